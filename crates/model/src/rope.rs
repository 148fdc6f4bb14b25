//! RoPE frequency tables, with Llama 3 frequency-dependent and linear scaling.

use super::config::{LlamaConfig, RopeScaling};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::RwLock;

/// Cosine and sine tables, `[rows, rotary_dim / 2]` (the head size unless the config rotates
/// only part of each head), for positions up to the config's
/// `max_position_embeddings`. The rows are made as positions are asked for (doubling, from
/// [`RopeTables::MIN_ROWS`]), not for the whole context up front: a config with a long context
/// (Llama 3.1's 131072 positions, or a mistaken 10⁹) costs nothing until a sequence is that
/// long. Rows are a pure function of the position, so how far the tables have grown never
/// changes a value.
#[derive(Debug)]
pub struct RopeTables {
    inverse: Vec<f64>,
    max_positions: usize,
    dtype: DType,
    device: Device,
    /// The rows made so far: cos, sin.
    rows: RwLock<Option<(Tensor, Tensor)>>,
}

impl Clone for RopeTables {
    fn clone(&self) -> Self {
        Self {
            inverse: self.inverse.clone(),
            max_positions: self.max_positions,
            dtype: self.dtype,
            device: self.device.clone(),
            rows: RwLock::new(self.made()),
        }
    }
}

/// Inverse frequencies `1 / theta^(2i/d)`, rescaled as Llama 3 (or linear scaling: divided by
/// the factor) does when configured.
pub fn inverse_frequencies(
    head_size: usize,
    theta: f64,
    scaling: Option<&RopeScaling>,
) -> Vec<f64> {
    (0..head_size / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_size as f64))
        .map(|f| match scaling {
            Some(s) if s.rope_type == "linear" => f / s.factor,
            Some(s) => llama3_scale(f, s),
            None => f,
        })
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
    /// The fewest rows made at once.
    pub const MIN_ROWS: usize = 256;

    /// Tables of the global layers for positions up to the config's
    /// `max_position_embeddings`; no row is made yet.
    pub fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::for_layers(cfg, false, dtype, device)
    }

    /// [`RopeTables::new`] for `local` (sliding, Gemma 3) or global layers.
    pub fn for_layers(
        cfg: &LlamaConfig,
        local: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (theta, scaling) = (cfg.rope_theta_for(local), cfg.rope_scaling_for(local));
        Ok(Self {
            inverse: inverse_frequencies(cfg.rotary_dim(), theta, scaling),
            max_positions: cfg.max_position_embeddings,
            dtype,
            device: device.clone(),
            rows: RwLock::new(None),
        })
    }

    /// The rows made so far.
    fn made(&self) -> Option<(Tensor, Tensor)> {
        self.rows.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rows made so far (for tests and memory accounting).
    pub fn rows(&self) -> usize {
        self.made().map_or(0, |(cos, _)| cos.dim(0).unwrap_or(0))
    }

    /// Tables with at least `needed` rows, made now if they do not exist yet.
    fn at_least(&self, needed: usize) -> Result<(Tensor, Tensor)> {
        if needed > self.max_positions {
            candle_core::bail!(
                "position {} is past the model's max_position_embeddings ({})",
                needed - 1,
                self.max_positions
            );
        }
        if let Some(t) = self.made().filter(|(cos, _)| cos.dims()[0] >= needed) {
            return Ok(t);
        }
        let mut rows = self.rows.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = rows.as_ref().filter(|(cos, _)| cos.dims()[0] >= needed) {
            return Ok(t.clone());
        }
        let positions = needed
            .next_power_of_two()
            .max(Self::MIN_ROWS)
            .min(self.max_positions);
        let half = self.inverse.len();
        let inverse = &self.inverse;
        let angles: Vec<f64> = (0..positions)
            .flat_map(|p| inverse.iter().map(move |f| p as f64 * f))
            .collect();
        let table = |f: fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = angles.iter().map(|a| f(*a) as f32).collect();
            Tensor::from_vec(v, (positions, half), &self.device)?.to_dtype(self.dtype)
        };
        let made = (table(f64::cos)?, table(f64::sin)?);
        *rows = Some(made.clone());
        Ok(made)
    }

    /// Rows for positions `start..start + len`.
    pub fn window(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.at_least(start + len)?;
        Ok((cos.narrow(0, start, len)?, sin.narrow(0, start, len)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_positions: usize, head_dim: usize) -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": head_dim,
            "vocab_size": 128256, "max_position_embeddings": max_positions,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        }))
        .unwrap()
    }

    #[test]
    fn a_long_context_makes_rows_only_as_positions_are_asked_for() {
        // Llama 3.1: 131072 positions; all rows in f32 would be 64 MiB, made up front.
        let tables = RopeTables::new(&config(131_072, 128), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(tables.rows(), 0);
        let (cos, _) = tables.window(0, 10).unwrap();
        assert_eq!(
            (cos.dims(), tables.rows()),
            (&[10, 64][..], RopeTables::MIN_ROWS)
        );
        tables.window(1000, 24).unwrap();
        assert_eq!(tables.rows(), 1024);
        tables.window(131_000, 72).unwrap();
        assert_eq!(tables.rows(), 131_072);
        let message = tables.window(131_000, 73).unwrap_err().to_string();
        assert!(
            message
                .contains("position 131072 is past the model's max_position_embeddings (131072)"),
            "{message}"
        );
        // A mistaken 4·10⁹ positions costs nothing until used.
        let huge = RopeTables::new(&config(4_000_000_000, 128), DType::F32, &Device::Cpu).unwrap();
        huge.window(5, 3).unwrap();
        assert_eq!(huge.rows(), RopeTables::MIN_ROWS);
    }

    #[test]
    fn rows_do_not_depend_on_how_far_the_tables_grew() {
        let cfg = config(8192, 16);
        let grown = RopeTables::new(&cfg, DType::F32, &Device::Cpu).unwrap();
        grown.window(0, 5000).unwrap();
        let fresh = RopeTables::new(&cfg, DType::F32, &Device::Cpu).unwrap();
        for (start, len) in [(0, 7), (250, 20), (4000, 100)] {
            let (a, b) = (
                grown.window(start, len).unwrap(),
                fresh.window(start, len).unwrap(),
            );
            for (x, y) in [(a.0, b.0), (a.1, b.1)] {
                assert_eq!(
                    x.to_vec2::<f32>().unwrap(),
                    y.to_vec2::<f32>().unwrap(),
                    "{start}+{len}"
                );
            }
        }
        // Position 3, frequency index 1: cos(3 / theta^(2/16)), unscaled (short wavelength).
        let (cos, _) = fresh.window(3, 1).unwrap();
        let want = (3.0 / 500000f64.powf(2.0 / 16.0)).cos() as f32;
        assert_eq!(cos.to_vec2::<f32>().unwrap()[0][1], want);
    }
}
