//! RMSNorm, its weight applied as `w` or with an offset as `offset + w` (Gemma's `1 + w`): its
//! dispatch, composite reference, and fused kernels with their own backward. One
//! pass per row forward, one pass per row for the input gradient and a row-parallel reduction
//! for the weight gradient, on the CPU (rayon) and on CUDA (`kernels/norms.cu`). The per-row
//! inverse RMS is recomputed in backward rather than stored: it costs one dot product per row
//! (on CUDA the input gradient's kernel hands it on to the weight gradient).

use super::cpu_kernel::{f32s, output, written_rows, MIN_ROWS_PER_TASK};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use super::reference::widened;
use super::rows_and_width;
use candle_core::{DType, Layout, Result, Tensor, D};
use rayon::prelude::*;
#[cfg(feature = "cuda")]
use std::sync::Arc;

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`, computed in at least f32. Fused where
/// [`super::fused`] accepts the operands, else the [`fn@reference`].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    rms_norm_offset(x, weight, 0.0, eps)
}

/// RMSNorm scaled by `offset + weight` (Gemma's `1 + w`, whose fresh weight is 0): with an
/// offset the product is taken in f32 and rounded once, as transformers' Gemma norms do. Fused
/// where [`super::fused`] accepts the operands, else the [`fn@reference`].
///
/// A weight of another dtype than `x` is cast to it first, except a trained f32 master weight
/// over 16-bit rows on CUDA: the kernels take its compute-dtype copy (the step's kept copy,
/// `ops::training_step`) and its gradient is summed straight into f32, where a gradient of the
/// copy would be rounded to 16 bits and then cast back by another kernel.
pub fn rms_norm_offset(x: &Tensor, weight: &Tensor, offset: f64, eps: f64) -> Result<Tensor> {
    let op = |compute_weight| RmsNorm::new((offset, eps), compute_weight);
    if weight.dtype() != x.dtype() {
        if let Some(copy) = master_copy(x, weight)? {
            let (x, weight) = (x.contiguous()?, weight.contiguous()?);
            return x.apply_op2(&weight, op(Some(copy)));
        }
        return rms_norm_offset(x, &super::cast(weight, x.dtype())?, offset, eps);
    }
    if super::fused(&[x, weight]) {
        let (x, weight) = (x.contiguous()?, weight.contiguous()?);
        return x.apply_op2(&weight, op(None));
    }
    reference(x, weight, offset, eps)
}

/// The weight the fused kernels read for a trained f32 master `weight` over 16-bit CUDA rows
/// `x`: the step's compute copy in `x`'s dtype (the op then sums the master's gradient in f32).
/// `None` for any other pair.
pub(crate) fn master_copy(x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    let master = weight.dtype() == DType::F32 && weight.track_op() && x.device().is_cuda();
    if !(master && super::fused(&[x]) && x.dtype() != DType::F32) {
        return Ok(None);
    }
    Ok(Some(
        super::step_scope::copy_or_cast(weight, x.dtype())?.contiguous()?,
    ))
}

/// `normed`, the norm of rows `x` with `weight` that a fused kernel already wrote (reading
/// `compute_weight` where `weight` is a master, [`master_copy`]), entered in the graph as
/// [`rms_norm_offset`]'s output with its backward.
#[cfg(feature = "cuda")]
pub(crate) fn attach_normed(
    normed: &Tensor,
    [x, weight]: [&Tensor; 2],
    compute_weight: Option<Tensor>,
    (offset, eps): (f64, f64),
) -> Tensor {
    let op = RmsNorm::new((offset, eps), compute_weight);
    Tensor::attach_op2(normed, [x, weight], Arc::new(Box::new(op)))
}

/// [`rms_norm_offset`] from candle's differentiable ops, any backend and dtype.
pub fn reference(x: &Tensor, weight: &Tensor, offset: f64, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(widened(dtype))?;
    let mean_square = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(mean_square + eps)?.sqrt()?)?;
    let wide_weight = weight.to_dtype(widened(dtype))?;
    if offset == 0.0 {
        // Rounded to the dtype before the weight multiplies it, as transformers' Llama norm
        // does; the product taken in f32 and rounded once, as a 16-bit multiply rounds it (the
        // same values), so that the weight's gradient, a sum over every row, is summed in f32.
        let rounded = normed.to_dtype(dtype)?.to_dtype(widened(dtype))?;
        return rounded.broadcast_mul(&wide_weight)?.to_dtype(dtype);
    }
    let scale = wide_weight.affine(1.0, offset)?;
    normed.broadcast_mul(&scale)?.to_dtype(dtype)
}

pub(super) fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    let mean_square = row.iter().map(|x| x * x).sum::<f32>() / row.len() as f32;
    1.0 / (mean_square + eps).sqrt()
}

/// Checks that `weight` has one entry per column of `x`.
pub(super) fn check_width(x: &Layout, weight: &[f32]) -> Result<(usize, usize)> {
    let (rows, width) = rows_and_width(x)?;
    if weight.len() != width {
        candle_core::bail!("rms_norm: weight of {} for rows of {width}", weight.len());
    }
    Ok((rows, width))
}

struct RmsNorm {
    eps: f32,
    offset: f32,
    /// The weight the kernels read where the op's weight operand is an f32 master over 16-bit
    /// rows (its copy in their dtype); the master then gets an f32 gradient.
    compute_weight: Option<Tensor>,
}

impl FusedOp<2> for RmsNorm {
    const NAME: &'static str = "rms-norm";

    fn cpu(&self, [(x, x_layout), (w, w_layout)]: [CpuOperand; 2]) -> CpuOutput {
        let (x, w) = (f32s(x, x_layout)?, f32s(w, w_layout)?);
        let (_, width) = check_width(x_layout, w)?;
        // SAFETY: every element of each row is written.
        let y = unsafe {
            written_rows(x.len(), width, |row, y| {
                let x = &x[row * width..][..width];
                let r = inverse_rms(x, self.eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    y.write(x * r * (self.offset + w));
                }
            })
        };
        Ok(output(y, x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, w]: [Operand; 2]) -> CudaOutput {
        let y = match &self.compute_weight {
            Some(copy) => super::launch::with_operands(&[copy], |c| {
                cuda::forward(x, c[0], self.eps, self.offset)
            })?,
            None => cuda::forward(x, w, self.eps, self.offset)?,
        };
        Ok((y, x.1.shape().clone()))
    }

    fn backward(
        &self,
        [x, w]: [&Tensor; 2],
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 2]> {
        // candle stores whatever gradient is returned, so a frozen operand must get `None`
        // (which also skips its kernel).
        let grad = grad.contiguous()?;
        let (x_data, w_data) = (x.detach(), self.kernel_weight(w));
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && x.track_op() && w.track_op() {
            let norm = (self.eps, self.offset);
            let dw = Some(w.dtype());
            let (dx, dw) = cuda::grads(&x_data, &w_data, &grad, None, norm, dw)?;
            return Ok([Some(dx), dw]);
        }
        let input_grad = RmsNormInputGrad {
            eps: self.eps,
            offset: self.offset,
        };
        let dx = x
            .track_op()
            .then(|| x_data.apply_op3(&w_data, &grad, input_grad))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| {
                let dw = x_data.apply_op2(&grad, RmsNormWeightGrad { eps: self.eps })?;
                dw.to_dtype(w.dtype())
            })
            .transpose()?;
        Ok([dx, dw])
    }

    /// On CUDA, the input gradient written onto the one the input already holds (in a pre-norm
    /// block, the residual stream's, which arrives before the norm's): the sum in the kernel's
    /// pass instead of an add reading both gradients again.
    fn backward_onto(
        &self,
        [x, w]: [&Tensor; 2],
        _y: &Tensor,
        grad: &Tensor,
        held: [Option<&Tensor>; 2],
    ) -> Result<Option<[Option<Tensor>; 2]>> {
        #[cfg(feature = "cuda")]
        if let [Some(held_x), None] = held {
            let summable = held_x.is_contiguous()
                && held_x.dims() == x.dims()
                && held_x.dtype() == x.dtype()
                && held_x.device().same_device(x.device());
            if x.device().is_cuda() && x.track_op() && summable {
                let (x_data, w_data) = (x.detach(), self.kernel_weight(w));
                let (norm, grad) = ((self.eps, self.offset), grad.contiguous()?);
                let dw = w.track_op().then(|| w.dtype());
                let (dx, dw) = cuda::grads(&x_data, &w_data, &grad, Some(held_x), norm, dw)?;
                return Ok(Some([Some(dx), dw]));
            }
        }
        let _ = (x, w, grad, held);
        Ok(None)
    }
}

impl RmsNorm {
    /// The op for a norm scaled by `offset + weight` with `eps`, reading `compute_weight`
    /// where the weight operand is an f32 master.
    fn new((offset, eps): (f64, f64), compute_weight: Option<Tensor>) -> RmsNorm {
        RmsNorm {
            eps: eps as f32,
            offset: offset as f32,
            compute_weight,
        }
    }

    /// The weight the kernels read: the compute copy of a master weight, else `w` itself.
    fn kernel_weight(&self, w: &Tensor) -> Tensor {
        self.compute_weight.clone().unwrap_or_else(|| w.detach())
    }
}

custom_op!(RmsNorm: 2);

/// `dx = r · (g⊙w' − x̂ · mean(g⊙w'⊙x̂))` with `x̂ = x · r` and `w' = offset + w`.
struct RmsNormInputGrad {
    eps: f32,
    offset: f32,
}

impl FusedOp<3> for RmsNormInputGrad {
    const NAME: &'static str = "rms-norm-input-grad";

    fn cpu(&self, [(x, x_layout), (w, w_layout), (g, g_layout)]: [CpuOperand; 3]) -> CpuOutput {
        let (x, w, g) = (f32s(x, x_layout)?, f32s(w, w_layout)?, f32s(g, g_layout)?);
        let (_, width) = check_width(x_layout, w)?;
        // SAFETY: every element of each row is written.
        let dx = unsafe {
            written_rows(x.len(), width, |row, dx| {
                let (x, g) = (&x[row * width..][..width], &g[row * width..][..width]);
                let r = inverse_rms(x, self.eps);
                let o = self.offset;
                let dot: f32 = x
                    .iter()
                    .zip(g)
                    .zip(w)
                    .map(|((x, g), w)| x * g * (o + w))
                    .sum();
                let k = dot * r * r / width as f32;
                for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    dx.write(r * (g * (o + w) - x * k));
                }
            })
        };
        Ok(output(dx, x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, w, g]: [Operand; 3]) -> CudaOutput {
        let dx = cuda::input_grad([x, w, g], None, (self.eps, self.offset), None)?;
        Ok((dx, x.1.shape().clone()))
    }
}

custom_op!(RmsNormInputGrad: 3);

/// `dw = Σ_rows g ⊙ x̂`, summed per fixed chunk of rows and then across chunks in order.
struct RmsNormWeightGrad {
    eps: f32,
}

impl FusedOp<2> for RmsNormWeightGrad {
    const NAME: &'static str = "rms-norm-weight-grad";

    fn cpu(&self, [(x, x_layout), (g, g_layout)]: [CpuOperand; 2]) -> CpuOutput {
        let (x, g) = (f32s(x, x_layout)?, f32s(g, g_layout)?);
        let (_, width) = rows_and_width(x_layout)?;
        // Fixed chunks summed in order: the result does not depend on how rayon splits the
        // work, so a resumed run reproduces an uninterrupted one bit for bit.
        let chunk = MIN_ROWS_PER_TASK * width.max(1);
        let partials: Vec<Vec<f32>> = x
            .par_chunks(chunk)
            .zip(g.par_chunks(chunk))
            .map(|(x, g)| {
                let mut acc = vec![0f32; width];
                for (x, g) in x.chunks(width.max(1)).zip(g.chunks(width.max(1))) {
                    let r = inverse_rms(x, self.eps);
                    for ((a, &x), &g) in acc.iter_mut().zip(x).zip(g) {
                        *a += g * x * r;
                    }
                }
                acc
            })
            .collect();
        let mut dw = vec![0f32; width];
        for partial in partials {
            dw.iter_mut().zip(&partial).for_each(|(d, p)| *d += p);
        }
        Ok(output(dw, width))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, g]: [Operand; 2]) -> CudaOutput {
        let (_, width) = rows_and_width(x.1)?;
        let inverse = cuda::inverse(x, self.eps)?;
        let dtype = candle_core::backend::BackendStorage::dtype(x.0);
        Ok((cuda::weight_grad(x, g, &inverse, dtype)?, width.into()))
    }
}

custom_op!(RmsNormWeightGrad: 2);

/// The CUDA launchers (`kernels/norms.cu`).
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use crate::launch::constants::HELD_NORM_WARPS;
    use crate::launch::{
        self, alloc, base_address, common_dtype, elementwise_kernel, grid, int, per_warp_row, run,
        Arg, Operand,
    };
    use crate::rows_and_width;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Layout, Result, Tensor};

    /// Warps a block of the fused gradients' kernel runs.
    const FUSED_WARPS: usize = 8;
    /// Shared memory a block of the fused gradients' kernel may give its warps' column sums: at
    /// most 24 KiB, so that eight such blocks (64 warps) fit a multiprocessor. On an H100 the
    /// fused kernel paid at rows of 768 (24 KiB; base training 1.2% faster) and lost at rows of
    /// 2,048 with half the warps a block (the 1b 0.4% slower): with fewer warps in flight the
    /// pass reads more slowly than the two kernels it replaces (docs/benchmarks.md).
    const SLICES_BYTES: usize = 24 << 10;
    /// Consecutive rows each warp of the fused gradients' kernel takes.
    const ROWS_PER_WARP: usize = 2;

    /// The input gradient, `held + dx` where `held` is given, and with `weight` (its dtype:
    /// `w`'s, or f32 for an f32 master's), the weight gradient: both from one kernel where
    /// [`FUSED_WARPS`] warps' column sums fit [`SLICES_BYTES`] or a 16-bit row fits a warp's
    /// registers ([`input_and_weight_grads`]), else the input gradient's kernel writes the
    /// per-row inverse RMS that the weight gradient's kernel reads.
    pub(super) fn grads(
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        held: Option<&Tensor>,
        norm: (f32, f32),
        weight: Option<DType>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let operands: Vec<&Tensor> = [x, w, grad].into_iter().chain(held).collect();
        let (dx, dw) = launch::with_operands(&operands, |ops| {
            let held = ops.get(3).copied();
            if let Some(dw_dtype) = weight {
                let fused = input_and_weight_grads([ops[0], ops[1], ops[2]], held, norm, dw_dtype)?;
                if let Some((dx, dw)) = fused {
                    return Ok((dx, Some(dw)));
                }
            }
            let inverse = weight
                .map(|dtype| inverse_buffer(ops[0]).map(|inverse| (inverse, dtype)))
                .transpose()?;
            let rows_inverse = inverse.as_ref().map(|(inverse, _)| inverse);
            let dx = input_grad([ops[0], ops[1], ops[2]], held, norm, rows_inverse)?;
            let dw = inverse
                .map(|(inverse, dtype)| weight_grad(ops[0], ops[2], &inverse, dtype))
                .transpose()?;
            Ok((dx, dw))
        })?;
        Ok((
            launch::tensor(dx, x.shape().clone()),
            dw.map(|dw| launch::tensor(dw, w.shape().clone())),
        ))
    }

    /// RMSNorm forward, scaled by `offset + w`.
    pub(super) fn forward(x: Operand, w: Operand, eps: f32, offset: f32) -> Result<CudaStorage> {
        let dtype = common_dtype(&[x, w])?;
        let (rows, width) = rows_and_width(x.1)?;
        check_weight(w, width)?;
        let y = alloc(&x.0.device, dtype, rows * width)?;
        let scalars = [int(rows)?, int(width)?, Arg::Float(eps), Arg::Float(offset)];
        let (name, _) = elementwise_kernel(("rms_norm_fwd", "rms_norm_fwd_wide"), &[x, w], width)?;
        run((name, dtype), per_warp_row(rows)?, &[x, w], y, &scalars)
    }

    pub(crate) fn check_weight(w: Operand, width: usize) -> Result<()> {
        if w.1.shape().elem_count() != width {
            candle_core::bail!(
                "rms_norm: weight of {} for rows of {width}",
                w.1.shape().elem_count()
            );
        }
        Ok(())
    }

    /// The input gradient (as [`input_grad`] writes it) and the weight gradient from one pass
    /// over the rows: each warp sums its rows' share of the weight gradient in shared memory,
    /// each block writes its warps' sums as one partial row, and [`weight_grad_sum`] adds the
    /// blocks' rows. Where [`FUSED_WARPS`] warps' sums would not fit [`SLICES_BYTES`] (rows
    /// wider than 768 elements), [`held_input_and_weight_grads`], or `None`.
    fn input_and_weight_grads(
        [x, w, g]: [Operand; 3],
        held: Option<Operand>,
        (eps, offset): (f32, f32),
        dw_dtype: DType,
    ) -> Result<Option<(CudaStorage, CudaStorage)>> {
        let (operands, dtype, (rows, width)) = input_grad_operands([x, w, g], held)?;
        let kernels = ("rms_norm_dx_dw", "rms_norm_dx_dw_wide");
        let (name, per_access) = elementwise_kernel(kernels, &operands, width)?;
        let slice_bytes = width.div_ceil(32 * per_access) * 32 * per_access * 4;
        if FUSED_WARPS * slice_bytes > SLICES_BYTES {
            let norm = (eps, offset);
            let shape = (dtype, rows, width, per_access);
            return held_input_and_weight_grads([x, w, g], held, norm, (shape, dw_dtype));
        }
        let blocks = rows.div_ceil(FUSED_WARPS * ROWS_PER_WARP).max(1);
        let scalars = [
            int(width)?,
            Arg::Float(eps),
            Arg::Float(offset),
            Arg::Address(launch::optional_address(held)?),
            int(ROWS_PER_WARP)?,
        ];
        let block = (FUSED_WARPS * 32, FUSED_WARPS * slice_bytes);
        let (name, shape) = ((name, dtype, dw_dtype), (rows, width));
        grads_with_partials(name, [x, w, g], shape, (blocks, block), &scalars).map(Some)
    }

    /// Launches `name`, a kernel that writes the input gradient of rows `x` (`[rows, width]`)
    /// and one partial row of the weight gradient a block, on `blocks` blocks of `threads` and
    /// `shared` bytes, its arguments `x, w, g, dx, partial, rows` then `scalars`; then sums the
    /// partial rows into a weight gradient of `dw_dtype` ([`weight_grad_sum`]).
    fn grads_with_partials(
        (name, dtype, dw_dtype): (&str, DType, DType),
        [x, w, g]: [Operand; 3],
        (rows, width): (usize, usize),
        (blocks, (threads, shared)): (usize, (usize, usize)),
        scalars: &[Arg],
    ) -> Result<(CudaStorage, CudaStorage)> {
        let dev = &x.0.device;
        let dx = alloc(dev, dtype, rows * width)?;
        // Every (block, column) partial sum is written by the kernel.
        let partial = alloc(dev, DType::F32, blocks * width)?;
        let mut args = vec![
            Arg::Address(launch::address(x)?),
            Arg::Address(launch::address(w)?),
            Arg::Address(launch::address(g)?),
            Arg::Address(base_address(&dx)?),
            Arg::Address(base_address(&partial)?),
            int(rows)?,
        ];
        args.extend_from_slice(scalars);
        let block = (launch::int_u32(threads)?, 1);
        let config = (grid(blocks)?, block, launch::int_u32(shared)?);
        launch::launch_with_shared(dev, name, Some(dtype), config, &args)?;
        let dw = weight_grad_sum(&partial, blocks, width, dw_dtype)?;
        Ok((dx, dw))
    }

    /// [`input_and_weight_grads`] for 16-bit rows of 1,024, 1,536 or 2,048 elements read 16
    /// bytes at a time (`per_access`), too wide for its shared-memory slices: each warp holds a
    /// row's x and g in registers and its share of the weight gradient in its slice, and each
    /// multiprocessor takes one block and one run of rows. `None` for other rows. The operands
    /// are those [`input_grad_operands`] checked, of `dtype` and `[rows, width]`.
    fn held_input_and_weight_grads(
        [x, w, g]: [Operand; 3],
        held: Option<Operand>,
        (eps, offset): (f32, f32),
        ((dtype, rows, width, per_access), dw_dtype): ((DType, usize, usize, usize), DType),
    ) -> Result<Option<(CudaStorage, CudaStorage)>> {
        let packs = width / (32 * per_access);
        let sixteen_bit = matches!(dtype, DType::BF16 | DType::F16);
        if !(sixteen_bit && per_access == 8 && width % 256 == 0 && matches!(packs, 4 | 6 | 8)) {
            return Ok(None);
        }
        let dev = &x.0.device;
        let name = format!("rms_norm_dx_dw_held{packs}");
        let block = (HELD_NORM_WARPS * 32, HELD_NORM_WARPS * width * 4);
        let (threads, shared) = (launch::int_u32(block.0)?, launch::int_u32(block.1)?);
        let resident = launch::resident_blocks(dev, &name, Some(dtype), (threads, shared))?;
        let rows_per_block = rows.div_ceil(resident.min(rows.div_ceil(HELD_NORM_WARPS)).max(1));
        let blocks = rows.div_ceil(rows_per_block.max(1)).max(1);
        let scalars = [
            Arg::Float(eps),
            Arg::Float(offset),
            Arg::Address(launch::optional_address(held)?),
            int(rows_per_block)?,
        ];
        let (name, shape) = ((name.as_str(), dtype, dw_dtype), (rows, width));
        grads_with_partials(name, [x, w, g], shape, (blocks, block), &scalars).map(Some)
    }

    /// The operands of an input gradient (`held` last, where given), their dtype and the rows'
    /// count and width, checked: the weight as wide as a row, `held` contiguous in x's shape.
    fn input_grad_operands<'a>(
        [x, w, g]: [Operand<'a>; 3],
        held: Option<Operand<'a>>,
    ) -> Result<(Vec<Operand<'a>>, DType, (usize, usize))> {
        let operands: Vec<Operand> = [x, w, g].into_iter().chain(held).collect();
        let dtype = common_dtype(&operands)?;
        let (rows, width) = rows_and_width(x.1)?;
        check_weight(w, width)?;
        if let Some(held) = held {
            if !held.1.is_contiguous() || held.1.shape() != x.1.shape() {
                candle_core::bail!("rms_norm: a held gradient of {:?}", held.1.shape());
            }
        }
        Ok((operands, dtype, (rows, width)))
    }

    /// RMSNorm input gradient for the weight `offset + w`, written as `held + dx` where `held`
    /// (contiguous, x's shape) is given; with `inverse`, the kernel also writes each row's
    /// inverse RMS there (f32, one per row) for [`weight_grad`].
    pub(super) fn input_grad(
        [x, w, g]: [Operand; 3],
        held: Option<Operand>,
        (eps, offset): (f32, f32),
        inverse: Option<&CudaStorage>,
    ) -> Result<CudaStorage> {
        let (operands, dtype, (rows, width)) = input_grad_operands([x, w, g], held)?;
        let dx = alloc(&x.0.device, dtype, rows * width)?;
        let inverse = inverse.map(base_address).transpose()?.unwrap_or(0);
        let scalars = [
            int(rows)?,
            int(width)?,
            Arg::Float(eps),
            Arg::Address(inverse),
            Arg::Float(offset),
            Arg::Address(launch::optional_address(held)?),
        ];
        let kernels = ("rms_norm_dx", "rms_norm_dx_wide");
        let (name, _) = elementwise_kernel(kernels, &operands, width)?;
        run((name, dtype), per_warp_row(rows)?, &[x, w, g], dx, &scalars)
    }

    /// The per-row inverse RMS of `x` (f32), for [`weight_grad`].
    pub(super) fn inverse(x: Operand, eps: f32) -> Result<CudaStorage> {
        let (rows, width) = rows_and_width(x.1)?;
        let kernels = ("rms_norm_inverse", "rms_norm_inverse_wide");
        run(
            (elementwise_kernel(kernels, &[x], width)?.0, x.0.dtype()),
            per_warp_row(rows)?,
            &[x],
            inverse_buffer(x)?,
            &[int(rows)?, int(width)?, Arg::Float(eps)],
        )
    }

    /// An f32 buffer for the per-row inverse RMS of `x`.
    pub(super) fn inverse_buffer(x: Operand) -> Result<CudaStorage> {
        let (rows, _) = rows_and_width(x.1)?;
        alloc(&x.0.device, DType::F32, rows.max(1))
    }

    /// RMSNorm weight gradient in `dw_dtype` from the per-row inverse RMS: column sums per
    /// chunk of rows, then the sum of the chunks.
    pub(super) fn weight_grad(
        x: Operand,
        g: Operand,
        inverse: &CudaStorage,
        dw_dtype: DType,
    ) -> Result<CudaStorage> {
        const ROWS_PER_CHUNK: usize = 64;
        let dtype = common_dtype(&[x, g])?;
        let (rows, width) = rows_and_width(x.1)?;
        let dev = &x.0.device;
        let inverse_layout = Layout::contiguous(rows.max(1));
        let chunks = rows.div_ceil(ROWS_PER_CHUNK).max(1);
        // Every (chunk, column) partial sum is written by the kernel.
        let partial = run(
            ("rms_norm_dw_partial", dtype),
            ((grid(width.div_ceil(32))?.0, grid(chunks)?.0), (32, 8)),
            &[x, g, (inverse, &inverse_layout)],
            alloc(dev, DType::F32, chunks * width)?,
            &[int(rows)?, int(width)?, int(ROWS_PER_CHUNK)?],
        )?;
        weight_grad_sum(&partial, chunks, width, dw_dtype)
    }

    /// The weight gradient in `dtype`: the column sums of the f32 `[chunks, width]` partial
    /// sums, in chunk order within each of eight interleaved runs.
    fn weight_grad_sum(
        partial: &CudaStorage,
        chunks: usize,
        width: usize,
        dtype: DType,
    ) -> Result<CudaStorage> {
        let partial_layout = Layout::contiguous(chunks * width);
        run(
            ("rms_norm_dw_finish", dtype),
            (grid(width.div_ceil(32))?, (32, 8)),
            &[(partial, &partial_layout)],
            alloc(&partial.device, dtype, width)?,
            &[int(chunks)?, int(width)?],
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};
    use candle_core::Var;

    #[test]
    fn a_16_bit_norm_rounds_as_transformers_and_sums_its_weight_gradient_in_f32() {
        use crate::parity::relative_error;
        use candle_core::DType;
        // 4,096 rows: a weight gradient summed in bf16 would lose most of its digits.
        let x32 = uniform(&[4096, 64], 3);
        let w32 = uniform(&[64], 4);
        let (x, w) = (
            x32.to_dtype(DType::BF16).unwrap(),
            w32.to_dtype(DType::BF16).unwrap(),
        );
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let y = super::rms_norm(&xv, &wv, 1e-6).unwrap();
        // The forward: the normed rows rounded to bf16, then a bf16 multiply.
        let x_wide = x.to_dtype(DType::F32).unwrap();
        let rms = x_wide.sqr().unwrap().mean_keepdim(1).unwrap();
        let normed = x_wide.broadcast_div(&(rms + 1e-6).unwrap().sqrt().unwrap());
        let want = normed.unwrap().to_dtype(DType::BF16).unwrap();
        let want = want.broadcast_mul(&w).unwrap();
        assert_eq!(relative_error(&y, &want), 0.0);
        // The weight's gradient against the same norm in f32 on the same (rounded) inputs.
        let dw = y.sum_all().unwrap().backward().unwrap();
        let dw = dw.get(&wv).unwrap().clone();
        let (x_f32, w_f32) = (Var::from_tensor(&x_wide).unwrap(), w.to_dtype(DType::F32));
        let w_f32 = Var::from_tensor(&w_f32.unwrap()).unwrap();
        let y_f32 = super::rms_norm(&x_f32, &w_f32, 1e-6).unwrap();
        let want_dw = y_f32.sum_all().unwrap().backward().unwrap();
        let error = relative_error(&dw, want_dw.get(&w_f32).unwrap());
        assert!(error < 1e-2, "weight gradient off by {error:.2e}");
    }

    #[test]
    fn gradients_of_vars_hold_no_graph() {
        // The model passes norm weights (Vars) straight in; their gradients must not keep the
        // forward graph alive (see cpu_kernel.rs).
        let x = Var::from_tensor(&uniform(&[3, 8], 1)).unwrap();
        let w = Var::from_tensor(&uniform(&[8], 2)).unwrap();
        let y = super::rms_norm(&x, &w, 1e-6).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(!grads.get(&x).unwrap().track_op());
        assert!(!grads.get(&w).unwrap().track_op());
    }

    #[test]
    fn matches_the_reference_forward_and_backward() {
        // Width 1 is left out: there dx ≈ 0 is pure cancellation noise in both versions.
        for (i, shape) in [vec![1, 1, 3], vec![2, 3, 8], vec![5, 17], vec![1, 50, 384]]
            .iter()
            .enumerate()
        {
            let s = 10 * i as u64;
            let width = *shape.last().unwrap();
            let inputs = [uniform(shape, s), uniform(&[width], s + 1)];
            for offset in [0.0, 1.0] {
                assert_parity(
                    &format!("rms_norm offset {offset}"),
                    &inputs,
                    &[true, true],
                    |t| super::rms_norm_offset(&t[0], &t[1], offset, 1e-5),
                    |t| super::reference(&t[0], &t[1], offset, 1e-5),
                    1e-5,
                );
            }
        }
    }
}
