//! The one table of a model's parameter names: each block projection's module name, its short
//! name, where it sits in a block, its shape and bias, each family's norms and their Hugging
//! Face names, and the tensor paths around the blocks. Loading, saving, LoRA targets, PEFT keys
//! and config validation all read it.

use crate::config::LlamaConfig;
use crate::family::Family;

/// The embedding table.
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// The final RMSNorm's weight.
pub const FINAL_NORM: &str = "model.norm.weight";
/// The output head (absent when it is tied to the embedding).
pub const LM_HEAD: &str = "lm_head.weight";

/// A norm of a transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// Before attention (every family).
    PreAttention,
    /// On the attention output, before the residual add (Gemma).
    PostAttention,
    /// Before the feed-forward (every family).
    PreFeedForward,
    /// On the feed-forward output, before the residual add (Gemma).
    PostFeedForward,
    /// Over each query head (Qwen3, Gemma 3).
    Query,
    /// Over each key head (Qwen3, Gemma 3).
    Key,
}

impl Norm {
    /// The norms of a block of `family`, in the order of a block's parameters.
    pub fn of(family: &Family) -> Vec<Norm> {
        let mut norms = vec![Norm::PreAttention];
        if family.qk_norm {
            norms.extend([Norm::Query, Norm::Key]);
        }
        match family.sandwich_norms {
            true => norms.extend([
                Norm::PostAttention,
                Norm::PreFeedForward,
                Norm::PostFeedForward,
            ]),
            false => norms.push(Norm::PreFeedForward),
        }
        norms
    }

    /// The weight's name inside a block. The norm before the feed-forward is
    /// `post_attention_layernorm` in Llama-style blocks (it follows attention), and
    /// `pre_feedforward_layernorm` where the attention output has a norm of its own.
    pub fn name(self, family: &Family) -> &'static str {
        match (self, family.sandwich_norms) {
            (Norm::PreAttention, _) => "input_layernorm.weight",
            (Norm::PreFeedForward, false) | (Norm::PostAttention, _) => {
                "post_attention_layernorm.weight"
            }
            (Norm::PreFeedForward, true) => "pre_feedforward_layernorm.weight",
            (Norm::PostFeedForward, _) => "post_feedforward_layernorm.weight",
            (Norm::Query, _) => "self_attn.q_norm.weight",
            (Norm::Key, _) => "self_attn.k_norm.weight",
        }
    }

    /// Whether a checkpoint lists the norm before the attention projections.
    pub(crate) fn before_attention(self) -> bool {
        matches!(self, Norm::PreAttention | Norm::Query | Norm::Key)
    }

    /// The weight's size in a model of `cfg`.
    pub fn size(self, cfg: &LlamaConfig) -> usize {
        match self {
            Norm::Query | Norm::Key => cfg.head_size(),
            _ => cfg.hidden_size,
        }
    }
}

/// The module path of block `i`: `model.layers.{i}`.
pub fn layer(i: usize) -> String {
    format!("model.layers.{i}")
}

/// A projection of a transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Projection {
    /// `self_attn.q_proj`: hidden to query heads.
    Q,
    /// `self_attn.k_proj`: hidden to key heads.
    K,
    /// `self_attn.v_proj`: hidden to value heads.
    V,
    /// `self_attn.o_proj`: attention output back to hidden.
    O,
    /// `mlp.gate_proj`: hidden to the feed-forward width, through the activation.
    Gate,
    /// `mlp.up_proj`: hidden to the feed-forward width, multiplied by the gate.
    Up,
    /// `mlp.down_proj`: feed-forward width back to hidden.
    Down,
}

impl Projection {
    /// Every projection, in the order of a block's parameters in a checkpoint.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The module name Hugging Face and PEFT use: `q_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The short form `lora.target_modules` also accepts: `q`.
    pub fn short_name(self) -> &'static str {
        self.name().trim_end_matches("_proj")
    }

    /// The projection a long or short name means.
    pub fn from_name(name: &str) -> Option<Projection> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name || p.short_name() == name)
    }

    /// The module path inside a block: `self_attn.q_proj` or `mlp.up_proj`.
    pub fn module(self) -> String {
        let parent = match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            Projection::Gate | Projection::Up | Projection::Down => "mlp",
        };
        format!("{parent}.{}", self.name())
    }

    /// The module path in block `i`: `model.layers.{i}.self_attn.q_proj`.
    pub fn path(self, i: usize) -> String {
        format!("{}.{}", layer(i), self.module())
    }

    /// The weight's `(out, in)` in a model of `cfg`.
    pub fn shape(self, cfg: &LlamaConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_size();
        let kv = cfg.kv_heads() * cfg.head_size();
        let ffn = cfg.intermediate_size;
        match self {
            Projection::Q => (q, h),
            Projection::K | Projection::V => (kv, h),
            Projection::O => (h, q),
            Projection::Gate | Projection::Up => (ffn, h),
            Projection::Down => (h, ffn),
        }
    }

    /// Whether the projection has a bias in a model of `cfg` (q, k and v, where the config
    /// says so).
    pub fn has_bias(self, cfg: &LlamaConfig) -> bool {
        matches!(self, Projection::Q | Projection::K | Projection::V) && cfg.qkv_bias()
    }
}

/// A weight that holds several projections stacked by rows in a checkpoint (Phi-3); the model
/// computes with views of its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fused {
    /// `self_attn.qkv_proj`: q, k and v.
    Qkv,
    /// `mlp.gate_up_proj`: gate, then up.
    GateUp,
}

impl Fused {
    /// The projections stacked, first rows first.
    pub fn parts(self) -> &'static [Projection] {
        match self {
            Fused::Qkv => &[Projection::Q, Projection::K, Projection::V],
            Fused::GateUp => &[Projection::Gate, Projection::Up],
        }
    }

    /// The module path inside a block: `self_attn.qkv_proj`.
    pub fn module(self) -> &'static str {
        match self {
            Fused::Qkv => "self_attn.qkv_proj",
            Fused::GateUp => "mlp.gate_up_proj",
        }
    }

    /// The module path in block `i`.
    pub fn path(self, i: usize) -> String {
        format!("{}.{}", layer(i), self.module())
    }

    /// The weight's `(out, in)` in a model of `cfg`: the parts' outputs summed.
    pub fn shape(self, cfg: &LlamaConfig) -> (usize, usize) {
        let shapes = self.parts().iter().map(|p| p.shape(cfg));
        let inp = shapes.clone().map(|s| s.1).next().unwrap_or(0);
        (shapes.map(|s| s.0).sum(), inp)
    }
}

/// A module LoRA adapts: a projection, or a weight a checkpoint stores stacked (whose PEFT
/// adapter adapts it whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Module {
    /// One projection with its own weight.
    One(Projection),
    /// A stacked weight, adapted whole (Phi-3).
    Stacked(Fused),
}

impl Module {
    /// Every module name `lora.target_modules` knows, in any family.
    pub const KNOWN: [Module; 9] = [
        Module::One(Projection::Q),
        Module::One(Projection::K),
        Module::One(Projection::V),
        Module::Stacked(Fused::Qkv),
        Module::One(Projection::O),
        Module::One(Projection::Gate),
        Module::One(Projection::Up),
        Module::Stacked(Fused::GateUp),
        Module::One(Projection::Down),
    ];

    /// The adaptable modules of a block of `family`, in a block's order.
    pub fn of(family: &Family) -> Vec<Module> {
        let stacked = |m: &Module| matches!(m, Module::Stacked(_));
        let keep = |m: &Module| match family.fused_projections {
            true => stacked(m) || matches!(m, Module::One(Projection::O | Projection::Down)),
            false => !stacked(m),
        };
        Self::KNOWN.into_iter().filter(keep).collect()
    }

    /// The module name Hugging Face and PEFT use: `q_proj`, `qkv_proj`.
    pub fn name(self) -> &'static str {
        let module = match self {
            Module::One(p) => return p.name(),
            Module::Stacked(f) => f.module(),
        };
        module.rsplit('.').next().unwrap_or(module)
    }

    /// The module a long or short name (`qkv_proj` or `qkv`) means.
    pub fn from_name(name: &str) -> Option<Module> {
        let short = |m: &Module| m.name().trim_end_matches("_proj").to_string();
        Self::KNOWN
            .into_iter()
            .find(|m| m.name() == name || short(m) == name)
    }

    /// The module path inside a block: `self_attn.qkv_proj`.
    pub fn module(self) -> String {
        match self {
            Module::One(p) => p.module(),
            Module::Stacked(f) => f.module().to_string(),
        }
    }

    /// The module path in block `i`.
    pub fn path(self, i: usize) -> String {
        format!("{}.{}", layer(i), self.module())
    }

    /// The weight's `(out, in)` in a model of `cfg`.
    pub fn shape(self, cfg: &LlamaConfig) -> (usize, usize) {
        match self {
            Module::One(p) => p.shape(cfg),
            Module::Stacked(f) => f.shape(cfg),
        }
    }
}

/// Passes every `(name, shape)` of `all` to `add`.
fn add_all<const N: usize>(
    add: &mut impl FnMut(String, Vec<usize>),
    all: [(String, Vec<usize>); N],
) {
    for (name, shape) in all {
        add(name, shape);
    }
}

/// The HF tensor names of every parameter of a model with this config, with their shapes, in
/// the order transformers lists them.
pub fn parameter_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let family = Family::of(cfg);
    let norms = Norm::of(&family);
    let mut shapes = vec![(EMBED_TOKENS.to_string(), vec![cfg.vocab_size, h])];
    for i in 0..cfg.num_hidden_layers {
        let p = layer(i);
        let mut add = |name: String, shape: Vec<usize>| shapes.push((format!("{p}.{name}"), shape));
        let norm = |n: Norm| (n.name(&family).to_string(), vec![n.size(cfg)]);
        let (attention_norms, mlp_norms): (Vec<Norm>, Vec<Norm>) =
            norms.iter().partition(|n| n.before_attention());
        for (name, shape) in attention_norms.into_iter().map(norm) {
            add(name, shape);
        }
        // The order random initialisation draws in: changing it changes fresh weights.
        let weight = |p: Projection| {
            let (out, inp) = p.shape(cfg);
            (format!("{}.weight", p.module()), vec![out, inp])
        };
        let bias = |p: Projection| (format!("{}.bias", p.module()), vec![p.shape(cfg).0]);
        let fused = |f: Fused| {
            let (out, inp) = f.shape(cfg);
            (format!("{}.weight", f.module()), vec![out, inp])
        };
        let attention = [Projection::Q, Projection::K, Projection::V];
        match family.fused_projections {
            true => add_all(&mut add, [fused(Fused::Qkv)]),
            false => add_all(&mut add, attention.map(weight)),
        }
        if cfg.qkv_bias() {
            for (name, shape) in attention.map(bias) {
                add(name, shape);
            }
        }
        let (name, shape) = weight(Projection::O);
        add(name, shape);
        for (name, shape) in mlp_norms.into_iter().map(norm) {
            add(name, shape);
        }
        match family.fused_projections {
            true => add_all(&mut add, [fused(Fused::GateUp)]),
            false => add_all(&mut add, [Projection::Gate, Projection::Up].map(weight)),
        }
        let (name, shape) = weight(Projection::Down);
        add(name, shape);
    }
    shapes.push((FINAL_NORM.into(), vec![h]));
    if !cfg.tie_word_embeddings {
        shapes.push((LM_HEAD.into(), vec![cfg.vocab_size, h]));
    }
    shapes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_paths_are_hf_paths() {
        for p in Projection::ALL {
            assert_eq!(Projection::from_name(p.name()), Some(p));
            assert_eq!(Projection::from_name(p.short_name()), Some(p));
        }
        assert_eq!(Projection::from_name("qkv_proj"), None);
        assert_eq!(Projection::Q.path(3), "model.layers.3.self_attn.q_proj");
        assert_eq!(Projection::Down.path(0), "model.layers.0.mlp.down_proj");
        assert_eq!(Projection::Gate.short_name(), "gate");
    }
}
