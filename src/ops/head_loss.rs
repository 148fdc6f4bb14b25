//! The output projection and the per-token NLL as one op, chunked over rows: when the
//! `[tokens, vocab]` logits would be large, they are computed a chunk at a time, reduced to one
//! NLL per row, and recomputed chunk by chunk in backward, so the full logits tensor (and its
//! gradient) never exists at once. Small logits are kept for backward instead of recomputed.

use super::attach::attach2;
use candle_core::{DType, Result, Tensor};

/// Logits up to this size are computed whole and kept for backward.
const KEEP_BYTES: usize = 256 << 20;
/// Above it, the logits are computed in chunks of at most this size.
const CHUNK_BYTES: usize = 256 << 20;

/// NLL `[n]` (f32) of u32 `targets` `[n]` under `hidden @ head.t()` (`hidden` `[n, d]`, `head`
/// `[vocab, d]`), with gradients for `hidden` and, when it is tracked, for `head`.
pub fn head_nll(hidden: &Tensor, head: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _) = hidden.dims2()?;
    let row_bytes = head.dim(0)? * hidden.dtype().size_in_bytes();
    let rows = if n * row_bytes <= KEEP_BYTES {
        n.max(1)
    } else {
        (CHUNK_BYTES / row_bytes).max(1)
    };
    head_nll_in_chunks(hidden, head, targets, rows)
}

/// [`head_nll`] with the logits computed `rows` rows at a time (kept when that is all rows).
fn head_nll_in_chunks(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    rows: usize,
) -> Result<Tensor> {
    let n = hidden.dim(0)?;
    let (x, w) = (hidden.detach(), head.detach());
    let targets = targets.contiguous()?;
    let mut nll = Vec::with_capacity(n.div_ceil(rows));
    let mut kept = None;
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let logits = x.narrow(0, start, len)?.matmul(&w.t()?)?;
        nll.push(super::token_nll(&logits, &targets.narrow(0, start, len)?)?);
        if len == n {
            kept = Some(logits);
        }
    }
    let nll = Tensor::cat(&nll, 0)?;
    let head_grad = head.track_op();
    if !hidden.track_op() && !head_grad {
        return Ok(nll);
    }
    attach2(hidden, head, &nll, "head-nll", move |grad| {
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        let mut dx = Vec::with_capacity(n.div_ceil(rows));
        let mut dw: Vec<Tensor> = Vec::new();
        for start in (0..n).step_by(rows) {
            let len = rows.min(n - start);
            let xc = x.narrow(0, start, len)?;
            let logits = match &kept {
                Some(logits) => logits.clone(),
                None => xc.matmul(&w.t()?)?,
            };
            let t = targets.narrow(0, start, len)?;
            let dlogits = super::token_nll_grad(&logits, &t, &g.narrow(0, start, len)?)?;
            dx.push(dlogits.matmul(&w)?);
            if head_grad {
                dw.push(dlogits.t()?.matmul(&xc)?);
            }
        }
        Ok((Some(Tensor::cat(&dx, 0)?), sum_in_f32(dw, w.dtype())?))
    })
}

/// The sum of the per-chunk head gradients, accumulated in f32 (in their own dtype when there
/// is only one).
fn sum_in_f32(parts: Vec<Tensor>, dtype: DType) -> Result<Option<Tensor>> {
    if parts.len() <= 1 {
        return Ok(parts.into_iter().next());
    }
    let mut total: Option<Tensor> = None;
    for part in parts {
        let part = part.to_dtype(DType::F32)?;
        total = Some(match total {
            Some(t) => (t + part)?,
            None => part,
        });
    }
    total.map(|t| t.to_dtype(dtype)).transpose()
}

#[cfg(test)]
mod tests {
    use crate::ops::parity::{assert_parity, uniform};
    use crate::ops::reference;
    use candle_core::{Device, Tensor};

    fn reference_head_nll(t: &[Tensor]) -> candle_core::Result<Tensor> {
        reference::token_nll(&t[0].matmul(&t[1].t()?)?, &t[2])
    }

    #[test]
    fn matches_projection_then_nll() {
        let (n, d, vocab) = (6, 8, 11);
        let targets: Vec<u32> = (0..n).map(|r| (r * 5 % vocab) as u32).collect();
        let inputs = [
            uniform(&[n, d], 1),
            uniform(&[vocab, d], 2),
            Tensor::new(targets, &Device::Cpu).unwrap(),
        ];
        assert_parity(
            "head_nll",
            &inputs,
            &[true, true, false],
            |t| super::head_nll(&t[0], &t[1], &t[2]),
            reference_head_nll,
            1e-5,
        );
    }

    #[test]
    fn chunked_path_matches_too() {
        // 10 rows in chunks of 4, 4 and 2, recomputed in backward.
        let (n, d, vocab) = (10, 8, 13);
        let targets: Vec<u32> = (0..n).map(|r| (r * 7 % vocab) as u32).collect();
        let inputs = [
            uniform(&[n, d], 3),
            uniform(&[vocab, d], 4),
            Tensor::new(targets, &Device::Cpu).unwrap(),
        ];
        assert_parity(
            "head_nll (chunked)",
            &inputs,
            &[true, true, false],
            |t| super::head_nll_in_chunks(&t[0], &t[1], &t[2], 4),
            reference_head_nll,
            1e-5,
        );
    }
}
