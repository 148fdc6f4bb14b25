//! The hot operations of the model, in one place. The model calls these, never candle's
//! composite ops directly, so that faster fused versions can replace them per backend without
//! touching the model. Every function here records a backward pass (candle's fused
//! `rms_norm`/`rope`/`softmax_last_dim` do not: see CANDLE_NOTES).

mod frozen;

pub use frozen::frozen_linear;

use candle_core::{DType, Result, Tensor, D};

/// The dtype reductions run in: f32 for 16-bit inputs, the input's own otherwise.
fn widened(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`, computed in at least f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(widened(dtype))?;
    let mean_square = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(mean_square + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Rotary position embedding in the Hugging Face rotate-half layout. `x` is
/// `[batch, heads, seq, head_dim]`; `cos`/`sin` are `[seq, head_dim / 2]` for these positions.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    candle_nn::rotary_emb::rope_slow(x, cos, sin)
}

/// Causal scaled dot-product attention. `q` is `[batch, heads, q_len, head_dim]`, `k`/`v` are
/// `[batch, heads, kv_len, head_dim]` with the same number of heads (repeat kv heads first);
/// query `i` sits at position `kv_len - q_len + i` and sees keys up to that position.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, _, q_len, head_dim) = q.dims4()?;
    let kv_len = k.dim(2)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = if q_len > 1 {
        let mask = causal_mask(q_len, kv_len, q.device())?;
        scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?
    } else {
        scores
    };
    let dtype = scores.dtype();
    let probs = candle_nn::ops::softmax(&scores.to_dtype(widened(dtype))?, D::Minus1)?;
    probs.to_dtype(dtype)?.matmul(v)
}

/// `[q_len, kv_len]` additive mask: 0 where a query may attend, -inf where it may not.
fn causal_mask(q_len: usize, kv_len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let offset = kv_len - q_len;
    let values: Vec<f32> = (0..q_len)
        .flat_map(|i| {
            (0..kv_len).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(values, (q_len, kv_len), device)
}

/// SwiGLU gate: `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Token embedding lookup: rows of `table` for `ids` (any shape of u32 ids).
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    dims.push(table.dim(1)?);
    table.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
}

/// Negative log-likelihood of each target under `logits` (`[n, vocab]`, targets `[n]` u32),
/// computed in at least f32. Returns `[n]`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(widened(logits.dtype()))?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    log_probs
        .gather(&targets.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()
}

/// Mean NLL over the positions where `weights` (`[n]` f32, 1 to score, 0 to skip) is set.
pub fn masked_mean_nll(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let nll = token_nll(logits, targets)?;
    let count = weights
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0);
    let weights = weights.to_dtype(nll.dtype())?;
    (nll * weights)?.sum_all()? / count
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn rms_norm_matches_definition_and_has_gradients() {
        let x = Var::from_tensor(&randn(&[2, 3, 8], 1)).unwrap();
        let w = Var::from_tensor(&randn(&[8], 2)).unwrap();
        let y = rms_norm(&x, &w, 1e-5).unwrap();
        let xs = x.to_vec3::<f32>().unwrap();
        let ws = w.to_vec1::<f32>().unwrap();
        let row = &xs[1][2];
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / 8.0 + 1e-5).sqrt();
        let got = y.to_vec3::<f32>().unwrap()[1][2][3];
        assert!((got - row[3] / rms * ws[3]).abs() < 1e-5);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some() && grads.get(&w).is_some());
    }

    #[test]
    fn attention_is_causal_and_cache_consistent() {
        let q = randn(&[1, 2, 5, 4], 3);
        let k = randn(&[1, 2, 5, 4], 4);
        let v = randn(&[1, 2, 5, 4], 5);
        let full = causal_attention(&q, &k, &v).unwrap();
        // The last query alone against all keys equals the last row of the full pass.
        let last = causal_attention(&q.narrow(2, 4, 1).unwrap(), &k, &v).unwrap();
        let a = full.narrow(2, 4, 1).unwrap().flatten_all().unwrap();
        let diff = (a - last.flatten_all().unwrap()).unwrap().abs().unwrap();
        assert!(diff.max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-6);
        // The first query only sees the first value.
        let first = full.narrow(2, 0, 1).unwrap().flatten_all().unwrap();
        let v0 = v.narrow(2, 0, 1).unwrap().flatten_all().unwrap();
        let diff = (first - v0).unwrap().abs().unwrap();
        assert!(diff.max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn nll_matches_log_softmax() {
        let logits = randn(&[3, 5], 6);
        let targets = Tensor::new(&[1u32, 4, 0], &Device::Cpu).unwrap();
        let nll = token_nll(&logits, &targets)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rows = logits.to_vec2::<f32>().unwrap();
        for (i, t) in [1usize, 4, 0].iter().enumerate() {
            let lse = rows[i].iter().map(|v| v.exp()).sum::<f32>().ln();
            assert!((nll[i] - (lse - rows[i][*t])).abs() < 1e-5);
        }
        let w = Tensor::new(&[1f32, 0.0, 1.0], &Device::Cpu).unwrap();
        let mean = masked_mean_nll(&logits, &targets, &w)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((mean - (nll[0] + nll[2]) / 2.0).abs() < 1e-6);
    }
}
