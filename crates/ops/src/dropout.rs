//! Inverted dropout whose mask is a function of a seed and each element's index: LoRA's
//! dropout of a projection's input.
//!
//! A mask drawn from a generator has to be kept from the forward pass to the backward pass
//! (an activation-sized tensor per adapted projection), and on CUDA reseeding candle's
//! generator for each mask cost more than the step's products. Here element `i` of a tensor
//! (in its logical, row-major order) is kept when its 32-bit half of SplitMix64's output
//! number `i / 2` for the seed is at least `p · 2³²`, so the same mask is drawn again wherever
//! it is needed, on any device, by one elementwise pass (`kernels/elementwise.cu`,
//! `dropout_vec`; the host computes the same bits).

use super::attach::attach;
use super::cpu_kernel::{f32s, output, written_rows, ELEMENTWISE_CHUNK};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

/// One dropout mask: zero with probability `p`, else `1 / (1 − p)`, the same for the same seed
/// and shape on every device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    seed: u64,
    /// `p · 2³²`: an element whose 32 bits are below it is dropped.
    threshold: u32,
    /// `1 / (1 − p)`.
    keep_scale: f64,
}

impl Dropout {
    /// The mask of probability `p` (from 0 up to 1, 1 excluded) drawn from `seed`.
    pub fn new(p: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability {p} is not in [0, 1)");
        }
        Ok(Self {
            seed,
            threshold: (p * 2f64.powi(32)).round().min(u32::MAX as f64) as u32,
            keep_scale: 1.0 / (1.0 - p),
        })
    }

    /// Whether element `index` (row-major) is kept.
    pub fn keeps(&self, index: usize) -> bool {
        let bits = splitmix64_output(self.seed, (index / 2) as u64);
        let half = match index % 2 {
            0 => bits as u32,
            _ => (bits >> 32) as u32,
        };
        half >= self.threshold
    }

    /// The mask for `shape` on `device`, as f32 values 0 and `1 / (1 − p)`: the reference the
    /// kernels are checked against, and where they do not apply, what `x` is multiplied by.
    pub fn mask(&self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let keep = self.keep_scale as f32;
        let values: Vec<f32> = (0..n)
            .into_par_iter()
            .with_min_len(ELEMENTWISE_CHUNK)
            .map(|i| if self.keeps(i) { keep } else { 0.0 })
            .collect();
        Tensor::from_vec(values, shape, device)
    }

    /// `x` with the dropped elements zeroed and the kept ones scaled by `1 / (1 − p)`, in
    /// `x`'s dtype. No backward ([`Self::forward`] has one).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.masked(x, None, 1.0)
    }

    /// `base + factor · apply(x)` for `base` of `x`'s shape and dtype, in one pass where the
    /// fused kernels apply. No backward.
    pub fn add_applied(&self, base: &Tensor, x: &Tensor, factor: f64) -> Result<Tensor> {
        if base.shape() != x.shape() {
            candle_core::bail!(
                "dropout: base {:?} and input {:?} differ",
                base.shape(),
                x.shape()
            );
        }
        self.masked(x, Some(base), factor)
    }

    /// [`Self::apply`] with a backward: the gradient masked and scaled the same way.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.apply(x)?;
        if !x.track_op() {
            return Ok(y);
        }
        let dropout = *self;
        attach(x, &y, "dropout", move |grad| Ok(Some(dropout.apply(grad)?)))
    }

    /// `base + factor · apply(x)`, `base` optional: the fused op on contiguous operands of
    /// [`super::fused`]'s dtypes and devices, the mask as a tensor elsewhere.
    fn masked(&self, x: &Tensor, base: Option<&Tensor>, factor: f64) -> Result<Tensor> {
        let x = x.detach().contiguous()?;
        let base = base.map(|b| b.detach().contiguous()).transpose()?;
        let operands: Vec<&Tensor> = std::iter::once(&x).chain(base.as_ref()).collect();
        let op = Masked {
            dropout: *self,
            scale: (self.keep_scale * factor) as f32,
        };
        if super::fused(&operands) && operands.iter().all(|t| aligned(t)) {
            return match &base {
                None => x.apply_op1_no_bwd(&op),
                Some(base) => x.apply_op2_no_bwd(base, &op),
            };
        }
        let mask = self.mask(x.dims(), x.device())?.to_dtype(x.dtype())?;
        let kept = (x * mask)?;
        let kept = if factor == 1.0 {
            kept
        } else {
            (kept * factor)?
        };
        match base {
            None => Ok(kept),
            Some(base) => base + kept,
        }
    }
}

/// Output number `index` of SplitMix64 seeded with `seed`.
fn splitmix64_output(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn aligned(t: &Tensor) -> bool {
    (t.layout().start_offset() * t.dtype().size_in_bytes()) % 16 == 0
}

/// `base + scale · mask · x` (`base` the second operand when there is one), `scale` already
/// holding `1 / (1 − p)`.
struct Masked {
    dropout: Dropout,
    scale: f32,
}

impl Masked {
    /// The CPU kernel over f32 values.
    fn cpu_values(&self, x: &[f32], base: Option<&[f32]>) -> Vec<f32> {
        // SAFETY: every element of each chunk is written.
        unsafe {
            written_rows(x.len(), ELEMENTWISE_CHUNK, |chunk, out| {
                let start = chunk * ELEMENTWISE_CHUNK;
                for (j, o) in out.iter_mut().enumerate() {
                    let i = start + j;
                    let kept = match self.dropout.keeps(i) {
                        true => x[i] * self.scale,
                        false => 0.0,
                    };
                    o.write(base.map_or(kept, |b| b[i] + kept));
                }
            })
        }
    }
}

impl FusedOp<1> for Masked {
    const NAME: &'static str = "dropout";

    fn cpu(&self, [(x, layout)]: [CpuOperand; 1]) -> CpuOutput {
        let values = self.cpu_values(f32s(x, layout)?, None);
        Ok(output(values, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x]: [Operand; 1]) -> CudaOutput {
        Ok((cuda::masked(self, x, None)?, x.1.shape().clone()))
    }
}

impl FusedOp<2> for Masked {
    const NAME: &'static str = "dropout-add";

    fn cpu(&self, [(x, x_layout), (base, base_layout)]: [CpuOperand; 2]) -> CpuOutput {
        let (x, base) = (f32s(x, x_layout)?, f32s(base, base_layout)?);
        if x.len() != base.len() {
            candle_core::bail!("dropout: {} and {} elements", x.len(), base.len());
        }
        let values = self.cpu_values(x, Some(base));
        Ok(output(values, x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, base]: [Operand; 2]) -> CudaOutput {
        Ok((cuda::masked(self, x, Some(base))?, x.1.shape().clone()))
    }
}

custom_op!(Masked: 1);
custom_op!(Masked: 2);

/// The CUDA launcher (`kernels/elementwise.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use super::Masked;
    use crate::launch::{self, address, alloc, base_address, per_element, same_count, Arg};
    use crate::launch::{common_dtype, start_aligned, Operand};
    use candle_core::{CudaStorage, Result};

    /// `base + scale · mask · x` for contiguous operands of one dtype and size from 16-byte
    /// boundaries, 16 bytes a thread.
    pub(super) fn masked(op: &Masked, x: Operand, base: Option<Operand>) -> Result<CudaStorage> {
        let operands: Vec<Operand> = std::iter::once(x).chain(base).collect();
        let dtype = common_dtype(&operands)?;
        let n = match base {
            Some(base) => same_count(x, base)?,
            None => x.1.shape().elem_count(),
        };
        if !start_aligned(&operands)? {
            candle_core::bail!("dropout: operands must start on a 16-byte boundary");
        }
        let out = alloc(&x.0.device, dtype, n)?;
        let args = [
            Arg::Address(address(x)?),
            Arg::Address(base.map(address).transpose()?.unwrap_or(0)),
            Arg::Address(base_address(&out)?),
            Arg::Count(n as u64),
            Arg::Count(op.dropout.seed),
            Arg::Count(op.dropout.threshold as u64),
            Arg::Float(op.scale),
        ];
        let (grid, block) = per_element(n.div_ceil(16 / dtype.size_in_bytes()))?;
        launch::launch(&out.device, "dropout_vec", Some(dtype), grid, block, &args)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::{relative_error, uniform};
    use candle_core::DType;

    #[test]
    fn drops_about_p_and_keeps_the_mean() {
        let d = Dropout::new(0.25, 9).unwrap();
        let mask = d.mask(&[100, 100], &Device::Cpu).unwrap();
        let values = mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dropped = values.iter().filter(|&&v| v == 0.0).count() as f64 / 1e4;
        assert!((dropped - 0.25).abs() < 0.02, "dropped {dropped}");
        let mean = values.iter().sum::<f32>() / 1e4;
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        assert!(values
            .iter()
            .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let again = Dropout::new(0.25, 9)
            .unwrap()
            .mask(&[100, 100], &Device::Cpu);
        assert_eq!(
            again
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            values
        );
        let other = Dropout::new(0.25, 10)
            .unwrap()
            .mask(&[100, 100], &Device::Cpu);
        assert_ne!(
            other
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            values
        );
    }

    #[test]
    fn neighbouring_elements_are_independent() {
        // Both halves of one 64-bit draw are used: pairs must not be dropped together.
        let d = Dropout::new(0.5, 3).unwrap();
        let n = 20_000;
        let both = (0..n)
            .filter(|i| !d.keeps(2 * i) && !d.keeps(2 * i + 1))
            .count();
        let fraction = both as f64 / n as f64;
        assert!((fraction - 0.25).abs() < 0.02, "both dropped {fraction}");
    }

    #[test]
    fn the_fused_kernel_equals_the_mask_tensor() {
        let d = Dropout::new(0.1, 77).unwrap();
        // Odd sizes exercise the tail; a narrowed operand is not contiguous.
        let x = uniform(&[3, 70_001], 1);
        let base = uniform(&[3, 70_001], 2);
        let mask = d.mask(x.dims(), x.device()).unwrap();
        let want = (&x * &mask).unwrap();
        assert_eq!(relative_error(&d.apply(&x).unwrap(), &want), 0.0);
        let want_sum = (&base + (&want * 0.5).unwrap()).unwrap();
        let sum = d.add_applied(&base, &x, 0.5).unwrap();
        assert!(relative_error(&sum, &want_sum) < 1e-7);
        let strided = x.narrow(1, 1, 1000).unwrap();
        let want = strided.contiguous().unwrap() * d.mask(&[3, 1000], x.device()).unwrap();
        assert_eq!(
            relative_error(&d.apply(&strided).unwrap(), &want.unwrap()),
            0.0
        );
        // bf16 on the CPU takes the mask tensor.
        let half = x.to_dtype(DType::BF16).unwrap();
        let got = d.apply(&half).unwrap().to_dtype(DType::F32).unwrap();
        let want = (half.to_dtype(DType::F32).unwrap() * &mask).unwrap();
        assert!(relative_error(&got, &want) < 1e-2);
    }

    #[test]
    fn the_gradient_is_masked_the_same_way() {
        let d = Dropout::new(0.3, 5).unwrap();
        let x = candle_core::Var::from_tensor(&uniform(&[4, 33], 3)).unwrap();
        let y = d.forward(x.as_tensor()).unwrap();
        let weights = uniform(&[4, 33], 4);
        let loss = (y * &weights).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let got = grads.get(x.as_tensor()).unwrap();
        let want = (weights * d.mask(&[4, 33], &Device::Cpu).unwrap()).unwrap();
        assert_eq!(relative_error(got, &want), 0.0);
    }

    #[test]
    fn probabilities_outside_zero_to_one_are_refused() {
        assert!(Dropout::new(1.0, 0).is_err());
        assert!(Dropout::new(-0.1, 0).is_err());
        let none = Dropout::new(0.0, 1).unwrap();
        assert!((0..1000).all(|i| none.keeps(i)));
    }
}
