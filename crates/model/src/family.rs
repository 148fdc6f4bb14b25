//! Model families as options of one decoder block. [`Family::of`] reads what differs between
//! Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 from `config.json`: the kind
//! of RMSNorm, per-head q/k norms, the MLP's activation, the embedding scale, the norms around
//! attention and the feed-forward, the attention scale, logit soft-capping, fused q/k/v and
//! gate/up weights, partial rotary, and per layer the sliding window and the RoPE base. The decoder ([`crate::Llama`]) and the naming table
//! ([`crate::names`]) read nothing else about the family.

use crate::config::LlamaConfig;
use serde::{Deserialize, Deserializer, Serialize};

/// The `config.json` keys of the newer families, beside [`LlamaConfig`]'s own (flattened into
/// it, so they are read and written at the top level and absent keys stay absent).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FamilyOptions {
    /// Gemma's MLP activation (`gelu_pytorch_tanh`); Gemma ignores `hidden_act`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Gemma: attention scores are scaled by `query_pre_attn_scalar^-0.5` (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<usize>,
    /// `cap · tanh(score / cap)` on attention scores. Absent is Gemma 2's 50, `null` is off.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub attn_logit_softcapping: Option<Option<f64>>,
    /// `cap · tanh(logit / cap)` on the output logits. Absent is Gemma 2's 30, `null` is off.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub final_logit_softcapping: Option<Option<f64>>,
    /// How many positions (the query's own included) a sliding-window layer attends to.
    /// Absent is Gemma's 4096, `null` is no window.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub sliding_window: Option<Option<usize>>,
    /// Qwen2/Qwen3: whether the layers from `max_window_layers` on slide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen2/Qwen3: the first layer that slides, with `use_sliding_window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Per layer `full_attention` or `sliding_attention` (transformers 5 writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3's older spelling: every `sliding_window_pattern`-th layer is global (default 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3's older spelling of the sliding layers' RoPE base (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Kept so that a saved config reloads in transformers as it was: an absent key there is
    /// the family's default (Phi-3's 32000, past a small vocabulary, fails to load).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub pad_token_id: Option<Option<u32>>,
    /// Phi-3's older spelling of the rotated share of each head (transformers 5 writes it
    /// into `rope_parameters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Phi-3's context before LongRoPE scaling (transformers gives it priority over the one in
    /// `rope_parameters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

/// A key that is present (even as `null`) deserializes to `Some`; an absent one, through
/// `#[serde(default)]`, stays `None`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The architectures llmtool implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Llama (`LlamaForCausalLM`; SmolLM and unknown types read as one).
    Llama,
    /// Mistral (`MistralForCausalLM`).
    Mistral,
    /// Qwen2 (`Qwen2ForCausalLM`).
    Qwen2,
    /// Qwen3 (`Qwen3ForCausalLM`).
    Qwen3,
    /// Gemma 2 (`Gemma2ForCausalLM`).
    Gemma2,
    /// Gemma 3, text only (`Gemma3ForCausalLM`).
    Gemma3,
    /// Phi-3 (`Phi3ForCausalLM`).
    Phi3,
}

impl Kind {
    /// Every kind with its HF `architectures` entry and `model_type`.
    pub const ALL: [(Kind, &'static str, &'static str); 7] = [
        (Kind::Llama, "LlamaForCausalLM", "llama"),
        (Kind::Mistral, "MistralForCausalLM", "mistral"),
        (Kind::Qwen2, "Qwen2ForCausalLM", "qwen2"),
        (Kind::Qwen3, "Qwen3ForCausalLM", "qwen3"),
        (Kind::Gemma2, "Gemma2ForCausalLM", "gemma2"),
        (Kind::Gemma3, "Gemma3ForCausalLM", "gemma3_text"),
        (Kind::Phi3, "Phi3ForCausalLM", "phi3"),
    ];

    /// The kind of a config: its first architecture, else its `model_type` (unknown types
    /// are read as Llama, as llmtool always has).
    pub fn of(cfg: &LlamaConfig) -> Kind {
        let by = |f: &dyn Fn(&(Kind, &str, &str)) -> bool| Self::ALL.iter().find(|e| f(e));
        let found = match cfg.architectures.first() {
            Some(arch) => by(&|e| e.1 == arch),
            None => by(&|e| e.2 == cfg.model_type),
        };
        found.map_or(Kind::Llama, |e| e.0)
    }

    fn is_gemma(self) -> bool {
        matches!(self, Kind::Gemma2 | Kind::Gemma3)
    }
}

/// How a norm applies its weight `w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `x / rms(x) · w` (Llama, Qwen).
    Plain,
    /// `x / rms(x) · (1 + w)` (Gemma; a fresh weight is 0).
    OnePlus,
}

/// The feed-forward's gated activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) · up`.
    SwiGlu,
    /// `gelu_tanh(gate) · up` (GeGLU with PyTorch's tanh approximation).
    GeGluTanh,
}

impl Activation {
    /// The fused op's unit.
    pub fn glu(self) -> ops::Glu {
        match self {
            Activation::SwiGlu => ops::Glu::SwiGlu,
            Activation::GeGluTanh => ops::Glu::GeGlu,
        }
    }
}

/// What one layer's attention does differently from another's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerAttention {
    /// Positions a query attends to, its own included; `None` for global attention.
    pub window: Option<usize>,
    /// Whether the layer uses the local (sliding) RoPE tables.
    pub local_rope: bool,
}

/// Everything about a model's family the decoder needs, derived from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// The architecture.
    pub kind: Kind,
    /// How every RMSNorm applies its weight.
    pub norm: NormKind,
    /// RMSNorm (of [`Family::norm`]'s kind) over each head's queries and keys before RoPE.
    pub qk_norm: bool,
    /// The feed-forward's gated activation.
    pub activation: Activation,
    /// Embeddings are multiplied by this (Gemma: sqrt(hidden)).
    pub embed_scale: Option<f64>,
    /// Norms on the attention and feed-forward outputs before each residual add (Gemma).
    pub sandwich_norms: bool,
    /// The factor on attention scores.
    pub attention_scale: f64,
    /// Soft cap on attention scores (`cap · tanh(score / cap)`); `None` for none.
    pub attn_softcap: Option<f64>,
    /// Soft cap on the output logits (`cap · tanh(logit / cap)`); `None` for none.
    pub final_softcap: Option<f64>,
    /// q/k/v and gate/up are one weight each in a checkpoint (Phi-3's `qkv_proj`,
    /// `gate_up_proj`).
    pub fused_projections: bool,
    /// How many leading dimensions of each head RoPE rotates (Phi-3's
    /// `partial_rotary_factor`); the rest pass through.
    pub rotary_dim: usize,
    /// One entry per layer.
    pub layers: Vec<LayerAttention>,
}

impl Family {
    /// The family of a config that [`check`] accepted.
    pub fn of(cfg: &LlamaConfig) -> Family {
        let kind = Kind::of(cfg);
        let o = &cfg.family_options;
        let gemma = kind.is_gemma();
        let cap = |v: Option<Option<f64>>, gemma2: f64| match (v, kind) {
            (Some(v), _) => v,
            (None, Kind::Gemma2) => Some(gemma2),
            (None, _) => None,
        };
        let scalar = match gemma {
            true => o.query_pre_attn_scalar.unwrap_or(256),
            false => cfg.head_size(),
        };
        let window = sliding_window(kind, o);
        let layers = layer_types(cfg, kind)
            .into_iter()
            .map(|sliding| LayerAttention {
                window: window.filter(|_| sliding),
                local_rope: sliding && kind == Kind::Gemma3,
            })
            .collect();
        Family {
            kind,
            norm: if gemma {
                NormKind::OnePlus
            } else {
                NormKind::Plain
            },
            qk_norm: matches!(kind, Kind::Qwen3 | Kind::Gemma3),
            activation: if gemma {
                Activation::GeGluTanh
            } else {
                Activation::SwiGlu
            },
            embed_scale: gemma.then(|| (cfg.hidden_size as f64).sqrt()),
            sandwich_norms: gemma,
            attention_scale: 1.0 / (scalar as f64).sqrt(),
            attn_softcap: cap(o.attn_logit_softcapping, 50.0),
            final_softcap: cap(o.final_logit_softcapping, 30.0),
            fused_projections: kind == Kind::Phi3,
            rotary_dim: cfg.rotary_dim(),
            layers,
        }
    }
}

/// The window of sliding layers, where the family has them (transformers' default for an
/// absent key is 4096 in every family that has the option but Phi-3).
fn sliding_window(kind: Kind, o: &FamilyOptions) -> Option<usize> {
    let default = (kind != Kind::Phi3).then_some(4096);
    let window = o.sliding_window.unwrap_or(default);
    match kind {
        Kind::Qwen2 | Kind::Qwen3 => window.filter(|_| o.use_sliding_window == Some(true)),
        Kind::Llama => None,
        _ => window,
    }
}

/// Per layer whether it slides: `layer_types` where the config has it (Mistral and Phi-3
/// ignore it: their window applies to every layer), else the family's default pattern (as transformers
/// fills it in).
fn layer_types(cfg: &LlamaConfig, kind: Kind) -> Vec<bool> {
    let o = &cfg.family_options;
    let every_layer = matches!(kind, Kind::Mistral | Kind::Phi3);
    if let Some(types) = o.layer_types.as_ref().filter(|_| !every_layer) {
        return types.iter().map(|t| t == "sliding_attention").collect();
    }
    let pattern = o.sliding_window_pattern.unwrap_or(6).max(1);
    let window_from = o.max_window_layers.unwrap_or(usize::MAX);
    (0..cfg.num_hidden_layers)
        .map(|i| match kind {
            Kind::Gemma2 => i % 2 == 0,
            Kind::Gemma3 => (i + 1) % pattern != 0,
            Kind::Qwen2 | Kind::Qwen3 => i >= window_from,
            Kind::Mistral | Kind::Phi3 => true,
            Kind::Llama => false,
        })
        .collect()
}

/// Checks the family options of `cfg` (architecture, activation, layer types, windows,
/// caps); returns a message that starts with the offending key.
pub fn check(cfg: &LlamaConfig) -> Result<(), String> {
    if let Some(arch) = cfg.architectures.first() {
        if !Kind::ALL.iter().any(|e| e.1 == arch) {
            let supported: Vec<&str> = Kind::ALL.iter().map(|e| e.1).collect();
            return Err(format!(
                "architectures: {arch} is not supported (supported: {})",
                supported.join(", ")
            ));
        }
    }
    let kind = Kind::of(cfg);
    let o = &cfg.family_options;
    match kind.is_gemma() {
        true => {
            let act = o
                .hidden_activation
                .as_deref()
                .unwrap_or("gelu_pytorch_tanh");
            if act != "gelu_pytorch_tanh" {
                return Err(format!(
                    "hidden_activation: {act} is not supported (only gelu_pytorch_tanh)"
                ));
            }
        }
        false if cfg.hidden_act != "silu" => {
            return Err(format!(
                "hidden_act: {} is not supported (only silu)",
                cfg.hidden_act
            ))
        }
        false => {}
    }
    if let Some(types) = &o.layer_types {
        if types.len() != cfg.num_hidden_layers {
            return Err(format!(
                "layer_types: has {} entries, num_hidden_layers is {}",
                types.len(),
                cfg.num_hidden_layers
            ));
        }
        if let Some(t) = types
            .iter()
            .find(|t| *t != "full_attention" && *t != "sliding_attention")
        {
            return Err(format!(
                "layer_types: {t} is not supported (only full_attention and sliding_attention)"
            ));
        }
    }
    if sliding_window(kind, o) == Some(0) {
        return Err("sliding_window: must be at least 1, got 0".into());
    }
    let positive = |key: &str, v: Option<f64>| match v {
        Some(v) if !(v.is_finite() && v > 0.0) => {
            Err(format!("{key}: must be a positive finite number, got {v}"))
        }
        _ => Ok(()),
    };
    if o.query_pre_attn_scalar == Some(0) {
        return Err("query_pre_attn_scalar: must be at least 1, got 0".into());
    }
    positive("attn_logit_softcapping", o.attn_logit_softcapping.flatten())?;
    positive(
        "final_logit_softcapping",
        o.final_logit_softcapping.flatten(),
    )?;
    positive("rope_local_base_freq", o.rope_local_base_freq)?;
    Ok(())
}

/// Keys of `config.json` (the raw JSON object) whose values ask for something llmtool does not
/// implement: the first one, as a message that starts with the key.
pub fn check_unsupported(json: &serde_json::Value) -> Result<(), String> {
    let is_on = |key: &str| {
        json.get(key)
            .is_some_and(|v| !(v.is_null() || v == &serde_json::json!(false)))
    };
    let keys: [(&str, &str); 5] = [
        ("use_bidirectional_attention", "bidirectional attention"),
        ("vision_config", "a vision tower (load the text model only)"),
        ("num_experts", "mixture-of-experts layers"),
        ("num_local_experts", "mixture-of-experts layers"),
        ("attn_logit_softcapping_per_layer", "per-layer soft-capping"),
    ];
    if let Some((key, what)) = keys.iter().find(|(key, _)| is_on(key)) {
        return Err(format!("{key}: {what} is not supported"));
    }
    let model_type = json.get("model_type").and_then(|v| v.as_str());
    let gemma = matches!(model_type, Some("gemma2" | "gemma3_text"));
    if gemma && is_on("attention_bias") {
        return Err("attention_bias: biases in Gemma attention are not supported".into());
    }
    if model_type == Some("qwen3") && is_on("attention_bias") {
        return Err("attention_bias: biases in Qwen3 attention are not supported".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SUPPORTED_ARCHITECTURES;

    fn family(extra: serde_json::Value) -> Family {
        let mut cfg = serde_json::json!({
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
            "num_attention_heads": 4, "vocab_size": 320,
        });
        cfg.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let cfg: LlamaConfig = serde_json::from_value(cfg).unwrap();
        cfg.check().unwrap();
        Family::of(&cfg)
    }

    fn windows(f: &Family) -> Vec<Option<usize>> {
        f.layers.iter().map(|l| l.window).collect()
    }

    #[test]
    fn supported_architectures_are_the_kinds() {
        let kinds: Vec<&str> = Kind::ALL.iter().map(|e| e.1).collect();
        assert_eq!(kinds, SUPPORTED_ARCHITECTURES);
    }

    #[test]
    fn default_layer_patterns_are_transformers_defaults() {
        let llama = family(serde_json::json!({"sliding_window": 8}));
        assert_eq!(windows(&llama), [None; 6]);
        assert_eq!((llama.attention_scale, llama.attn_softcap), (0.25, None));
        let gemma2 = family(serde_json::json!({"model_type": "gemma2", "sliding_window": 8}));
        let w = Some(8);
        assert_eq!(windows(&gemma2), [w, None, w, None, w, None]);
        assert_eq!(
            (gemma2.attn_softcap, gemma2.final_softcap),
            (Some(50.0), Some(30.0))
        );
        assert_eq!(gemma2.attention_scale, 1.0 / 16.0);
        let gemma3 = family(serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"], "final_logit_softcapping": null,
        }));
        let w = Some(4096);
        assert_eq!(windows(&gemma3), [w, w, w, w, w, None]);
        assert!(gemma3.layers[0].local_rope && !gemma3.layers[5].local_rope);
        assert_eq!((gemma3.attn_softcap, gemma3.final_softcap), (None, None));
        let qwen3 = family(serde_json::json!({
            "model_type": "qwen3", "sliding_window": 8, "max_window_layers": 4,
        }));
        assert!(qwen3.qk_norm && windows(&qwen3) == [None; 6]);
        let qwen3 = family(serde_json::json!({
            "model_type": "qwen3", "sliding_window": 8, "max_window_layers": 4,
            "use_sliding_window": true,
        }));
        let w = Some(8);
        assert_eq!(windows(&qwen3), [None, None, None, None, w, w]);
        let full = vec!["full_attention"; 6];
        let mistral = family(serde_json::json!({"model_type": "mistral", "layer_types": full}));
        assert_eq!(windows(&mistral), [Some(4096); 6]);
        let phi3 = family(serde_json::json!({
            "model_type": "phi3", "partial_rotary_factor": 0.75,
        }));
        assert_eq!(windows(&phi3), [None; 6]);
        assert!(phi3.fused_projections && phi3.rotary_dim == 12);
    }
}
