//! Dtype conversion with a backward: the f32 master weights cast to the compute dtype on every
//! step of mixed-precision training, and their gradients on the way back.
//!
//! candle's CUDA cast moves one element per thread through a strided-index kernel; the weight
//! casts of a base bf16 training step ran at 0.4–1.3 TB/s and took about 1 ms of it. This one
//! moves 8 elements per thread (`kernels/elementwise.cu`).

use super::attach::attach;
use super::step_scope;
use candle_core::{DType, Result, Tensor};

/// `x` in `dtype`; the gradient flows back cast to `x`'s dtype. Inside a training step that
/// holds a copy of `x` in `dtype` (a master's [`crate::ComputeCopies`]), that copy; else on
/// CUDA, between f32, bf16 and f16 for a contiguous `x` that starts on a 16-byte boundary, one
/// vectorized kernel; candle's `to_dtype` elsewhere.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    let kept = step_scope::kept_cast(x, dtype);
    let Some(y) = kept.map_or_else(|| fused_cast(&x.detach(), dtype), |y| Ok(Some(y)))? else {
        return x.to_dtype(dtype);
    };
    if !x.track_op() {
        return Ok(y);
    }
    let source = x.dtype();
    attach(x, &y, "cast", move |grad| {
        Ok(Some(cast(&grad.detach(), source)?))
    })
}

/// `x` in `dtype` by a fresh conversion, without a backward and without looking for a step's
/// kept copy: [`cast`]'s kernel where it applies, candle's `to_dtype` elsewhere.
pub(crate) fn fresh_cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    let x = x.detach();
    if x.dtype() == dtype {
        return Ok(x);
    }
    fused_cast(&x, dtype)?.map_or_else(|| x.to_dtype(dtype), Ok)
}

/// `parts` (2-D, one width, no gradient) in `dtype`, stacked along their rows: the stacked
/// weight of master weights in mixed precision. Inside a training step that holds the
/// masters' stacked copy ([`crate::ComputeCopies::add_stacked`]), that copy. On CUDA, with
/// every part contiguous from a 16-byte boundary and each part's rows starting on one in the
/// output, one cast kernel a part writes its rows of one buffer, where casting each and
/// concatenating the casts would copy the whole weight once more every step.
pub fn stacked_cast(parts: &[&Tensor], dtype: DType) -> Result<Tensor> {
    if let Some(stacked) = step_scope::kept_stack(parts, dtype) {
        return Ok(stacked);
    }
    #[cfg(feature = "cuda")]
    if let Some(stacked) = cuda::stacked_cast(parts, dtype)? {
        return Ok(stacked);
    }
    let casts = parts
        .iter()
        .map(|p| cast(&p.detach(), dtype))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&casts, 0)
}

#[cfg(feature = "cuda")]
use cuda::fused_cast;

/// The CUDA launcher (`kernels/elementwise.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::{
        self, address, alloc, base_address, per_element, start_aligned, suffix, Arg, Operand,
    };
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Result, Tensor};

    /// `x` in `dtype` by the vectorized kernel, where it applies: CUDA, between f32, bf16 and
    /// f16, `x` contiguous from a 16-byte boundary.
    pub(super) fn fused_cast(x: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        let floats = |d: DType| matches!(d, DType::F32 | DType::BF16 | DType::F16);
        if !(x.device().is_cuda() && x.is_contiguous() && floats(x.dtype()) && floats(dtype)) {
            return Ok(None);
        }
        let y = launch::with_operands(&[x], |ops| match start_aligned(ops)? {
            true => cast(ops[0], dtype).map(Some),
            false => Ok(None),
        })?;
        Ok(y.map(|y| launch::tensor(y, x.shape().clone())))
    }

    /// `x` (contiguous from a 16-byte boundary) converted to `dtype`, 8 elements per thread.
    fn cast(x: Operand, dtype: DType) -> Result<CudaStorage> {
        let n = x.1.shape().elem_count();
        let out = alloc(&x.0.device, dtype, n)?;
        cast_into(x, (&out, 0))?;
        Ok(out)
    }

    /// `x` (contiguous from a 16-byte boundary) converted to `out`'s dtype into its elements
    /// from `offset` on (a 16-byte boundary).
    fn cast_into(x: Operand, (out, offset): (&CudaStorage, usize)) -> Result<()> {
        let (n, dtype) = (x.1.shape().elem_count(), out.dtype());
        let offset_bytes = offset * dtype.size_in_bytes();
        if !start_aligned(&[x])? || offset_bytes % 16 != 0 {
            candle_core::bail!("cast: the operand and output must start on 16-byte boundaries");
        }
        let args = [
            Arg::Address(address(x)?),
            Arg::Address(base_address(out)? + offset_bytes as u64),
            Arg::Count(n as u64),
        ];
        let (grid, block) = per_element(n.div_ceil(8))?;
        let name = format!("cast_to_{}", suffix(dtype)?);
        launch::launch(&out.device, &name, Some(x.0.dtype()), grid, block, &args)
    }

    /// [`super::stacked_cast`] by one kernel a part, where it applies: CUDA, float dtypes,
    /// 2-D parts of one width, each contiguous from a 16-byte boundary and starting on one in
    /// the output.
    pub(super) fn stacked_cast(parts: &[&Tensor], dtype: DType) -> Result<Option<Tensor>> {
        let floats = |d: DType| matches!(d, DType::F32 | DType::BF16 | DType::F16);
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let width = first.dim(1)?;
        let fits = |p: &&Tensor| {
            p.device().is_cuda()
                && p.rank() == 2
                && p.is_contiguous()
                && floats(p.dtype())
                && p.dim(1).is_ok_and(|w| w == width)
                && (p.elem_count() * dtype.size_in_bytes()) % 16 == 0
        };
        if !(floats(dtype) && parts.iter().all(fits)) {
            return Ok(None);
        }
        let rows: usize = parts.iter().map(|p| p.dim(0)).sum::<Result<usize>>()?;
        let tensors: Vec<Tensor> = parts.iter().map(|p| p.detach()).collect();
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let stacked = launch::with_operands(&refs, |ops| {
            if !start_aligned(ops)? {
                return Ok(None);
            }
            let out = alloc(&ops[0].0.device, dtype, rows * width)?;
            let mut offset = 0;
            for &part in ops {
                cast_into(part, (&out, offset))?;
                offset += part.1.shape().elem_count();
            }
            Ok(Some(out))
        })?;
        Ok(stacked.map(|out| launch::tensor(out, (rows, width).into())))
    }
}

/// No fused cast without CUDA: candle's CPU cast is already a plain loop.
#[cfg(not(feature = "cuda"))]
fn fused_cast(_: &Tensor, _: DType) -> Result<Option<Tensor>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};
    use candle_core::DType;

    #[test]
    fn casts_values_and_gradients_like_to_dtype() {
        let x = uniform(&[3, 5], 7);
        assert_parity(
            "cast",
            &[x],
            &[true],
            |t| super::cast(&super::cast(&t[0], DType::F64)?, DType::F32),
            |t| t[0].to_dtype(DType::F64)?.to_dtype(DType::F32),
            f32::MIN_POSITIVE,
        );
    }
}
