//! mlx-lm's adapter directory, the other format `--adapter` reads and `finetune
//! --adapter-format mlx` writes: `adapter_config.json` holds mlx-lm's training arguments, of
//! which `fine_tune_type`, `num_layers` and `lora_parameters` (`rank`, `scale`, `dropout`,
//! `keys`) describe the adapter, and `adapters.safetensors` holds
//! `model.layers.{i}.{key}.lora_a` `[in, r]` and `.lora_b` `[r, out]`. mlx-lm's `LoRALinear`
//! adds `scale * (x lora_a) lora_b`, so `lora_a` and `lora_b` are PEFT's A and B transposed,
//! and mlx-lm's `scale` is PEFT's `alpha / r`: an mlx adapter is read as the PEFT adapter with
//! `lora_alpha = scale * rank`.

use super::peft::AdapterConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

/// mlx-lm's adapter weights file.
pub const MLX_WEIGHTS: &str = "adapters.safetensors";

/// PEFT's adapter weights file.
pub const PEFT_WEIGHTS: &str = "adapter_model.safetensors";

/// The two adapter directory formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AdapterFormat {
    /// PEFT's `adapter_config.json` + `adapter_model.safetensors`.
    #[default]
    Peft,
    /// mlx-lm's `adapter_config.json` + `adapters.safetensors`.
    Mlx,
}

impl AdapterFormat {
    /// The format of the adapter directory `dir`: mlx-lm's when it holds `adapters.safetensors`
    /// and not PEFT's weights file, else PEFT's.
    pub fn of_dir(dir: &Path) -> Self {
        if !dir.join(PEFT_WEIGHTS).is_file() && dir.join(MLX_WEIGHTS).is_file() {
            Self::Mlx
        } else {
            Self::Peft
        }
    }

    /// The weights file of this format.
    pub fn weights_file(self) -> &'static str {
        match self {
            Self::Peft => PEFT_WEIGHTS,
            Self::Mlx => MLX_WEIGHTS,
        }
    }

    /// The tensor name of module `path`'s A (`is_a`) or B matrix.
    pub(super) fn tensor_name(self, path: &str, is_a: bool) -> String {
        match (self, is_a) {
            (Self::Peft, true) => format!("{}{path}.lora_A.weight", super::PEFT_PREFIX),
            (Self::Peft, false) => format!("{}{path}.lora_B.weight", super::PEFT_PREFIX),
            (Self::Mlx, true) => format!("{path}.lora_a"),
            (Self::Mlx, false) => format!("{path}.lora_b"),
        }
    }

    /// The module path of a tensor name and whether it is A, or `None` for a name that is
    /// neither matrix of a module in this format.
    pub(super) fn parse(self, name: &str) -> Option<(&str, bool)> {
        let (rest, a, b) = match self {
            Self::Peft => (
                name.strip_prefix(super::PEFT_PREFIX)?,
                ".lora_A.weight",
                ".lora_B.weight",
            ),
            Self::Mlx => (name, ".lora_a", ".lora_b"),
        };
        rest.strip_suffix(a)
            .map(|m| (m, true))
            .or_else(|| rest.strip_suffix(b).map(|m| (m, false)))
    }

    /// Whether this format stores A and B transposed from PEFT's `[r, in]` and `[out, r]`.
    pub(super) fn transposed(self) -> bool {
        self == Self::Mlx
    }
}

impl std::str::FromStr for AdapterFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "peft" => Ok(Self::Peft),
            "mlx" => Ok(Self::Mlx),
            _ => Err(format!("expected peft or mlx, got `{text}`")),
        }
    }
}

/// The fields of mlx-lm's `adapter_config.json` that describe the adapter (mlx-lm writes all
/// its training arguments there; the others are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlxAdapterConfig {
    /// `lora` (mlx-lm's default), `dora` or `full`; only `lora` is supported.
    #[serde(default = "lora")]
    pub fine_tune_type: String,
    /// The adapted blocks: the last `num_layers` of the model (`-1`: all).
    pub num_layers: i64,
    /// Rank, scale, dropout and the adapted module paths.
    pub lora_parameters: LoraParameters,
    /// The base model mlx-lm was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// mlx-lm's `lora_parameters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraParameters {
    pub rank: usize,
    pub scale: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Module paths inside a block (`self_attn.q_proj`); without them mlx-lm adapts every
    /// linear layer of the adapted blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
}

fn lora() -> String {
    "lora".into()
}

impl MlxAdapterConfig {
    /// Rejects what llmtool does not implement (DoRA, full fine-tuning).
    pub(super) fn check_supported(&self) -> Result<(), String> {
        if self.fine_tune_type != "lora" {
            return Err(format!(
                "fine_tune_type {:?} is not supported: only \"lora\" adapters are",
                self.fine_tune_type
            ));
        }
        if self.lora_parameters.rank == 0 {
            return Err("lora_parameters.rank is 0: the rank must be at least 1".into());
        }
        Ok(())
    }

    /// The PEFT config of the same adapter, whose weights adapt the module paths `modules`
    /// (`model.layers.0.self_attn.q_proj`).
    pub(super) fn to_peft<'a>(&self, modules: impl Iterator<Item = &'a str>) -> AdapterConfig {
        let p = &self.lora_parameters;
        let names: BTreeSet<String> = modules.map(|m| short_name(m).to_string()).collect();
        let alpha = p.scale * p.rank as f64;
        AdapterConfig {
            base_model_name_or_path: self.model.clone(),
            ..AdapterConfig::with(p.rank, alpha, p.dropout, names.into_iter().collect(), false)
        }
    }

    /// mlx-lm's config for an adapter with the PEFT config `config` on the module paths
    /// `modules` of a model with `num_hidden_layers` blocks.
    pub(super) fn from_peft<'a>(
        config: &AdapterConfig,
        modules: impl Iterator<Item = &'a str>,
        num_hidden_layers: usize,
    ) -> Self {
        let keys: BTreeSet<String> = modules.map(|m| key_in_block(m).to_string()).collect();
        Self {
            fine_tune_type: lora(),
            num_layers: num_hidden_layers as i64,
            lora_parameters: LoraParameters {
                rank: config.r,
                scale: config.scale(),
                dropout: config.lora_dropout,
                keys: Some(keys.into_iter().collect()),
            },
            model: config.base_model_name_or_path.clone(),
        }
    }
}

/// `self_attn.q_proj` of `model.layers.0.self_attn.q_proj`.
fn key_in_block(path: &str) -> &str {
    path.strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .map_or(path, |(_, key)| key)
}

/// `q_proj` of `model.layers.0.self_attn.q_proj`.
fn short_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::TargetModules;

    #[test]
    fn names_round_trip_in_both_formats() {
        let path = "model.layers.3.mlp.gate_proj";
        for format in [AdapterFormat::Peft, AdapterFormat::Mlx] {
            for is_a in [true, false] {
                let name = format.tensor_name(path, is_a);
                assert_eq!(format.parse(&name), Some((path, is_a)), "{name}");
            }
        }
        assert_eq!(
            AdapterFormat::Mlx.tensor_name(path, true),
            "model.layers.3.mlp.gate_proj.lora_a"
        );
        assert_eq!(AdapterFormat::Mlx.parse("model.norm.weight"), None);
        assert_eq!(key_in_block(path), "mlp.gate_proj");
        assert_eq!(short_name(path), "gate_proj");
    }

    #[test]
    fn mlx_scale_is_peft_alpha_over_r_both_ways() {
        let mlx: MlxAdapterConfig = serde_json::from_str(
            r#"{"model": "m", "num_layers": 2, "iters": 100,
                "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.05,
                                    "keys": ["self_attn.q_proj"]}}"#,
        )
        .unwrap();
        assert_eq!(mlx.fine_tune_type, "lora");
        let modules = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj",
        ];
        let peft = mlx.to_peft(modules.into_iter());
        assert_eq!((peft.r, peft.lora_alpha, peft.scale()), (4, 80.0, 20.0));
        assert_eq!(
            peft.target_modules,
            TargetModules::List(vec!["q_proj".into()])
        );
        assert_eq!(peft.base_model_name_or_path.as_deref(), Some("m"));
        let back = MlxAdapterConfig::from_peft(&peft, modules.into_iter(), 2);
        assert_eq!(back, mlx);
    }

    #[test]
    fn dora_and_full_are_refused() {
        let mut mlx: MlxAdapterConfig = serde_json::from_str(
            r#"{"num_layers": -1, "lora_parameters": {"rank": 8, "scale": 20.0}}"#,
        )
        .unwrap();
        assert!(mlx.check_supported().is_ok());
        mlx.fine_tune_type = "dora".into();
        assert!(mlx.check_supported().unwrap_err().contains("\"dora\""));
    }
}
