//! The hot operations of the model, in one place. The model calls these, never candle's
//! composite ops directly, so that faster fused versions can replace them per backend without
//! touching the model. Every function here records a backward pass (candle's fused
//! `rms_norm`/`rope`/`softmax_last_dim` do not: see CANDLE_NOTES).
//!
//! Each op has a composite reference in [`reference`] (any backend, any dtype). The public
//! functions dispatch to fused kernels with their own backward where [`fused`] says one exists:
//! rayon kernels on the CPU in f32, and with the `cuda` feature CUDA kernels (`kernels/ops.cu`,
//! launched from `cuda.rs`) in f32, bf16 and f16. Everything else (Metal, f64, 16-bit on the
//! CPU) takes the reference. The AdamW update has fused CPU and multi-tensor CUDA kernels too
//! ([`adamw`]); its composite lives with the optimizer.

pub mod adamw;
mod add;
mod add_norm;
mod attach;
mod attention;
mod cast;
pub mod check;
mod cpu_kernel;
mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
mod decode;
pub mod device;
mod embedding;
mod fast_exp;
#[cfg(feature = "cuda")]
mod flash;
mod frozen;
mod gemv;
mod graph;
mod head_loss;
mod kv_write;
mod master_linear;
pub mod parity;
pub mod reference;
mod rms_norm;
mod rope;
mod swap;
mod swiglu;

pub use adamw::{adamw_step, AdamWUpdate};
pub use add::{add, install_gradient_add};
pub use cast::cast;
pub use frozen::{frozen_linear, lora_linear};
pub use graph::{can_capture, with_capture_cache, write_u32s, Graph};
pub use head_loss::{head_mean_nll, head_nll};
pub use kv_write::{write_kv, KvLayout, Position};
pub use master_linear::master_linear;

use candle_core::{DType, Device, Layout, Result, Tensor};

/// Whether the fused kernels handle these tensors: all on one device and of one dtype, f32 on
/// the CPU, or f32/bf16/f16 on CUDA (in builds with the `cuda` feature).
pub fn fused(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else {
        return false;
    };
    let dtype = first.dtype();
    let alike = tensors
        .iter()
        .all(|t| t.dtype() == dtype && t.device().same_device(first.device()));
    alike
        && match first.device() {
            Device::Cpu => dtype == DType::F32,
            Device::Cuda(_) => {
                cfg!(feature = "cuda") && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            }
            _ => false,
        }
}

/// The size of the last dimension and the number of rows before it.
pub(crate) fn rows_and_width(layout: &Layout) -> Result<(usize, usize)> {
    let width = *layout
        .dims()
        .last()
        .ok_or_else(|| candle_core::Error::Msg("fused kernel: scalar operand".into()))?;
    let rows = layout.shape().elem_count().checked_div(width).unwrap_or(0);
    Ok((rows, width))
}

/// The sizes of grouped-query attention operands: `q` `[batch, heads, q_len, head_size]`
/// against `k` and `v`, both `[batch, kv_heads, kv_len, head_size]`, with `heads` a multiple
/// of `kv_heads`. (Without the `cuda` feature only the decode check reads it, which needs
/// only the query length and head size.)
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct GroupedDims {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_size: usize,
}

impl GroupedDims {
    /// The sizes of `q`, `k` and `v`, or `None` when they do not fit together.
    pub(crate) fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<Self> {
        let (batch, heads, q_len, head_size) = q.dims4().ok()?;
        let kd @ (kb, kv_heads, kv_len, kd_size) = k.dims4().ok()?;
        let fits = v.dims4().ok()? == kd
            && kb == batch
            && kd_size == head_size
            && kv_heads > 0
            && heads % kv_heads == 0;
        fits.then_some(Self {
            batch,
            heads,
            kv_heads,
            q_len,
            kv_len,
            head_size,
        })
    }
}

/// Whether `ids` are u32 on the same device as `like`, as the fused kernels need.
fn ids_beside(ids: &Tensor, like: &Tensor) -> bool {
    ids.dtype() == DType::U32 && ids.device().same_device(like.device())
}

/// `x @ weight.t()` for `weight` `[out, in]` and `x` `[.., in]`, as one 2-D product over all
/// leading dimensions: its backward then computes the weight gradient as one GEMM over every
/// row, instead of a GEMM per batch element plus a reduction (what `broadcast_matmul` does).
/// For a few untracked rows (a decode step) it is a matrix-vector kernel.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (out, inp) = weight.dims2()?;
    if x.dims().last() != Some(&inp) {
        candle_core::bail!(
            "linear: input {:?} for a weight of [{out}, {inp}]",
            x.dims()
        );
    }
    let rows = x.reshape(((), inp))?;
    if gemv::supported(&rows, weight) {
        return gemv::gemv(&rows, weight)?.reshape(with_last_dim(x, out));
    }
    rows.matmul(&weight.t()?)?.reshape(with_last_dim(x, out))
}

/// `x`'s dimensions with the last one replaced by `last`.
fn with_last_dim(x: &Tensor, last: usize) -> Vec<usize> {
    let mut dims = x.dims().to_vec();
    if let Some(d) = dims.last_mut() {
        *d = last;
    }
    dims
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`, computed in at least f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(&[x, weight]) {
        return rms_norm::rms_norm(&x.contiguous()?, &weight.contiguous()?, eps);
    }
    reference::rms_norm(x, weight, eps)
}

/// `(x + delta, rms_norm(x + delta, weight))`: the residual add and the norm after it. Fused
/// into one kernel for inference (nothing tracked, fused backend), else the two ops.
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let tracked = x.track_op() || delta.track_op() || weight.track_op();
    if !tracked && fused(&[x, delta, weight]) && x.shape() == delta.shape() {
        let (x, delta) = (x.contiguous()?, delta.contiguous()?);
        return add_norm::add_rms_norm(&x, &delta, &weight.contiguous()?, eps);
    }
    let sum = add(x, delta)?;
    let normed = rms_norm(&sum, weight, eps)?;
    Ok((sum, normed))
}

/// Whether [`write_kv`] runs fused here: inference (nothing tracked) on a backend [`fused`]
/// accepts. Elsewhere the caller splits the projections and appends to the cache itself.
/// `x` is the input of the projection (the projection's dtype and device are its).
pub fn write_kv_fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    !x.track_op() && fused(&[x, cos, sin])
}

/// `swiglu(x @ gate.t(), x @ up.t())` for the stacked projection `gate_up` `[2 ffn, in]` (gate
/// rows, then up rows) and `x` `[.., in]`. One matrix-vector kernel for a few untracked rows
/// (a decode step); elsewhere the projection, split, then [`swiglu`].
pub fn swiglu_projection(x: &Tensor, gate_up: &Tensor) -> Result<Tensor> {
    let rows = x.reshape(((), gate_up.dim(1)?))?;
    let ffn = gate_up.dim(0)? / 2;
    if gemv::supported(&rows, gate_up) {
        return gemv::gemv_swiglu(&rows, gate_up)?.reshape(with_last_dim(x, ffn));
    }
    let both = linear(x, gate_up)?;
    let last = both.rank() - 1;
    swiglu(&both.narrow(last, 0, ffn)?, &both.narrow(last, ffn, ffn)?)
}

/// Rotary position embedding in the Hugging Face rotate-half layout. `x` is
/// `[batch, heads, seq, head_dim]`; `cos`/`sin` are `[seq, head_dim / 2]` for these positions.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused(&[x, cos, sin]) && rope::supports(x, cos, sin) {
        return rope::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?);
    }
    reference::rope(x, cos, sin)
}

/// Causal scaled dot-product attention. `q` is `[batch, heads, q_len, head_dim]`, `k`/`v` are
/// `[batch, heads, kv_len, head_dim]` with the same number of heads (repeat kv heads first);
/// query `i` sits at position `kv_len - q_len + i` and sees keys up to that position.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if fused(&[q, k, v]) {
        return attention::causal_attention(q, k, v);
    }
    reference::causal_attention(q, k, v)
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
    attach::attach(y, &value, "split-heads", move |grad| Ok(Some(merge(grad)?)))
}

/// `[batch, heads, seq, head_size]` attention outputs as `[batch, seq, heads * head_size]`
/// (contiguous). The graph node keeps nothing of `y`: its backward is the split.
pub fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let (_, heads, _, _) = y.dims4()?;
    let value = merge(&y.detach())?;
    if !y.track_op() {
        return Ok(value);
    }
    attach::attach(y, &value, "merge-heads", move |grad| {
        Ok(Some(split_heads(&grad.detach(), heads)?))
    })
}

/// [`merge_heads`] outside the graph.
fn merge(y: &Tensor) -> Result<Tensor> {
    let (b, heads, t, d) = y.dims4()?;
    swap_middle(y)?.reshape((b, t, heads * d))
}

/// `x` `[a, b, c, d]` as a contiguous `[a, c, b, d]` (the attention head split and merge).
pub fn swap_middle(x: &Tensor) -> Result<Tensor> {
    if let [a, b, c, d] = *x.dims() {
        if (b == 1 || c == 1) && x.is_contiguous() {
            // The same elements in the same order (a decode step: one position).
            return x.reshape((a, c, b, d));
        }
    }
    if fused(&[x]) && x.rank() == 4 {
        return swap::swap_middle(&x.contiguous()?);
    }
    x.transpose(1, 2)?.contiguous()
}

/// Grouped-query causal attention: `q` `[b, heads, q_len, d]` against keys and values
/// `[b, kv_heads, kv_len, d]` that may be views into a KV cache, `heads / kv_heads` query heads
/// per kv head. A decode step (one query, no gradients, fused backend) reads the cache in place
/// with one kernel; on CUDA the flash kernels run where they support the head size (see
/// [`flash_attention`]); otherwise kv heads are repeated and [`causal_attention`] runs.
pub fn grouped_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if fused(&[q, k, v]) && decode::supported(q, k, v) {
        return decode::decode_attention(q, k, v);
    }
    flash_attention(q, k, v)
}

/// [`grouped_attention`] of a one-query decode step whose position `position` holds (u32
/// `[1]`, on the queries' device): `k`/`v` are the KV cache's whole buffers
/// `[b, kv_heads, max_len, d]`, and the step attends to the positions up to its own. The CUDA
/// decode kernel reads the position in place (so a captured step replays at the next
/// position); elsewhere the position is read back and the views narrowed for
/// [`grouped_attention`].
pub fn decode_attention_at(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    position: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && fused(&[q, k, v]) && decode::supported(q, k, v) {
        return decode::decode_attention_at(q, k, v, position);
    }
    let len = Position::Device(position).read()? + 1;
    grouped_attention(q, &k.narrow(2, 0, len)?, &v.narrow(2, 0, len)?)
}

/// The attention of a block without a KV cache, from its projections to the input of its output
/// projection: `q` `[b, t, heads · d]` and `k`/`v` `[b, t, kv_heads · d]` split into heads,
/// queries and keys rotated by RoPE (`tables`: cos and sin `[t, d / 2]`), causal grouped-query
/// attention, heads merged back into `[b, t, heads · d]`. On CUDA in bf16/f16 the flash kernels
/// read and write the projections' rows in place (no split or merge copies, forward or
/// backward); elsewhere it is [`split_heads`], [`rope`], [`grouped_attention`] and
/// [`merge_heads`].
pub fn self_attention(
    [q, k, v]: [&Tensor; 3],
    tables: (&Tensor, &Tensor),
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if flash::self_attention_supported([q, k, v], tables, heads, kv_heads)? {
        return flash::self_attention([q, k, v], tables, heads, kv_heads);
    }
    let (cos, sin) = tables;
    let q = rope(&split_heads(q, heads)?, cos, sin)?;
    let k = rope(&split_heads(k, kv_heads)?, cos, sin)?;
    let v = split_heads(v, kv_heads)?;
    merge_heads(&grouped_attention(&q, &k, &v)?)
}

/// Flash-style grouped-query causal attention (same contract as [`grouped_attention`]) where
/// the CUDA kernels support the operands (head size 64 or 128), which never hold the T×T
/// probabilities: tensor-core kernels in bf16 and f16, f32 kernels otherwise. Elsewhere kv
/// heads are repeated and [`causal_attention`] runs.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if flash::supported(q, k, v) {
        return flash::flash_attention(q, k, v);
    }
    repeated_kv_attention(q, k, v)
}

/// Repeats kv heads to the query heads and runs [`causal_attention`].
fn repeated_kv_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (k, v) = repeat_kv_heads(q, k, v)?;
    causal_attention(q, &k, &v)
}

/// `k` and `v` with each kv head repeated for the query heads of `q` that read it, contiguous.
pub(crate) fn repeat_kv_heads(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let repeat = q.dim(1)? / k.dim(1)?.max(1);
    let k = candle_transformers::utils::repeat_kv(k.clone(), repeat)?.contiguous()?;
    let v = candle_transformers::utils::repeat_kv(v.clone(), repeat)?.contiguous()?;
    Ok((k, v))
}

/// SwiGLU gate: `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused(&[gate, up]) && gate.shape() == up.shape() {
        return swiglu::swiglu(&gate.contiguous()?, &up.contiguous()?);
    }
    reference::swiglu(gate, up)
}

/// `swiglu(master_linear(x, gate), master_linear(x, up))` for master weights `gate` and `up`
/// `[ffn, in]`: a block's gated projection in training. On CUDA the two run as one stacked
/// projection into a packed SwiGLU whose gradient comes back packed: one GEMM each way, and
/// the input's gradient needs no sum of two (measured there; elsewhere the two projections).
pub fn swiglu_master_projection(x: &Tensor, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let alike = gate.dims() == up.dims() && gate.dtype() == up.dtype();
    if alike && x.device().is_cuda() && fused(&[x]) {
        let packed = master_linear::stacked_master_linear(x, gate, up)?;
        return swiglu_packed(&packed);
    }
    swiglu(&master_linear(x, gate)?, &master_linear(x, up)?)
}

/// `silu(gate) · up` for a packed projection `h` `[.., 2 · width]` whose rows hold the gate,
/// then the up half; its gradient comes back in the same layout.
pub fn swiglu_packed(h: &Tensor) -> Result<Tensor> {
    if fused(&[h]) {
        return swiglu::swiglu_packed(&h.contiguous()?);
    }
    let last = h.rank().max(1) - 1;
    let half = h.dim(last)? / 2;
    reference::swiglu(&h.narrow(last, 0, half)?, &h.narrow(last, half, half)?)
}

/// Token embedding lookup: rows of `table` for `ids` (any shape of u32 ids).
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    if fused(&[table]) && ids_beside(ids, table) {
        return embedding::embedding(ids, table);
    }
    reference::embedding(ids, table)
}

/// Negative log-likelihood of each target under `logits` (`[n, vocab]`, targets `[n]` u32),
/// computed in at least f32. Returns `[n]`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused(&[logits]) && ids_beside(targets, logits) {
        return cross_entropy::token_nll(&logits.contiguous()?, &targets.contiguous()?);
    }
    reference::token_nll(logits, targets)
}

/// `(softmax(logits) − onehot(targets)) · g[row]` in the logits' dtype (f32 row scales `g`):
/// the gradient of `Σ g · token_nll` with respect to the logits.
pub fn token_nll_grad(logits: &Tensor, targets: &Tensor, g: &Tensor) -> Result<Tensor> {
    if fused(&[logits]) && ids_beside(targets, logits) && g.dtype() == DType::F32 {
        let (logits, targets) = (logits.contiguous()?, targets.contiguous()?);
        return cross_entropy::token_nll_grad(&logits, &targets, &g.contiguous()?);
    }
    reference::token_nll_grad(logits, targets, g)
}

/// [`token_nll`] and [`token_nll_grad`] of the same logits together, as `(nll, gradient)`.
/// Fused, it is one pass per row that computes the row's log-sum-exp once (a rayon kernel on the
/// CPU, one kernel that reads the logits twice on CUDA; the two ops read them five times), and
/// neither result records a backward; elsewhere it is the two ops.
pub fn token_nll_with_grad(
    logits: &Tensor,
    targets: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if fused(&[logits]) && ids_beside(targets, logits) && g.dtype() == DType::F32 {
        let (logits, targets, g) = (logits.contiguous()?, targets.contiguous()?, g.contiguous()?);
        return cross_entropy::token_nll_with_grad(&logits, &targets, &g);
    }
    Ok((
        token_nll(logits, targets)?,
        token_nll_grad(logits, targets, g)?,
    ))
}

/// `Σ values · weights / max(Σ weights, 1)` as a scalar, computed on the device (no host
/// synchronization).
pub fn weighted_mean(values: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let weights = weights.to_dtype(values.dtype())?;
    let count = weights.sum_all()?.maximum(1.0)?;
    (values * &weights)?.sum_all()?.div(&count)
}

/// Mean NLL over the positions where `weights` (`[n]` f32, 1 to score, 0 to skip) is set, for
/// `logits` `[n, vocab]` and u32 `targets` `[n]`; computed in at least f32.
pub fn masked_mean_nll(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    weighted_mean(&token_nll(logits, targets)?, weights)
}

#[cfg(test)]
mod tests {
    use super::reference::token_nll;
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
