//! A block's grouped-query self-attention, with the options of its family: per-head q/k
//! norms, sliding windows, a score scale of its own, soft-capped scores, partial rotary and a
//! separate RoPE base for local layers. Plain attention (every family but Gemma and Phi-3, in
//! layers without a window or whose window covers every position attended to) runs the fused
//! paths of `ops` that join RoPE and the flash kernels; the others run the heads through the
//! fused RoPE (partial where the family rotates part of each head) and
//! [`ops::windowed_attention`], whose fused causal softmax and decode kernels take the
//! options (the flash kernels take plain scores only). With a KV cache, every layer that
//! rotates whole heads splits, rotates and caches its projections in one kernel and passes
//! its options to the decode attention.

use super::cache::LayerCache;
use super::config::LlamaConfig;
use super::llama::{Block, Llama};
use super::rope::RopeTables;
use crate::linear::{stacked_low_rank, Linear};
use crate::names::Norm;
use candle_core::{Result, Tensor, D};

/// Grouped-query self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection, `hidden → heads × head_size`.
    pub q_proj: Linear,
    /// Key projection, `hidden → kv_heads × head_size`.
    pub k_proj: Linear,
    /// Value projection, `hidden → kv_heads × head_size`.
    pub v_proj: Linear,
    /// Output projection, `heads × head_size → hidden`.
    pub o_proj: Linear,
    /// q, k and v stacked into one projection for inference ([`Llama::fuse_projections`]);
    /// the three above are then views into it.
    pub(crate) qkv: Option<Linear>,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_size: usize,
}

impl Attention {
    /// The attention of a model of `cfg` from its q, k, v and o projections.
    /// `qkv` is the stacked projection the three parts are views of, where the checkpoint
    /// stores them stacked.
    pub(crate) fn new(
        [q, k, v, o]: [std::result::Result<Linear, crate::ModelError>; 4],
        qkv: Option<Linear>,
        cfg: &LlamaConfig,
    ) -> std::result::Result<Self, crate::ModelError> {
        Ok(Self {
            q_proj: q?,
            k_proj: k?,
            v_proj: v?,
            o_proj: o?,
            qkv,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.kv_heads(),
            head_size: cfg.head_size(),
        })
    }

    /// Query heads, kv heads and the head size.
    pub(crate) fn heads_and_size(&self) -> (usize, usize, usize) {
        (self.heads, self.kv_heads, self.head_size)
    }

    /// The stacked q/k/v projection, where one exists and no part has an adapter since.
    pub(crate) fn stacked(&self) -> Option<&Linear> {
        let adapted = [&self.q_proj, &self.k_proj, &self.v_proj]
            .iter()
            .any(|l| l.adapter.is_some());
        self.qkv.as_ref().filter(|_| !adapted)
    }
}

/// Where a block's positions are: the first one's position (after a cache's), and where each
/// position's example starts in rows that pack several.
pub(crate) type Placement<'a> = (usize, Option<&'a ops::Segments>);

impl Llama {
    /// The attention of block `i` on normed hidden states `x` placed at `start` (and within
    /// `segments`).
    pub(crate) fn attention(
        &self,
        i: usize,
        x: &Tensor,
        (start, segments): Placement,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let block = &self.layers[i];
        let a = &block.self_attn;
        let rope = self.layer_rope(i);
        let t = x.dim(1)?;
        let heads = a.heads_and_size();
        let (cos, sin) = rope.window(start, t)?;
        let options = self.attention_options(i, segments);
        // A window that covers every position attended to masks nothing (a packed cache's
        // decode step keeps its window: a replayed step attends at later positions).
        let trimmed = ops::AttentionOptions {
            window: options.window.filter(|&w| start + t > w),
            ..options.clone()
        };
        let y = match cache {
            Some(c) if ops::write_kv_fused(x, &cos, &sin) => {
                // The projection is split, rotated and cached in one kernel, whatever the
                // layer's options (the decode kernel takes them, also in a replayed step).
                let qkv = match (a.stacked(), self.family.qk_norm) {
                    (Some(qkv), false) => qkv.forward(x, self.dtype())?,
                    _ => Tensor::cat(&self.projections(block, x)?, D::Minus1)?,
                };
                c.attend_packed(&qkv, rope, heads, options)?
            }
            None => {
                let (heads, kv_heads) = (a.heads, a.kv_heads);
                let y = match self.packed_projection(block, x, (&cos, &sin))? {
                    Some(qkv) => {
                        let heads = (heads, kv_heads);
                        ops::packed_self_attention(&qkv, (&cos, &sin), heads, trimmed)?
                    }
                    None => {
                        let [q, k, v] = self.projections(block, x)?;
                        let tables = (&cos, &sin);
                        ops::self_attention([&q, &k, &v], tables, heads, kv_heads, trimmed)?
                    }
                };
                return a.o_proj.forward(&y, self.dtype());
            }
            Some(c) => {
                let [q, k, v] = self.projections(block, x)?;
                let q = ops::rope(&ops::split_heads(&q, a.heads)?, &cos, &sin)?;
                let k = ops::rope(&ops::split_heads(&k, a.kv_heads)?, &cos, &sin)?;
                let v = ops::split_heads(&v, a.kv_heads)?;
                let (k, v) = c.append(&k, &v)?;
                ops::windowed_attention(&q, &k, &v, trimmed)?
            }
        };
        a.o_proj.forward(&ops::merge_heads(&y)?, self.dtype())
    }

    /// The packed q/k/v projection `[b, t, (heads + 2 · kv_heads) · d]` of `x` where `block`'s
    /// attention takes one, for the packed self-attention's kernels (training on CUDA in 16
    /// bits; no q/k norms): one GEMM over the three master weights where they train with
    /// nothing else to them and the checkpoint does not stack them itself, or the frozen
    /// stacked weight with the three parts' low-rank updates as one product (LoRA). One
    /// product each way then replaces three, and the input's gradient is no sum of three.
    /// `None` where the three projections go their own ways.
    fn packed_projection(
        &self,
        block: &Block,
        x: &Tensor,
        tables: (&Tensor, &Tensor),
    ) -> Result<Option<Tensor>> {
        let a = &block.self_attn;
        let heads = (a.heads, a.kv_heads);
        if self.family.qk_norm || !ops::packed_self_attention_fuses(x, tables, heads, a.head_size) {
            return Ok(None);
        }
        let parts = [&a.q_proj, &a.k_proj, &a.v_proj];
        if a.qkv.is_some() {
            return stacked_low_rank(a.qkv.as_ref(), &parts, x);
        }
        match parts.map(Linear::bare_master) {
            [Some(q), Some(k), Some(v)] if q.dtype() == k.dtype() && k.dtype() == v.dtype() => {
                ops::stacked_master_linear(x, &[q, k, v]).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The RoPE tables of block `i`: the local ones where its family gives sliding layers a
    /// base of their own (Gemma 3).
    pub(crate) fn layer_rope(&self, i: usize) -> &RopeTables {
        match (self.family.layers[i].local_rope, &self.rope_local) {
            (true, Some(local)) => local,
            _ => &self.rope,
        }
    }

    /// The options of block `i`'s attention (its family's scale and soft cap, its window) on
    /// rows packed as `segments` say.
    pub(crate) fn attention_options(
        &self,
        i: usize,
        segments: Option<&ops::Segments>,
    ) -> ops::AttentionOptions {
        ops::AttentionOptions {
            scale: self.family.attention_scale,
            softcap: self.family.attn_softcap,
            window: self.family.layers[i].window,
            segments: segments.cloned(),
        }
    }

    /// The q, k and v projections `[b, t, heads · head_size]` of `x`, the queries and keys
    /// normed per head where the family has q/k norms.
    fn projections(&self, block: &Block, x: &Tensor) -> Result<[Tensor; 3]> {
        let a = &block.self_attn;
        let [q, k, v] = match a.qkv.as_ref().filter(|l| l.adapter.is_some()) {
            // An adapter of a weight the checkpoint stacks (Phi-3's qkv_proj) adapts it whole.
            Some(qkv) => {
                let y = qkv.forward(x, self.dtype())?;
                let widths = [&a.q_proj, &a.k_proj, &a.v_proj].map(|l| l.dims().map(|d| d.0));
                let [q, k, _] = widths;
                let (q, k) = (q?, k?);
                let rest = y.dim(D::Minus1)? - q - k;
                [(0, q), (q, k), (q + k, rest)].map(|(at, n)| y.narrow(D::Minus1, at, n))
            }
            None => [&a.q_proj, &a.k_proj, &a.v_proj].map(|l| l.forward(x, self.dtype())),
        };
        let (q, k, v) = (q?, k?, v?);
        let per_head = |y: Tensor, n: Norm| match block.norm(n) {
            Some(weight) => {
                let (b, t, width) = y.dims3()?;
                let heads = y.reshape((b, t, width / a.head_size, a.head_size))?;
                self.rms_norm(&heads, weight)?.reshape((b, t, width))
            }
            None => Ok(y),
        };
        Ok([per_head(q, Norm::Query)?, per_head(k, Norm::Key)?, v])
    }
}
