//! LoRA's products that read a dropped input, the dropout masks drawn inside the products.
//!
//! With dropout, each adapted part multiplies its own masked copy of the projection's input:
//! forward `(mask_p ⊙ x) @ a_pᵀ`, and for the factor's gradient `g_pᵀ @ (mask_p ⊙ x)`. Done as
//! separate ops, each part writes an activation-sized masked copy and reads it back (three
//! passes over an activation a part, where the products themselves are rank-sized), and the
//! masks, drawn by a compute-bound hash, cost more than the products. On CUDA each of the two is
//! one tensor-core kernel for all the parts of a projection (`kernels/lora.cu`) that draws each
//! element's bit as it reads the input ([`Dropout`]'s bits, the same as the host's), so the
//! input is read once and nothing activation-sized is written. Elsewhere (the CPU, Metal, f32,
//! shapes the kernels do not take) the separate ops compute the same values.

#[cfg(feature = "cuda")]
use super::fused_op::{custom_op, CpuOperand, CpuOutput, CudaOutput, FusedOp, Operand};
use super::master_linear::scaled_weight_grad;
use super::Dropout;
use candle_core::{DType, Result, Tensor};

/// Each part of a stacked LoRA projection: its rank and its dropout mask, in order (a part's
/// columns of the bottleneck and rows of the stacked `a` follow the ones before it).
pub(crate) type MaskedParts<'a> = &'a [(usize, Dropout)];

/// `(mask_p ⊙ x) @ a_pᵀ` for each part, side by side: `[n, Σ r_p]` in `x`'s dtype for the
/// input rows `x` `[n, in]` and the stacked factors `a` `[Σ r_p, in]` (`x`'s dtype).
pub(crate) fn masked_bottleneck(x: &Tensor, a: &Tensor, parts: MaskedParts) -> Result<Tensor> {
    let (_, width) = x.dims2()?;
    check_dims(
        "masked_bottleneck",
        parts,
        [(a, (total_rank(parts), width))],
    )?;
    #[cfg(feature = "cuda")]
    if let Some(kernel) = Kernel::fitting(&[x, a], width, parts)? {
        let f32_sums = x.apply_op2_no_bwd(a, &Bottleneck(kernel))?;
        return super::cast(&f32_sums, x.dtype());
    }
    let mut row = 0;
    let mut products = Vec::with_capacity(parts.len());
    for &(rank, dropout) in parts {
        products.push(super::linear(&dropout.apply(x)?, &a.narrow(0, row, rank)?)?);
        row += rank;
    }
    Tensor::cat(&products, 1)
}

/// The stacked factors' gradient `[Σ r_p, in]` in `dtype`: each part's `scale · g_pᵀ @ (mask_p
/// ⊙ x)` for the gradient at the bottleneck `g` `[n, Σ r_p]` and the input rows `x` `[n, in]`.
pub(crate) fn masked_factor_grad(
    g: &Tensor,
    x: &Tensor,
    parts: MaskedParts,
    dtype: DType,
    scale: f64,
) -> Result<Tensor> {
    let (n, width) = x.dims2()?;
    check_dims(
        "masked_factor_grad",
        parts,
        [(g, (n, total_rank(parts))), (x, (n, width))],
    )?;
    #[cfg(feature = "cuda")]
    if let Some(mut kernel) = Kernel::fitting(&[g, x], width, parts)? {
        kernel.scale *= scale as f32;
        let f32_grad = g.apply_op2_no_bwd(x, &FactorGrad(kernel))?;
        return super::cast(&f32_grad, dtype);
    }
    let mut row = 0;
    let mut grads = Vec::with_capacity(parts.len());
    for &(rank, dropout) in parts {
        let g_part = g.narrow(1, row, rank)?.contiguous()?;
        grads.push(scaled_weight_grad(
            &g_part,
            &dropout.apply(x)?,
            dtype,
            scale,
        )?);
        row += rank;
    }
    Tensor::cat(&grads, 0)
}

/// The parts' summed rank.
fn total_rank(parts: MaskedParts) -> usize {
    parts.iter().map(|(rank, _)| rank).sum()
}

/// An error naming `op` unless each tensor has its expected `[rows, cols]`.
fn check_dims<const N: usize>(
    op: &str,
    parts: MaskedParts,
    expected: [(&Tensor, (usize, usize)); N],
) -> Result<()> {
    for (tensor, dims) in expected {
        if tensor.dims2()? != dims {
            candle_core::bail!(
                "{op}: {:?} where {dims:?} was expected for ranks {:?}",
                tensor.shape(),
                parts.iter().map(|(rank, _)| rank).collect::<Vec<_>>()
            );
        }
    }
    Ok(())
}

/// The parameters every kernel of `kernels/lora.cu` takes: each part's rank and seed, the
/// parts' shared threshold, and the scale (`1 / (1 − p)` times the caller's).
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
struct Kernel {
    ranks: Vec<usize>,
    seeds: Vec<u64>,
    threshold: u32,
    scale: f32,
}

#[cfg(feature = "cuda")]
impl Kernel {
    /// The most parts one launch takes (`LORA_PARTS`).
    const PARTS: usize = 4;
    /// The largest summed rank: the kernels hold the ranks as one 64-wide tile.
    const RANK: usize = 64;
    /// The kernels' tiles: 64 rows or columns a block.
    const TILE: usize = 64;

    /// The parameters where the kernels take `operands` whose activation is `width` wide,
    /// and `parts`: 16-bit CUDA operands of one dtype from 16-byte boundaries, whole 64-wide
    /// column tiles, ranks multiples of 8, at most [`Self::PARTS`] parts of one dropout
    /// probability and [`Self::RANK`] summed rank.
    fn fitting(operands: &[&Tensor], width: usize, parts: MaskedParts) -> Result<Option<Self>> {
        let (Some(first), Some((_, dropout))) = (operands.first(), parts.first()) else {
            return Ok(None);
        };
        let fits = first.device().is_cuda()
            && super::fused(operands)
            && matches!(first.dtype(), DType::BF16 | DType::F16)
            && width % Self::TILE == 0
            && parts.iter().all(|(rank, _)| rank % 8 == 0)
            && parts.len() <= Self::PARTS
            && total_rank(parts) <= Self::RANK
            && parts.iter().all(|(_, d)| d.same_probability(dropout))
            && operands.iter().all(|t| super::add::aligned(t));
        Ok(fits.then(|| Self {
            ranks: parts.iter().map(|(r, _)| *r).collect(),
            seeds: parts.iter().map(|(_, d)| d.seed()).collect(),
            threshold: dropout.threshold(),
            scale: dropout.keep_scale() as f32,
        }))
    }
}

/// [`masked_bottleneck`]'s kernel: f32 sums `[n, Σ r_p]` of operands `x`, `a`.
#[cfg(feature = "cuda")]
struct Bottleneck(Kernel);

/// [`masked_factor_grad`]'s kernel: f32 sums `[Σ r_p, in]` of operands `g`, `x`.
#[cfg(feature = "cuda")]
struct FactorGrad(Kernel);

#[cfg(feature = "cuda")]
impl FusedOp<2> for Bottleneck {
    const NAME: &'static str = "masked-lora-bottleneck";

    fn cpu(&self, _: [CpuOperand; 2]) -> CpuOutput {
        candle_core::bail!("masked_bottleneck: the fused kernel is CUDA only")
    }

    fn cuda(&self, [x, a]: [Operand; 2]) -> CudaOutput {
        let (rows, _) = x.1.shape().dims2()?;
        let total = self.0.ranks.iter().sum::<usize>();
        let out = cuda::reduced(&self.0, cuda::Reduced::Bottleneck, [x, a], (rows, total))?;
        Ok((out, (rows, total).into()))
    }
}

#[cfg(feature = "cuda")]
impl FusedOp<2> for FactorGrad {
    const NAME: &'static str = "masked-lora-factor-grad";

    fn cpu(&self, _: [CpuOperand; 2]) -> CpuOutput {
        candle_core::bail!("masked_factor_grad: the fused kernel is CUDA only")
    }

    fn cuda(&self, [g, x]: [Operand; 2]) -> CudaOutput {
        let (_, cols) = x.1.shape().dims2()?;
        let total = self.0.ranks.iter().sum::<usize>();
        let out = cuda::reduced(&self.0, cuda::Reduced::FactorGrad, [g, x], (total, cols))?;
        Ok((out, (total, cols).into()))
    }
}

#[cfg(feature = "cuda")]
custom_op!(Bottleneck: 2);
#[cfg(feature = "cuda")]
custom_op!(FactorGrad: 2);

/// The CUDA launchers (`kernels/lora.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use super::Kernel;
    use crate::launch::{self, address, base_address, common_dtype, int, int_u32, Arg};
    use crate::launch::{start_aligned, zeros_f32, Operand};
    use candle_core::{CudaStorage, Result};

    /// Blocks a launch aims for: enough for four on each of an H100's or H200's 132
    /// multiprocessors, so the reduced dimension is split until the grid has as many.
    const BLOCKS: usize = 4 * 132;

    /// The parts' arguments every kernel takes after its operands and sizes: the count,
    /// four seeds, four ranks (unused parts' 0), the threshold and the scale.
    fn part_args(kernel: &Kernel) -> Result<Vec<Arg>> {
        let mut args = vec![int(kernel.ranks.len())?];
        for part in 0..Kernel::PARTS {
            args.push(Arg::Count(kernel.seeds.get(part).copied().unwrap_or(0)));
        }
        for part in 0..Kernel::PARTS {
            args.push(int(kernel.ranks.get(part).copied().unwrap_or(0))?);
        }
        args.push(Arg::Count(kernel.threshold as u64));
        args.push(Arg::Float(kernel.scale));
        Ok(args)
    }

    /// The tensor-core kernels, by the dimension of the input `x` `[rows, cols]` they reduce.
    #[derive(Clone, Copy)]
    pub(super) enum Reduced {
        /// `masked_lora_bottleneck` over `[x, a]`: the columns.
        Bottleneck,
        /// `masked_lora_factor_grad` over `[g, x]`: the rows.
        FactorGrad,
    }

    /// A tensor-core kernel over its operands into f32 sums of `out_dims`, zeroed first: a
    /// block a 64-wide tile of the kept dimension and a slice of the reduced one, split
    /// until the grid has [`BLOCKS`] blocks.
    pub(super) fn reduced(
        kernel: &Kernel,
        which: Reduced,
        operands: [Operand; 2],
        out_dims: (usize, usize),
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&operands)?;
        if !start_aligned(&operands)? {
            candle_core::bail!("masked LoRA products: operands must start on a 16-byte boundary");
        }
        let (name, x) = match which {
            Reduced::Bottleneck => ("masked_lora_bottleneck", operands[0]),
            Reduced::FactorGrad => ("masked_lora_factor_grad", operands[1]),
        };
        let (rows, cols) = x.1.shape().dims2()?;
        let (kept, reduced) = match which {
            Reduced::Bottleneck => (rows, cols),
            Reduced::FactorGrad => (cols, rows),
        };
        let tiles = kept.div_ceil(Kernel::TILE);
        let slices = BLOCKS
            .div_ceil(tiles)
            .clamp(1, reduced.div_ceil(Kernel::TILE));
        let per_slice = reduced.div_ceil(slices).div_ceil(Kernel::TILE) * Kernel::TILE;
        let out = zeros_f32(&x.0.device, out_dims.0 * out_dims.1)?;
        let mut args = vec![
            Arg::Address(address(operands[0])?),
            Arg::Address(address(operands[1])?),
            Arg::Address(base_address(&out)?),
            int(rows)?,
            int(cols)?,
        ];
        args.extend(part_args(kernel)?);
        args.push(int(per_slice)?);
        let grid = (int_u32(tiles)?, int_u32(reduced.div_ceil(per_slice))?);
        launch::launch(&out.device, name, Some(dtype), grid, (128, 1), &args)?;
        Ok(out)
    }
}
