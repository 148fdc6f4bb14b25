//! RoPE frequency tables, with Llama 3 frequency-dependent scaling.

use super::config::{LlamaConfig, RopeScaling};
use candle_core::{DType, Device, Result, Tensor};

/// Cosine and sine tables, `[max_positions, head_size / 2]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Inverse frequencies `1 / theta^(2i/d)`, rescaled as Llama 3 does when configured.
pub fn inverse_frequencies(
    head_size: usize,
    theta: f64,
    scaling: Option<&RopeScaling>,
) -> Vec<f64> {
    (0..head_size / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_size as f64))
        .map(|f| scaling.map_or(f, |s| llama3_scale(f, s)))
        .collect()
}

fn llama3_scale(freq: f64, s: &RopeScaling) -> f64 {
    let original = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = original / s.low_freq_factor;
    let high_freq_wavelen = original / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_freq_wavelen {
        freq
    } else if wavelen > low_freq_wavelen {
        freq / s.factor
    } else {
        let smooth =
            (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

impl RopeTables {
    /// Tables for every position up to the config's `max_position_embeddings`.
    pub fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let inv = inverse_frequencies(cfg.head_size(), cfg.theta(), cfg.llama3_scaling());
        let positions = cfg.max_position_embeddings;
        let half = inv.len();
        let angles: Vec<f64> = (0..positions)
            .flat_map(|p| inv.iter().map(move |f| p as f64 * f))
            .collect();
        let table = |f: fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = angles.iter().map(|a| f(*a) as f32).collect();
            Tensor::from_vec(v, (positions, half), device)?.to_dtype(dtype)
        };
        Ok(Self {
            cos: table(f64::cos)?,
            sin: table(f64::sin)?,
        })
    }

    /// Rows for positions `start..start + len`.
    pub fn window(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.narrow(0, start, len)?,
            self.sin.narrow(0, start, len)?,
        ))
    }
}
