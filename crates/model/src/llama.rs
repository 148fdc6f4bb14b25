//! The decoder of every supported family: token embedding (scaled for Gemma), RMSNorm (`w` or
//! `1 + w`), RoPE, grouped-query causal attention (`attention.rs`: q/k norms, sliding windows,
//! soft-capping), a gated MLP (SwiGLU or GeGLU), norms around attention and the MLP as the
//! family has them, tied or untied output head with optional soft-capping. What a family
//! changes is a [`Family`] read from `config.json`. It knows nothing about training: the
//! trainer drives [`Llama::embed`], [`Llama::block`] and [`Llama::logits`] itself when it
//! checkpoints.

pub use super::attention::Attention;
use super::attention::Placement;
pub use super::cache::Cache;
use super::cache::LayerCache;
use super::config::LlamaConfig;
use super::rope::RopeTables;
use super::weights::{ModelError, Weights};
use crate::family::{Family, NormKind};
use crate::linear::stacked_low_rank;
pub use crate::linear::Linear;
use crate::names::{self, Fused, Module, Norm, Projection};
use candle_core::{DType, Device, IndexOp, Result, Tensor};
use std::collections::BTreeMap;

impl Mlp {
    /// The stacked gate/up projection, where one exists and no part has an adapter since.
    pub(crate) fn stacked(&self) -> Option<&Linear> {
        let adapted = self.gate_proj.adapter.is_some() || self.up_proj.adapter.is_some();
        self.gate_up.as_ref().filter(|_| !adapted)
    }
}

/// The gated feed-forward block (SwiGLU or GeGLU, as the family says).
#[derive(Debug, Clone)]
pub struct Mlp {
    /// The gate projection, `hidden → intermediate`.
    pub gate_proj: Linear,
    /// The up projection, `hidden → intermediate`.
    pub up_proj: Linear,
    /// The down projection, `intermediate → hidden`.
    pub down_proj: Linear,
    /// gate and up stacked into one projection for inference ([`Llama::fuse_projections`]).
    gate_up: Option<Linear>,
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    /// The norm weights the family has ([`Norm::of`]), in a checkpoint's order.
    pub norms: Vec<(Norm, Tensor)>,
    /// The self-attention.
    pub self_attn: Attention,
    /// The gated feed-forward.
    pub mlp: Mlp,
}

/// A causal language model of any supported family (the name is historical: Llama was the
/// first).
#[derive(Debug, Clone)]
pub struct Llama {
    /// The model's `config.json`.
    pub config: LlamaConfig,
    /// What the family changes, read from `config`.
    pub family: Family,
    /// Token embedding, `vocab_size × hidden_size` (on the host for a frozen, untied table after
    /// [`Llama::keep_input_embedding_on_host`]).
    pub embed_tokens: Tensor,
    /// The transformer blocks, first to last.
    pub layers: Vec<Block>,
    /// Weight of the final RMSNorm, before the head.
    pub norm: Tensor,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Tensor>,
    pub(crate) rope: RopeTables,
    /// The tables of sliding layers where they have their own RoPE base (Gemma 3).
    pub(crate) rope_local: Option<RopeTables>,
    dtype: DType,
}

impl Block {
    /// The weight of norm `n`, if the block's family has it.
    pub fn norm(&self, n: Norm) -> Option<&Tensor> {
        self.norms.iter().find(|(m, _)| *m == n).map(|(_, t)| t)
    }

    /// The weight of a norm every family has.
    pub(crate) fn required_norm(&self, n: Norm) -> Result<&Tensor> {
        self.norm(n)
            .ok_or_else(|| candle_core::Error::Msg(format!("the block has no {n:?} norm")))
    }

    /// The projection `p` of this block.
    pub fn projection(&self, p: Projection) -> &Linear {
        let (a, m) = (&self.self_attn, &self.mlp);
        match p {
            Projection::Q => &a.q_proj,
            Projection::K => &a.k_proj,
            Projection::V => &a.v_proj,
            Projection::O => &a.o_proj,
            Projection::Gate => &m.gate_proj,
            Projection::Up => &m.up_proj,
            Projection::Down => &m.down_proj,
        }
    }

    /// The projection `p` of this block, to attach an adapter to.
    pub fn projection_mut(&mut self, p: Projection) -> &mut Linear {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        match p {
            Projection::Q => &mut a.q_proj,
            Projection::K => &mut a.k_proj,
            Projection::V => &mut a.v_proj,
            Projection::O => &mut a.o_proj,
            Projection::Gate => &mut m.gate_proj,
            Projection::Up => &mut m.up_proj,
            Projection::Down => &mut m.down_proj,
        }
    }
}

/// A block's projections by name, and its stacked q/k/v and gate/up projections if stored so.
type BlockProjections = (BTreeMap<Projection, Linear>, [Option<Linear>; 2]);

/// Block `i`'s projections, and its stacked q/k/v and gate/up projections where the
/// checkpoint stores them stacked (the family's `fused_projections`): the parts are then views
/// into the stacked weights, and train them when they train.
fn load_projections(
    cfg: &LlamaConfig,
    family: &Family,
    w: &Weights,
    i: usize,
) -> std::result::Result<BlockProjections, ModelError> {
    let single = |p: Projection| {
        let (out, inp) = p.shape(cfg);
        Ok((p, Linear::load(w, &p.path(i), out, inp, p.has_bias(cfg))?))
    };
    if !family.fused_projections {
        let all = Projection::ALL
            .into_iter()
            .map(single)
            .collect::<std::result::Result<_, ModelError>>()?;
        return Ok((all, [None, None]));
    }
    let mut linears: BTreeMap<Projection, Linear> = [Projection::O, Projection::Down]
        .into_iter()
        .map(single)
        .collect::<std::result::Result<_, ModelError>>()?;
    let stacked = [Fused::Qkv, Fused::GateUp].map(|f| {
        let (out, inp) = f.shape(cfg);
        let whole = Linear::load(w, &f.path(i), out, inp, false)?;
        let rows: Vec<usize> = f.parts().iter().map(|p| p.shape(cfg).0).collect();
        let parts = whole.split(&rows)?;
        Ok::<_, ModelError>((
            f.parts().iter().copied().zip(parts).collect::<Vec<_>>(),
            whole,
        ))
    });
    let mut wholes = [None, None];
    for (slot, result) in stacked.into_iter().enumerate() {
        let (parts, whole) = result?;
        linears.extend(parts);
        wholes[slot] = Some(whole);
    }
    Ok((linears, wholes))
}

/// The final norm's weight and offset and the head, for a head product that takes the norm on
/// the way in ([`Llama::normed_head`]).
struct NormedHead {
    weight: Tensor,
    offset: f64,
    head: Tensor,
    source: ops::WeightSource,
}

impl NormedHead {
    /// The final norm as the head's product takes it on the way in.
    fn input_norm(&self, eps: f64) -> ops::InputNorm<'_> {
        ops::InputNorm {
            weight: &self.weight,
            offset: self.offset,
            eps,
        }
    }
}

impl Llama {
    /// Builds the model from `weights`, computing in `dtype`. Weights that are `Var`s train;
    /// plain tensors are frozen.
    pub fn new(
        cfg: &LlamaConfig,
        w: &Weights,
        dtype: DType,
    ) -> std::result::Result<Self, ModelError> {
        let shapes = names::parameter_shapes(cfg);
        w.check_unexpected(
            shapes.iter().map(|(n, _)| n.as_str()),
            cfg.num_hidden_layers,
            cfg.tie_word_embeddings,
        )?;
        let h = cfg.hidden_size;
        let family = Family::of(cfg);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = names::layer(i);
            let (mut linears, [qkv, gate_up]) = load_projections(cfg, &family, w, i)?;
            let mut linear = |proj: Projection| {
                linears
                    .remove(&proj)
                    .ok_or_else(|| ModelError::MissingTensor {
                        source_name: w.source_name().to_string(),
                        name: proj.path(i),
                    })
            };
            let norms = Norm::of(&family)
                .into_iter()
                .map(|n| {
                    Ok((
                        n,
                        w.get(&format!("{p}.{}", n.name(&family)), &[n.size(cfg)])?,
                    ))
                })
                .collect::<std::result::Result<_, ModelError>>()?;
            layers.push(Block {
                norms,
                self_attn: Attention::new(
                    [Projection::Q, Projection::K, Projection::V, Projection::O].map(&mut linear),
                    qkv,
                    cfg,
                )?,
                mlp: Mlp {
                    gate_proj: linear(Projection::Gate)?,
                    up_proj: linear(Projection::Up)?,
                    down_proj: linear(Projection::Down)?,
                    gate_up,
                },
            });
        }
        let embed_tokens = w.get(names::EMBED_TOKENS, &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(w.get(names::LM_HEAD, &[cfg.vocab_size, h])?)
        };
        let local = family.layers.iter().any(|l| l.local_rope);
        let norm = w.get(names::FINAL_NORM, &[h])?;
        let device = norm.device();
        Ok(Self {
            config: cfg.clone(),
            rope: RopeTables::new(cfg, dtype, device)?,
            rope_local: match local {
                true => Some(RopeTables::for_layers(cfg, true, dtype, device)?),
                false => None,
            },
            family,
            embed_tokens,
            layers,
            norm,
            lm_head,
            dtype,
        })
    }

    /// Stacks each block's frozen q/k/v projections, and its gate/up projections, into one
    /// weight each (the parts become views into it): for inference, where a decode step is
    /// bound by kernel launches, and for LoRA, whose updates of a stack's parts then run as one
    /// product with it. Projections that train are left alone, and so are stacks made before;
    /// a part that gets an adapter later is computed on its own again outside LoRA's product.
    pub fn fuse_projections(&mut self) -> Result<()> {
        // A checkpoint that stores them stacked (Phi-3) has them stacked already.
        for block in self
            .layers
            .iter_mut()
            .filter(|_| !self.family.fused_projections)
        {
            let a = &mut block.self_attn;
            if a.qkv.is_none() {
                a.qkv = Linear::stack(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj])?;
            }
            let m = &mut block.mlp;
            if m.gate_up.is_none() {
                m.gate_up = Linear::stack(&mut [&mut m.gate_proj, &mut m.up_proj])?;
            }
        }
        Ok(())
    }

    /// The master weights each block may multiply as one stacked weight in training, each
    /// stack's parts in order: gate and up where both train with nothing else to them, and q,
    /// k and v where the attention may pack them (as `packed_projection` asks, but for the
    /// device and dtype): what an optimizer can keep one compute-dtype copy of
    /// ([`ops::ComputeCopies::add_stacked`]).
    pub fn stacked_masters(&self) -> Vec<Vec<Tensor>> {
        let stack = |parts: &[&Linear]| -> Option<Vec<Tensor>> {
            parts.iter().map(|l| l.bare_master().cloned()).collect()
        };
        let mut out = Vec::new();
        for block in &self.layers {
            let (a, m) = (&block.self_attn, &block.mlp);
            out.extend(stack(&[&m.gate_proj, &m.up_proj]));
            if !self.family.qk_norm && a.qkv.is_none() {
                out.extend(stack(&[&a.q_proj, &a.k_proj, &a.v_proj]));
            }
        }
        out
    }

    /// Turns the attached adapters' dropout on with masks drawn from `seed` (pass a new seed
    /// each step; the same seed replays the same masks, as checkpointed recomputation needs),
    /// or off with `None` (evaluation, generation).
    pub fn set_adapter_dropout_seed(&self, seed: Option<u64>) {
        for block in &self.layers {
            let stacked = [&block.self_attn.qkv, &block.mlp.gate_up];
            let parts = Projection::ALL.map(|p| block.projection(p));
            let linears = stacked.into_iter().flatten().chain(parts);
            for adapter in linears.filter_map(|l| l.adapter.as_ref()) {
                adapter.set_dropout_seed(seed);
            }
        }
    }

    /// The projection at a module path such as `model.layers.3.mlp.up_proj` (or, where the
    /// checkpoint stores them stacked, `model.layers.3.self_attn.qkv_proj`), where an adapter
    /// attaches.
    pub fn linear_mut(&mut self, path: &str) -> Option<&mut Linear> {
        let (index, module) = path.strip_prefix("model.layers.")?.split_once('.')?;
        let block = self.layers.get_mut(index.parse::<usize>().ok()?)?;
        let modules = Module::of(&self.family);
        match modules.into_iter().find(|m| m.module() == module)? {
            Module::One(p) => Some(block.projection_mut(p)),
            Module::Stacked(Fused::Qkv) => block.self_attn.qkv.as_mut(),
            Module::Stacked(Fused::GateUp) => block.mlp.gate_up.as_mut(),
        }
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model computes on, where its weights live (all of them but an input
    /// embedding kept on the host, [`Llama::keep_input_embedding_on_host`]).
    pub fn device(&self) -> &Device {
        self.norm.device()
    }

    /// Moves a frozen, untied input embedding of a model on a CUDA device into host memory and
    /// hands its device memory back to the driver: a LoRA base's `vocab × hidden` table (1 GB
    /// at Llama-3.1-8B's shape in 16 bits) is only ever read a row per token, so each step
    /// gathers its rows on the host and uploads those. Returns whether it moved; a table that
    /// trains, one tied to the output head, or one on another device stays. Training and
    /// evaluation run as before; a decoding graph cannot be captured over such a model.
    pub fn keep_input_embedding_on_host(&mut self) -> Result<bool> {
        let on_cuda = self.embed_tokens.device().is_cuda();
        let movable =
            !self.embed_tokens.track_op() && self.config.frozen_embedding_on_host(on_cuda);
        if !movable {
            return Ok(false);
        }
        let device = self.device().clone();
        self.embed_tokens = self.embed_tokens.to_device(&Device::Cpu)?;
        ops::device::release_unused_memory(&device)?;
        Ok(true)
    }

    /// Every parameter with its HF name, 4-bit projections expanded to the dtype they were
    /// quantized from.
    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(names::EMBED_TOKENS.to_string(), self.embed_tokens.clone())];
        for (i, b) in self.layers.iter().enumerate() {
            let p = names::layer(i);
            let norms = |before_attention: bool| {
                b.norms
                    .iter()
                    .filter(move |(n, _)| n.before_attention() == before_attention)
                    .map(|(n, t)| (format!("{p}.{}", n.name(&self.family)), t.clone()))
            };
            out.extend(norms(true));
            let stacked = [
                (Fused::Qkv, &b.self_attn.qkv),
                (Fused::GateUp, &b.mlp.gate_up),
            ];
            let stacked = stacked.map(|(f, l)| {
                let l = l.as_ref().filter(|_| self.family.fused_projections);
                l.map(|l| {
                    Ok::<_, candle_core::Error>((
                        format!("{}.weight", f.path(i)),
                        l.stored_weight()?,
                    ))
                })
                .transpose()
            });
            let [qkv, gate_up] = stacked;
            let (qkv, gate_up) = (qkv?, gate_up?);
            let attention = match &qkv {
                Some(_) => &[Projection::O][..],
                None => &[Projection::Q, Projection::K, Projection::V, Projection::O],
            };
            out.extend(qkv);
            for &proj in attention {
                let l = b.projection(proj);
                out.push((format!("{}.weight", proj.path(i)), l.stored_weight()?));
                if let Some(bias) = &l.bias {
                    out.push((format!("{}.bias", proj.path(i)), bias.clone()));
                }
            }
            out.extend(norms(false));
            let mlp = match &gate_up {
                Some(_) => &[Projection::Down][..],
                None => &[Projection::Gate, Projection::Up, Projection::Down],
            };
            out.extend(gate_up);
            for &proj in mlp {
                let weight = b.projection(proj).stored_weight()?;
                out.push((format!("{}.weight", proj.path(i)), weight));
            }
        }
        out.push((names::FINAL_NORM.into(), self.norm.clone()));
        if let Some(head) = &self.lm_head {
            out.push((names::LM_HEAD.into(), head.clone()));
        }
        Ok(out)
    }

    /// Token ids `[batch, seq]` (u32) to hidden states `[batch, seq, hidden]`.
    /// Rows are looked up in the table's own dtype (the f32 master in mixed precision) and
    /// only they are cast, so the table's gradient comes out in its dtype with no cast of the
    /// whole table either way.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = ops::cast(&ops::embedding(ids, &self.embed_tokens)?, self.dtype)?;
        match self.family.embed_scale {
            Some(scale) => x.affine(scale, 0.0),
            None => Ok(x),
        }
    }

    /// Runs block `i` on hidden states whose first position is `start`.
    pub fn block(
        &self,
        i: usize,
        x: &Tensor,
        start: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (x, mlp) = self.block_lazy(i, x, None, (start, None), cache)?;
        ops::add(&x, &mlp)
    }

    /// Runs block `i` on training rows `x` (no cache), which pack several examples each where
    /// `segments` says where each position's example starts: attention then stays within each
    /// example ([`ops::Segments`]). RoPE keeps the row's positions: it rotates queries and
    /// keys by their absolute positions, and a score depends only on the difference of the
    /// two, which within an example is the same as from the example's own start.
    pub fn training_block(
        &self,
        i: usize,
        x: &Tensor,
        segments: Option<&ops::Segments>,
    ) -> Result<Tensor> {
        let (x, mlp) = self.block_lazy(i, x, None, (0, segments), None)?;
        ops::add(&x, &mlp)
    }

    /// Every block on training rows `x` (as [`Llama::training_block`] one after another), each
    /// block's closing residual add joined with the next block's first norm
    /// ([`ops::add_rms_norm`]). Returns the last block's output.
    pub fn training_blocks(&self, x: &Tensor, segments: Option<&ops::Segments>) -> Result<Tensor> {
        match self.blocks(x.clone(), segments, None)? {
            (x, Some(mlp)) => ops::add(&x, &mlp),
            (x, None) => Ok(x),
        }
    }

    /// Block `i` on the residual stream `x` plus `pending`, the previous block's MLP output
    /// not yet added to it. Returns the new stream and this block's MLP output, again not
    /// added: each add then joins the norm after it ([`ops::add_rms_norm`]).
    fn block_lazy(
        &self,
        i: usize,
        x: &Tensor,
        pending: Option<&Tensor>,
        at: Placement,
        cache: Option<&mut LayerCache>,
    ) -> Result<(Tensor, Tensor)> {
        let b = &self.layers[i];
        let (x, normed) = self.add_norm(x, pending, b.required_norm(Norm::PreAttention)?)?;
        let attention = self.attention(i, &normed, at, cache)?;
        let attention = self.output_norm(b, Norm::PostAttention, attention)?;
        let pre_mlp = b.required_norm(Norm::PreFeedForward)?;
        let (x, normed) = self.add_norm(&x, Some(&attention), pre_mlp)?;
        let mlp = self.mlp(&b.mlp, &normed)?;
        Ok((x, self.output_norm(b, Norm::PostFeedForward, mlp)?))
    }

    /// `y` through the block's norm `n` where the family has one (Gemma's norms on the
    /// attention and feed-forward outputs), else `y`.
    fn output_norm(&self, b: &Block, n: Norm, y: Tensor) -> Result<Tensor> {
        match b.norm(n) {
            Some(weight) => self.rms_norm(&y, weight),
            None => Ok(y),
        }
    }

    /// A norm's weight in the compute dtype and the offset added to it as it multiplies: 1
    /// for Gemma's `1 + w` (the fused kernels add it in f32, as transformers does), else 0.
    pub(crate) fn norm_weight(&self, weight: &Tensor) -> Result<(Tensor, f64)> {
        Ok((ops::cast(weight, self.dtype)?, self.norm_offset()))
    }

    /// The offset a norm's weight takes as it multiplies (see [`Llama::norm_weight`]).
    fn norm_offset(&self) -> f64 {
        match self.family.norm {
            NormKind::Plain => 0.0,
            NormKind::OnePlus => 1.0,
        }
    }

    /// A norm's weight as the norm ops take it: a trained weight as it is (an f32 master in
    /// mixed precision: on CUDA the op reads the step's compute copy and sums the gradient in
    /// f32, `ops::rms_norm_offset`), any other in the compute dtype.
    fn norm_operand(&self, weight: &Tensor) -> Result<Tensor> {
        match weight.track_op() {
            true => Ok(weight.clone()),
            false => ops::cast(weight, self.dtype),
        }
    }

    /// RMSNorm of `x` over its last dimension with the norm weight `weight`.
    pub(crate) fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let weight = self.norm_operand(weight)?;
        ops::rms_norm_offset(x, &weight, self.norm_offset(), self.config.rms_norm_eps)
    }

    /// `x + pending` (or `x`) and its RMSNorm with `weight`.
    fn add_norm(
        &self,
        x: &Tensor,
        pending: Option<&Tensor>,
        weight: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (weight, offset) = (self.norm_operand(weight)?, self.norm_offset());
        let eps = self.config.rms_norm_eps;
        match pending {
            Some(delta) => ops::add_rms_norm(x, delta, &weight, offset, eps),
            None => Ok((x.clone(), ops::rms_norm_offset(x, &weight, offset, eps)?)),
        }
    }

    fn mlp(&self, m: &Mlp, x: &Tensor) -> Result<Tensor> {
        let glu = self.family.activation.glu();
        // The stacked projection only pays off for a decode step (one position per
        // sequence, a few sequences): one kernel there, where many rows would copy the halves
        // out of the stacked output.
        let decode_step = x.rank() == 3 && x.dim(1)? == 1;
        if let Some(gate_up) = m.gate_up.as_ref().filter(|l| l.adapter.is_some()) {
            // An adapter of a weight the checkpoint stacks (Phi-3's gate_up_proj) adapts it
            // whole: gate, then up.
            let hidden = ops::glu_packed(&gate_up.forward(x, self.dtype)?, glu)?;
            return m.down_proj.forward(&hidden, self.dtype);
        }
        // LoRA on both halves of a frozen stacked weight: one product into the packed kernels
        // (a decode step's rows keep each half's own matrix-vector products).
        let parts = [&m.gate_proj, &m.up_proj];
        if !decode_step && ops::glu_packed_fuses(x) {
            if let Some(packed) = stacked_low_rank(m.gate_up.as_ref(), &parts, x)? {
                return m
                    .down_proj
                    .forward(&ops::glu_packed(&packed, glu)?, self.dtype);
            }
        }
        let hidden = match (
            m.stacked(),
            m.gate_proj.bare_master(),
            m.up_proj.bare_master(),
        ) {
            (Some(gate_up), ..) if decode_step && !x.track_op() && gate_up.bias.is_none() => {
                ops::glu_projection(x, &gate_up.weight.dense(self.dtype)?, glu)?
            }
            (_, Some(gate), Some(up)) => ops::glu_master_projection(x, gate, up, glu)?,
            _ => {
                let gate = m.gate_proj.forward(x, self.dtype)?;
                let up = m.up_proj.forward(x, self.dtype)?;
                ops::glu(&gate, &up, glu)?
            }
        };
        m.down_proj.forward(&hidden, self.dtype)
    }

    /// The output head's weight in the compute dtype: `lm_head`, or the embedding when tied.
    fn head(&self) -> Result<Tensor> {
        ops::cast(self.head_master(), self.dtype)
    }

    /// The output head's weight as stored (the tied embedding table when there is no head).
    fn head_master(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.rms_norm(x, &self.norm)
    }

    /// Final norm and output head: hidden states to logits `[.., vocab]` in the compute dtype.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.head_logits(&self.final_norm(x)?)
    }

    /// The output head on normalized hidden states, soft-capped where the family says so.
    fn head_logits(&self, x: &Tensor) -> Result<Tensor> {
        let head = self.head()?;
        let logits = if head.is_variable() || head.track_op() {
            ops::linear(x, &head)?
        } else {
            ops::frozen_linear(x, &ops::LinearWeight::Dense(head))?
        };
        self.softcapped(logits)
    }

    /// Logits soft-capped where the family says so.
    fn softcapped(&self, logits: Tensor) -> Result<Tensor> {
        match self.family.final_softcap {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    /// Final norm, output head and per-token NLL (f32 `[n]`, no gradient) of u32 `targets`
    /// `[n]` for hidden states `[.., hidden]` with `n` positions, without keeping the full
    /// logits when they are large ([`ops::head_nll`], soft-capped chunk by chunk where the
    /// family caps the logits).
    pub fn token_nll(&self, x: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let x = self.final_norm(x)?;
        let x = x.reshape(((), self.config.hidden_size))?;
        ops::head_nll(&x, &self.head()?, targets, self.family.final_softcap)
    }

    /// The training loss: the mean NLL of u32 `targets` `[n]` over the positions `weights`
    /// (`[n]` f32, 1 to score, 0 to skip) selects, for hidden states `[.., hidden]`, with the
    /// output head's gradients computed as it runs ([`ops::head_mean_nll`]). The head gets a
    /// gradient only when it is trainable.
    pub fn mean_nll(&self, x: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
        let x = self.final_norm(x)?;
        let x = x.reshape(((), self.config.hidden_size))?;
        let cap = self.family.final_softcap;
        ops::head_mean_nll(&x, self.head_master(), targets, weights, cap)
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` whose first position is
    /// `cache.len()` (or 0 without a cache).
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let (x, pending) = self.residual_stream(ids, cache)?;
        self.final_logits(&x, pending.as_ref())
    }

    /// [`Llama::forward`]'s logits of the last position only, `[batch, vocab]`: what a prompt
    /// needs before decoding, without the output head's work and memory on every other
    /// position (transformers' `logits_to_keep=1`).
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let (x, pending) = self.residual_stream(ids, cache)?;
        let last = x.dim(1)? - 1;
        // The norm and the head work row by row: the last position's alone are the same.
        let last_of = |t: &Tensor| t.narrow(1, last, 1)?.squeeze(1)?.contiguous();
        let pending = pending.as_ref().map(last_of).transpose()?;
        self.final_logits(&last_of(&x)?, pending.as_ref())
    }

    /// The final norm and the output head on the residual stream `x` `[.., hidden]` with the
    /// last block's MLP output `pending` not yet added (none after a decode step's blocks).
    /// Without one, for an untracked head, the norm is taken on the way into the head's
    /// product ([`ops::rms_norm_linear`]): a decode step's head is one kernel, not two.
    fn final_logits(&self, x: &Tensor, pending: Option<&Tensor>) -> Result<Tensor> {
        let Some(normed) = self.normed_head(pending)? else {
            let (_, normed) = self.add_norm(x, pending, &self.norm)?;
            return self.head_logits(&normed);
        };
        let norm = normed.input_norm(self.config.rms_norm_eps);
        self.softcapped(ops::rms_norm_linear(
            x,
            norm,
            (&normed.head, normed.source),
        )?)
    }

    /// The final norm and the head, where the final norm is taken on the way into the head's
    /// product: nothing `pending` and an untracked head.
    fn normed_head(&self, pending: Option<&Tensor>) -> Result<Option<NormedHead>> {
        if pending.is_some() {
            return Ok(None);
        }
        let (head, source) = ops::WeightSource::cast(self.head_master(), self.dtype)?;
        if head.is_variable() || head.track_op() {
            return Ok(None);
        }
        let (weight, offset) = self.norm_weight(&self.norm)?;
        Ok(Some(NormedHead {
            weight,
            offset,
            head,
            source,
        }))
    }

    /// A greedy one-position step over `cache` on token ids `[rows, 1]`:
    /// [`ops::greedy_step`] on [`Llama::forward`]'s logits with the step tensor `step` and the
    /// picks `log`. Where the final norm goes into the head and the logits are not
    /// soft-capped, [`ops::rms_norm_head_greedy_step`], whose head's product also gives the
    /// argmax's first pass for one row on CUDA: the logits are not kept.
    pub fn greedy_step(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        step: &Tensor,
        log: &ops::PicksLog,
    ) -> Result<()> {
        let (x, pending) = self.residual_stream(ids, Some(cache))?;
        // Soft-capped logits keep the separate argmax (asked first: looking up the normed
        // head casts the head, which final_logits would then do again).
        if self.family.final_softcap.is_none() {
            if let Some(normed) = self.normed_head(pending.as_ref())? {
                let norm = normed.input_norm(self.config.rms_norm_eps);
                let head = (&normed.head, normed.source);
                return ops::rms_norm_head_greedy_step(&x, norm, head, step, log);
            }
        }
        let logits = self.final_logits(&x, pending.as_ref())?;
        ops::greedy_step(&logits.i((.., 0))?, step, log)
    }

    /// The blocks on token ids `[batch, seq]` whose first position is `cache.len()` (or 0
    /// without a cache): the residual stream `[batch, seq, hidden]` and the last block's MLP
    /// output not yet added to it, if any (see [`Llama::blocks`]).
    fn residual_stream(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.blocks(self.embed(ids)?, None, cache)
    }

    /// Every block on the residual stream `x` `[batch, seq, hidden]`, whose first position is
    /// `cache.len()` (or 0 without a cache) and whose rows pack examples where `segments` says
    /// so: the new stream and the last block's MLP output not yet added to it, if any. A
    /// one-position step over a cache runs each block that allows it in five kernels
    /// ([`Llama::decode_block`]), each adding its MLP output.
    fn blocks(
        &self,
        mut x: Tensor,
        segments: Option<&ops::Segments>,
        mut cache: Option<&mut Cache>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let start = cache.as_ref().map_or(0, |c| c.len());
        // What ops::write_kv_fused asks of the step's input (the RoPE tables are in the
        // model's dtype on its device, as the input).
        let decode_step = x.dim(1)? == 1 && !x.track_op() && ops::fused(&[&x]);
        let mut pending: Option<Tensor> = None;
        for i in 0..self.layers.len() {
            match (
                cache.as_mut(),
                self.decode_weights(i).filter(|_| decode_step),
            ) {
                (Some(c), Some(weights)) => {
                    if let Some(p) = pending.take() {
                        x = ops::add(&x, &p)?;
                    }
                    x = self.decode_block(i, &x, weights, &mut c.layers[i])?;
                }
                (c, _) => {
                    let layer_cache = c.map(|c| &mut c.layers[i]);
                    let at = (start, segments);
                    let (next, mlp) = self.block_lazy(i, &x, pending.as_ref(), at, layer_cache)?;
                    (x, pending) = (next, Some(mlp));
                }
            }
        }
        Ok((x, pending))
    }
}
