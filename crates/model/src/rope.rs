//! RoPE frequency tables, with Llama 3 frequency-dependent, linear and LongRoPE scaling.

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
///
/// LongRoPE (Phi-3 128k, Phi-4-mini) has two sets of frequencies: a forward pass whose last
/// position is within the original context uses the short factors for every position, one
/// that reaches past it the long ones, as transformers switches them per call.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// The frequencies of sequences within the original context (all sequences without
    /// LongRoPE).
    short: Frequencies,
    /// LongRoPE's frequencies of longer sequences, and the original context.
    long: Option<(Frequencies, usize)>,
    max_positions: usize,
}

/// One set of frequencies and the rows made of them so far.
#[derive(Debug)]
struct Frequencies {
    inverse: Vec<f64>,
    /// The factor on cos and sin (LongRoPE's attention factor; else 1).
    scale: f64,
    dtype: DType,
    device: Device,
    /// The rows made so far: cos, sin.
    rows: RwLock<Option<(Tensor, Tensor)>>,
}

impl Clone for Frequencies {
    fn clone(&self) -> Self {
        Self {
            inverse: self.inverse.clone(),
            scale: self.scale,
            dtype: self.dtype,
            device: self.device.clone(),
            rows: RwLock::new(self.made()),
        }
    }
}

/// Inverse frequencies `1 / theta^(2i/d)`, rescaled as Llama 3 (or linear scaling: divided by
/// the factor) does when configured. LongRoPE's are [`longrope_frequencies`].
pub fn inverse_frequencies(
    head_size: usize,
    theta: f64,
    scaling: Option<&RopeScaling>,
) -> Vec<f64> {
    (0..head_size / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_size as f64))
        .map(|f| match scaling {
            Some(s) if s.rope_type == "linear" => f / s.factor(),
            Some(s) if s.rope_type == "llama3" => llama3_scale(f, s),
            _ => f,
        })
        .collect()
}

/// LongRoPE's inverse frequencies `1 / (factor_i · theta^(2i/d))` for one list of factors.
pub fn longrope_frequencies(rotary_dim: usize, theta: f64, factors: &[f64]) -> Vec<f64> {
    inverse_frequencies(rotary_dim, theta, None)
        .into_iter()
        .zip(factors)
        .map(|(f, factor)| f / factor)
        .collect()
}

fn llama3_scale(freq: f64, s: &RopeScaling) -> f64 {
    let original = s.original_context() as f64;
    let low_freq_wavelen = original / s.low_freq_factor;
    let high_freq_wavelen = original / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_freq_wavelen {
        freq
    } else if wavelen > low_freq_wavelen {
        freq / s.factor()
    } else {
        let smooth =
            (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor() + smooth * freq
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
        let frequencies = |inverse, scale| Frequencies {
            inverse,
            scale,
            dtype,
            device: device.clone(),
            rows: RwLock::new(None),
        };
        let dim = cfg.rotary_dim();
        let longrope = scaling.filter(|s| s.rope_type == "longrope");
        let (short, long) = match longrope {
            Some(s) => {
                let original = cfg.longrope_original_context(s);
                let scale = longrope_attention_factor(cfg, s, original);
                let factors = |f: &Option<Vec<f64>>| f.clone().unwrap_or_default();
                let short = longrope_frequencies(dim, theta, &factors(&s.short_factor));
                let long = longrope_frequencies(dim, theta, &factors(&s.long_factor));
                (
                    frequencies(short, scale),
                    Some((frequencies(long, scale), original)),
                )
            }
            None => (
                frequencies(inverse_frequencies(dim, theta, scaling), 1.0),
                None,
            ),
        };
        Ok(Self {
            short,
            long,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// Rows made so far (for tests and memory accounting).
    pub fn rows(&self) -> usize {
        let rows = |f: &Frequencies| f.made().map_or(0, |(cos, _)| cos.dim(0).unwrap_or(0));
        rows(&self.short) + self.long.as_ref().map_or(0, |(long, _)| rows(long))
    }

    /// Rows for positions `start..start + len`, of one forward pass over them.
    pub fn window(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let end = start + len;
        let frequencies = match &self.long {
            Some((long, original)) if end > *original => long,
            _ => &self.short,
        };
        let (cos, sin) = frequencies.at_least(end, self.max_positions)?;
        Ok((cos.narrow(0, start, len)?, sin.narrow(0, start, len)?))
    }

    /// Rows for positions `0..len` as decoding one token at a time sees them: the row of
    /// position `p` is the one a forward pass ending at `p` uses (with LongRoPE, short
    /// factors up to the original context, long ones past it).
    pub fn decoding_rows(&self, len: usize) -> Result<(Tensor, Tensor)> {
        let Some((long, original)) = self.long.as_ref().filter(|(_, o)| len > *o) else {
            return self.window(0, len);
        };
        let (short_cos, short_sin) = self.short.at_least(*original, self.max_positions)?;
        let (long_cos, long_sin) = long.at_least(len, self.max_positions)?;
        let tail = len - original;
        let cat = |short: &Tensor, long: &Tensor| {
            Tensor::cat(
                &[
                    short.narrow(0, 0, *original)?,
                    long.narrow(0, *original, tail)?,
                ],
                0,
            )
        };
        Ok((cat(&short_cos, &long_cos)?, cat(&short_sin, &long_sin)?))
    }
}

/// LongRoPE's factor on cos and sin: the configured `attention_factor`, else
/// `sqrt(1 + ln s / ln original)` with `s` the configured `factor` or the ratio of the context
/// to the original one (1 when `s <= 1`).
pub(crate) fn longrope_attention_factor(
    cfg: &LlamaConfig,
    s: &RopeScaling,
    original: usize,
) -> f64 {
    if let Some(factor) = s.attention_factor {
        return factor;
    }
    let extension = s
        .factor
        .unwrap_or(cfg.max_position_embeddings as f64 / original as f64);
    if extension <= 1.0 {
        1.0
    } else {
        (1.0 + extension.ln() / (original as f64).ln()).sqrt()
    }
}

impl Frequencies {
    /// The rows made so far.
    fn made(&self) -> Option<(Tensor, Tensor)> {
        self.rows.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Tables with at least `needed` rows (of at most `max_positions`), made now if they do
    /// not exist yet.
    fn at_least(&self, needed: usize, max_positions: usize) -> Result<(Tensor, Tensor)> {
        if needed > max_positions {
            candle_core::bail!(
                "position {} is past the model's max_position_embeddings ({max_positions})",
                needed - 1,
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
            .max(RopeTables::MIN_ROWS)
            .min(max_positions);
        let half = self.inverse.len();
        let inverse = &self.inverse;
        let angles: Vec<f64> = (0..positions)
            .flat_map(|p| inverse.iter().map(move |f| p as f64 * f))
            .collect();
        let table = |f: fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = angles.iter().map(|a| (f(*a) * self.scale) as f32).collect();
            Tensor::from_vec(v, (positions, half), &self.device)?.to_dtype(self.dtype)
        };
        let made = (table(f64::cos)?, table(f64::sin)?);
        *rows = Some(made.clone());
        Ok(made)
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
