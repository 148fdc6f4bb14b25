//! LoRA adapters in PEFT format: `adapter_config.json` + `adapter_model.safetensors` with keys
//! like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, A `[r, in]`,
//! B `[out, r]`, and the forward `W x + scale * B (A dropout(x))`; mlx-lm's adapter
//! directories are read and written too (`mlx.rs`).

mod adapter;
mod layer;
mod merge;
mod mlx;
mod peft;

pub use adapter::Adapter;
pub use layer::LoraLayer;
pub use merge::merge;
pub use mlx::{AdapterFormat, MlxAdapterConfig};
pub use peft::{config_issues, expand_targets, AdapterConfig, TargetModules};

/// The prefix PEFT puts before a module path in adapter tensor names.
const PEFT_PREFIX: &str = "base_model.model.";
