//! Choosing the next token: repetition penalty, temperature, top-k, top-p and min-p, on top of
//! candle-transformers' `LogitsProcessor`.

use candle_core::{Result, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

/// Sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    /// In (0, 1].
    pub top_p: Option<f64>,
    /// In [0, 1).
    pub min_p: Option<f64>,
    /// 1 disables; above 1 discourages tokens already in the context.
    pub repetition_penalty: f64,
    pub seed: u64,
}

/// A sampling setting out of range.
#[derive(Debug, thiserror::Error)]
#[error("{name} must be {range}, got {value}")]
pub struct InvalidSampling {
    pub name: &'static str,
    pub range: &'static str,
    pub value: String,
}

impl SamplingParams {
    /// Checks every setting's range.
    pub fn validate(&self) -> std::result::Result<(), InvalidSampling> {
        let bad = |name, range, value: String| Err(InvalidSampling { name, range, value });
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "a number >= 0", self.temperature.to_string());
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return bad("top-p", "in (0, 1]", p.to_string());
        }
        if let Some(p) = self.min_p.filter(|p| !(*p >= 0.0 && *p < 1.0)) {
            return bad("min-p", "in [0, 1)", p.to_string());
        }
        if self.top_k == Some(0) {
            return bad("top-k", "at least 1", "0".into());
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition-penalty",
                "a positive number",
                self.repetition_penalty.to_string(),
            );
        }
        Ok(())
    }

    fn sampling(&self) -> Sampling {
        let temperature = self.temperature;
        if temperature <= 0.0 {
            return Sampling::ArgMax;
        }
        let p = self.top_p.filter(|p| *p < 1.0);
        match (self.top_k, p) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

/// Picks tokens from logits; the same parameters (seed included) give the same choices.
pub struct Sampler {
    processor: LogitsProcessor,
    params: SamplingParams,
}

impl Sampler {
    /// A sampler seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Self {
            processor: LogitsProcessor::from_sampling(params.seed, params.sampling()),
            params,
        }
    }

    /// The next token for `logits` (`[vocab]`), penalising the tokens in `context`.
    pub fn sample(&mut self, logits: &Tensor, context: &[u32]) -> Result<u32> {
        let penalty = self.params.repetition_penalty;
        let logits = if penalty != 1.0 {
            candle_transformers::utils::apply_repeat_penalty(logits, penalty as f32, context)?
        } else {
            logits.clone()
        };
        match self.params.min_p.filter(|p| *p > 0.0) {
            Some(min_p) => self
                .processor
                .sample_f(&logits, |probs| apply_min_p(probs, min_p as f32)),
            None => self.processor.sample(&logits),
        }
    }
}

/// Min-p: drops tokens whose probability is below `min_p` times the most likely token's.
/// Runs on the temperature-scaled probabilities, before top-k and top-p.
fn apply_min_p(probs: &mut [f32], min_p: f32) {
    let top = probs.iter().copied().fold(0.0f32, f32::max);
    let floor = top * min_p;
    probs
        .iter_mut()
        .filter(|p| **p < floor)
        .for_each(|p| *p = 0.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn params() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            seed: 7,
        }
    }

    #[test]
    fn min_p_keeps_only_likely_tokens() {
        let mut p = vec![0.5, 0.3, 0.1, 0.05, 0.05];
        apply_min_p(&mut p, 0.25);
        assert_eq!(p, [0.5, 0.3, 0.0, 0.0, 0.0]);
        let logits = Tensor::new(&[3.0f32, 2.9, -5.0, -5.0], &Device::Cpu).unwrap();
        let mut s = Sampler::new(SamplingParams {
            min_p: Some(0.5),
            ..params()
        });
        for _ in 0..50 {
            assert!(s.sample(&logits, &[]).unwrap() < 2);
        }
    }

    #[test]
    fn same_seed_same_tokens_and_greedy_is_argmax() {
        let logits = Tensor::new(&[1.0f32, 1.1, 0.9, 1.05], &Device::Cpu).unwrap();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..params() });
            (0..20)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        let mut greedy = Sampler::new(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            ..params()
        });
        // Token 1 is penalised below token 3.
        assert_eq!(greedy.sample(&logits, &[1]).unwrap(), 3);
    }

    #[test]
    fn ranges_are_checked() {
        let bad = SamplingParams {
            top_p: Some(1.5),
            ..params()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "top-p must be in (0, 1], got 1.5"
        );
        assert!(SamplingParams {
            min_p: Some(1.0),
            ..params()
        }
        .validate()
        .is_err());
        assert!(params().validate().is_ok());
    }
}
