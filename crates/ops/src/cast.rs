//! Dtype conversion with a backward: the f32 master weights cast to the compute dtype on every
//! step of mixed-precision training, and their gradients on the way back.
//!
//! candle's CUDA cast moves one element per thread through a strided-index kernel; the weight
//! casts of a base bf16 training step ran at 0.4–1.3 TB/s and took about 1 ms of it. This one
//! moves 8 elements per thread (`kernels/elementwise.cu`).

use super::attach::attach;
use candle_core::{DType, Result, Tensor};

/// `x` in `dtype`; the gradient flows back cast to `x`'s dtype. On CUDA, between f32, bf16 and
/// f16 for a contiguous `x` that starts on a 16-byte boundary, one vectorized kernel; candle's
/// `to_dtype` elsewhere.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    let Some(y) = fused_cast(&x.detach(), dtype)? else {
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

#[cfg(feature = "cuda")]
use cuda::fused_cast;

/// The CUDA launcher (`kernels/elementwise.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::{self, alloc, per_element, run, start_aligned, suffix, Arg, Operand};
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
        if !start_aligned(&[x])? {
            candle_core::bail!("cast: the operand must start on a 16-byte boundary");
        }
        let n = x.1.shape().elem_count();
        let out = alloc(&x.0.device, dtype, n)?;
        let name = format!("cast_to_{}", suffix(dtype)?);
        let scalars = [Arg::Count(n as u64)];
        run(
            (&name, x.0.dtype()),
            per_element(n.div_ceil(8))?,
            &[x],
            out,
            &scalars,
        )
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
