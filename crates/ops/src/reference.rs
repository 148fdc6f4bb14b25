//! Composite reference implementations of the hot ops, built from candle's differentiable
//! tensor ops. They run on every backend and dtype, define what the fused kernels must compute,
//! and are what the fused kernels are tested against.

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

/// `(softmax(logits) − onehot(targets)) · g[row]` in the logits' dtype, for f32 row scales `g`
/// `[n]`: the gradient of `Σ g · token_nll` with respect to the logits, computed in f32.
pub fn token_nll_grad(logits: &Tensor, targets: &Tensor, g: &Tensor) -> Result<Tensor> {
    let dtype = logits.dtype();
    let probs = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
    let vocab = logits.dim(1)?;
    let onehot = candle_nn::encoding::one_hot(targets.clone(), vocab, 1f32, 0f32)?;
    (probs - onehot)?
        .broadcast_mul(&g.unsqueeze(1)?)?
        .to_dtype(dtype)
}
