//! Swapping the two middle axes of a 4-D tensor (`[a, b, c, d]` to `[a, c, b, d]`, contiguous):
//! the attention head split `[batch, seq, heads, dim]` → `[batch, heads, seq, dim]` and the
//! merge back. A dedicated kernel on CUDA instead of candle's generic strided copy, which
//! reads the shape and strides from memory for every element; the backward is the same swap.

use super::cpu_kernel::{f32s, output, written_rows};
#[cfg(feature = "cuda")]
use super::cuda;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `x` `[a, b, c, d]` as a contiguous `[a, c, b, d]`. Same contract as
/// `x.transpose(1, 2)?.contiguous()`; `x` must be contiguous, on a backend [`super::fused`]
/// accepts.
pub(crate) fn swap_middle(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(SwapMiddle)
}

struct SwapMiddle;

fn swapped(layout: &Layout) -> Result<(usize, usize, usize, usize)> {
    match *layout.dims() {
        [a, b, c, d] => Ok((a, b, c, d)),
        ref other => candle_core::bail!("swap_middle: expected 4 dimensions, got {other:?}"),
    }
}

impl CustomOp1 for SwapMiddle {
    fn name(&self) -> &'static str {
        "swap-middle"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(storage, layout)?;
        let (a, b, c, d) = swapped(layout)?;
        // Output row (ai, ci, bi) of d elements is input row (ai, bi, ci).
        // SAFETY: every element of each row is written.
        let y = unsafe {
            written_rows(x.len(), d, |row, out| {
                let (bi, rest) = (row % b, row / b);
                let (ci, ai) = (rest % c, rest / c);
                let src = &x[((ai * b + bi) * c + ci) * d..][..d];
                out.iter_mut().zip(src).for_each(|(o, &v)| {
                    o.write(v);
                });
            })
        };
        Ok(output(y, (a, c, b, d)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (a, b, c, d) = swapped(layout)?;
        Ok((cuda::swap_middle((storage, layout))?, (a, c, b, d).into()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&SwapMiddle)?))
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};

    #[test]
    fn matches_transpose_forward_and_backward() {
        for shape in [[2, 3, 4, 5], [1, 7, 2, 1], [3, 1, 1, 8]] {
            assert_parity(
                "swap_middle",
                &[uniform(&shape, 1)],
                &[true],
                |t| super::swap_middle(&t[0]),
                |t| t[0].transpose(1, 2)?.contiguous(),
                1e-7,
            );
        }
    }
}
