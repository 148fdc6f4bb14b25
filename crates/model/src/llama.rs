//! The Llama-family decoder: token embedding, RMSNorm, RoPE, grouped-query causal attention,
//! SwiGLU MLP, tied or untied output head. It knows nothing about training: the trainer drives
//! [`Llama::embed`], [`Llama::block`] and [`Llama::logits`] itself when it checkpoints.

pub use super::cache::Cache;
use super::cache::LayerCache;
use super::config::LlamaConfig;
use super::rope::RopeTables;
use super::weights::{ModelError, Weights};
pub use crate::linear::Linear;
use crate::names::{self, Projection};
use candle_core::{DType, Device, Result, Tensor, D};

impl Attention {
    /// The stacked q/k/v projection, where one exists and no part has an adapter since.
    fn stacked(&self) -> Option<&Linear> {
        let adapted = [&self.q_proj, &self.k_proj, &self.v_proj]
            .iter()
            .any(|l| l.adapter.is_some());
        self.qkv.as_ref().filter(|_| !adapted)
    }
}

impl Mlp {
    /// The stacked gate/up projection, where one exists and no part has an adapter since.
    fn stacked(&self) -> Option<&Linear> {
        let adapted = self.gate_proj.adapter.is_some() || self.up_proj.adapter.is_some();
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
        let (heads, kv_heads, head_size) =
            (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_size());
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = names::layer(i);
            let linear = |proj: Projection| {
                let (out, inp) = proj.shape(cfg);
                Linear::load(w, &proj.path(i), out, inp, proj.has_bias(cfg))
            };
            layers.push(Block {
                input_layernorm: w.get(&format!("{p}.{}", names::INPUT_NORM), &[h])?,
                self_attn: Attention {
                    q_proj: linear(Projection::Q)?,
                    k_proj: linear(Projection::K)?,
                    v_proj: linear(Projection::V)?,
                    o_proj: linear(Projection::O)?,
                    qkv: None,
                    heads,
                    kv_heads,
                    head_size,
                },
                post_attention_layernorm: w
                    .get(&format!("{p}.{}", names::POST_ATTENTION_NORM), &[h])?,
                mlp: Mlp {
                    gate_proj: linear(Projection::Gate)?,
                    up_proj: linear(Projection::Up)?,
                    down_proj: linear(Projection::Down)?,
                    gate_up: None,
                },
            });
        }
        let embed_tokens = w.get(names::EMBED_TOKENS, &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(w.get(names::LM_HEAD, &[cfg.vocab_size, h])?)
        };
        Ok(Self {
            config: cfg.clone(),
            rope: RopeTables::new(cfg, dtype, embed_tokens.device())?,
            embed_tokens,
            layers,
            norm: w.get(names::FINAL_NORM, &[h])?,
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

    /// Turns the attached adapters' dropout on with masks drawn from `seed` (pass a new seed
    /// each step; the same seed replays the same masks, as checkpointed recomputation needs),
    /// or off with `None` (evaluation, generation).
    pub fn set_adapter_dropout_seed(&self, seed: Option<u64>) {
        for block in &self.layers {
            for p in Projection::ALL {
                if let Some(adapter) = &block.projection(p).adapter {
                    adapter.set_dropout_seed(seed);
                }
            }
        }
    }

    /// The projection at a module path such as `model.layers.3.mlp.up_proj`, where an adapter
    /// attaches.
    pub fn linear_mut(&mut self, path: &str) -> Option<&mut Linear> {
        let (index, module) = path.strip_prefix("model.layers.")?.split_once('.')?;
        let block = self.layers.get_mut(index.parse::<usize>().ok()?)?;
        let projection = Projection::ALL.into_iter().find(|p| p.module() == module)?;
        Some(block.projection_mut(projection))
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
        let mut out = vec![(names::EMBED_TOKENS.to_string(), self.embed_tokens.clone())];
        for (i, b) in self.layers.iter().enumerate() {
            let p = names::layer(i);
            let norm = |name: &str, t: &Tensor| (format!("{p}.{name}"), t.clone());
            out.push(norm(names::INPUT_NORM, &b.input_layernorm));
            for proj in [Projection::Q, Projection::K, Projection::V, Projection::O] {
                let l = b.projection(proj);
                out.push((format!("{}.weight", proj.path(i)), l.weight.clone()));
                if let Some(bias) = &l.bias {
                    out.push((format!("{}.bias", proj.path(i)), bias.clone()));
                }
            }
            out.push(norm(
                names::POST_ATTENTION_NORM,
                &b.post_attention_layernorm,
            ));
            for proj in [Projection::Gate, Projection::Up, Projection::Down] {
                let weight = b.projection(proj).weight.clone();
                out.push((format!("{}.weight", proj.path(i)), weight));
            }
        }
        out.push((names::FINAL_NORM.into(), self.norm.clone()));
        if let Some(head) = &self.lm_head {
            out.push((names::LM_HEAD.into(), head.clone()));
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
        let (cos, sin) = self.rope.window(start, t)?;
        let y = match cache {
            Some(c) if ops::write_kv_fused(x, &cos, &sin) => {
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
                let q = a.q_proj.forward(x, self.dtype)?;
                let k = a.k_proj.forward(x, self.dtype)?;
                let v = a.v_proj.forward(x, self.dtype)?;
                let y = ops::self_attention([&q, &k, &v], (&cos, &sin), a.heads, a.kv_heads)?;
                return a.o_proj.forward(&y, self.dtype);
            }
            Some(c) => {
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
