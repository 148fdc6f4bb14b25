//! The Llama-family decoder: token embedding, RMSNorm, RoPE, grouped-query causal attention,
//! SwiGLU MLP, tied or untied output head. It knows nothing about training: the trainer drives
//! [`Llama::embed`], [`Llama::block`] and [`Llama::logits`] itself when it checkpoints.

pub use super::cache::Cache;
use super::cache::LayerCache;
use super::config::LlamaConfig;
use super::lora::{Adapter, LoraLayer};
use super::rope::RopeTables;
use super::weights::{ModelError, Weights};
use crate::ops;
use candle_core::{DType, Device, Result, Tensor, D};

/// A projection `x @ weight.t() + bias`, plus a LoRA update when an adapter is attached.
/// Weights that are not trainable go through [`ops::frozen_linear`], so no gradient is
/// computed for them.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraLayer>,
    trainable: bool,
}

impl Linear {
    fn load(
        w: &Weights,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> std::result::Result<Self, ModelError> {
        let weight = w.get(&format!("{name}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(w.get(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Self {
            trainable: weight.is_variable(),
            weight,
            bias,
            lora: None,
        })
    }

    /// One projection computing `parts` side by side (their outputs concatenated along the last
    /// dimension), each part's weight and bias becoming a view into it so that nothing is
    /// stored twice. `None` (and nothing changed) when a part trains or has an adapter.
    fn stack(parts: &mut [&mut Linear]) -> Result<Option<Linear>> {
        let with_bias = parts.iter().filter(|p| p.bias.is_some()).count();
        if parts.iter().any(|p| p.trainable || p.lora.is_some())
            || (with_bias != 0 && with_bias != parts.len())
        {
            return Ok(None);
        }
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        let bias = match biases.is_empty() {
            true => None,
            false => Some(Tensor::cat(&biases, 0)?),
        };
        let mut offset = 0;
        for part in parts.iter_mut() {
            let rows = part.weight.dim(0)?;
            part.weight = weight.narrow(0, offset, rows)?;
            if let (Some(b), Some(all)) = (&mut part.bias, &bias) {
                *b = all.narrow(0, offset, rows)?;
            }
            offset += rows;
        }
        Ok(Some(Linear {
            weight,
            bias,
            lora: None,
            trainable: false,
        }))
    }

    /// The weight of a trained projection with nothing else to it (no adapter, no bias): what
    /// [`ops::master_linear`] alone computes.
    fn bare_master(&self) -> Option<&Tensor> {
        (self.trainable && self.lora.is_none() && self.bias.is_none()).then_some(&self.weight)
    }

    /// Applies the projection (and the LoRA update, if any), computing in `dtype`.
    pub fn forward(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let y = match (&self.lora, self.trainable) {
            (None, true) => ops::master_linear(x, &self.weight)?,
            (Some(lora), true) => {
                (ops::master_linear(x, &self.weight)? + lora.forward(x, dtype)?)?
            }
            (Some(lora), false) => {
                lora.forward_with_frozen(x, &ops::cast(&self.weight, dtype)?, dtype)?
            }
            (None, false) => ops::frozen_linear(x, &ops::cast(&self.weight, dtype)?)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&ops::cast(b, dtype)?),
            None => Ok(y),
        }
    }
}

impl Attention {
    /// The stacked q/k/v projection, where one exists and no part has an adapter since.
    fn stacked(&self) -> Option<&Linear> {
        let adapted = [&self.q_proj, &self.k_proj, &self.v_proj]
            .iter()
            .any(|l| l.lora.is_some());
        self.qkv.as_ref().filter(|_| !adapted)
    }
}

impl Mlp {
    /// The stacked gate/up projection, where one exists and no part has an adapter since.
    fn stacked(&self) -> Option<&Linear> {
        let adapted = self.gate_proj.lora.is_some() || self.up_proj.lora.is_some();
        self.gate_up.as_ref().filter(|_| !adapted)
    }
}

/// Grouped-query self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// q, k and v stacked into one projection for inference ([`Llama::fuse_projections`]);
    /// the three above are then views into it.
    qkv: Option<Linear>,
    heads: usize,
    kv_heads: usize,
    head_size: usize,
}

/// The SwiGLU feed-forward block.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// gate and up stacked into one projection for inference ([`Llama::fuse_projections`]).
    gate_up: Option<Linear>,
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Tensor>,
    rope: RopeTables,
    dtype: DType,
}

impl Block {
    /// The projections with their module names inside the block (`self_attn.q_proj`, ...).
    fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }
}

/// The HF tensor names of every parameter of a model with this config, with their shapes.
pub fn parameter_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_size();
    let kv = cfg.kv_heads() * cfg.head_size();
    let ffn = cfg.intermediate_size;
    let mut shapes = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut add = |name: &str, shape: Vec<usize>| shapes.push((format!("{p}.{name}"), shape));
        add("input_layernorm.weight", vec![h]);
        add("self_attn.q_proj.weight", vec![q, h]);
        add("self_attn.k_proj.weight", vec![kv, h]);
        add("self_attn.v_proj.weight", vec![kv, h]);
        if cfg.qkv_bias() {
            add("self_attn.q_proj.bias", vec![q]);
            add("self_attn.k_proj.bias", vec![kv]);
            add("self_attn.v_proj.bias", vec![kv]);
        }
        add("self_attn.o_proj.weight", vec![h, q]);
        add("post_attention_layernorm.weight", vec![h]);
        add("mlp.gate_proj.weight", vec![ffn, h]);
        add("mlp.up_proj.weight", vec![ffn, h]);
        add("mlp.down_proj.weight", vec![h, ffn]);
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    shapes
}

impl Llama {
    /// Builds the model from `weights`, computing in `dtype`. Weights that are `Var`s train;
    /// plain tensors are frozen.
    pub fn new(
        cfg: &LlamaConfig,
        w: &Weights,
        dtype: DType,
    ) -> std::result::Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let (heads, kv_heads, head_size) =
            (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_size());
        let ffn = cfg.intermediate_size;
        let bias = cfg.qkv_bias();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let linear = |n: &str, out, inp, b| Linear::load(w, &format!("{p}.{n}"), out, inp, b);
            layers.push(Block {
                input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn: Attention {
                    q_proj: linear("self_attn.q_proj", heads * head_size, h, bias)?,
                    k_proj: linear("self_attn.k_proj", kv_heads * head_size, h, bias)?,
                    v_proj: linear("self_attn.v_proj", kv_heads * head_size, h, bias)?,
                    o_proj: linear("self_attn.o_proj", h, heads * head_size, false)?,
                    qkv: None,
                    heads,
                    kv_heads,
                    head_size,
                },
                post_attention_layernorm: w
                    .get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp: Mlp {
                    gate_proj: linear("mlp.gate_proj", ffn, h, false)?,
                    up_proj: linear("mlp.up_proj", ffn, h, false)?,
                    down_proj: linear("mlp.down_proj", h, ffn, false)?,
                    gate_up: None,
                },
            });
        }
        let embed_tokens = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(w.get("lm_head.weight", &[cfg.vocab_size, h])?)
        };
        Ok(Self {
            config: cfg.clone(),
            rope: RopeTables::new(cfg, dtype, embed_tokens.device())?,
            embed_tokens,
            layers,
            norm: w.get("model.norm.weight", &[h])?,
            lm_head,
            dtype,
        })
    }

    /// Stacks each block's q/k/v projections, and its gate/up projections, into one matmul
    /// each, for inference: a decode step is bound by kernel launches. Projections that train
    /// are left alone; one that gets an adapter later is computed on its own again.
    pub fn fuse_projections(&mut self) -> Result<()> {
        for block in &mut self.layers {
            let a = &mut block.self_attn;
            a.qkv = Linear::stack(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj])?;
            let m = &mut block.mlp;
            m.gate_up = Linear::stack(&mut [&mut m.gate_proj, &mut m.up_proj])?;
        }
        Ok(())
    }

    /// Adds the LoRA update of `adapter` to the projections it adapts (replacing any adapter
    /// attached before). The model then computes `W x + scale * B A dropout(x)` there; the
    /// adapter's tensors are shared, so gradients land on [`Adapter::vars`].
    pub fn attach_adapter(&mut self, adapter: &Adapter) -> std::result::Result<(), ModelError> {
        let (scale, dropout) = (adapter.scale(), adapter.config.lora_dropout);
        for (id, (path, (a, b))) in adapter.modules().enumerate() {
            let linear = self.linear_mut(path).ok_or_else(|| {
                ModelError::Lora(format!("the adapter adapts {path}, which this model lacks"))
            })?;
            let (out, inp) = linear.weight.dims2()?;
            if a.dims()[1..] != [inp] || b.dims()[..1] != [out] || a.dim(0)? != b.dim(1)? {
                return Err(ModelError::Lora(format!(
                    "{path}: A {:?} and B {:?} do not fit the weight [{out}, {inp}]",
                    a.dims(),
                    b.dims()
                )));
            }
            linear.lora = Some(LoraLayer::new(
                a.clone(),
                b.clone(),
                scale,
                dropout,
                id as u64,
            ));
        }
        Ok(())
    }

    /// Turns LoRA dropout on with masks drawn from `seed` (pass a new seed each step; the same
    /// seed replays the same masks, as checkpointed recomputation needs), or off with `None`
    /// (evaluation, generation).
    pub fn set_lora_dropout_seed(&self, seed: Option<u64>) {
        for block in &self.layers {
            for linear in block.linears() {
                if let Some(lora) = &linear.lora {
                    lora.set_dropout_seed(seed);
                }
            }
        }
    }

    /// The projection at a module path such as `model.layers.3.mlp.up_proj`.
    fn linear_mut(&mut self, path: &str) -> Option<&mut Linear> {
        let rest = path.strip_prefix("model.layers.")?;
        let (index, name) = rest.split_once('.')?;
        let block = self.layers.get_mut(index.parse::<usize>().ok()?)?;
        block
            .linears_mut()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, l)| l)
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Every parameter with its HF name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                b.input_layernorm.clone(),
            ));
            let a = &b.self_attn;
            for (n, l) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                out.push((format!("{p}.self_attn.{n}.weight"), l.weight.clone()));
                if let Some(bias) = &l.bias {
                    out.push((format!("{p}.self_attn.{n}.bias"), bias.clone()));
                }
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                b.post_attention_layernorm.clone(),
            ));
            let m = &b.mlp;
            for (n, l) in [
                ("gate_proj", &m.gate_proj),
                ("up_proj", &m.up_proj),
                ("down_proj", &m.down_proj),
            ] {
                out.push((format!("{p}.mlp.{n}.weight"), l.weight.clone()));
            }
        }
        out.push(("model.norm.weight".into(), self.norm.clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".into(), head.clone()));
        }
        out
    }

    /// Token ids `[batch, seq]` (u32) to hidden states `[batch, seq, hidden]`.
    /// Rows are looked up in the table's own dtype (the f32 master in mixed precision) and
    /// only they are cast, so the table's gradient comes out in its dtype with no cast of the
    /// whole table either way.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        ops::cast(&ops::embedding(ids, &self.embed_tokens)?, self.dtype)
    }

    /// Runs block `i` on hidden states whose first position is `start`.
    pub fn block(
        &self,
        i: usize,
        x: &Tensor,
        start: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (x, mlp) = self.block_lazy(i, x, None, start, cache)?;
        ops::add(&x, &mlp)
    }

    /// Block `i` on the residual stream `x` plus `pending`, the previous block's MLP output
    /// not yet added to it. Returns the new stream and this block's MLP output, again not
    /// added: each add then joins the norm after it ([`ops::add_rms_norm`]).
    fn block_lazy(
        &self,
        i: usize,
        x: &Tensor,
        pending: Option<&Tensor>,
        start: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<(Tensor, Tensor)> {
        let b = &self.layers[i];
        let (x, normed) = self.add_norm(x, pending, &b.input_layernorm)?;
        let attention = self.attention(&b.self_attn, &normed, start, cache)?;
        let (x, normed) = self.add_norm(&x, Some(&attention), &b.post_attention_layernorm)?;
        Ok((x, self.mlp(&b.mlp, &normed)?))
    }

    /// `x + pending` (or `x`) and its RMSNorm with `weight`.
    fn add_norm(
        &self,
        x: &Tensor,
        pending: Option<&Tensor>,
        weight: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (weight, eps) = (ops::cast(weight, self.dtype)?, self.config.rms_norm_eps);
        match pending {
            Some(delta) => ops::add_rms_norm(x, delta, &weight, eps),
            None => Ok((x.clone(), ops::rms_norm(x, &weight, eps)?)),
        }
    }

    fn mlp(&self, m: &Mlp, x: &Tensor) -> Result<Tensor> {
        // The stacked projection only pays off for a single row (a decode step): one kernel
        // there, where many rows would copy the halves out of the stacked output.
        let single_row = x.elem_count() == x.dim(D::Minus1)?;
        let hidden = match (
            m.stacked(),
            m.gate_proj.bare_master(),
            m.up_proj.bare_master(),
        ) {
            (Some(gate_up), ..) if single_row && !x.track_op() && gate_up.bias.is_none() => {
                ops::swiglu_projection(x, &ops::cast(&gate_up.weight, self.dtype)?)?
            }
            (_, Some(gate), Some(up)) => ops::swiglu_master_projection(x, gate, up)?,
            _ => {
                let gate = m.gate_proj.forward(x, self.dtype)?;
                ops::swiglu(&gate, &m.up_proj.forward(x, self.dtype)?)?
            }
        };
        m.down_proj.forward(&hidden, self.dtype)
    }

    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        start: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let t = x.dim(1)?;
        let heads = (a.heads, a.kv_heads, a.head_size);
        let tables = (&self.rope.cos, &self.rope.sin);
        let y = match cache {
            Some(c) if ops::write_kv_fused(x, tables.0, tables.1) => {
                // The projection is split, rotated and cached in one kernel.
                let qkv = match a.stacked() {
                    Some(qkv) => qkv.forward(x, self.dtype)?,
                    None => Tensor::cat(
                        &[&a.q_proj, &a.k_proj, &a.v_proj]
                            .map(|p| p.forward(x, self.dtype))
                            .into_iter()
                            .collect::<Result<Vec<_>>>()?,
                        D::Minus1,
                    )?,
                };
                c.attend_packed(&qkv, &self.rope, heads)?
            }
            None => {
                let (cos, sin) = self.rope.window(start, t)?;
                let q = a.q_proj.forward(x, self.dtype)?;
                let k = a.k_proj.forward(x, self.dtype)?;
                let v = a.v_proj.forward(x, self.dtype)?;
                let y = ops::self_attention([&q, &k, &v], (&cos, &sin), a.heads, a.kv_heads)?;
                return a.o_proj.forward(&y, self.dtype);
            }
            Some(c) => {
                let (cos, sin) = self.rope.window(start, t)?;
                let q = ops::split_heads(&a.q_proj.forward(x, self.dtype)?, a.heads)?;
                let k = ops::split_heads(&a.k_proj.forward(x, self.dtype)?, a.kv_heads)?;
                let v = ops::split_heads(&a.v_proj.forward(x, self.dtype)?, a.kv_heads)?;
                let q = ops::rope(&q, &cos, &sin)?;
                let k = ops::rope(&k, &cos, &sin)?;
                let (k, v) = c.append(&k, &v)?;
                ops::grouped_attention(&q, &k, &v)?
            }
        };
        a.o_proj.forward(&ops::merge_heads(&y)?, self.dtype)
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
        let weight = ops::cast(&self.norm, self.dtype)?;
        ops::rms_norm(x, &weight, self.config.rms_norm_eps)
    }

    /// Final norm and output head: hidden states to logits `[.., vocab]` in the compute dtype.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.head_logits(&self.final_norm(x)?)
    }

    /// The output head on normalized hidden states.
    fn head_logits(&self, x: &Tensor) -> Result<Tensor> {
        let head = self.head()?;
        if head.is_variable() || head.track_op() {
            ops::linear(x, &head)
        } else {
            ops::frozen_linear(x, &head)
        }
    }

    /// Final norm, output head and per-token NLL (f32 `[n]`, no gradient) of u32 `targets`
    /// `[n]` for hidden states `[.., hidden]` with `n` positions, without keeping the full
    /// logits when they are large ([`ops::head_nll`]).
    pub fn token_nll(&self, x: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let x = self.final_norm(x)?;
        let x = x.reshape(((), self.config.hidden_size))?;
        ops::head_nll(&x, &self.head()?, targets)
    }

    /// The training loss: the mean NLL of u32 `targets` `[n]` over the positions `weights`
    /// (`[n]` f32, 1 to score, 0 to skip) selects, for hidden states `[.., hidden]`, with the
    /// output head's gradients computed as it runs ([`ops::head_mean_nll`]). The head gets a
    /// gradient only when it is trainable.
    pub fn mean_nll(&self, x: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
        let x = self.final_norm(x)?;
        let x = x.reshape(((), self.config.hidden_size))?;
        ops::head_mean_nll(&x, self.head_master(), targets, weights)
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` whose first position is
    /// `cache.len()` (or 0 without a cache).
    pub fn forward(&self, ids: &Tensor, mut cache: Option<&mut Cache>) -> Result<Tensor> {
        let start = cache.as_ref().map_or(0, |c| c.len());
        let mut x = self.embed(ids)?;
        let mut pending = None;
        for i in 0..self.layers.len() {
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let (next, mlp) = self.block_lazy(i, &x, pending.as_ref(), start, layer_cache)?;
            (x, pending) = (next, Some(mlp));
        }
        let (_, normed) = self.add_norm(&x, pending.as_ref(), &self.norm)?;
        self.head_logits(&normed)
    }
}
