//! The LoRA update of one projection, with its dropout, as the model calls it through
//! [`LinearAdapter`].

use candle_core::{DType, Device, Result, Tensor};
use model::{LinearAdapter, LowRank};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The low-rank update of one projection: `y += scale * dropout(x) @ A^T @ B^T`.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// Probability of zeroing an input feature during training.
    pub dropout: f64,
    /// Distinguishes this layer's dropout mask from the others' in the same step.
    id: u64,
    /// The seed of this layer's mask for this step, or [`NO_DROPOUT`] (evaluation). Shared
    /// and atomic so the trainer can switch it through a shared reference to the model.
    mask_seed: Arc<AtomicU64>,
}

/// `mask_seed` value meaning dropout is off.
const NO_DROPOUT: u64 = u64::MAX;

impl LoraLayer {
    /// A layer with dropout off until [`LinearAdapter::set_dropout_seed`] turns it on.
    pub fn new(a: Tensor, b: Tensor, scale: f64, dropout: f64, id: u64) -> Self {
        Self {
            a,
            b,
            scale,
            dropout,
            id,
            mask_seed: Arc::new(AtomicU64::new(NO_DROPOUT)),
        }
    }

    /// This step's dropout mask for `x` (in `x`'s dtype), or `None` when dropout is off.
    fn mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match self.mask_seed.load(Ordering::Relaxed) {
            seed if seed != NO_DROPOUT && self.dropout > 0.0 => {
                let mask = dropout_mask(x.dims(), self.dropout, seed, x.device())?;
                Ok(Some(mask.to_dtype(x.dtype())?))
            }
            _ => Ok(None),
        }
    }
}

impl LinearAdapter for LoraLayer {
    /// Turns dropout on with masks drawn from `seed` (mixed with this layer's id), or off.
    /// The same seed gives the same mask, so a recomputed forward (checkpointing) matches.
    fn set_dropout_seed(&self, seed: Option<u64>) {
        let mixed = seed.map_or(NO_DROPOUT, |s| {
            splitmix64(s ^ splitmix64(self.id)).min(NO_DROPOUT - 1)
        });
        self.mask_seed.store(mixed, Ordering::Relaxed);
    }

    /// The update `scale * dropout(x) @ A^T @ B^T`, computed in `dtype`.
    fn update(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let x = match self.mask(x)? {
            Some(mask) => x.mul(&mask)?,
            None => x.clone(),
        };
        let a = ops::cast(&self.a, dtype)?;
        let b = ops::cast(&self.b, dtype)?;
        // Scaling the small B rather than the output keeps one activation-sized tensor less.
        ops::linear(&ops::linear(&x, &a)?, &(b * self.scale)?)
    }

    /// `x @ weight.t()` for a frozen `weight` plus this update, as one graph node
    /// ([`ops::lora_linear`], which casts the factors to `x`'s dtype and hands them their
    /// gradients in theirs), computed in `dtype`.
    fn forward_with_frozen(
        &self,
        x: &Tensor,
        weight: &ops::LinearWeight,
        dtype: DType,
    ) -> Result<Tensor> {
        let mask = self.mask(x)?;
        debug_assert_eq!(
            x.dtype(),
            dtype,
            "the projection's input arrives in its dtype"
        );
        ops::lora_linear(x, weight, &self.a, &self.b, self.scale, mask.as_ref())
    }

    /// The factors and scale while dropout is off (or zero): the update is then the plain
    /// low-rank product.
    fn low_rank(&self) -> Option<LowRank<'_>> {
        let off = self.mask_seed.load(Ordering::Relaxed) == NO_DROPOUT || self.dropout <= 0.0;
        off.then_some(LowRank {
            a: &self.a,
            b: &self.b,
            scale: self.scale,
        })
    }
}

/// An inverted-dropout mask of `shape`: 0 with probability `p`, else `1 / (1 - p)`, the same
/// for the same seed. On the CPU it is drawn from a seeded host generator; on a GPU from the
/// device generator reseeded with `seed` (drawing activation-sized masks on the host and
/// copying them over would cost more than the step itself). Masks differ between backends.
fn dropout_mask(shape: &[usize], p: f64, seed: u64, device: &Device) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    if !device.is_cpu() {
        device.set_seed(seed)?;
        let uniform = Tensor::rand(0f32, 1f32, shape, device)?;
        return uniform.ge(p)?.to_dtype(DType::F32)? * keep;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random::<f64>() < p {
                0.0
            } else {
                keep as f32
            }
        })
        .collect();
    Tensor::from_vec(values, shape, device)
}

/// A 64-bit mixing function (SplitMix64's finaliser).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_mask_drops_about_p_and_keeps_the_mean() {
        let mask = dropout_mask(&[100, 100], 0.25, 9, &Device::Cpu).unwrap();
        let values = mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dropped = values.iter().filter(|v| **v == 0.0).count() as f64 / 1e4;
        let mean = values.iter().map(|v| *v as f64).sum::<f64>() / 1e4;
        assert!((dropped - 0.25).abs() < 0.02, "dropped {dropped}");
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        let again = dropout_mask(&[100, 100], 0.25, 9, &Device::Cpu).unwrap();
        assert_eq!(
            values,
            again.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn the_update_is_a_plain_low_rank_product_only_while_no_mask_is_drawn() {
        let zeros = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &Device::Cpu);
        let (a, b) = (zeros((4, 8)).unwrap(), zeros((6, 4)).unwrap());
        let with_dropout = LoraLayer::new(a.clone(), b.clone(), 2.0, 0.1, 0);
        let low_rank = with_dropout.low_rank().expect("dropout starts off");
        assert_eq!(
            (low_rank.a.id(), low_rank.b.id(), low_rank.scale),
            (a.id(), b.id(), 2.0)
        );
        with_dropout.set_dropout_seed(Some(7));
        assert!(with_dropout.low_rank().is_none(), "masks are drawn");
        with_dropout.set_dropout_seed(None);
        assert!(with_dropout.low_rank().is_some());
        // Dropout 0 draws no mask whatever the seed.
        let without = LoraLayer::new(a, b, 2.0, 0.0, 1);
        without.set_dropout_seed(Some(7));
        assert!(without.low_rank().is_some());
    }
}
