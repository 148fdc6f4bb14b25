//! The residual add and the RMSNorm that follows it, in one pass per row: for inference (a
//! decode step is bound by kernel launches, and this joins two of them at each of the two norms
//! of every block) and, on CUDA, for a training step's blocks (the rows read once instead of
//! three times, and one launch instead of two), whose two results then enter the graph as the
//! add's and the norm's nodes with their own backward. The sum is rounded to the tensor dtype
//! before it is normalized, as the separate add stores it.

use super::cpu_kernel::{f32s, for_each_row, output};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use super::rms_norm::{check_width, inverse_rms};
use candle_core::{Layout, Result, Shape, Tensor};

/// `(x + delta, rms_norm_offset(x + delta, weight, offset))`: the residual add and the norm
/// after it, the norm scaled by `offset + weight` (0 for a plain norm, Gemma's 1). Fused into
/// one kernel for inference (nothing tracked, fused backend) and for training rows on CUDA
/// that a warp's registers hold (rows of up to 2,048 16-bit or 1,024 f32 elements, the weight
/// in their dtype or a trained f32 master), else the two ops.
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    offset: f64,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let tracked = x.track_op() || delta.track_op() || weight.track_op();
    if !tracked && super::fused(&[x, delta, weight]) && x.shape() == delta.shape() {
        let (x, delta, weight) = (x.contiguous()?, delta.contiguous()?, weight.contiguous()?);
        let op = AddRmsNorm {
            eps: eps as f32,
            offset: offset as f32,
        };
        let both = x.apply_op3_no_bwd(&delta, &weight, &op)?;
        return Ok((both.get(0)?, both.get(1)?));
    }
    #[cfg(feature = "cuda")]
    if let Some(both) = tracked_rows(x, delta, weight, (offset, eps))? {
        return Ok(both);
    }
    let sum = super::add(x, delta)?;
    let normed = super::rms_norm_offset(&sum, weight, offset, eps)?;
    Ok((sum, normed))
}

/// [`add_rms_norm`] of tracked CUDA rows in one kernel ([`cuda::add_rms_norm_rows`]), the sum
/// entered in the graph as the add (its gradient passed to `x` and `delta` as it is) and the
/// norm as [`super::rms_norm_offset`]'s node over it; `None` where the kernel does not take the
/// rows or the weight would need a cast first.
#[cfg(feature = "cuda")]
fn tracked_rows(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    norm: (f64, f64),
) -> Result<Option<(Tensor, Tensor)>> {
    if !(x.device().is_cuda() && x.shape() == delta.shape() && super::fused(&[x, delta])) {
        return Ok(None);
    }
    let (kernel_weight, compute_weight) = match weight.dtype() == x.dtype() {
        true => (weight.contiguous()?, None),
        false => match super::rms_norm::master_copy(x, weight)? {
            Some(copy) => (copy.clone(), Some(copy)),
            None => return Ok(None),
        },
    };
    let (x, delta) = (x.contiguous()?, delta.contiguous()?);
    let (eps, offset) = (norm.1 as f32, norm.0 as f32);
    let outputs = super::launch::with_operands(&[&x, &delta, &kernel_weight], |o| {
        cuda::add_rms_norm_rows([o[0], o[1], o[2]], (eps, offset))
    })?;
    let Some((sum, normed)) = outputs else {
        return Ok(None);
    };
    let tensor = |storage| super::launch::tensor(storage, x.shape().clone());
    let (sum, normed) = (tensor(sum), tensor(normed));
    let tracked = (x.track_op(), delta.track_op());
    let sum = super::attach::attach2(&x, &delta, &sum, "residual-add", move |g| {
        Ok((tracked.0.then(|| g.clone()), tracked.1.then(|| g.clone())))
    })?;
    let normed = super::rms_norm::attach_normed(&normed, [&sum, weight], compute_weight, norm);
    Ok(Some((sum, normed)))
}

struct AddRmsNorm {
    eps: f32,
    offset: f32,
}

/// `[2, ..dims]`: the sum, then the normalized sum.
fn pair_shape(layout: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(layout.dims());
    dims.into()
}

impl FusedOp<3> for AddRmsNorm {
    const NAME: &'static str = "add-rms-norm";

    fn cpu(
        &self,
        [(x, x_layout), (delta, delta_layout), (w, w_layout)]: [CpuOperand; 3],
    ) -> CpuOutput {
        let (x, delta, w) = (
            f32s(x, x_layout)?,
            f32s(delta, delta_layout)?,
            f32s(w, w_layout)?,
        );
        let (_, width) = check_width(x_layout, w)?;
        if delta.len() != x.len() {
            candle_core::bail!("add_rms_norm: {} and {} elements", x.len(), delta.len());
        }
        let mut out = vec![0f32; 2 * x.len()];
        let (sum, normed) = out.split_at_mut(x.len());
        for (s, (&a, &b)) in sum.iter_mut().zip(x.iter().zip(delta)) {
            *s = a + b;
        }
        let sum = &*sum;
        for_each_row(normed, width, |row, y| {
            let s = &sum[row * width..][..width];
            let r = inverse_rms(s, self.eps);
            for ((y, &s), &w) in y.iter_mut().zip(s).zip(w) {
                *y = s * r * (self.offset + w);
            }
        });
        Ok(output(out, pair_shape(x_layout)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, delta, w]: [Operand; 3]) -> CudaOutput {
        let out = cuda::add_rms_norm(x, delta, w, (self.eps, self.offset))?;
        Ok((out, pair_shape(x.1)))
    }
}

custom_op!(AddRmsNorm: 3);

/// The CUDA launcher (`kernels/norms.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::constants::{
        ADD_NORM_PACKS as WIDE_PACKS, ADD_NORM_WIDE_THREADS as WIDE_THREADS,
    };
    use crate::launch::{
        self, address, alloc, base_address, common_dtype, elementwise_kernel, int, per_row,
        per_warp_row, run, same_count, Arg, Operand,
    };
    use crate::rms_norm::cuda::check_weight;
    use crate::rows_and_width;
    use candle_core::{CudaStorage, Result};

    /// Residual add and RMSNorm scaled by `offset + w`: `[sum; normed]` in one buffer of twice
    /// `x`'s size.
    pub(super) fn add_rms_norm(
        x: Operand,
        delta: Operand,
        w: Operand,
        (eps, offset): (f32, f32),
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&[x, delta, w])?;
        let (rows, width) = rows_and_width(x.1)?;
        check_weight(w, width)?;
        same_count(x, delta)?;
        let out = alloc(&x.0.device, dtype, 2 * rows * width)?;
        let kernels = ("add_rms_norm", "add_rms_norm_wide");
        let (name, shape) = match elementwise_kernel(kernels, &[x, delta, w], width)? {
            // A block as wide as the row's 16-byte packs, up to WIDE_THREADS, so each thread
            // holds at most WIDE_PACKS of them in registers.
            (wide, per_access) if width / per_access <= WIDE_PACKS * WIDE_THREADS => (
                wide,
                per_row(rows, width / per_access, WIDE_THREADS as u32)?,
            ),
            _ => (kernels.0, per_row(rows, width, 256)?),
        };
        let scalars = [int(rows)?, int(width)?, Arg::Float(eps), Arg::Float(offset)];
        run((name, dtype), shape, &[x, delta, w], out, &scalars)
    }

    /// The 16-byte words a lane of `add_rms_norm_rows` holds of a row of x and of delta: the
    /// kernel's instances (`kernels/norms.cu`), the fewest that hold the row taken.
    const ROW_WORDS: [usize; 3] = [2, 4, 8];

    /// Residual add and RMSNorm scaled by `offset + w` of many rows, a warp a row holding it in
    /// registers: the sum and the normalized sum in two buffers of `x`'s size. `None` where a
    /// row does not fit [`ROW_WORDS`]' largest (2,048 16-bit elements, 1,024 f32) or the
    /// operands are not 16-byte aligned rows.
    pub(super) fn add_rms_norm_rows(
        [x, delta, w]: [Operand; 3],
        (eps, offset): (f32, f32),
    ) -> Result<Option<(CudaStorage, CudaStorage)>> {
        let dtype = common_dtype(&[x, delta, w])?;
        let (rows, width) = rows_and_width(x.1)?;
        check_weight(w, width)?;
        same_count(x, delta)?;
        let per_access = 16 / dtype.size_in_bytes();
        let words = ROW_WORDS
            .into_iter()
            .find(|&words| width <= 32 * per_access * words);
        let aligned = launch::start_aligned(&[x, delta, w])? && width % per_access == 0;
        let (Some(words), true) = (words, aligned) else {
            return Ok(None);
        };
        let dev = &x.0.device;
        let (sum, y) = (
            alloc(dev, dtype, rows * width)?,
            alloc(dev, dtype, rows * width)?,
        );
        let args = [
            Arg::Address(address(x)?),
            Arg::Address(address(delta)?),
            Arg::Address(address(w)?),
            Arg::Address(base_address(&sum)?),
            Arg::Address(base_address(&y)?),
            int(rows)?,
            int(width)?,
            Arg::Float(eps),
            Arg::Float(offset),
        ];
        let (grid, block) = per_warp_row(rows)?;
        let name = format!("add_rms_norm_rows{words}");
        launch::launch(dev, &name, Some(dtype), grid, block, &args)?;
        Ok(Some((sum, y)))
    }
}
