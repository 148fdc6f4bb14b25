//! LoRA's products with a dropped input, the dropout masks drawn inside the products.
//!
//! With dropout, each adapted part multiplies its own masked copy of the projection's input:
//! the forward product `(mask_p ⊙ x) @ a_pᵀ`, the factor's gradient `g_pᵀ @ (mask_p ⊙ x)` and
//! the input gradient's share `mask_p ⊙ (g_p @ a_p)`. Done as separate ops, each part writes an
//! activation-sized masked copy or share and reads it back (three or four passes over an
//! activation a part, where the products themselves are rank-sized), and the masks, drawn by a
//! compute-bound hash, cost more than the products. On CUDA each of the three is one
//! tensor-core kernel for all the parts of a projection (`kernels/lora.cu`) that draws each
//! element's bit where it reads or writes it ([`Dropout`]'s bits, the same as the host's), so
//! the input or the frozen product's gradient is read once and nothing activation-sized is
//! written but the input gradient itself. Elsewhere (the CPU, Metal, f32, shapes the kernels do
//! not take) the separate ops compute the same values.

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
        let product = Product::Bottleneck;
        let f32_sums = x.apply_op2_no_bwd(a, &MaskedProduct { kernel, product })?;
        return super::cast(&f32_sums, x.dtype());
    }
    let products = part_rows(parts)
        .map(|(row, rank, dropout)| super::linear(&dropout.apply(x)?, &a.narrow(0, row, rank)?))
        .collect::<Result<Vec<_>>>()?;
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
    let (n, _) = x.dims2()?;
    check_dims("masked_factor_grad", parts, [(g, (n, total_rank(parts)))])?;
    #[cfg(feature = "cuda")]
    if let Some(mut kernel) = Kernel::fitting(&[g, x], x.dim(1)?, parts)? {
        kernel.scale *= scale as f32;
        let product = Product::FactorGrad;
        let f32_grad = g.apply_op2_no_bwd(x, &MaskedProduct { kernel, product })?;
        return super::cast(&f32_grad, dtype);
    }
    let grads = part_rows(parts)
        .map(|(row, rank, dropout)| {
            let g_part = g.narrow(1, row, rank)?.contiguous()?;
            scaled_weight_grad(&g_part, &dropout.apply(x)?, dtype, scale)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&grads, 0)
}

/// `base + scale · Σ_p mask_p ⊙ (g_p @ a_p)` for the frozen product's gradient rows `base`
/// `[n, in]`, the gradient at the bottleneck `g` `[n, Σ r_p]` and the stacked factors `a`
/// `[Σ r_p, in]`, all of one dtype: the input's gradient.
pub(crate) fn add_masked_shares(
    base: &Tensor,
    g: &Tensor,
    a: &Tensor,
    parts: MaskedParts,
    scale: f64,
) -> Result<Tensor> {
    let (n, width) = base.dims2()?;
    let total = total_rank(parts);
    let dims = [(g, (n, total)), (a, (total, width))];
    check_dims("add_masked_shares", parts, dims)?;
    #[cfg(feature = "cuda")]
    if let Some(mut kernel) = Kernel::fitting(&[base, g, a], width, parts)? {
        kernel.scale *= scale as f32;
        return base.apply_op3_no_bwd(g, a, &MaskedShares(kernel));
    }
    let mut sum = base.clone();
    for (row, rank, dropout) in part_rows(parts) {
        let share = g
            .narrow(1, row, rank)?
            .contiguous()?
            .matmul(&a.narrow(0, row, rank)?)?;
        sum = dropout.add_applied(&sum, &share, scale)?;
    }
    Ok(sum)
}

/// Each part's first row of the stacked ranks, its rank and its mask.
fn part_rows(parts: MaskedParts<'_>) -> impl Iterator<Item = (usize, usize, Dropout)> + '_ {
    parts.iter().scan(0, |row, &(rank, dropout)| {
        let first = *row;
        *row += rank;
        Some((first, rank, dropout))
    })
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
struct Kernel {
    ranks: Vec<usize>,
    seeds: Vec<u64>,
    threshold: u32,
    scale: f32,
}

#[cfg(feature = "cuda")]
impl Kernel {
    /// The most parts one launch takes.
    const PARTS: usize = crate::launch::constants::LORA_PARTS;
    /// The largest summed rank: the kernels hold the ranks as one 64-wide tile.
    const RANK: usize = 64;
    /// The kernels' tiles: 64 rows or columns a block.
    const TILE: usize = 64;

    /// The parameters where the kernels take `operands` whose activation is `width` wide,
    /// and `parts`: 16-bit CUDA operands of one dtype from 16-byte boundaries, whole 64-wide
    /// column tiles, ranks multiples of 8, at most [`Self::PARTS`] parts of one dropout
    /// probability and [`Self::RANK`] summed rank, no more row tiles than a grid's second
    /// dimension holds.
    fn fitting(operands: &[&Tensor], width: usize, parts: MaskedParts) -> Result<Option<Self>> {
        let (Some(first), Some((_, dropout))) = (operands.first(), parts.first()) else {
            return Ok(None);
        };
        let fits = first.device().is_cuda()
            && first.dim(0)?.div_ceil(Self::TILE) <= u16::MAX as usize
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

/// Which product a launch computes, by the dimension of the input `x` `[rows, cols]` it sums
/// over.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy)]
enum Product {
    /// [`masked_bottleneck`] over `[x, a]`, into f32 sums `[rows, Σ r_p]`: the columns.
    Bottleneck,
    /// [`masked_factor_grad`] over `[g, x]`, into f32 sums `[Σ r_p, cols]`: the rows.
    FactorGrad,
}

/// One launch of a `kernels/lora.cu` kernel.
#[cfg(feature = "cuda")]
struct MaskedProduct {
    kernel: Kernel,
    product: Product,
}

#[cfg(feature = "cuda")]
impl FusedOp<2> for MaskedProduct {
    const NAME: &'static str = "masked-lora-product";

    fn name(&self) -> &'static str {
        match self.product {
            Product::Bottleneck => "masked-lora-bottleneck",
            Product::FactorGrad => "masked-lora-factor-grad",
        }
    }

    fn cpu(&self, _: [CpuOperand; 2]) -> CpuOutput {
        candle_core::bail!("{}: the fused kernel is CUDA only", self.name())
    }

    fn cuda(&self, operands: [Operand; 2]) -> CudaOutput {
        cuda::masked_product(self, operands)
    }
}

#[cfg(feature = "cuda")]
custom_op!(MaskedProduct: 2);

/// [`add_masked_shares`]'s kernel over `base`, `g` and `a`: the input gradient.
#[cfg(feature = "cuda")]
struct MaskedShares(Kernel);

#[cfg(feature = "cuda")]
impl FusedOp<3> for MaskedShares {
    const NAME: &'static str = "masked-lora-shares";

    fn cpu(&self, _: [CpuOperand; 3]) -> CpuOutput {
        candle_core::bail!("{}: the fused kernel is CUDA only", Self::NAME)
    }

    fn cuda(&self, operands: [Operand; 3]) -> CudaOutput {
        cuda::masked_shares(&self.0, operands)
    }
}

#[cfg(feature = "cuda")]
custom_op!(MaskedShares: 3);

/// The CUDA launchers (`kernels/lora.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use super::{Kernel, MaskedProduct, Product};
    use crate::fused_op::{CudaOutput, FusedOp};
    use crate::launch::{self, address, alloc, base_address, common_dtype, int, int_u32, Arg};
    use crate::launch::{start_aligned, zeros_f32, Operand};
    use candle_core::Result;

    /// Blocks a launch aims for: enough for four on each of an H100's or H200's 132
    /// multiprocessors, so the reduced dimension is split until the grid has as many.
    const BLOCKS: usize = 4 * 132;

    /// Threads a block: 4 warps.
    const THREADS: u32 = crate::launch::constants::FM_THREADS as u32;

    /// The parts' arguments every kernel takes after their operands and sizes: the count,
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

    /// The kernel of `op.product` over its operands into f32 sums, zeroed first: a block a
    /// 64-wide tile of the kept dimension and a slice of the reduced one, split until the grid
    /// has [`BLOCKS`] blocks.
    pub(super) fn masked_product(op: &MaskedProduct, operands: [Operand; 2]) -> CudaOutput {
        let dtype = common_dtype(&operands)?;
        if !start_aligned(&operands)? {
            candle_core::bail!("{}: operands must start on a 16-byte boundary", op.name());
        }
        let total = op.kernel.ranks.iter().sum::<usize>();
        let (name, x) = match op.product {
            Product::Bottleneck => ("masked_lora_bottleneck", operands[0]),
            Product::FactorGrad => ("masked_lora_factor_grad", operands[1]),
        };
        let (rows, cols) = x.1.shape().dims2()?;
        let (kept, reduced, out_dims) = match op.product {
            Product::Bottleneck => (rows, cols, (rows, total)),
            Product::FactorGrad => (cols, rows, (total, cols)),
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
        args.extend(part_args(&op.kernel)?);
        args.push(int(per_slice)?);
        let grid = (int_u32(tiles)?, int_u32(reduced.div_ceil(per_slice))?);
        launch::launch(&out.device, name, Some(dtype), grid, (THREADS, 1), &args)?;
        Ok((out, out_dims.into()))
    }

    /// `masked_lora_input_grad` over `[base, g, a]` into a new tensor of `base`'s shape and
    /// dtype: a block of 4 warps a 64 × 64 tile of it.
    pub(super) fn masked_shares(kernel: &Kernel, operands: [Operand; 3]) -> CudaOutput {
        let dtype = common_dtype(&operands)?;
        if !start_aligned(&operands)? {
            candle_core::bail!("masked-lora-shares: operands must start on a 16-byte boundary");
        }
        let [base, g, a] = operands;
        let (rows, cols) = base.1.shape().dims2()?;
        let out = alloc(&base.0.device, dtype, rows * cols)?;
        let mut args = vec![
            Arg::Address(address(base)?),
            Arg::Address(address(g)?),
            Arg::Address(address(a)?),
            Arg::Address(base_address(&out)?),
            int(rows)?,
            int(cols)?,
        ];
        args.extend(part_args(kernel)?);
        let tiles = |n: usize| int_u32(n.div_ceil(Kernel::TILE));
        let name = "masked_lora_input_grad";
        launch::launch(
            &out.device,
            name,
            Some(dtype),
            (tiles(cols)?, tiles(rows)?),
            (THREADS, 1),
            &args,
        )?;
        Ok((out, base.1.shape().clone()))
    }
}
