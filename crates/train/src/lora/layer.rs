//! The LoRA update of one projection, with its dropout, as the model calls it through
//! [`LinearAdapter`].

use candle_core::{DType, Result, Tensor};
use model::{LinearAdapter, LowRank};
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

    /// This step's dropout mask, or `None` when dropout is off.
    fn dropout(&self) -> Result<Option<ops::Dropout>> {
        match self.mask_seed.load(Ordering::Relaxed) {
            seed if seed != NO_DROPOUT && self.dropout > 0.0 => {
                ops::Dropout::new(self.dropout, seed).map(Some)
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
            ops::splitmix64(s ^ ops::splitmix64(self.id, 0), 0).min(NO_DROPOUT - 1)
        });
        self.mask_seed.store(mixed, Ordering::Relaxed);
    }

    /// The update `scale * dropout(x) @ A^T @ B^T`, computed in `dtype`.
    fn update(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let x = match self.dropout()? {
            Some(dropout) => dropout.forward(x)?,
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
        let dropout = self.dropout()?;
        debug_assert_eq!(
            x.dtype(),
            dtype,
            "the projection's input arrives in its dtype"
        );
        ops::lora_linear(x, weight, &self.a, &self.b, self.scale, dropout)
    }

    /// The factors, scale and this step's dropout mask.
    fn low_rank(&self) -> Result<Option<LowRank<'_>>> {
        Ok(Some(LowRank {
            a: &self.a,
            b: &self.b,
            scale: self.scale,
            dropout: self.dropout()?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn each_layer_draws_its_own_mask_and_the_same_one_again() {
        let zeros = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &Device::Cpu);
        let layer =
            |id| LoraLayer::new(zeros((4, 8)).unwrap(), zeros((6, 4)).unwrap(), 1.0, 0.1, id);
        let (first, second) = (layer(0), layer(1));
        first.set_dropout_seed(Some(7));
        second.set_dropout_seed(Some(7));
        let drawn = first.dropout().unwrap().expect("dropout is on");
        assert_ne!(Some(drawn), second.dropout().unwrap());
        first.set_dropout_seed(Some(8));
        assert_ne!(Some(drawn), first.dropout().unwrap());
        first.set_dropout_seed(Some(7));
        assert_eq!(
            Some(drawn),
            first.dropout().unwrap(),
            "a recomputed forward's mask"
        );
        first.set_dropout_seed(None);
        assert_eq!(first.dropout().unwrap(), None);
    }

    #[test]
    fn the_low_rank_update_carries_this_steps_mask() {
        let zeros = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &Device::Cpu);
        let (a, b) = (zeros((4, 8)).unwrap(), zeros((6, 4)).unwrap());
        let with_dropout = LoraLayer::new(a.clone(), b.clone(), 2.0, 0.1, 0);
        let low_rank = with_dropout.low_rank().unwrap().expect("always offered");
        assert_eq!(
            (
                low_rank.a.id(),
                low_rank.b.id(),
                low_rank.scale,
                low_rank.dropout
            ),
            (a.id(), b.id(), 2.0, None),
            "dropout starts off"
        );
        with_dropout.set_dropout_seed(Some(7));
        let drawn = with_dropout.low_rank().unwrap().unwrap().dropout;
        assert_eq!(drawn, with_dropout.dropout().unwrap());
        assert!(drawn.is_some());
        // Dropout 0 draws no mask whatever the seed.
        let without = LoraLayer::new(a, b, 2.0, 0.0, 1);
        without.set_dropout_seed(Some(7));
        assert_eq!(without.low_rank().unwrap().unwrap().dropout, None);
    }
}
