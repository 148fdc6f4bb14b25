//! Swapping the two middle axes of a 4-D tensor (`[a, b, c, d]` to `[a, c, b, d]`, contiguous):
//! the attention head split `[batch, seq, heads, dim]` → `[batch, heads, seq, dim]` and the
//! merge back ([`split_heads`], [`merge_heads`]). A dedicated kernel on CUDA
//! (`kernels/elementwise.cu`) instead of candle's generic strided copy, which reads the shape
//! and strides from memory for every element; the backward is the same swap.

use super::attach::attach;
use super::cpu_kernel::{f32s, output, written_rows};
use super::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use super::fused_op::{CudaOutput, Operand};
use candle_core::{Layout, Result, Tensor};

/// `x` `[a, b, c, d]` as a contiguous `[a, c, b, d]` (the attention head split and merge).
pub fn swap_middle(x: &Tensor) -> Result<Tensor> {
    if let [a, b, c, d] = *x.dims() {
        if (b == 1 || c == 1) && x.is_contiguous() {
            // The same elements in the same order (a decode step: one position).
            return x.reshape((a, c, b, d));
        }
    }
    if super::fused(&[x]) && x.rank() == 4 {
        return x.contiguous()?.apply_op1(SwapMiddle);
    }
    x.transpose(1, 2)?.contiguous()
}

/// `[batch, seq, heads * head_size]` projections as `[batch, heads, seq, head_size]`
/// (contiguous). The graph node keeps nothing of `y`: its backward is the merge.
pub fn split_heads(y: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = y.dims3()?;
    let split = |y: &Tensor| swap_middle(&y.reshape((b, t, heads, width / heads))?);
    let value = split(&y.detach())?;
    if !y.track_op() {
        return Ok(value);
    }
    attach(y, &value, "split-heads", move |grad| Ok(Some(merge(grad)?)))
}

/// `[batch, heads, seq, head_size]` attention outputs as `[batch, seq, heads * head_size]`
/// (contiguous). The graph node keeps nothing of `y`: its backward is the split.
pub fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let (_, heads, _, _) = y.dims4()?;
    let value = merge(&y.detach())?;
    if !y.track_op() {
        return Ok(value);
    }
    attach(y, &value, "merge-heads", move |grad| {
        Ok(Some(split_heads(&grad.detach(), heads)?))
    })
}

/// [`merge_heads`] outside the graph.
fn merge(y: &Tensor) -> Result<Tensor> {
    let (b, heads, t, d) = y.dims4()?;
    swap_middle(y)?.reshape((b, t, heads * d))
}

struct SwapMiddle;

fn swapped(layout: &Layout) -> Result<(usize, usize, usize, usize)> {
    match *layout.dims() {
        [a, b, c, d] => Ok((a, b, c, d)),
        ref other => candle_core::bail!("swap_middle: expected 4 dimensions, got {other:?}"),
    }
}

impl FusedOp<1> for SwapMiddle {
    const NAME: &'static str = "swap-middle";

    fn cpu(&self, [(storage, layout)]: [CpuOperand; 1]) -> CpuOutput {
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
    fn cuda(&self, [x]: [Operand; 1]) -> CudaOutput {
        let (a, b, c, d) = swapped(x.1)?;
        Ok((cuda::swap_middle(x)?, (a, c, b, d).into()))
    }

    fn backward(
        &self,
        _x: [&Tensor; 1],
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 1]> {
        Ok([Some(grad.contiguous()?.apply_op1_no_bwd(&SwapMiddle)?)])
    }
}

custom_op!(SwapMiddle: 1);

/// The CUDA launcher (`kernels/elementwise.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::{
        address, alloc, base_address, common_dtype, int, launch, per_element, run, start_aligned,
        Arg, Operand,
    };
    use candle_core::{CudaStorage, Result};

    /// `[a, b, c, d]` to `[a, c, b, d]`, contiguous.
    pub(super) fn swap_middle(x: Operand) -> Result<CudaStorage> {
        let dtype = common_dtype(&[x])?;
        let &[_, b, c, d] = x.1.dims() else {
            candle_core::bail!("swap_middle: expected 4 dimensions, got {:?}", x.1.dims());
        };
        let n = x.1.shape().elem_count();
        let y = alloc(&x.0.device, dtype, n)?;
        let row_bytes = d * dtype.size_in_bytes();
        if row_bytes % 16 == 0 && start_aligned(&[x])? {
            // Rows of whole 16-byte units: move those (the output buffer is aligned).
            let (units, unit_rows) = (n * dtype.size_in_bytes() / 16, row_bytes / 16);
            let args = [
                Arg::Address(address(x)?),
                Arg::Address(base_address(&y)?),
                int(b)?,
                int(c)?,
                int(unit_rows)?,
                Arg::Count(units as u64),
            ];
            let (grid, block) = per_element(units)?;
            launch(&x.0.device, "swap_middle_v16", None, grid, block, &args)?;
            return Ok(y);
        }
        let scalars = [int(b)?, int(c)?, int(d)?, Arg::Count(n as u64)];
        run(("swap_middle", dtype), per_element(n)?, &[x], y, &scalars)
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
                |t| t[0].apply_op1(super::SwapMiddle),
                |t| t[0].transpose(1, 2)?.contiguous(),
                1e-7,
            );
        }
    }
}
