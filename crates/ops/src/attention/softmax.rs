//! Fused causal attention on the CPU and on CUDA: `softmax(scores * scale + causal mask)` in one
//! pass per row, and its backward in one pass, with no mask tensor and no T×T temporaries
//! besides the probabilities themselves (`kernels/attention.cu` on CUDA). The [`Scoring`]
//! options soft-cap the scaled scores (Gemma 2) and narrow each row to a sliding window (and,
//! with [`Segments`], to its segment's keys); with
//! soft-capping the backward also reads the raw scores (kept for it), since the probabilities
//! do not give back the capped logits' slopes. The QKᵀ and PV
//! products stay candle matmuls (cuBLAS on CUDA). The whole attention is one node of the
//! autograd graph with a hand-written backward, so candle keeps and accumulates no score-sized
//! gradients of its own.

use super::{Scoring, Segments};
use crate::attach::attach3;
use crate::cpu_kernel::{assume_written, f32s, output, written_rows};
use crate::fast_exp;
use crate::fused_op::{custom_op, CpuOperand, CpuOutput, FusedOp};
#[cfg(feature = "cuda")]
use crate::fused_op::{CudaOutput, Operand};
use crate::rows_and_width;
use candle_core::{Layout, Result, Tensor};
use std::mem::MaybeUninit;
use std::ops::Range;

/// Causal attention with the fused softmax, its scores taken as `scoring` says, each query
/// seeing only its segment's keys with `segments`. Same contract as
/// [`super::causal_attention`]; inputs must be contiguous, on a backend [`crate::fused`]
/// accepts.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scoring: Scoring,
    segments: Option<&Segments>,
) -> Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let scores = qd.matmul(&kd.t()?)?;
    let segments = segments.cloned();
    let softmax = CausalSoftmax {
        scoring,
        segments: segments.clone(),
    };
    let probs = scores.apply_op1_no_bwd(&softmax)?;
    let out = probs.matmul(&vd)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    // Only soft-capping's backward reads the raw scores; otherwise they are freed now.
    let capped = match scoring.softcap > 0.0 {
        true => scores,
        false => probs.clone(),
    };
    attach3([q, k, v], &out, "causal-attention", move |grad| {
        let grad = grad.contiguous()?;
        let dv = probs.t()?.matmul(&grad)?;
        let dp = grad.matmul(&vd.t()?)?;
        let grad_op = CausalSoftmaxGrad {
            scoring,
            segments: segments.clone(),
        };
        let ds = probs.apply_op3_no_bwd(&dp, &capped, &grad_op)?;
        let dq = ds.matmul(&kd)?;
        let dk = ds.t()?.matmul(&qd)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    })
}

/// Which keys each row of a `[batch, .., q_len, kv_len]` score tensor sees: query `i` sits at
/// position `kv_len - q_len + i` and sees the keys up to it, the last `window` of them with a
/// window, from its segment's start with segments.
struct RowKeys {
    q_len: usize,
    kv_len: usize,
    scoring: Scoring,
    /// The segment starts `[batch, kv_len]` and the score rows per batch row.
    starts: Option<(Vec<u32>, usize)>,
}

impl RowKeys {
    fn new(layout: &Layout, scoring: Scoring, segments: Option<&Segments>) -> Result<Self> {
        let (rows, q_len, kv_len) = query_and_key_lens(layout)?;
        let starts = match segments {
            None => None,
            Some(segments) => {
                let batch = layout.dims()[0];
                if q_len != kv_len || batch == 0 {
                    candle_core::bail!("segments need as many queries as keys, and a batch");
                }
                Some((segments.host(batch, kv_len)?, rows / batch))
            }
        };
        Ok(Self {
            q_len,
            kv_len,
            scoring,
            starts,
        })
    }

    /// The keys row `row` sees.
    fn of(&self, row: usize) -> Range<usize> {
        let end = self.kv_len - self.q_len + row % self.q_len + 1;
        let first = self.scoring.first_key(end);
        match &self.starts {
            None => first..end,
            Some((starts, per_batch)) => {
                let start = starts[row / per_batch * self.kv_len + end - 1] as usize;
                first.max(start).min(end - 1)..end
            }
        }
    }
}

/// The visible elements of an output row, after writing zeros over the rest (the masked
/// keys, whose probabilities and gradients are 0).
fn visible_part(row: &mut [MaybeUninit<f32>], keys: Range<usize>) -> &mut [MaybeUninit<f32>] {
    let (before, rest) = row.split_at_mut(keys.start);
    let (visible, after) = rest.split_at_mut(keys.len());
    before.fill(MaybeUninit::new(0.0));
    after.fill(MaybeUninit::new(0.0));
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
    scoring: Scoring,
    segments: Option<Segments>,
}

impl CausalSoftmax {
    /// Writes the probabilities of the visible `keys` of one row of `scores` into `p`, and
    /// zeros over the rest.
    fn write_row(&self, scores: &[f32], keys: Range<usize>, p: &mut [MaybeUninit<f32>]) {
        let scores = &scores[keys.clone()];
        let p = visible_part(p, keys);
        let Scoring { scale, softcap, .. } = self.scoring;
        if softcap > 0.0 {
            for (p, &s) in p.iter_mut().zip(scores) {
                p.write(softcap * (s * scale / softcap).tanh());
            }
            // SAFETY: the loop above wrote every element of `p`.
            let p = unsafe { assume_written(p) };
            fast_exp::softmax_in_place(p, 1.0);
            return;
        }
        let max = fast_exp::max(scores);
        for (p, &s) in p.iter_mut().zip(scores) {
            p.write(fast_exp::exp((s - max) * scale));
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
        let keys = RowKeys::new(layout, self.scoring, self.segments.as_ref())?;
        let kv_len = keys.kv_len;
        // SAFETY: `write_row` writes every element of the row.
        let probs = unsafe {
            written_rows(scores.len(), kv_len, |row, p| {
                let keys = keys.of(row);
                self.write_row(&scores[row * kv_len..][..kv_len], keys, p);
            })
        };
        Ok(output(probs, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [scores]: [Operand; 1]) -> CudaOutput {
        let (_, q_len, _) = query_and_key_lens(scores.1)?;
        let segments = self.segments.as_ref();
        let probs = cuda::causal_softmax(scores, q_len, self.scoring, segments)?;
        Ok((probs, scores.1.shape().clone()))
    }
}

custom_op!(CausalSoftmax: 1);

/// `dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale`, times the soft-cap's slope `1 − tanh²` of each
/// raw score (the third operand, read only with soft-capping), skipping the masked part of each
/// row (P = 0 there).
struct CausalSoftmaxGrad {
    scoring: Scoring,
    segments: Option<Segments>,
}

impl FusedOp<3> for CausalSoftmaxGrad {
    const NAME: &'static str = "causal-softmax-grad";

    fn cpu(
        &self,
        [(probs, probs_layout), (grad, grad_layout), (scores, scores_layout)]: [CpuOperand; 3],
    ) -> CpuOutput {
        let (probs, grad) = (f32s(probs, probs_layout)?, f32s(grad, grad_layout)?);
        let scores = f32s(scores, scores_layout)?;
        let keys = RowKeys::new(probs_layout, self.scoring, self.segments.as_ref())?;
        let kv_len = keys.kv_len;
        if grad.len() != probs.len() || scores.len() != probs.len() {
            candle_core::bail!(
                "causal softmax gradient: {} probabilities, {} gradients, {} scores",
                probs.len(),
                grad.len(),
                scores.len()
            );
        }
        let Scoring { scale, softcap, .. } = self.scoring;
        // SAFETY: `visible_part` writes the masked parts of each row, the loop the rest.
        let out = unsafe {
            written_rows(probs.len(), kv_len, |row, ds| {
                let keys = keys.of(row);
                let at = row * kv_len + keys.start..row * kv_len + keys.end;
                let (p, dp, s) = (&probs[at.clone()], &grad[at.clone()], &scores[at]);
                let dot: f32 = p.iter().zip(dp).map(|(p, d)| p * d).sum();
                let visible = visible_part(ds, keys);
                for (((ds, &p), &dp), &s) in visible.iter_mut().zip(p).zip(dp).zip(s) {
                    let slope = match softcap > 0.0 {
                        true => 1.0 - (s * scale / softcap).tanh().powi(2),
                        false => 1.0,
                    };
                    ds.write(p * (dp - dot) * scale * slope);
                }
            })
        };
        Ok(output(out, probs_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [probs, grad, scores]: [Operand; 3]) -> CudaOutput {
        let (_, q_len, _) = query_and_key_lens(probs.1)?;
        let segments = self.segments.as_ref();
        let ds = cuda::causal_softmax_grad([probs, grad, scores], q_len, self.scoring, segments)?;
        Ok((ds, probs.1.shape().clone()))
    }
}

custom_op!(CausalSoftmaxGrad: 3);

/// The CUDA launchers (`kernels/attention.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use super::{Scoring, Segments};
    use crate::launch::{
        alloc, common_dtype, elementwise_kernel, int, per_warp_row, run, Arg, Operand,
    };
    use crate::rows_and_width;
    use candle_core::{CudaStorage, Result};

    /// The kernels' arguments after the row counts: scale, soft-cap (0 for none), window (0
    /// for none), the segment starts (null for none) and the score rows per batch row.
    fn scoring_args(
        scoring: Scoring,
        segments: Option<&Segments>,
        rows: usize,
        kv_len: usize,
    ) -> Result<[Arg; 5]> {
        let (starts, per_batch) = match segments {
            None => (0, rows.max(1)),
            Some(s) => (s.address(kv_len)?, rows / s.starts().dim(0)?.max(1)),
        };
        Ok([
            Arg::Float(scoring.scale),
            Arg::Float(scoring.softcap),
            int(scoring.window.min(kv_len))?,
            Arg::Address(starts),
            int(per_batch)?,
        ])
    }

    /// Causal softmax of attention scores `[.., q_len, kv_len]`, taken as `scoring` says.
    pub(super) fn causal_softmax(
        scores: Operand,
        q_len: usize,
        scoring: Scoring,
        segments: Option<&Segments>,
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&[scores])?;
        let (rows, kv_len) = rows_and_width(scores.1)?;
        let probs = alloc(&scores.0.device, dtype, rows * kv_len)?;
        let counts = [int(rows)?, int(q_len)?, int(kv_len)?];
        let scoring = scoring_args(scoring, segments, rows, kv_len)?;
        let scalars = [counts.as_slice(), &scoring].concat();
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

    /// Gradient of the causal softmax with respect to the raw scores (read only with
    /// soft-capping).
    pub(super) fn causal_softmax_grad(
        [probs, grad, scores]: [Operand; 3],
        q_len: usize,
        scoring: Scoring,
        segments: Option<&Segments>,
    ) -> Result<CudaStorage> {
        let dtype = common_dtype(&[probs, grad, scores])?;
        let (rows, kv_len) = rows_and_width(probs.1)?;
        let ds = alloc(&probs.0.device, dtype, rows * kv_len)?;
        let counts = [int(rows)?, int(q_len)?, int(kv_len)?];
        let scoring = scoring_args(scoring, segments, rows, kv_len)?;
        let scalars = [counts.as_slice(), &scoring].concat();
        let kernels = ("causal_softmax_bwd", "causal_softmax_bwd_wide");
        let (name, _) = elementwise_kernel(kernels, &[probs, grad, scores], kv_len)?;
        run(
            (name, dtype),
            per_warp_row(rows)?,
            &[probs, grad, scores],
            ds,
            &scalars,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::{windowed_reference, AttentionOptions, Scoring, Segments};
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
                |t| super::super::causal_attention(&t[0], &t[1], &t[2]),
                |t| super::super::reference(&t[0], &t[1], &t[2]),
                1e-5,
            );
        }
    }

    #[test]
    fn soft_capped_windowed_scores_match_the_reference() {
        // (queries, keys, options): prompt and decode-like rows, windows inside and past them.
        let options = |scale: f64, softcap, window| AttentionOptions {
            scale,
            softcap,
            window,
            segments: None,
        };
        for (i, (q, kv, o)) in [
            (7, 7, options(0.3, Some(2.0), Some(3))),
            (5, 9, options(0.5, None, Some(4))),
            (6, 6, options(0.4, Some(1.5), None)),
            (3, 8, options(0.2, Some(50.0), Some(20))),
            (40, 40, options(0.35, Some(3.0), Some(1))),
        ]
        .into_iter()
        .enumerate()
        {
            let s = 10 * i as u64;
            let inputs = [
                (uniform(&[2, 2, q, 8], s) * 3.0).unwrap(),
                (uniform(&[2, 2, kv, 8], s + 1) * 3.0).unwrap(),
                uniform(&[2, 2, kv, 8], s + 2),
            ];
            assert_parity(
                "causal_attention with options",
                &inputs,
                &[true; 3],
                |t| super::causal_attention(&t[0], &t[1], &t[2], Scoring::of(&o), None),
                |t| windowed_reference(&t[0], &t[1], &t[2], o.clone()),
                1e-5,
            );
        }
    }

    #[test]
    fn segmented_scores_match_the_reference() {
        // Two rows of 13 positions: segments of 4, 1, 8 and of 13; with and without a window.
        let starts = [[0, 0, 0, 0, 4, 5, 5, 5, 5, 5, 5, 5, 5], [0; 13]];
        let rows: Vec<Vec<u32>> = starts.iter().map(|r| r.to_vec()).collect();
        let device = candle_core::Device::Cpu;
        let segments = Segments::from_rows(&rows, &device).unwrap();
        for (i, window) in [None, Some(3)].into_iter().enumerate() {
            let o = AttentionOptions {
                scale: 0.3,
                softcap: None,
                window,
                segments: Some(segments.clone()),
            };
            let s = 10 * i as u64;
            let inputs = [
                uniform(&[2, 3, 13, 8], s),
                uniform(&[2, 3, 13, 8], s + 1),
                uniform(&[2, 3, 13, 8], s + 2),
            ];
            let scoring = Scoring::of(&o);
            assert_parity(
                "segmented causal_attention",
                &inputs,
                &[true; 3],
                |t| super::causal_attention(&t[0], &t[1], &t[2], scoring, Some(&segments)),
                |t| windowed_reference(&t[0], &t[1], &t[2], o.clone()),
                1e-5,
            );
        }
    }
}
