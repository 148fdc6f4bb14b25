//! The Hugging Face `config.json` of a model of a supported family (Llama, Mistral, Qwen2,
//! Qwen3, Gemma 2, Gemma 3 text, Phi-3; SmolLM is a Llama). What differs between the families is
//! read from it by [`crate::family::Family::of`].

use crate::family::{self, FamilyOptions};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Architectures whose weights and forward pass this crate implements.
pub const SUPPORTED_ARCHITECTURES: [&str; 7] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
];

/// transformers 5's `rope_parameters`: one set for every layer, or (Gemma 3) one per layer
/// type (`full_attention`, `sliding_attention`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RopeParameters {
    /// One set per layer type, keyed `full_attention` and `sliding_attention` (Gemma 3).
    PerLayerType(BTreeMap<String, RopeScaling>),
    /// One set for every layer.
    Shared(RopeScaling),
}

/// RoPE settings: the legacy `rope_scaling` object, or transformers 5's `rope_parameters`
/// (which also carries `rope_theta`). The `default`, `linear` and `llama3` types are
/// implemented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// The scaling scheme (`default`, `linear`, `llama3`, `longrope`); `type` in older configs.
    #[serde(alias = "type", default = "default_rope_type")]
    pub rope_type: String,
    /// RoPE base frequency; transformers 5 keeps it here rather than at the top level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// The context extension (linear, llama3; LongRoPE's default is the ratio of the context
    /// to the original one). Read through [`RopeScaling::factor`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// llama3: wavelengths above `original / low_freq_factor` are scaled by the full `factor`
    /// (default 1).
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    /// llama3: wavelengths below `original / high_freq_factor` are left unscaled (default 4).
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    /// The context before scaling. Read through [`RopeScaling::original_context`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// LongRoPE: the divisor of each frequency for sequences up to the original context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_factor: Option<Vec<f64>>,
    /// LongRoPE: the divisor of each frequency for sequences past the original context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_factor: Option<Vec<f64>>,
    /// LongRoPE: the factor on cos and sin (default `sqrt(1 + ln factor / ln original)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// The rotated share of each head (Phi-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
}

fn default_rope_type() -> String {
    "default".into()
}

impl RopeScaling {
    /// The context extension factor (1 when not given).
    pub fn factor(&self) -> f64 {
        self.factor.unwrap_or(1.0)
    }

    /// The context before scaling (Llama 3's default 8192 when not given).
    pub fn original_context(&self) -> usize {
        self.original_max_position_embeddings.unwrap_or(8192)
    }
}
fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}

/// The smallest `vocab_size` accepted: fewer tokens cannot be a real tokenizer's.
pub const MIN_VOCAB_SIZE: usize = 16;

/// The most positions a model may have: positions are 32-bit on the device.
pub const MAX_POSITIONS: usize = u32::MAX as usize;

/// The largest size, head count or vocabulary a `config.json` may give: far above any real
/// model's, low enough that the products of two never overflow.
pub const MAX_DIMENSION: usize = 1 << 24;

/// The most layers a model may have: far above any real model's, low enough that listing the
/// tensors' names and shapes cannot exhaust memory.
pub const MAX_LAYERS: usize = 1 << 16;

/// The most parameters a model may have (about 1.1 trillion, 4 TB in f32): counts above it
/// overflow no arithmetic, but no model that large can be held.
pub const MAX_PARAMETERS: u128 = 1 << 40;

/// A token id field that may be a single id or a list (HF allows both for `eos_token_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// A list of ids (models with several end-of-sequence tokens).
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }

    /// The first id (the one a single-id field would hold); `None` for an empty list.
    pub fn first(&self) -> Option<u32> {
        match self {
            Self::One(id) => Some(*id),
            Self::Many(ids) => ids.first().copied(),
        }
    }
}

/// The fields of `config.json` llmtool reads and writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// The model class, e.g. `LlamaForCausalLM`; the first entry picks the family.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// transformers' model type (`llama`, `qwen2`, `gemma3_text`, ...); default `llama`.
    #[serde(default = "llama")]
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads per attention layer.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads); `None` means as
    /// many as the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Size of one attention head; `None` means `hidden_size / num_attention_heads` (256 for
    /// Gemma).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Rows of the token embedding and of the output head.
    pub vocab_size: usize,
    /// Longest sequence in tokens the model supports (default 2048).
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Legacy top-level RoPE base frequency (default 10000); `rope_parameters.rope_theta` wins over
    /// it.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// The legacy RoPE frequency scaling, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers 5's RoPE settings, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Epsilon added to the mean square in RMSNorm (default 1e-6).
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Whether the output head shares the token embedding's weights (default `false`).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Llama `attention_bias`; always on for Qwen2).
    #[serde(default)]
    pub attention_bias: bool,
    /// The beginning-of-sequence token, if the model has one.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// The end-of-sequence token or tokens, if any.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// The MLP activation; only `silu` (the default) is supported outside Gemma.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Standard deviation of the normal initialisation of a new model's weights (default 0.02).
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    /// The dtype of the stored weights, as transformers 4.x names the key
    /// (`float32`, `bfloat16`, `float16`).
    #[serde(default)]
    pub torch_dtype: Option<String>,
    /// The same, as transformers 5 names the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// How the checkpoint's weights were quantized, if they were: read to refuse formats
    /// llmtool cannot load, never written back (what llmtool saves is dense).
    #[serde(default, skip_serializing)]
    pub quantization_config: Option<serde_json::Value>,
    /// The keys of the newer families (Qwen3, Gemma): norms, caps, windows.
    #[serde(flatten)]
    pub family_options: FamilyOptions,
}

/// Checks `quantization_config`: bitsandbytes' 4-bit NF4 loads (as NF4), anything else is
/// refused by name.
fn check_quantization(q: &serde_json::Value) -> Result<(), String> {
    let text = |key: &str| q.get(key).and_then(|v| v.as_str());
    match text("quant_method").unwrap_or("unnamed") {
        "bitsandbytes"
            if q.get("load_in_4bit").and_then(|v| v.as_bool()) == Some(true)
                && text("bnb_4bit_quant_type") == Some("nf4") =>
        {
            Ok(())
        }
        "bitsandbytes" => Err(
            "quantization_config: bitsandbytes 8-bit or fp4 weights cannot \
                               be loaded (4-bit nf4 only); use the unquantized model"
                .into(),
        ),
        other => Err(format!(
            "quantization_config.quant_method: {other} checkpoints cannot be loaded \
             (bitsandbytes nf4 only); use the unquantized model"
        )),
    }
}

fn llama() -> String {
    "llama".into()
}
fn default_max_positions() -> usize {
    2048
}
fn default_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}
fn default_init() -> f64 {
    0.02
}

impl LlamaConfig {
    /// Whether a frozen input embedding waits in host memory while the model trains on a CUDA
    /// device (`on_cuda`): where it is untied from the output head (a tied table is the head's
    /// weight too, read whole every step). Each step gathers its rows on the host
    /// ([`crate::Llama::keep_input_embedding_on_host`]); `estimate` plans it outside the device.
    pub fn frozen_embedding_on_host(&self, on_cuda: bool) -> bool {
        on_cuda && !self.tie_word_embeddings
    }

    /// The dtype the weights are stored in, from `dtype` or `torch_dtype`; `None` when
    /// neither names one llmtool stores (`float32`, `bfloat16`, `float16`).
    pub fn stored_dtype(&self) -> Option<candle_core::DType> {
        let name = self.dtype.as_ref().or(self.torch_dtype.as_ref())?;
        match name.as_str() {
            "float32" => Some(candle_core::DType::F32),
            "bfloat16" => Some(candle_core::DType::BF16),
            "float16" => Some(candle_core::DType::F16),
            _ => None,
        }
    }

    /// Records `dtype` as the dtype the weights are stored in, under the key both
    /// transformers 4.x and 5 read.
    pub fn set_stored_dtype(&mut self, dtype: candle_core::DType) {
        let name = match dtype {
            candle_core::DType::BF16 => "bfloat16",
            candle_core::DType::F16 => "float16",
            _ => "float32",
        };
        self.torch_dtype = Some(name.into());
        self.dtype = None;
    }

    /// Key/value heads (defaults to the attention heads).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one attention head (Gemma's default is 256).
    pub fn head_size(&self) -> usize {
        let gemma = matches!(self.model_type.as_str(), "gemma2" | "gemma3_text");
        match (self.head_dim, gemma) {
            (Some(d), _) => d,
            (None, true) => 256,
            (None, false) => self.hidden_size / self.num_attention_heads,
        }
    }

    /// The rotated share of each head: `rope_parameters.partial_rotary_factor`, else the
    /// legacy top-level key, else 1.
    pub fn partial_rotary_factor(&self) -> f64 {
        self.rope_parameters_for(false)
            .and_then(|p| p.partial_rotary_factor)
            .or(self.family_options.partial_rotary_factor)
            .unwrap_or(1.0)
    }

    /// How many leading dimensions of each head RoPE rotates (`int(head_size · factor)`, as
    /// transformers truncates).
    pub fn rotary_dim(&self) -> usize {
        (self.head_size() as f64 * self.partial_rotary_factor()) as usize
    }

    /// The dimensions the model's fused ops run at, for the op checks.
    pub fn op_shape(&self) -> ops::check::ModelShape {
        ops::check::ModelShape {
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            kv_heads: self.kv_heads(),
            head_size: self.head_size(),
            ffn: self.intermediate_size,
            vocab: self.vocab_size,
        }
    }

    /// The `rope_parameters` of layers of `local` (sliding) or global attention.
    fn rope_parameters_for(&self, local: bool) -> Option<&RopeScaling> {
        match self.rope_parameters.as_ref()? {
            RopeParameters::Shared(p) => Some(p),
            RopeParameters::PerLayerType(map) => map.get(if local {
                "sliding_attention"
            } else {
                "full_attention"
            }),
        }
    }

    /// RoPE base frequency of global layers (`rope_parameters.rope_theta` wins over the
    /// legacy key).
    pub fn theta(&self) -> f64 {
        self.rope_theta_for(false)
    }

    /// RoPE base frequency of `local` (sliding, Gemma 3) or global layers. Local layers
    /// without their own parameters use `rope_local_base_freq` (default 10000).
    pub fn rope_theta_for(&self, local: bool) -> f64 {
        let given = self.rope_parameters_for(local).and_then(|p| p.rope_theta);
        match (given, local) {
            (Some(theta), _) => theta,
            (None, false) => self.rope_theta,
            (None, true) => self.family_options.rope_local_base_freq.unwrap_or(10000.0),
        }
    }

    /// The frequency scaling (llama3, linear or longrope) of `local` or global layers, if any. Legacy
    /// `rope_scaling` applies to global layers only (as transformers reads Gemma 3's).
    pub fn rope_scaling_for(&self, local: bool) -> Option<&RopeScaling> {
        let legacy = self.rope_scaling.as_ref().filter(|_| !local);
        [legacy, self.rope_parameters_for(local)]
            .into_iter()
            .flatten()
            .find(|s| ["llama3", "linear", "longrope"].contains(&s.rope_type.as_str()))
    }

    /// Whether q/k/v projections carry biases.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    /// Checks the architecture, shapes and numeric settings; returns a message that starts
    /// with the offending key. Run before anything divides by a head count or allocates.
    pub fn check(&self) -> Result<(), String> {
        family::check(self)?;
        if let Some(q) = &self.quantization_config {
            check_quantization(q)?;
        }
        let at_least = |key: &str, value: usize, min: usize| match value < min {
            true => Err(format!("{key}: must be at least {min}, got {value}")),
            false => Ok(()),
        };
        at_least("hidden_size", self.hidden_size, 1)?;
        at_least("intermediate_size", self.intermediate_size, 1)?;
        at_least("num_hidden_layers", self.num_hidden_layers, 1)?;
        at_least("num_attention_heads", self.num_attention_heads, 1)?;
        if let Some(kv) = self.num_key_value_heads {
            at_least("num_key_value_heads", kv, 1)?;
        }
        if let Some(d) = self.head_dim {
            at_least("head_dim", d, 1)?;
        }
        at_least("vocab_size", self.vocab_size, MIN_VOCAB_SIZE)?;
        at_least("max_position_embeddings", self.max_position_embeddings, 1)?;
        if self.max_position_embeddings > MAX_POSITIONS {
            return Err(format!(
                "max_position_embeddings: {} is more than llmtool can address (at most \
                 {MAX_POSITIONS}: positions are 32-bit)",
                self.max_position_embeddings
            ));
        }
        let at_most = |key: &str, value: usize, max: usize| match value > max {
            true => Err(format!(
                "{key}: {value} is more than llmtool supports (at most {max})"
            )),
            false => Ok(()),
        };
        for (key, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim.unwrap_or(0)),
        ] {
            at_most(key, value, MAX_DIMENSION)?;
        }
        at_most("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size ({}) is not divisible by num_attention_heads ({}); without head_dim \
                 the head size is their quotient",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err(format!(
                "num_attention_heads ({}) is not divisible by num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_size() % 2 != 0 {
            return Err(format!(
                "head size {} must be even for RoPE",
                self.head_size()
            ));
        }
        let factor = self.partial_rotary_factor();
        let rotary = self.rotary_dim();
        if !(factor > 0.0 && factor <= 1.0) || rotary < 2 || rotary % 2 != 0 {
            return Err(format!(
                "partial_rotary_factor: {factor} of head size {} rotates {rotary} dimensions; \
                 it must rotate an even number, at least 2",
                self.head_size()
            ));
        }
        let positive = |key: &str, value: f64| match value.is_finite() && value > 0.0 {
            true => Ok(()),
            false => Err(format!(
                "{key}: must be a positive finite number, got {value}"
            )),
        };
        positive("rms_norm_eps", self.rms_norm_eps)?;
        let mut sets = vec![("rope_scaling".to_string(), self.rope_scaling.as_ref())];
        match &self.rope_parameters {
            Some(RopeParameters::Shared(p)) => sets.push(("rope_parameters".into(), Some(p))),
            Some(RopeParameters::PerLayerType(map)) => {
                for (layer_type, p) in map {
                    sets.push((format!("rope_parameters.{layer_type}"), Some(p)));
                }
            }
            None => {}
        }
        let given_theta = self.rope_parameters_for(false).and_then(|p| p.rope_theta);
        if given_theta.is_none() {
            positive("rope_theta", self.rope_theta)?;
        }
        for (key, s) in sets {
            let Some(s) = s else { continue };
            if let Some(theta) = s.rope_theta {
                positive(&format!("{key}.rope_theta"), theta)?;
            }
            if !["llama3", "linear", "longrope", "default"].contains(&s.rope_type.as_str()) {
                return Err(format!(
                    "{key}.rope_type: {} is not supported (only default, linear, llama3 and longrope)",
                    s.rope_type
                ));
            }
            if s.rope_type == "linear" {
                positive(&format!("{key}.factor"), s.factor())?;
            }
            if s.rope_type == "longrope" {
                self.check_longrope(&key, s)?;
            }
            if s.rope_type == "llama3" {
                positive(&format!("{key}.factor"), s.factor())?;
                positive(&format!("{key}.low_freq_factor"), s.low_freq_factor)?;
                if !(s.high_freq_factor > s.low_freq_factor && s.high_freq_factor.is_finite()) {
                    return Err(format!(
                        "{key}.high_freq_factor: must be finite and above low_freq_factor ({}), \
                         got {}",
                        s.low_freq_factor, s.high_freq_factor
                    ));
                }
                at_least(
                    &format!("{key}.original_max_position_embeddings"),
                    s.original_context(),
                    1,
                )?;
            }
        }
        self.check_parameter_count()
    }

    /// LongRoPE's factors: one positive number per rotated frequency pair, in both lists; a
    /// positive original context and attention factor.
    fn check_longrope(&self, key: &str, s: &RopeScaling) -> Result<(), String> {
        let pairs = self.rotary_dim() / 2;
        for (name, factors) in [
            ("short_factor", &s.short_factor),
            ("long_factor", &s.long_factor),
        ] {
            let factors = factors
                .as_ref()
                .ok_or_else(|| format!("{key}.{name}: missing (rope_type longrope needs it)"))?;
            if factors.len() != pairs {
                return Err(format!(
                    "{key}.{name}: has {} factors, the rotated head dimensions need {pairs}",
                    factors.len()
                ));
            }
            if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                return Err(format!(
                    "{key}.{name}: every factor must be a positive finite number, got {bad}"
                ));
            }
        }
        let original = self.longrope_original_context(s);
        if original == 0 {
            return Err(format!(
                "{key}.original_max_position_embeddings: must be at least 1"
            ));
        }
        if let Some(factor) = s.attention_factor {
            if !(factor.is_finite() && factor > 0.0) {
                return Err(format!(
                    "{key}.attention_factor: must be a positive finite number, got {factor}"
                ));
            }
        }
        Ok(())
    }

    /// The original context of a model with LongRoPE on its global layers, past which its
    /// RoPE switches to the long factors; `None` without LongRoPE.
    pub fn longrope_context(&self) -> Option<usize> {
        self.rope_scaling_for(false)
            .filter(|s| s.rope_type == "longrope")
            .map(|s| self.longrope_original_context(s))
    }

    /// LongRoPE's original context: the top-level key (Phi-3's), else the one in the RoPE
    /// parameters, else the context itself (as transformers reads them).
    pub fn longrope_original_context(&self, s: &RopeScaling) -> usize {
        self.family_options
            .original_max_position_embeddings
            .or(s.original_max_position_embeddings)
            .unwrap_or(self.max_position_embeddings)
    }

    /// Refuses a model of more than [`MAX_PARAMETERS`] parameters, counted without overflow.
    /// Runs last in [`Self::check`]: listing the shapes needs every other value checked.
    fn check_parameter_count(&self) -> Result<(), String> {
        let count =
            crate::names::parameter_shapes(self)
                .iter()
                .try_fold(0u128, |sum, (_, shape)| {
                    let size = shape
                        .iter()
                        .try_fold(1u128, |p, &d| p.checked_mul(d as u128))?;
                    sum.checked_add(size)
                });
        match count {
            Some(n) if n <= MAX_PARAMETERS => Ok(()),
            _ => Err(format!(
                "hidden_size {}, intermediate_size {}, vocab_size {} and num_hidden_layers {} \
                 make more than {MAX_PARAMETERS} parameters, more than llmtool can hold",
                self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
            )),
        }
    }

    /// Number of parameters.
    pub fn parameter_count(&self) -> usize {
        crate::names::parameter_shapes(self)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }
}
