//! PEFT's `adapter_config.json`, and the projection names `target_modules` may hold.

use config::{Config, LoraSection};
use model::names::Module;
use model::Family;
use serde::{Deserialize, Serialize};

/// `target_modules` in `adapter_config.json`: a list of module names, or one string (PEFT
/// treats a string as a regular expression, except `all-linear`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names (`q_proj`, `v_proj`, ...).
    List(Vec<String>),
    /// A regular expression over module paths, or `all-linear`; loading goes by the adapter's
    /// tensors, not this.
    Pattern(String),
}

/// `adapter_config.json` as PEFT 0.21 reads and writes it (the fields llmtool uses; PEFT fills
/// in defaults for the rest, and older PEFT versions load it too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// The base model's directory or hub id, checked against the base given where it is a local
    /// directory.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The hub revision of the base model; written as `null`.
    #[serde(default)]
    pub revision: Option<String>,
    /// The PEFT method; only `LORA` loads.
    pub peft_type: String,
    /// The model head PEFT wraps; llmtool writes `CAUSAL_LM`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Adapter rank: the inner dimension of `B A`, at least 1.
    pub r: usize,
    /// Scale numerator: updates are scaled by `lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`).
    #[serde(serialize_with = "plain_number")]
    pub lora_alpha: f64,
    /// Dropout probability on the adapter input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// The projections the adapter adapts.
    pub target_modules: TargetModules,
    /// Scale by `lora_alpha / sqrt(r)` (rank-stabilised LoRA) instead of `lora_alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (weight-decomposed LoRA); not supported, so must be `false`.
    #[serde(default)]
    pub use_dora: bool,
    /// Which biases the adapter trains (`none`, `all`, `lora_only`); only `none` is supported.
    #[serde(default = "no_bias")]
    pub bias: String,
    /// Whether the base weights are stored `in × out` (GPT-2's `Conv1D`); not supported.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Modules trained in full beside the adapter; not supported unless empty.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Per-module ranks overriding `r`; not supported unless empty.
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    /// Per-module alphas overriding `lora_alpha`; not supported unless empty.
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    /// The layer indices PEFT restricts the adapter to; kept as read, the tensors decide.
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    /// The module-list name `layers_to_transform` refers to; kept as read.
    #[serde(default)]
    pub layers_pattern: Option<serde_json::Value>,
    /// How PEFT initialises a new adapter (default `true`: Kaiming-uniform A, zero B).
    #[serde(default = "init_true")]
    pub init_lora_weights: serde_json::Value,
    /// Whether PEFT loads the adapter frozen; llmtool writes `true`.
    #[serde(default)]
    pub inference_mode: bool,
}

fn no_bias() -> String {
    "none".into()
}

fn init_true() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

/// Writes whole numbers without a fraction (`8`, as PEFT writes `lora_alpha`), others as floats.
fn plain_number<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

impl AdapterConfig {
    /// The config of a new adapter with these settings on the modules `targets` (long names).
    pub fn new(lora: &LoraSection, targets: &[&str]) -> Self {
        let names = targets.iter().map(|t| t.to_string()).collect();
        Self::with(lora.r, lora.alpha, lora.dropout, names, lora.rslora)
    }

    /// A LoRA config of rank `r` on the modules `names` (sorted here), with PEFT's defaults
    /// for the rest.
    pub(super) fn with(
        r: usize,
        lora_alpha: f64,
        lora_dropout: f64,
        mut names: Vec<String>,
        use_rslora: bool,
    ) -> Self {
        names.sort();
        Self {
            base_model_name_or_path: None,
            revision: None,
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha,
            lora_dropout,
            target_modules: TargetModules::List(names),
            use_rslora,
            use_dora: false,
            bias: no_bias(),
            fan_in_fan_out: false,
            modules_to_save: None,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            layers_to_transform: None,
            layers_pattern: None,
            init_lora_weights: init_true(),
            inference_mode: true,
        }
    }

    /// The factor on `B A x`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        let r = self.r as f64;
        if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }
    }

    /// Rejects PEFT features llmtool does not implement.
    pub(super) fn check_supported(&self) -> std::result::Result<(), String> {
        let unsupported = [
            (self.peft_type != "LORA", "peft_type is not LORA"),
            (self.use_dora, "use_dora (DoRA) is not supported"),
            (
                self.bias != "none",
                "bias other than \"none\" is not supported",
            ),
            (self.fan_in_fan_out, "fan_in_fan_out is not supported"),
            (
                self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()),
                "modules_to_save is not supported",
            ),
            (
                !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty(),
                "rank_pattern/alpha_pattern (per-module ranks) are not supported",
            ),
        ];
        if let Some((_, why)) = unsupported.iter().find(|(bad, _)| *bad) {
            return Err(why.to_string());
        }
        if self.r == 0 {
            return Err("r is 0: the rank must be at least 1".into());
        }
        if let TargetModules::List(names) = &self.target_modules {
            if let Some(name) = names.iter().find(|n| !known(n)) {
                return Err(unknown(name));
            }
        }
        Ok(())
    }
}

/// Long module names for `names` (long, short, or `all-linear`) in a model of `family`,
/// without duplicates, in a block's order. A name of a module the family stores otherwise
/// (`q_proj` where Phi-3 stacks `qkv_proj`) is an error naming what it has.
pub fn expand_targets(
    names: &[String],
    family: &Family,
) -> std::result::Result<Vec<&'static str>, String> {
    let modules = Module::of(family);
    let mut wanted = Vec::new();
    for name in names {
        if name == "all-linear" {
            wanted.extend(modules.iter().copied());
            continue;
        }
        let module = Module::from_name(name).ok_or_else(|| unknown(name))?;
        if !modules.contains(&module) {
            let have: Vec<&str> = modules.iter().map(|m| m.name()).collect();
            return Err(format!(
                "target_modules names {name:?}, which this model does not have as a module; it has {} (or all-linear)",
                have.join(", ")
            ));
        }
        wanted.push(module);
    }
    Ok(modules
        .into_iter()
        .filter(|m| wanted.contains(m))
        .map(Module::name)
        .collect())
}

/// Whether `name` is `all-linear` or a module name of some supported family.
fn known(name: &str) -> bool {
    name == "all-linear" || Module::from_name(name).is_some()
}

/// The error of a target name no supported family has.
fn unknown(name: &str) -> String {
    format!(
        "target_modules names {name:?}, a module no supported model has; expected one of {}, or all-linear",
        known_targets()
    )
}

/// Every module name of every family, comma-separated.
fn known_targets() -> String {
    let names: Vec<&str> = Module::KNOWN.iter().map(|m| m.name()).collect();
    names.join(", ")
}

/// The problems of the config's `lora.target_modules` (names the model's table lacks), for
/// [`config::load_with`].
pub fn config_issues(c: &Config) -> Vec<(String, String)> {
    c.lora
        .target_modules
        .iter()
        .enumerate()
        .filter(|(_, t)| !known(t))
        .map(|(i, target)| {
            let message = format!(
                "unknown module {target:?}; expected one of {}, or all-linear",
                known_targets()
            );
            (format!("lora.target_modules.{i}"), message)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_expand_short_names_and_all_linear() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let family = |model_type: &str| {
            let cfg: model::LlamaConfig = serde_json::from_value(serde_json::json!({
                "model_type": model_type, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32,
            }))
            .unwrap();
            Family::of(&cfg)
        };
        let (llama, phi3) = (family("llama"), family("phi3"));
        assert_eq!(
            expand_targets(&names(&["v", "q_proj", "q"]), &llama).unwrap(),
            ["q_proj", "v_proj"]
        );
        assert_eq!(
            expand_targets(&names(&["all-linear"]), &llama)
                .unwrap()
                .len(),
            7
        );
        assert!(expand_targets(&names(&["c_attn"]), &llama).is_err());
        assert_eq!(
            expand_targets(&names(&["all-linear"]), &phi3).unwrap(),
            ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        );
        let message = expand_targets(&names(&["q_proj"]), &phi3).unwrap_err();
        assert!(message.contains("it has qkv_proj, o_proj"), "{message}");
        assert!(expand_targets(&names(&["qkv"]), &llama).is_err());
    }

    #[test]
    fn alpha_is_written_like_peft() {
        let mut config = AdapterConfig::new(&LoraSection::default(), &["q_proj"]);
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["lora_alpha"], serde_json::json!(16));
        config.lora_alpha = 2.5;
        assert_eq!(serde_json::to_value(&config).unwrap()["lora_alpha"], 2.5);
        config.use_rslora = true;
        config.r = 4;
        assert_eq!(config.scale(), 1.25);
    }
}
