//! Fused causal attention on the CPU and on CUDA: `softmax(scores * scale + causal mask)` in one
//! pass per row, and its backward in one pass, with no mask tensor and no T×T temporaries
//! besides the probabilities themselves (`kernels/attention.cu` on CUDA). The QKᵀ and PV
//! products stay candle matmuls (cuBLAS on CUDA). The whole attention is one node of the
//! autograd graph with a hand-written backward, so candle keeps and accumulates no score-sized
//! gradients of its own.

use crate::attach::attach3;
use crate::cpu_kernel::{assume_written, f32s, output, written_rows};
use crate::fast_exp;
use crate::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use crate::fused_op::{CudaOutput, Operand};
use crate::rows_and_width;
use candle_core::{Layout, Result, Tensor};
use std::mem::MaybeUninit;

/// Causal attention with the fused softmax. Same contract as [`super::causal_attention`];
/// inputs must be contiguous, on a backend [`crate::fused`] accepts.
pub(crate) fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let head_dim = q.dim(3)?;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let probs = qd
        .matmul(&kd.t()?)?
        .apply_op1_no_bwd(&CausalSoftmax { scale })?;
    let out = probs.matmul(&vd)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    attach3([q, k, v], &out, "causal-attention", move |grad| {
        let grad = grad.contiguous()?;
        let dv = probs.t()?.matmul(&grad)?;
        let dp = grad.matmul(&vd.t()?)?;
        let ds = probs.apply_op2_no_bwd(&dp, &CausalSoftmaxGrad { scale })?;
        let dq = ds.matmul(&kd)?;
        let dk = ds.t()?.matmul(&qd)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    })
}

/// Row `row` of a `[.., q_len, kv_len]` score tensor may see keys `0..visible(row)`: query `i`
/// sits at position `kv_len - q_len + i`.
fn visible(row: usize, q_len: usize, kv_len: usize) -> usize {
    kv_len - q_len + row % q_len + 1
}

/// The first `n` (visible) elements of an output row, after writing zeros over the rest (the
/// masked keys, whose probabilities and gradients are 0).
fn visible_part(row: &mut [MaybeUninit<f32>], n: usize) -> &mut [MaybeUninit<f32>] {
    let (visible, masked) = row.split_at_mut(n);
    masked.fill(MaybeUninit::new(0.0));
    visible
}

fn query_and_key_lens(layout: &Layout) -> Result<(usize, usize, usize)> {
    let (rows, kv_len) = rows_and_width(layout)?;
    let dims = layout.dims();
    let q_len = if dims.len() >= 2 {
        dims[dims.len() - 2]
    } else {
        1
    };
    if q_len > kv_len || q_len == 0 {
        candle_core::bail!("causal softmax: {q_len} queries against {kv_len} keys");
    }
    Ok((rows, q_len, kv_len))
}

struct CausalSoftmax {
    scale: f32,
}

impl CausalSoftmax {
    /// Writes the probabilities of one row of `scores.len()` visible keys into the first
    /// elements of `p`, and zeros over the rest.
    fn write_row(&self, scores: &[f32], p: &mut [MaybeUninit<f32>]) {
        let p = visible_part(p, scores.len());
        let max = fast_exp::max(scores);
        for (p, &s) in p.iter_mut().zip(scores) {
            p.write(fast_exp::exp((s - max) * self.scale));
        }
        // SAFETY: the loop above wrote every element of `p`.
        let p = unsafe { assume_written(p) };
        let inv = 1.0 / fast_exp::sum(p);
        p.iter_mut().for_each(|p| *p *= inv);
    }
}

impl FusedOp<1> for CausalSoftmax {
    const NAME: &'static str = "causal-softmax";

    fn cpu(&self, [(storage, layout)]: [CpuOperand; 1]) -> CpuOutput {
        let scores = f32s(storage, layout)?;
        let (_, q_len, kv_len) = query_and_key_lens(layout)?;
        // SAFETY: `write_row` writes every element of the row.
        let probs = unsafe {
            written_rows(scores.len(), kv_len, |row, p| {
                let n = visible(row, q_len, kv_len);
                self.write_row(&scores[row * kv_len..][..n], p);
            })
        };
        Ok(output(probs, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [scores]: [Operand; 1]) -> CudaOutput {
        let (_, q_len, _) = query_and_key_lens(scores.1)?;
        let probs = cuda::causal_softmax(scores, q_len, self.scale)?;
        Ok((probs, scores.1.shape().clone()))
    }
}

custom_op!(CausalSoftmax: 1);

/// `dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale`, skipping the masked part of each row (P = 0 there).
struct CausalSoftmaxGrad {
    scale: f32,
}

impl FusedOp<2> for CausalSoftmaxGrad {
    const NAME: &'static str = "causal-softmax-grad";

    fn cpu(&self, [(probs, probs_layout), (grad, grad_layout)]: [CpuOperand; 2]) -> CpuOutput {
        let (probs, grad) = (f32s(probs, probs_layout)?, f32s(grad, grad_layout)?);
        let (_, q_len, kv_len) = query_and_key_lens(probs_layout)?;
        if grad.len() != probs.len() {
            candle_core::bail!(
                "causal softmax gradient: {} probabilities, {} gradients",
                probs.len(),
                grad.len()
            );
        }
        // SAFETY: `visible_part` writes the masked tail of each row, the loop the rest.
        let out = unsafe {
            written_rows(probs.len(), kv_len, |row, ds| {
                let n = visible(row, q_len, kv_len);
                let (p, dp) = (&probs[row * kv_len..][..n], &grad[row * kv_len..][..n]);
                let dot: f32 = p.iter().zip(dp).map(|(p, d)| p * d).sum();
                for ((ds, &p), &dp) in visible_part(ds, n).iter_mut().zip(p).zip(dp) {
                    ds.write(p * (dp - dot) * self.scale);
                }
            })
        };
        Ok(output(out, probs_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [probs, grad]: [Operand; 2]) -> CudaOutput {
        let (_, q_len, _) = query_and_key_lens(probs.1)?;
        let ds = cuda::causal_softmax_grad(probs, grad, q_len, self.scale)?;
        Ok((ds, probs.1.shape().clone()))
    }
}

custom_op!(CausalSoftmaxGrad: 2);

/// The CUDA launchers (`kernels/attention.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::launch::{
        alloc, common_dtype, elementwise_kernel, int, per_warp_row, run, Arg, Operand,
    };
    use crate::rows_and_width;
    use candle_core::{CudaStorage, Result};

    /// Causal softmax of attention scores `[.., q_len, kv_len]`, scaled by `scale`.
    pub(super) fn causal_softmax(scores: Operand, q_len: usize, scale: f32) -> Result<CudaStorage> {
        let dtype = common_dtype(&[scores])?;
        let (rows, kv_len) = rows_and_width(scores.1)?;
        let probs = alloc(&scores.0.device, dtype, rows * kv_len)?;
        let scalars = [int(rows)?, int(q_len)?, int(kv_len)?, Arg::Float(scale)];
        let kernels = ("causal_softmax_fwd", "causal_softmax_fwd_wide");
        let (name, _) = elementwise_kernel(kernels, &[scores], kv_len)?;
        run(
            (name, dtype),
            per_warp_row(rows)?,
            &[scores],
            probs,
            &scalars,
        )
    }

    /// Gradient of the causal softmax with respect to the raw scores.
    pub(super) fn causal_softmax_grad(
        probs: Operand,
        grad: Operand,
        q_len: usize,
        scale: f32,
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&[probs, grad])?;
        let (rows, kv_len) = rows_and_width(probs.1)?;
        let ds = alloc(&probs.0.device, dtype, rows * kv_len)?;
        let scalars = [int(rows)?, int(q_len)?, int(kv_len)?, Arg::Float(scale)];
        let kernels = ("causal_softmax_bwd", "causal_softmax_bwd_wide");
        let (name, _) = elementwise_kernel(kernels, &[probs, grad], kv_len)?;
        run(
            (name, dtype),
            per_warp_row(rows)?,
            &[probs, grad],
            ds,
            &scalars,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, uniform};

    #[test]
    fn matches_the_reference_forward_and_backward() {
        // (batch, heads, queries, keys, head size): single token, decode step, odd sizes.
        for (i, &(b, h, q, kv, d)) in [
            (1, 1, 1, 1, 4),
            (2, 3, 7, 7, 8),
            (1, 2, 1, 5, 4),
            (2, 2, 3, 9, 16),
            (1, 1, 33, 33, 5),
            // Large enough for the parallel path.
            (1, 2, 100, 100, 8),
        ]
        .iter()
        .enumerate()
        {
            let s = 10 * i as u64;
            let inputs = [
                uniform(&[b, h, q, d], s),
                uniform(&[b, h, kv, d], s + 1),
                uniform(&[b, h, kv, d], s + 2),
            ];
            assert_parity(
                "causal_attention",
                &inputs,
                &[true; 3],
                |t| super::causal_attention(&t[0], &t[1], &t[2]),
                |t| super::super::reference(&t[0], &t[1], &t[2]),
                1e-5,
            );
        }
    }
}
