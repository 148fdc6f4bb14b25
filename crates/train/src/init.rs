//! Fresh weights for a model trained from scratch, reproducible from a seed on any device.

use candle_core::{Device, Result, Tensor};
use config::ModelSection;
use model::config::TokenIds;
use model::names::parameter_shapes;
use model::{LlamaConfig, Weights};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

/// Normal(0, `initializer_range`) for linear and embedding weights, ones for norms, zeros for
/// biases (as transformers initialises Llama), drawn on the CPU from `seed`.
pub fn random_weights(cfg: &LlamaConfig, seed: u64, device: &Device) -> Result<Weights> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0f32, cfg.initializer_range as f32)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, shape) in parameter_shapes(cfg) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.contains("norm") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        tensors.insert(name, Tensor::from_vec(values, shape, device)?);
    }
    Ok(Weights::new(tensors, "fresh initialisation"))
}

/// The `config.json` of a model built from scratch from the `model` section, with `vocab_size`
/// token embeddings (`model.vocab_size` resolved against the tokenizer) and `eos_token_id` (the
/// dataset tokenizer's end of text) as both BOS and EOS.
pub fn scratch_config(
    m: &ModelSection,
    vocab_size: usize,
    eos_token_id: Option<u32>,
) -> LlamaConfig {
    LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        hidden_size: m.hidden_size,
        intermediate_size: m.intermediate_size,
        num_hidden_layers: m.num_hidden_layers,
        num_attention_heads: m.num_attention_heads,
        num_key_value_heads: Some(m.num_key_value_heads),
        head_dim: Some(m.hidden_size / m.num_attention_heads),
        vocab_size,
        max_position_embeddings: m.max_position_embeddings,
        rope_theta: m.rope_theta,
        rope_scaling: None,
        rope_parameters: None,
        rms_norm_eps: m.rms_norm_eps,
        tie_word_embeddings: m.tie_word_embeddings,
        attention_bias: false,
        bos_token_id: eos_token_id.map(TokenIds::One),
        eos_token_id: eos_token_id.map(TokenIds::One),
        hidden_act: "silu".into(),
        initializer_range: m.initializer_range,
        torch_dtype: Some("float32".into()),
        dtype: None,
        quantization_config: None,
        family_options: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_preset_has_47m_parameters() {
        let c = scratch_config(&ModelSection::default(), 16384, Some(0));
        let millions = c.parameter_count() as f64 / 1e6;
        assert!((45.0..49.0).contains(&millions), "{millions}");
    }

    #[test]
    fn rejects_unknown_architecture() {
        let mut c = scratch_config(&ModelSection::default(), 16384, None);
        c.architectures = vec!["GPT2LMHeadModel".into()];
        let err = c.check().unwrap_err();
        assert!(err.contains("GPT2LMHeadModel") && err.contains("LlamaForCausalLM"));
    }
}
