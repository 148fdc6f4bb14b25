//! Fresh weights for a model trained from scratch, reproducible from a seed on any device.

use crate::model::llama::parameter_shapes;
use crate::model::{LlamaConfig, Weights};
use candle_core::{Device, Result, Tensor};
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
