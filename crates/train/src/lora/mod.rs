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

/// Parameter counts of a LoRA fine-tune, for its memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCounts {
    /// The adapter's.
    pub adapter: usize,
    /// The rank summed over the adapted projections: a token's values in the bottlenecks
    /// `dropout(x) @ aᵀ` of every projection.
    pub bottleneck_width: usize,
    /// Every adaptable projection of the blocks (what a 4-bit base quantizes).
    pub projections: usize,
    /// The largest projection's.
    pub largest_projection: usize,
}

/// The [`ParameterCounts`] of an adapter with the settings of `lora` on a model of `cfg`; an
/// error names a target the model lacks.
pub fn parameter_counts(
    lora: &config::LoraSection,
    cfg: &model::LlamaConfig,
) -> Result<ParameterCounts, String> {
    let family = model::Family::of(cfg);
    let targets = expand_targets(&lora.target_modules, &family)?;
    let adapted = adapter::target_shapes(cfg, &targets);
    let adapter = adapted
        .iter()
        .map(|(_, out, inp)| lora.r * (out + inp))
        .sum();
    let all: Vec<&str> = model::names::Module::of(&family)
        .iter()
        .map(|m| m.name())
        .collect();
    let sizes: Vec<usize> = adapter::target_shapes(cfg, &all)
        .iter()
        .map(|(_, out, inp)| out * inp)
        .collect();
    Ok(ParameterCounts {
        adapter,
        bottleneck_width: lora.r * adapted.len(),
        projections: sizes.iter().sum(),
        largest_projection: sizes.iter().copied().max().unwrap_or(0),
    })
}
pub use layer::LoraLayer;
pub use merge::merge;
pub use mlx::{AdapterFormat, MlxAdapterConfig};
pub use peft::{config_issues, expand_targets, AdapterConfig, TargetModules};

/// The prefix PEFT puts before a module path in adapter tensor names.
const PEFT_PREFIX: &str = "base_model.model.";
