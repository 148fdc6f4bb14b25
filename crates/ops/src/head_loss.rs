//! The output projection and the per-token NLL as one op, chunked over rows: when the
//! `[tokens, vocab]` logits would be large, they are computed a chunk at a time and reduced to
//! one NLL per row, so the full logits tensor (and its gradient) never exists at once.
//!
//! The training loss ([`head_mean_nll`]) computes its gradients during the forward pass, chunk
//! by chunk while each chunk's logits are at hand, and its backward only scales them by the
//! incoming gradient: the logits are never recomputed (a recompute is a third output-head GEMM,
//! 8% of a base fp32 training step). From a training step's backward pass
//! ([`super::backward_from_loss`]), whose incoming gradient is the seed 1, it hands them over
//! as they are.
//!
//! With a final soft-cap (Gemma 2's `cap · tanh(logit / cap)`), each chunk's logits are capped
//! before the NLL and the chunk's logit gradient takes the cap's slope `1 − tanh²`.

use super::add::scaled;
use super::attach::{attach2, receives_unit_seed};
use super::master_linear::add_weight_grad;
use candle_core::{DType, Result, Tensor, TensorId};
use std::sync::{Arc, Mutex, OnceLock};

/// The logits are computed in chunks of at most this size.
const CHUNK_BYTES: usize = 256 << 20;

/// Rows of `hidden` per chunk of at most `chunk_bytes` of logits against a head of `vocab` rows.
fn chunk_rows(hidden: &Tensor, vocab: usize, chunk_bytes: usize) -> usize {
    let row_bytes = vocab * hidden.dtype().size_in_bytes();
    (chunk_bytes / row_bytes.max(1)).max(1)
}

/// [`chunk_rows`] for the training loss. Where `head` is trained, each chunk adds its share of
/// the head's gradient to an f32 sum, reading and writing all of it (1 GB for a
/// 128K-vocabulary head of width 2,048), so a chunk holds at least half as many bytes of
/// logits as that gradient has: a 1B model's in four chunks of a 4 × 2,048 batch, not eight
/// (its training step 2–2.5% faster on an H100 at the same peak). A small head's chunks stay
/// at [`CHUNK_BYTES`], as do a frozen head's, which sum no gradient: larger ones would only
/// raise the peak (the base preset's by 9% at 512 MiB, a 1B LoRA step's by 1.5 GB at 1 GiB;
/// docs/benchmarks.md, session 35).
fn training_chunk_rows(hidden: &Tensor, head: &Tensor) -> Result<usize> {
    let (vocab, width) = head.dims2()?;
    let chunk_bytes = match head.track_op() {
        true => trained_head_chunk_bytes(vocab * width * DType::F32.size_in_bytes()),
        false => CHUNK_BYTES,
    };
    Ok(chunk_rows(hidden, vocab, chunk_bytes))
}

/// The chunk size for a trained head whose f32 gradient has `gradient_bytes`.
fn trained_head_chunk_bytes(gradient_bytes: usize) -> usize {
    CHUNK_BYTES.max(gradient_bytes / 2)
}

/// `cap · tanh(logits / cap)` where there is a cap.
fn capped(logits: Tensor, softcap: Option<f64>) -> Result<Tensor> {
    match softcap {
        Some(cap) => (logits / cap)?.tanh()? * cap,
        None => Ok(logits),
    }
}

/// NLL `[n]` (f32) of u32 `targets` `[n]` under `hidden @ head.t()` (`hidden` `[n, d]`, `head`
/// `[vocab, d]`), soft-capped by `softcap` where given, with no gradient (validation and
/// scoring).
pub fn head_nll(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let rows = chunk_rows(hidden, head.dim(0)?, CHUNK_BYTES);
    head_nll_in_chunks(&hidden.detach(), &head.detach(), targets, rows, softcap)
}

fn head_nll_in_chunks(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    rows: usize,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let n = x.dim(0)?;
    let targets = targets.contiguous()?;
    let mut nll = Vec::with_capacity(n.div_ceil(rows));
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let logits = capped(x.narrow(0, start, len)?.matmul(&w.t()?)?, softcap)?;
        nll.push(super::token_nll(&logits, &targets.narrow(0, start, len)?)?);
    }
    Tensor::cat(&nll, 0)
}

/// The training loss `Σ weights · nll / max(Σ weights, 1)` (f32 scalar) of u32 `targets` `[n]`
/// under `hidden @ head.t()` (soft-capped by `softcap` where given), `weights` `[n]` (1 to
/// score a position, 0 to skip it), with gradients for `hidden` and, when it is tracked, for
/// `head`. The logits are computed in `hidden`'s dtype; `head` may be wider (an f32 master
/// weight) and gets its gradient in its own dtype.
pub fn head_mean_nll(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let rows = training_chunk_rows(hidden, head)?;
    head_mean_nll_in_chunks(hidden, head, (targets, weights), rows, softcap)
}

fn head_mean_nll_in_chunks(
    hidden: &Tensor,
    head: &Tensor,
    (targets, weights): (&Tensor, &Tensor),
    rows: usize,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (x, w) = (
        hidden.detach(),
        super::step_scope::copy_or_cast(head, hidden.dtype())?,
    );
    let weights = weights.detach().to_dtype(DType::F32)?;
    let (want_dx, want_dw) = (hidden.track_op(), head.track_op());
    if !want_dx && !want_dw {
        let nll = head_nll_in_chunks(&x, &w, targets, rows, softcap)?;
        return super::weighted_mean(&nll, &weights);
    }
    // The logits' gradient takes each row's weight over the count, so the gradients come out
    // of the chunks as the mean's. In f16 they are those of the weighted sum and the division
    // happens in backward, on the f32 scale factor: divided in the kernel, a probability of
    // 1/32,000 over 8,192 counted tokens (4e-9) would underflow.
    let count = weights.sum_all()?.maximum(1.0)?;
    let divided = x.dtype() != DType::F16;
    let row_scales = match divided {
        true => weights.broadcast_div(&count)?,
        false => weights.clone(),
    };
    let targets = targets.contiguous()?;
    let n = x.dim(0)?;
    let mut nll = Vec::with_capacity(n.div_ceil(rows));
    let (mut dx, mut dw_sum) = (Vec::new(), None);
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let xc = x.narrow(0, start, len)?;
        let t = targets.narrow(0, start, len)?;
        let logits = capped(xc.matmul(&w.t()?)?, softcap)?;
        let (chunk_nll, dlogits) =
            super::token_nll_with_grad(&logits, &t, &row_scales.narrow(0, start, len)?)?;
        nll.push(chunk_nll);
        // The cap's slope: 1 − tanh² = 1 − (capped / cap)².
        let dlogits = match softcap {
            Some(cap) => (dlogits * (logits / cap)?.sqr()?.affine(-1.0, 1.0)?)?,
            None => dlogits,
        };
        if want_dx {
            dx.push(dlogits.matmul(&w)?);
        }
        if want_dw {
            dw_sum = Some(add_weight_grad(dw_sum, &dlogits, &xc)?);
        }
    }
    let loss = (Tensor::cat(&nll, 0)? * &weights)?.sum_all()?.div(&count)?;
    let dx = if want_dx {
        Some(Tensor::cat(&dx, 0)?)
    } else {
        None
    };
    let dw = dw_sum.map(|t| t.to_dtype(head.dtype())).transpose()?;
    let gradients = ChunkGradients {
        computed: Mutex::new(Some((dx, dw))),
        count,
        divided,
        loss: Arc::new(OnceLock::new()),
    };
    let loss_id = gradients.loss.clone();
    let loss = attach2(hidden, head, &loss, "head-mean-nll", move |grad| {
        gradients.for_loss_gradient(grad)
    })?;
    loss_id
        .set(loss.id())
        .map_err(|_| candle_core::Error::Msg("head-mean-nll: the loss attached twice".into()))?;
    Ok(loss)
}

/// The gradients [`head_mean_nll`]'s chunks computed (for the hidden states and the head, each
/// where it is tracked), and what they still need to be the loss's.
struct ChunkGradients {
    /// Taken by a pass from [`super::attach::backward_from_loss`], which hands them over
    /// unscaled: so its gradient store holds their only handle, and the tied table's lookup
    /// may add its rows into the head's in place.
    computed: Mutex<Option<(Option<Tensor>, Option<Tensor>)>>,
    /// The scored positions (at least 1), an f32 scalar.
    count: Tensor,
    /// Whether the chunks' gradients are already divided by `count` (all but f16).
    divided: bool,
    /// The loss the gradients are attached to.
    loss: Arc<OnceLock<TensorId>>,
}

impl ChunkGradients {
    /// The gradients of the hidden states and the head for `grad`, the loss's gradient.
    fn for_loss_gradient(&self, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let unit = self.loss.get().is_some_and(|&id| receives_unit_seed(id));
        let mut computed = self
            .computed
            .lock()
            .map_err(|_| candle_core::Error::Msg("head-mean-nll: poisoned gradients".into()))?;
        let gone = || {
            candle_core::Error::Msg(
                "head-mean-nll: the gradients went to an earlier backward pass".into(),
            )
        };
        let factor = match (unit, self.divided) {
            (true, true) => return computed.take().ok_or_else(gone),
            (true, false) => self.count.recip()?,
            (false, true) => grad.to_dtype(DType::F32)?,
            (false, false) => grad.to_dtype(DType::F32)?.div(&self.count)?,
        };
        let (dx, dw) = computed.as_ref().ok_or_else(gone)?;
        let scaled = |g: &Option<Tensor>| g.as_ref().map(|g| scaled(g, &factor)).transpose();
        Ok((scaled(dx)?, scaled(dw)?))
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{assert_parity, relative_error, uniform};
    use crate::{reference, weighted_mean};
    use candle_core::{DType, Device, Tensor};

    /// Hidden states, head, targets and loss weights (every third position skipped).
    fn inputs(n: usize, d: usize, vocab: usize, seed: u64) -> [Tensor; 4] {
        let targets: Vec<u32> = (0..n).map(|r| (r * 7 % vocab) as u32).collect();
        let weights: Vec<f32> = (0..n).map(|r| (r % 3 != 0) as u8 as f32).collect();
        [
            uniform(&[n, d], seed),
            uniform(&[vocab, d], seed + 1),
            Tensor::new(targets, &Device::Cpu).unwrap(),
            Tensor::new(weights, &Device::Cpu).unwrap(),
        ]
    }

    fn reference_loss(t: &[Tensor]) -> candle_core::Result<Tensor> {
        weighted_mean(
            &reference::token_nll(&t[0].matmul(&t[1].t()?)?, &t[2])?,
            &t[3],
        )
    }

    /// [`reference_loss`] with the logits soft-capped at 0.5.
    fn capped_reference_loss(t: &[Tensor]) -> candle_core::Result<Tensor> {
        let logits = ((t[0].matmul(&t[1].t()?)? / 0.5)?.tanh()? * 0.5)?;
        weighted_mean(&reference::token_nll(&logits, &t[2])?, &t[3])
    }

    #[test]
    fn loss_and_gradients_match_projection_then_weighted_nll() {
        assert_parity(
            "head_mean_nll",
            &inputs(6, 8, 11, 1),
            &[true, true, false, false],
            |t| super::head_mean_nll(&t[0], &t[1], &t[2], &t[3], None),
            reference_loss,
            1e-5,
        );
    }

    #[test]
    fn soft_capped_loss_and_gradients_match_in_chunks() {
        assert_parity(
            "head_mean_nll (soft-capped, chunked)",
            &inputs(10, 8, 13, 9),
            &[true, true, false, false],
            |t| super::head_mean_nll_in_chunks(&t[0], &t[1], (&t[2], &t[3]), 4, Some(0.5)),
            capped_reference_loss,
            1e-5,
        );
    }

    #[test]
    fn chunked_loss_and_gradients_match_with_a_trained_or_a_frozen_head() {
        // 10 rows in chunks of 4, 4 and 2; the head's gradient is summed over the chunks. A
        // frozen head (as under LoRA) gets none.
        for (head_trained, seed) in [(true, 3), (false, 5)] {
            assert_parity(
                "head_mean_nll (chunked)",
                &inputs(10, 8, 13, seed),
                &[true, head_trained, false, false],
                |t| super::head_mean_nll_in_chunks(&t[0], &t[1], (&t[2], &t[3]), 4, None),
                reference_loss,
                1e-5,
            );
        }
    }

    #[test]
    fn a_training_backward_pass_takes_the_chunks_gradients_as_they_are() {
        // From `backward_from_loss` the gradients are handed over unscaled (taken, so the
        // store holds the head's only handle); in f16 they are divided by the count then.
        let t = inputs(10, 8, 13, 11);
        let [x, w] = [&t[0], &t[1]].map(|v| candle_core::Var::from_tensor(v).unwrap());
        let want = reference_loss(&[
            x.as_tensor().clone(),
            w.as_tensor().clone(),
            t[2].clone(),
            t[3].clone(),
        ])
        .unwrap()
        .backward()
        .unwrap();
        for dtype in [DType::F32, DType::F16] {
            let [xd, wd] = [&x, &w].map(|v| v.as_tensor().to_dtype(dtype).unwrap());
            let loss = super::head_mean_nll_in_chunks(&xd, &wd, (&t[2], &t[3]), 4, None).unwrap();
            let grads = crate::backward_from_loss(&loss).unwrap();
            for v in [&x, &w] {
                let got = grads.get(v).unwrap().to_dtype(DType::F32).unwrap();
                let error = relative_error(&got, want.get(v).unwrap());
                assert!(error < 2e-3, "{dtype:?}: relative error {error:.2e}");
            }
            if dtype == DType::F32 {
                assert!(grads.get(&w).unwrap().is_sole_handle());
                let again = crate::backward_from_loss(&loss).unwrap_err().to_string();
                assert!(again.contains("earlier backward pass"), "{again}");
            }
        }
    }

    #[test]
    fn a_large_trained_head_takes_chunks_of_half_its_gradient() {
        let hidden = Tensor::zeros((4, 8), DType::BF16, &Device::Cpu).unwrap();
        let rows = |vocab: usize, width: usize| {
            let bytes = super::trained_head_chunk_bytes(vocab * width * 4);
            super::chunk_rows(&hidden, vocab, bytes)
        };
        // A Llama-3.2-1B head: a 1 GB f32 gradient, so 2,048 rows of 256.5 KB of bf16 logits
        // (256 MiB would be 1,046).
        assert_eq!(rows(128_256, 2048), 2048);
        // The base preset's: a 98 MB gradient, so 256 MiB chunks (8,388 rows).
        assert_eq!(rows(32_000, 768), (256 << 20) / (32_000 * 2));
    }

    #[test]
    fn per_token_nll_matches_in_chunks() {
        let t = inputs(10, 8, 13, 7);
        let want = reference::token_nll(&t[0].matmul(&t[1].t().unwrap()).unwrap(), &t[2]).unwrap();
        for got in [
            super::head_nll(&t[0], &t[1], &t[2], None).unwrap(),
            super::head_nll_in_chunks(&t[0], &t[1], &t[2], 3, None).unwrap(),
        ] {
            assert!(relative_error(&got, &want) < 1e-6);
        }
    }
}
