//! Inverted dropout whose mask is a function of a seed and each element's index: LoRA's
//! dropout of a projection's input.
//!
//! A mask drawn from a generator has to be kept from the forward pass to the backward pass
//! (an activation-sized tensor per adapted projection), and on CUDA reseeding candle's
//! generator for each mask cost more than the step's products. Here each element of a tensor
//! (in its logical, row-major order) has 16 bits of one of SplitMix64's outputs for the seed,
//! and is kept when they are at least `p · 2¹⁶`, so the same mask is drawn again wherever it is
//! needed by one elementwise pass, with the same bits on the CPU and CUDA
//! (`kernels/elementwise.cu`, `dropout_vec`). One output gives four elements their bits: in
//! each run of 16 elements, output `j` (0–3) holds elements `2j`, `2j + 1` (its low 32 bits)
//! and `2j + 8`, `2j + 9` (its high 32), the elements one thread holds in a tensor-core
//! fragment (`kernels/lora.cu`), so a kernel draws once for four elements (`draw_of`).
//! Metal, which has no such kernel, draws its masks with its own generator reseeded with the
//! mask's seed: the same mask again for the same seed, other bits than the CPU's.

use super::add::aligned;
use super::attach::attach;
use super::cpu_kernel::{slice, ELEMENTWISE_CHUNK};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use super::gemv::Element;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Result, Tensor, WithDType};
use rayon::prelude::*;

/// One dropout mask: zero with probability `p` (`p` rounded to a multiple of 2⁻¹⁶), else
/// `1 / (1 − p)` of that rounded `p`, so the mask's mean is 1; the same for the same seed and
/// shape on every device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    seed: u64,
    /// `p · 2¹⁶`, rounded: an element whose 16 bits are below it is dropped.
    threshold: u32,
    /// `1 / (1 − threshold / 2¹⁶)`.
    keep_scale: f64,
}

impl Dropout {
    /// The mask of probability `p` (from 0 up to 1, 1 excluded; applied in steps of 2⁻¹⁶)
    /// drawn from `seed`.
    pub fn new(p: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability {p} is not in [0, 1)");
        }
        let threshold = (p * DRAW_RANGE).round().min(DRAW_RANGE - 1.0) as u32;
        Ok(Self {
            seed,
            threshold,
            keep_scale: 1.0 / (1.0 - threshold as f64 / DRAW_RANGE),
        })
    }

    /// Whether element `index` (row-major) is kept.
    pub fn keeps(&self, index: usize) -> bool {
        let (draw, quarter) = draw_of(index);
        self.kept(splitmix64(self.seed, draw), quarter)
    }

    /// Whether the element whose bits are 16-bit `quarter` of `bits` is kept.
    fn kept(&self, bits: u64, quarter: usize) -> bool {
        (bits >> (16 * quarter)) as u16 as u32 >= self.threshold
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

    /// The mask where no kernel applies: [`Self::mask`], except on Metal, whose generator,
    /// reseeded with the mask's seed, draws its own mask on the GPU (a host mask copied over
    /// for every projection, forward and backward, would cost more than the products).
    fn device_mask(&self, shape: &[usize], device: &Device) -> Result<Tensor> {
        if !device.is_metal() {
            return self.mask(shape, device);
        }
        device.set_seed(self.seed)?;
        let p = self.threshold as f64 / DRAW_RANGE;
        let uniform = Tensor::rand(0f32, 1f32, shape, device)?;
        uniform.ge(p)?.to_dtype(DType::F32)? * self.keep_scale
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
        let kernel = match x.device() {
            Device::Cpu => operands.iter().all(|t| {
                t.dtype() == x.dtype() && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
            }),
            _ => super::fused(&operands) && operands.iter().all(|t| aligned(t)),
        };
        if kernel {
            return match &base {
                None => x.apply_op1_no_bwd(&op),
                Some(base) => x.apply_op2_no_bwd(base, &op),
            };
        }
        let mask = self
            .device_mask(x.dims(), x.device())?
            .to_dtype(x.dtype())?;
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

/// What the CUDA kernels that draw masks themselves take (`masked_lora.rs`).
#[cfg(feature = "cuda")]
impl Dropout {
    /// The seed the mask is drawn from.
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    /// `p · 2¹⁶`, rounded: an element whose 16 bits are below it is dropped.
    pub(crate) fn threshold(&self) -> u32 {
        self.threshold
    }

    /// `1 / (1 − threshold / 2¹⁶)`, the kept elements' factor.
    pub(crate) fn keep_scale(&self) -> f64 {
        self.keep_scale
    }

    /// Whether `other` drops with the same probability (whatever its seed).
    pub(crate) fn same_probability(&self, other: &Self) -> bool {
        self.threshold == other.threshold && self.keep_scale == other.keep_scale
    }
}

/// The values an element's 16 bits take.
const DRAW_RANGE: f64 = 65536.0;

/// Which SplitMix64 output holds element `index`'s bits, and which 16-bit quarter of it: in
/// each run of 16 elements, output `j` holds elements `2j`, `2j + 1` (quarters 0, 1) and
/// `2j + 8`, `2j + 9` (quarters 2, 3).
fn draw_of(index: usize) -> (u64, usize) {
    let within = index % 16;
    (
        (index / 16 * 4 + within / 2 % 4) as u64,
        within / 8 * 2 + within % 2,
    )
}

/// Output number `index` of SplitMix64 seeded with `seed` (a 64-bit mix of both).
pub fn splitmix64(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `base + scale · mask · x` (`base` the second operand when there is one), `scale` already
/// holding `1 / (1 − p)`.
struct Masked {
    dropout: Dropout,
    scale: f32,
}

impl Masked {
    /// The CPU kernel over a contiguous `x` (and `base`) of a float dtype, in f32.
    fn cpu_kernel(&self, x: CpuOperand, base: Option<CpuOperand>) -> CpuOutput {
        let shape = x.1.shape().clone();
        let storage = match x.0 {
            CpuStorage::F32(_) => CpuStorage::F32(self.values::<f32>(x, base)?),
            CpuStorage::BF16(_) => CpuStorage::BF16(self.values::<half::bf16>(x, base)?),
            CpuStorage::F16(_) => CpuStorage::F16(self.values::<half::f16>(x, base)?),
            other => candle_core::bail!("dropout: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, shape))
    }

    /// `base + scale · mask · x` element by element, in parallel.
    fn values<E: Element + WithDType>(
        &self,
        (x, x_layout): CpuOperand,
        base: Option<CpuOperand>,
    ) -> Result<Vec<E>> {
        let x = slice(x.as_slice::<E>()?, x_layout)?;
        let base = base
            .map(|(b, layout)| slice(b.as_slice::<E>()?, layout))
            .transpose()?;
        if base.is_some_and(|b| b.len() != x.len()) {
            candle_core::bail!("dropout: base and input sizes differ");
        }
        // A run of 16 elements (16-aligned in the tensor) takes four draws.
        let runs = x.len().div_ceil(16);
        let values = (0..runs)
            .into_par_iter()
            .with_min_len(ELEMENTWISE_CHUNK / 16)
            .flat_map_iter(|run| {
                let draws: [u64; 4] =
                    std::array::from_fn(|j| splitmix64(self.dropout.seed, (run * 4 + j) as u64));
                let first = run * 16;
                (first..x.len().min(first + 16)).map(move |i| {
                    let (draw, quarter) = draw_of(i);
                    let kept = match self.dropout.kept(draws[draw as usize % 4], quarter) {
                        true => x[i].f32() * self.scale,
                        false => 0.0,
                    };
                    E::from_f32(base.map_or(kept, |b| b[i].f32() + kept))
                })
            })
            .collect();
        Ok(values)
    }
}

impl FusedOp<1> for Masked {
    const NAME: &'static str = "dropout";

    fn cpu(&self, [x]: [CpuOperand; 1]) -> CpuOutput {
        self.cpu_kernel(x, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x]: [Operand; 1]) -> CudaOutput {
        Ok((cuda::masked(self, x, None)?, x.1.shape().clone()))
    }
}

impl FusedOp<2> for Masked {
    const NAME: &'static str = "dropout-add";

    fn cpu(&self, [x, base]: [CpuOperand; 2]) -> CpuOutput {
        self.cpu_kernel(x, Some(base))
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

    /// The values of the mask of `p` and `seed` for 100 × 100 elements, on the host.
    fn mask_values(p: f64, seed: u64) -> Vec<f32> {
        let mask = Dropout::new(p, seed)
            .unwrap()
            .mask(&[100, 100], &Device::Cpu);
        mask.unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn drops_about_p_and_keeps_the_mean() {
        let values = mask_values(0.25, 9);
        let dropped = values.iter().filter(|&&v| v == 0.0).count() as f64 / 1e4;
        assert!((dropped - 0.25).abs() < 0.02, "dropped {dropped}");
        let mean = values.iter().sum::<f32>() / 1e4;
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        let kept = |v: &f32| *v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6;
        assert!(values.iter().all(kept));
        assert_eq!(mask_values(0.25, 9), values, "the same seed, the same mask");
        assert_ne!(mask_values(0.25, 10), values);
    }

    #[test]
    fn kept_values_are_scaled_for_the_probability_the_mask_drops_at() {
        // 0.05 is drawn as 3,277 / 65,536: the kept values' scale is that probability's, so the
        // mask's expectation is 1 exactly.
        let d = Dropout::new(0.05, 1).unwrap();
        assert_eq!(d.threshold, 3_277);
        assert_eq!(d.keep_scale, 65_536.0 / 62_259.0);
        assert_eq!(d.keep_scale * (1.0 - 3_277.0 / 65_536.0), 1.0);
    }

    #[test]
    fn neighbouring_elements_are_independent() {
        // Four quarters of one 64-bit draw are used: elements sharing a draw, and neighbours
        // that do not, must not be dropped together.
        let d = Dropout::new(0.5, 3).unwrap();
        let n = 20_000;
        for offset in [1, 2, 8, 9] {
            let both = (0..n)
                .filter(|i| !d.keeps(16 * i) && !d.keeps(16 * i + offset))
                .count();
            let fraction = both as f64 / n as f64;
            assert!(
                (fraction - 0.25).abs() < 0.02,
                "+{offset}: both dropped {fraction}"
            );
        }
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
        // bf16 on the CPU: the kernel computes in f32 and rounds once.
        let half = x.to_dtype(DType::BF16).unwrap();
        let got = d.apply(&half).unwrap().to_dtype(DType::F32).unwrap();
        let want = (half.to_dtype(DType::F32).unwrap() * &mask).unwrap();
        let want = want
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(relative_error(&got, &want), 0.0);
        // f64 has no kernel: the mask tensor.
        let wide = x.to_dtype(DType::F64).unwrap();
        let want = (&wide * mask.to_dtype(DType::F64).unwrap()).unwrap();
        assert_eq!(relative_error(&d.apply(&wide).unwrap(), &want), 0.0);
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
    fn each_draw_serves_four_elements_of_a_run_of_16() {
        let mut seen = std::collections::HashMap::new();
        for index in 0..64 {
            let (draw, quarter) = draw_of(index);
            assert!(quarter < 4);
            assert!(
                seen.insert((draw, quarter), index).is_none(),
                "{index} shares bits"
            );
        }
        assert_eq!(seen.len(), 64, "64 elements take 16 draws' 64 quarters");
        assert_eq!(draw_of(16 + 3), (4 + 1, 1));
        assert_eq!(draw_of(16 + 11), (4 + 1, 3));
        let d = Dropout::new(0.5, 11).unwrap();
        let bits = splitmix64(11, 5);
        let kept = |quarter: usize| (bits >> (16 * quarter)) as u16 >= 32768;
        assert_eq!(d.keeps(16 + 2), kept(0));
        assert_eq!(d.keeps(16 + 3), kept(1));
        assert_eq!(d.keeps(16 + 10), kept(2));
        assert_eq!(d.keeps(16 + 11), kept(3));
    }

    #[test]
    fn probabilities_outside_zero_to_one_are_refused() {
        assert!(Dropout::new(1.0, 0).is_err());
        assert!(Dropout::new(-0.1, 0).is_err());
        let none = Dropout::new(0.0, 1).unwrap();
        assert!((0..1000).all(|i| none.keeps(i)));
    }
}
