//! Choosing the next token: repetition penalty, temperature, min-p, top-k and top-p, drawn from
//! a seeded `StdRng`. The draws are those candle-transformers' `LogitsProcessor` made (the same
//! probabilities, the same `WeightedIndex` over the same candidates in the same order), so a seed
//! gives the tokens it gave before llmtool dropped that crate.

use candle_core::{DType, Device, Error, Result, Tensor, D};
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::SeedableRng;

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
}

/// Picks tokens from logits; the same parameters (seed included) give the same choices.
pub struct Sampler {
    rng: StdRng,
    params: SamplingParams,
}

impl Sampler {
    /// A sampler seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
        }
    }

    /// The next token for `logits` (`[vocab]`), penalising the tokens in `context`. The
    /// probabilities are computed on the CPU in f32.
    pub fn sample(&mut self, logits: &Tensor, context: &[u32]) -> Result<u32> {
        let mut values = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            apply_repeat_penalty(&mut values, penalty as f32, context);
        }
        let vocab = values.len();
        let logits = Tensor::from_vec(values, vocab, &Device::Cpu)?;
        let temperature = self.params.temperature;
        if temperature <= 0.0 {
            return logits.argmax(D::Minus1)?.to_scalar::<u32>();
        }
        let mut probs =
            ops::reference::softmax(&(logits / temperature)?, D::Minus1)?.to_vec1::<f32>()?;
        if let Some(min_p) = self.params.min_p.filter(|p| *p > 0.0) {
            apply_min_p(&mut probs, min_p as f32);
        }
        // A top-p of 1 (or out of range) keeps every token.
        let top_p = self
            .params
            .top_p
            .filter(|p| *p > 0.0 && *p < 1.0)
            .map(|p| p as f32);
        match self.params.top_k.filter(|k| *k < vocab) {
            None => {
                if let Some(p) = top_p {
                    apply_top_p(&mut probs, p);
                }
                self.draw(&probs)
            }
            Some(k) => {
                // The k most likely tokens (in `select_nth_unstable_by`'s order), then top-p
                // among them if it would drop any.
                let mut order: Vec<usize> = (0..vocab).collect();
                let (top, _, _) =
                    order.select_nth_unstable_by(k, |&i, &j| probs[j].total_cmp(&probs[i]));
                let mut kept: Vec<f32> = top.iter().map(|&i| probs[i]).collect();
                if let Some(p) = top_p.filter(|p| *p < kept.iter().sum::<f32>()) {
                    apply_top_p(&mut kept, p);
                }
                let index = self.draw(&kept)?;
                Ok(top[index as usize] as u32)
            }
        }
    }

    /// One draw of an index with probability proportional to `weights`.
    fn draw(&mut self, weights: &[f32]) -> Result<u32> {
        let distribution = WeightedIndex::new(weights).map_err(Error::wrap)?;
        Ok(distribution.sample(&mut self.rng) as u32)
    }
}

/// Repetition penalty: each distinct token of `context` has its logit divided by `penalty` if
/// positive, multiplied if negative (tokens past the vocabulary are ignored).
fn apply_repeat_penalty(logits: &mut [f32], penalty: f32, context: &[u32]) {
    let mut seen = std::collections::HashSet::new();
    for &token in context {
        if !seen.insert(token) {
            continue;
        }
        if let Some(logit) = logits.get_mut(token as usize) {
            if *logit >= 0.0 {
                *logit /= penalty
            } else {
                *logit *= penalty
            }
        }
    }
}

/// Top-p (nucleus): keeps the most likely tokens until their probabilities sum to `p`, zeroes
/// the rest (the probabilities are not renormalised; the draw weights them).
fn apply_top_p(probs: &mut [f32], p: f32) {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&i, &j| probs[j].total_cmp(&probs[i]));
    let mut total = 0.0;
    for i in order {
        if total >= p {
            probs[i] = 0.0;
        } else {
            total += probs[i];
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

    /// TEMPORARY: the old implementation, to check the draws match before it is removed.
    fn old(params: &SamplingParams, logits: &Tensor, context: &[u32], n: usize) -> Vec<u32> {
        use candle_transformers::generation::{LogitsProcessor, Sampling};
        let t = params.temperature;
        let sampling = if t <= 0.0 {
            Sampling::ArgMax
        } else {
            match (params.top_k, params.top_p.filter(|p| *p < 1.0)) {
                (None, None) => Sampling::All { temperature: t },
                (Some(k), None) => Sampling::TopK { k, temperature: t },
                (None, Some(p)) => Sampling::TopP { p, temperature: t },
                (Some(k), Some(p)) => Sampling::TopKThenTopP {
                    k,
                    p,
                    temperature: t,
                },
            }
        };
        let mut lp = LogitsProcessor::from_sampling(params.seed, sampling);
        (0..n)
            .map(|_| {
                let l = if params.repetition_penalty != 1.0 {
                    candle_transformers::utils::apply_repeat_penalty(
                        logits,
                        params.repetition_penalty as f32,
                        context,
                    )
                    .unwrap()
                } else {
                    logits.clone()
                };
                match params.min_p.filter(|p| *p > 0.0) {
                    Some(m) => lp.sample_f(&l, |p| apply_min_p(p, m as f32)).unwrap(),
                    None => lp.sample(&l).unwrap(),
                }
            })
            .collect()
    }

    #[test]
    fn same_draws_as_candle_transformers() {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(99);
        let mut checked = 0;
        for vocab in [1usize, 2, 7, 50, 1000] {
            for round in 0..6 {
                let scale = [0.1f32, 1.0, 3.0, 8.0, 20.0, 1.0][round];
                let mut v: Vec<f32> = (0..vocab)
                    .map(|_| rng.random_range(-1.0..1.0) * scale)
                    .collect();
                if round == 5 && vocab > 3 {
                    v[1] = v[0]; // ties
                    v[2] = v[0];
                }
                let logits = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
                let bf = logits.to_dtype(DType::BF16).unwrap();
                let context: Vec<u32> = (0..5)
                    .map(|_| rng.random_range(0..vocab as u32 + 2))
                    .collect();
                for temperature in [0.0, 0.3, 1.0, 1.7] {
                    for top_k in [None, Some(1), Some(3), Some(40), Some(2000)] {
                        for top_p in [None, Some(0.05), Some(0.5), Some(0.9), Some(1.0)] {
                            for min_p in [None, Some(0.0), Some(0.1), Some(0.6)] {
                                for repetition_penalty in [1.0, 1.3, 0.7] {
                                    for seed in [0u64, 1, 12345] {
                                        let p = SamplingParams {
                                            temperature,
                                            top_k,
                                            top_p,
                                            min_p,
                                            repetition_penalty,
                                            seed,
                                        };
                                        for l in [&logits, &bf] {
                                            let want = old(&p, l, &context, 8);
                                            let mut s = Sampler::new(p.clone());
                                            let got: Vec<u32> = (0..8)
                                                .map(|_| s.sample(l, &context).unwrap())
                                                .collect();
                                            assert_eq!(
                                                got, want,
                                                "{p:?} vocab {vocab} round {round}"
                                            );
                                            checked += 1;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        eprintln!("checked {checked} sequences");
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
