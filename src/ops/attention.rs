//! Fused causal attention on the CPU and on CUDA: `softmax(scores * scale + causal mask)` in one
//! pass per row, and its backward in one pass, with no mask tensor and no T×T temporaries
//! besides the probabilities themselves. The QKᵀ and PV products stay candle matmuls (cuBLAS on
//! CUDA). The whole attention is one node of the autograd graph with a hand-written backward,
//! so candle keeps and accumulates no score-sized gradients of its own.

use super::attach::attach3;
use super::cpu_kernel::{f32s, for_each_row, output, MIN_ROWS_PER_TASK};
#[cfg(feature = "cuda")]
use super::cuda;
use super::fast_exp;
use super::rows_and_width;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Causal attention with the fused softmax. Same contract as
/// [`super::reference::causal_attention`]; inputs must be contiguous, on a backend
/// [`super::fused`] accepts.
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

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let scores = f32s(storage, layout)?;
        let (_, q_len, kv_len) = query_and_key_lens(layout)?;
        let mut probs = vec![0f32; scores.len()];
        for_each_row(&mut probs, kv_len, |row, p| {
            let s = &scores[row * kv_len..][..kv_len];
            let n = visible(row, q_len, kv_len);
            let max = fast_exp::max(&s[..n]);
            for (p, &s) in p[..n].iter_mut().zip(&s[..n]) {
                *p = fast_exp::exp((s - max) * self.scale);
            }
            let inv = 1.0 / fast_exp::sum(&p[..n]);
            p[..n].iter_mut().for_each(|p| *p *= inv);
        });
        Ok(output(probs, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (_, q_len, _) = query_and_key_lens(layout)?;
        let probs = cuda::causal_softmax((storage, layout), q_len, self.scale)?;
        Ok((probs, layout.shape().clone()))
    }
}

/// `dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale`, skipping the masked part of each row (P = 0 there).
struct CausalSoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        probs: &CpuStorage,
        probs_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (probs, grad) = (f32s(probs, probs_layout)?, f32s(grad, grad_layout)?);
        let (_, q_len, kv_len) = query_and_key_lens(probs_layout)?;
        let mut out = vec![0f32; probs.len()];
        out.par_chunks_mut(kv_len)
            .zip(probs.par_chunks(kv_len).zip(grad.par_chunks(kv_len)))
            .with_min_len(MIN_ROWS_PER_TASK)
            .enumerate()
            .for_each(|(row, (ds, (p, dp)))| {
                let n = visible(row, q_len, kv_len);
                let dot: f32 = p[..n].iter().zip(&dp[..n]).map(|(p, d)| p * d).sum();
                for ((ds, &p), &dp) in ds[..n].iter_mut().zip(&p[..n]).zip(&dp[..n]) {
                    *ds = p * (dp - dot) * self.scale;
                }
            });
        Ok(output(out, probs_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        probs: &CudaStorage,
        probs_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, q_len, _) = query_and_key_lens(probs_layout)?;
        let ds = cuda::causal_softmax_grad(
            (probs, probs_layout),
            (grad, grad_layout),
            q_len,
            self.scale,
        )?;
        Ok((ds, probs_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::parity::{assert_parity, uniform};
    use crate::ops::reference;

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
                |t| reference::causal_attention(&t[0], &t[1], &t[2]),
                1e-5,
            );
        }
    }
}
