//! Folding an adapter into its base's weights.

use super::Adapter;
use candle_core::{DType, Tensor};
use model::weights::ModelError;

/// The base parameters `base` with `adapter` folded in: `W + scale * B @ A`, computed in f32.
/// Fails if the adapter adapts a module `base` lacks.
pub fn merge(
    base: &[(String, Tensor)],
    adapter: &Adapter,
) -> std::result::Result<Vec<(String, Tensor)>, ModelError> {
    let scale = adapter.scale();
    let mut merged = 0;
    let mut out = Vec::with_capacity(base.len());
    for (name, w) in base {
        let pair = name
            .strip_suffix(".weight")
            .and_then(|m| adapter.modules.get(m));
        let w = match pair {
            Some((a, b)) => {
                merged += 1;
                let delta = b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?;
                (w.to_dtype(DType::F32)? + (delta * scale)?)?
            }
            None => w.clone(),
        };
        out.push((name.clone(), w));
    }
    if merged != adapter.modules.len() {
        return Err(ModelError::Lora(format!(
            "the adapter adapts {} modules but only {merged} exist in the base model",
            adapter.modules.len()
        )));
    }
    Ok(out)
}
