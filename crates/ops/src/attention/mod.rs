//! Causal attention: the dispatch of every attention entry point and the composite reference.
//! Three fused implementations sit beside it:
//!
//! - [`softmax`]: QKᵀ and PV as matmuls around a fused causal softmax (CPU and CUDA), one graph
//!   node that keeps only the probabilities (and the scores, with soft-capping);
//! - `flash` (CUDA only): flash-style kernels for head sizes 64 and 128 that never hold the T×T
//!   probabilities, on tensor cores in bf16 and f16;
//! - [`decode`]: one query per head against a KV cache read in place (inference).
//!
//! All three take [`AttentionOptions`] (a scale of its own, soft-capped scores, a sliding
//! window: Gemma, Mistral, Qwen's sliding layers); the first two also take [`Segments`], the
//! block-diagonal mask of packed rows (several examples a row, each seeing only its own tokens):
//! the flash kernels mask every tile by each query's segment start, skipping no tile for it.

mod decode;
#[cfg(feature = "cuda")]
mod flash;
mod softmax;

use super::reference::{repeat_kv, softmax, widened};
use super::{fused, merge_heads, rope, split_heads, write_kv, KvLayout, Position};
use candle_core::{Device, IndexOp, Result, Tensor, D};

/// Causal scaled dot-product attention. `q` is `[batch, heads, q_len, head_dim]`, `k`/`v` are
/// `[batch, heads, kv_len, head_dim]` with the same number of heads (repeat kv heads first);
/// query `i` sits at position `kv_len - q_len + i` and sees keys up to that position.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if fused(&[q, k, v]) {
        return softmax::causal_attention(q, k, v, Scoring::plain(q.dim(3)?), None);
    }
    reference(q, k, v)
}

/// [`causal_attention`] from candle's differentiable ops, any backend and dtype.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, _, q_len, head_dim) = q.dims4()?;
    let kv_len = k.dim(2)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = if q_len > 1 {
        let mask = window_mask(q_len, kv_len, None, q.device())?;
        scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?
    } else {
        scores
    };
    let dtype = scores.dtype();
    let probs = softmax(&scores.to_dtype(widened(dtype))?, D::Minus1)?;
    probs.to_dtype(dtype)?.matmul(v)
}

/// What [`windowed_attention`] does beyond plain causal attention.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionOptions {
    /// The factor on the scores `q·k` (plain attention: `1/sqrt(head_size)`).
    pub scale: f64,
    /// `cap · tanh(score / cap)` on the scaled scores, before the mask (Gemma 2).
    pub softcap: Option<f64>,
    /// How many positions a query attends to, its own included (sliding-window layers).
    pub window: Option<usize>,
    /// Packed rows: each query sees only the keys of its own segment (example).
    pub segments: Option<Segments>,
}

impl AttentionOptions {
    /// Plain causal attention for heads of `head_size`: `1/sqrt(head_size)`, no cap, no window.
    pub fn plain(head_size: usize) -> Self {
        Self {
            scale: 1.0 / (head_size as f64).sqrt(),
            softcap: None,
            window: None,
            segments: None,
        }
    }
}

/// Where each position's segment starts in rows that pack several examples: u32
/// `[batch, len]`, position `p` of row `b` belonging to the segment that starts at
/// `starts[b, p]` (`starts[b, p] <= p`, equal along a segment). Attention then lets the query
/// at `p` see the keys `[max(starts[b, p], p - window + 1), p]`: a block-diagonal causal mask,
/// so no segment sees another. Only self-attention takes them (as many queries as keys).
#[derive(Debug, Clone)]
pub struct Segments(Tensor);

impl Segments {
    /// The segment starts `starts` (u32 `[batch, len]`), checked for shape and dtype.
    pub fn new(starts: Tensor) -> Result<Self> {
        if starts.dtype() != candle_core::DType::U32 || starts.rank() != 2 {
            candle_core::bail!(
                "segment starts must be u32 [batch, len], not {:?} {:?}",
                starts.dtype(),
                starts.dims()
            );
        }
        Ok(Self(starts.contiguous()?))
    }

    /// Segment starts from the host, one `Vec` of `len` per row, on `device`.
    pub fn from_rows(rows: &[Vec<u32>], device: &Device) -> Result<Self> {
        let len = rows.first().map_or(0, Vec::len);
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        Self::new(Tensor::from_vec(flat, (rows.len(), len), device)?)
    }

    /// The u32 `[batch, len]` tensor of starts.
    pub fn starts(&self) -> &Tensor {
        &self.0
    }

    /// The starts on the host, row-major, checked against attention over `batch` rows of
    /// `len` positions.
    pub(crate) fn host(&self, batch: usize, len: usize) -> Result<Vec<u32>> {
        if self.0.dims() != [batch, len] {
            candle_core::bail!(
                "segment starts {:?} for attention over {batch} rows of {len} positions",
                self.0.dims()
            );
        }
        self.0.flatten_all()?.to_vec1()
    }
}

#[cfg(feature = "cuda")]
impl Segments {
    /// The device address of the starts, checked to be `len` positions a row.
    pub(crate) fn address(&self, len: usize) -> Result<u64> {
        if self.0.dim(1)? != len {
            candle_core::bail!("segment starts {:?} for {len} positions", self.0.dims());
        }
        crate::launch::with_operands(&[&self.0], |ops| crate::launch::address(ops[0]))
    }
}

/// The same tensor (the options of one forward pass), not equal values.
impl PartialEq for Segments {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

/// [`AttentionOptions`] as the kernels take them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scoring {
    pub scale: f32,
    /// 0 for none.
    pub softcap: f32,
    /// 0 for none.
    pub window: usize,
}

impl Scoring {
    pub(crate) fn of(options: &AttentionOptions) -> Self {
        Self {
            scale: options.scale as f32,
            softcap: options.softcap.unwrap_or(0.0) as f32,
            window: options.window.unwrap_or(0),
        }
    }

    pub(crate) fn plain(head_size: usize) -> Self {
        Self::of(&AttentionOptions::plain(head_size))
    }

    /// The first key a query sees whose keys end (exclusive) at `end`.
    pub(crate) fn first_key(&self, end: usize) -> usize {
        match self.window {
            0 => 0,
            w => end.saturating_sub(w),
        }
    }
}

/// Grouped-query causal attention with [`AttentionOptions`], with the contract of
/// [`grouped_attention`] (`k`/`v` may be views into a KV cache), which plain options take.
/// Otherwise fused where the backend is: a decode step reads the cache in place with one
/// kernel, the flash kernels run where they support the operands (see [`flash_attention`]),
/// others the fused causal softmax over repeated kv heads; elsewhere the composite
/// [`windowed_reference`].
pub fn windowed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: AttentionOptions,
) -> Result<Tensor> {
    let scoring = Scoring::of(&options);
    let segments = options.segments.as_ref();
    if segments.is_none() && scoring == Scoring::plain(q.dim(3)?) {
        return grouped_attention(q, k, v);
    }
    if segments.is_none() && decode::runs(q, k, v) {
        return decode::decode_attention(q, k, v, scoring);
    }
    if !fused(&[q, k, v]) {
        return windowed_reference(q, k, v, options);
    }
    #[cfg(feature = "cuda")]
    if flash::supported(q, k, v) {
        return flash::flash_attention(q, k, v, scoring, segments.cloned());
    }
    let (k, v) = repeat_kv_heads(q, k, v)?;
    softmax::causal_attention(&q.contiguous()?, &k, &v, scoring, segments)
}

/// [`windowed_attention`] from candle's differentiable ops, any backend and dtype (scores and
/// softmax in f32 for 16-bit inputs).
pub fn windowed_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: AttentionOptions,
) -> Result<Tensor> {
    let (k, v) = repeat_kv_heads(q, k, v)?;
    let q_len = q.dim(2)?;
    let kv_len = k.dim(2)?;
    let dtype = q.dtype();
    let scores = (q.matmul(&k.t()?)? * options.scale)?.to_dtype(widened(dtype))?;
    let scores = match options.softcap {
        Some(cap) => ((scores / cap)?.tanh()? * cap)?,
        None => scores,
    };
    let mask = match &options.segments {
        None => window_mask(q_len, kv_len, options.window, q.device())?,
        Some(segments) => segment_mask(segments, q_len, kv_len, options.window, q.device())?,
    };
    let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    let probs = softmax(&scores, D::Minus1)?;
    probs.to_dtype(dtype)?.matmul(&v)
}

/// `[batch, 1, len, len]` additive mask of [`Segments`]: [`window_mask`] with each query's
/// keys also starting at its segment's start.
fn segment_mask(
    segments: &Segments,
    q_len: usize,
    kv_len: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    if q_len != kv_len {
        candle_core::bail!("segments need as many queries as keys, not {q_len} and {kv_len}");
    }
    let batch = segments.starts().dim(0)?;
    let starts = segments.host(batch, kv_len)?;
    let window = window.unwrap_or(usize::MAX);
    let values: Vec<f32> = (0..batch * q_len)
        .flat_map(|row| {
            let (position, start) = (row % q_len, starts[row] as usize);
            (0..kv_len).map(
                move |j| match j <= position && j >= start && position - j < window {
                    true => 0.0,
                    false => f32::NEG_INFINITY,
                },
            )
        })
        .collect();
    Tensor::from_vec(values, (batch, 1, q_len, kv_len), device)
}

/// `[q_len, kv_len]` additive mask: query `i` sits at position `kv_len - q_len + i` and sees
/// the keys up to it, and with a `window` only the last `window` of them.
fn window_mask(
    q_len: usize,
    kv_len: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let offset = kv_len - q_len;
    let window = window.unwrap_or(usize::MAX);
    let values: Vec<f32> = (0..q_len)
        .flat_map(|i| {
            let position = offset + i;
            (0..kv_len).map(move |j| match j <= position && position - j < window {
                true => 0.0,
                false => f32::NEG_INFINITY,
            })
        })
        .collect();
    Tensor::from_vec(values, (q_len, kv_len), device)
}

/// Grouped-query causal attention: `q` `[b, heads, q_len, d]` against keys and values
/// `[b, kv_heads, kv_len, d]` that may be views into a KV cache, `heads / kv_heads` query heads
/// per kv head. A decode step (one query, no gradients, a fused backend or 16 bits on the CPU)
/// reads the cache in place with one kernel; on CUDA the flash kernels run where they support
/// the head size (see [`flash_attention`]); otherwise kv heads are repeated and
/// [`causal_attention`] runs.
pub fn grouped_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if decode::runs(q, k, v) {
        return decode::decode_attention(q, k, v, Scoring::plain(q.dim(3)?));
    }
    flash_attention(q, k, v)
}

/// [`windowed_attention`] of a one-query decode step whose position `position` holds (u32
/// `[1]`, on the queries' device): `k`/`v` are the KV cache's whole buffers
/// `[b, kv_heads, max_len, d]`, and the step attends to the positions up to its own (the last
/// `window` of them with a window). The CUDA decode kernel reads the position in place (so a
/// captured step replays at the next position); elsewhere the position is read back and the
/// views narrowed for [`windowed_attention`].
pub fn decode_attention_at(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    position: &Tensor,
    options: AttentionOptions,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && fused(&[q, k, v]) && decode::supported(q, k, v) {
        return decode::decode_attention_at(q, k, v, position, Scoring::of(&options));
    }
    let len = Position::Device(position).read()? + 1;
    windowed_attention(q, &k.narrow(2, 0, len)?, &v.narrow(2, 0, len)?, options)
}

/// The attention of a step over a KV cache from its packed projections `qkv`
/// `[b, t, (heads + 2 kv_heads) · head_size]`: the step's keys (rotated by `cos`/`sin`) and
/// values go into `cache` `[2, b, kv_heads, max_len, head_size]` at `layout.at`, as
/// [`write_kv`] writes them, and its rotated queries attend to every cached position up to
/// theirs as `options` say. Returns `[b, heads, t, head_size]`. Only where
/// [`crate::write_kv_fused`] holds. On CUDA a one-position step is one kernel: each block
/// rotates its query and its kv head's new key, one block a kv head writes the cache, and every
/// block attends to the cached positions and to the new key and value it holds. Elsewhere
/// [`write_kv`], then the attention over the cache ([`decode_attention_at`] for a position
/// held on the device, else [`windowed_attention`] over the positions so far).
pub fn cached_attention(
    cache: &Tensor,
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    layout: KvLayout,
    options: AttentionOptions,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(out) = decode::decode_step(cache, qkv, (cos, sin), layout, Scoring::of(&options))? {
        return Ok(out);
    }
    let q = write_kv(cache, qkv, cos, sin, layout)?;
    let (k, v) = (cache.i(0)?, cache.i(1)?);
    let len = match layout.at {
        Position::Device(position) => return decode_attention_at(&q, &k, &v, position, options),
        Position::Host(start) => start + qkv.dim(1)?,
    };
    // A window that covers every position attended to masks nothing.
    let options = AttentionOptions {
        window: options.window.filter(|&w| len > w),
        ..options
    };
    windowed_attention(&q, &k.narrow(2, 0, len)?, &v.narrow(2, 0, len)?, options)
}

/// The attention of a block without a KV cache, from its projections to the input of its output
/// projection: `q` `[b, t, heads · d]` and `k`/`v` `[b, t, kv_heads · d]` split into heads,
/// queries and keys rotated by RoPE (`tables`: cos and sin `[t, rotary / 2]`, the first
/// `rotary` elements of each head rotated), causal grouped-query attention with `options`,
/// heads merged back into `[b, t, heads · d]`. On CUDA in bf16/f16, with RoPE over whole heads,
/// the flash kernels read and write the projections' rows in place (no split or merge copies,
/// forward or backward); elsewhere it is [`split_heads`], [`rope`], [`windowed_attention`] and
/// [`merge_heads`].
pub fn self_attention(
    [q, k, v]: [&Tensor; 3],
    tables: (&Tensor, &Tensor),
    heads: usize,
    kv_heads: usize,
    options: AttentionOptions,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if flash::self_attention_supported([q, k, v], tables, heads, kv_heads)? {
        let scoring = Scoring::of(&options);
        return flash::self_attention(
            [q, k, v],
            tables,
            heads,
            kv_heads,
            scoring,
            options.segments,
        );
    }
    let (cos, sin) = tables;
    let q = rope(&split_heads(q, heads)?, cos, sin)?;
    let k = rope(&split_heads(k, kv_heads)?, cos, sin)?;
    let v = split_heads(v, kv_heads)?;
    merge_heads(&windowed_attention(&q, &k, &v, options)?)
}

/// [`self_attention`] of a packed q/k/v projection `qkv` `[b, t, (heads + 2 · kv_heads) · d]`
/// (each row's queries, then keys, then values, as a stacked projection writes them), as
/// `[b, t, heads · d]`. On CUDA in bf16/f16 with RoPE over whole heads, the flash kernels and
/// RoPE read the projection in place and its gradient comes back as one packed tensor (so the
/// stacked projection's backward is one product each way, with no sum of three input
/// gradients); elsewhere its three column blocks go through [`self_attention`].
pub fn packed_self_attention(
    qkv: &Tensor,
    tables: (&Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    options: AttentionOptions,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if flash::self_attention_packed_supported(qkv, tables, (heads, kv_heads))? {
        let scoring = Scoring::of(&options);
        let heads = (heads, kv_heads);
        return flash::self_attention_packed(qkv, tables, heads, scoring, options.segments);
    }
    let width = qkv.dim(D::Minus1)?;
    let parts = heads + 2 * kv_heads;
    if parts == 0 || width % parts != 0 {
        candle_core::bail!(
            "packed_self_attention: rows of {width} for {heads} + 2 x {kv_heads} heads"
        );
    }
    let d = width / parts;
    let part = |first: usize, count: usize| qkv.narrow(D::Minus1, first * d, count * d);
    let (q, k, v) = (
        part(0, heads)?,
        part(heads, kv_heads)?,
        part(heads + kv_heads, kv_heads)?,
    );
    self_attention([&q, &k, &v], tables, heads, kv_heads, options)
}

/// Whether [`packed_self_attention`] runs its fused kernels for a projection of `x` (the
/// hidden states `[b, t, ..]` in the compute dtype) into `heads` and `kv_heads` heads of
/// `head_size`, with RoPE tables `cos`/`sin`: where it does not, a stacked projection gains
/// nothing, and the three projections should go to [`self_attention`] as they are.
pub fn packed_self_attention_fuses(
    x: &Tensor,
    tables: (&Tensor, &Tensor),
    heads: (usize, usize),
    head_size: usize,
) -> bool {
    #[cfg(feature = "cuda")]
    return flash::projection_fits(x, tables, heads, head_size);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, tables, heads, head_size);
        false
    }
}

/// Flash-style grouped-query causal attention (same contract as [`grouped_attention`]) where
/// the CUDA kernels support the operands (head size 64 or 128), which never hold the T×T
/// probabilities: tensor-core kernels in bf16 and f16, f32 kernels otherwise. Elsewhere kv
/// heads are repeated and [`causal_attention`] runs.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if flash::supported(q, k, v) {
        return flash::flash_attention(q, k, v, Scoring::plain(q.dim(3)?), None);
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
    let k = repeat_kv(k, repeat)?.contiguous()?;
    let v = repeat_kv(v, repeat)?.contiguous()?;
    Ok((k, v))
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
