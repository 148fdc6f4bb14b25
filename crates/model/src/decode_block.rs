//! A decode step's block in five kernels: the q/k/v projection taking the block's first norm on
//! the way in, the step's attention over the KV cache (`ops::cached_attention`: rotation,
//! cache write and attention in one kernel), the output projection adding the residual on the
//! way out, the gate/up projection taking the second norm and applying the unit, and the down
//! projection adding the residual (`ops::rms_norm_linear`, `ops::linear_residual`,
//! `ops::rms_norm_glu_projection`). [`Llama::block_lazy`]'s way takes seven, two of them the
//! residual adds with norms, and a decode step is bound by launches. Blocks with more than
//! that (Gemma's norms on the attention and MLP outputs, q/k norms, biases, adapters, 4-bit
//! weights) take the general way.

use super::cache::LayerCache;
use super::llama::{Block, Llama};
use crate::names::Norm;
use candle_core::{Result, Tensor};

/// The frozen dense weights of a block whose decode step takes [`Llama::decode_block`].
#[derive(Clone, Copy)]
pub(crate) struct DecodeWeights<'a> {
    qkv: &'a Tensor,
    o: &'a Tensor,
    gate_up: &'a Tensor,
    down: &'a Tensor,
}

impl Llama {
    /// The weights of block `i` for [`Llama::decode_block`], where the block has nothing the
    /// five kernels leave out: no norms but the two before attention and the MLP, stacked
    /// q/k/v and gate/up projections, and no projection with a bias, an adapter, a 4-bit or a
    /// trainable weight.
    pub(crate) fn decode_weights(&self, i: usize) -> Option<DecodeWeights<'_>> {
        let b: &Block = &self.layers[i];
        let two_norms = b
            .norms
            .iter()
            .all(|(n, _)| matches!(n, Norm::PreAttention | Norm::PreFeedForward));
        if !two_norms {
            return None;
        }
        Some(DecodeWeights {
            qkv: b.self_attn.stacked()?.plain_weight()?,
            o: b.self_attn.o_proj.plain_weight()?,
            gate_up: b.mlp.stacked()?.plain_weight()?,
            down: b.mlp.down_proj.plain_weight()?,
        })
    }

    /// Block `i` of a one-position step over `cache` on the whole residual stream `x`
    /// `[batch, 1, hidden]` (nothing pending), with the block's weights `w`: the new stream.
    /// Only where [`ops::write_kv_fused`] holds, as [`LayerCache::attend_packed`] needs.
    pub(crate) fn decode_block(
        &self,
        i: usize,
        x: &Tensor,
        w: DecodeWeights,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let b = &self.layers[i];
        let dtype = self.dtype();
        let (pre_attention, offset) = self.norm_weight(b.required_norm(Norm::PreAttention)?)?;
        let (pre_mlp, _) = self.norm_weight(b.required_norm(Norm::PreFeedForward)?)?;
        let norm = |weight| ops::InputNorm {
            weight,
            offset,
            eps: self.config.rms_norm_eps,
        };
        let held = |weight| ops::WeightSource::cast(weight, dtype);
        let (qkv_weight, qkv_source) = held(w.qkv)?;
        let qkv = ops::rms_norm_linear(x, norm(&pre_attention), (&qkv_weight, qkv_source))?;
        let heads = b.self_attn.heads_and_size();
        let options = self.attention_options(i, None);
        let y = cache.attend_packed(&qkv, self.layer_rope(i), heads, options)?;
        let (o, o_source) = held(w.o)?;
        let x = ops::linear_residual(&ops::merge_heads(&y)?, (&o, o_source), x)?;
        let glu = self.family.activation.glu();
        let (gate_up, gate_up_source) = held(w.gate_up)?;
        let gate_up = (&gate_up, gate_up_source);
        let hidden = ops::rms_norm_glu_projection(&x, norm(&pre_mlp), gate_up, glu)?;
        let (down, down_source) = held(w.down)?;
        ops::linear_residual(&hidden, (&down, down_source), &x)
    }
}
