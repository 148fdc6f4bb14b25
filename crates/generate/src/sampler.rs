//! Choosing the next token: repetition penalty, temperature, min-p, top-k and top-p, drawn from
//! a seeded `StdRng`. The draws are those candle-transformers' `LogitsProcessor` made (the same
//! `WeightedIndex` over the same candidates in the same order, the probabilities computed on the
//! CPU as it computed them there), so a seed gives the tokens it gave before llmtool dropped that
//! crate. (It took the softmax of GPU logits on the GPU: there a draw decided by a probability's
//! last bit can differ.)

use candle_core::{DType, Device, Error, Result, Tensor, D};
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (at least 1); `None` keeps all.
    pub top_k: Option<usize>,
    /// In (0, 1].
    pub top_p: Option<f64>,
    /// In [0, 1).
    pub min_p: Option<f64>,
    /// 1 disables; above 1 discourages tokens already in the context.
    pub repetition_penalty: f64,
    /// Seed of the sampler's random draws: the same seed gives the same tokens.
    pub seed: u64,
}

/// A sampling setting out of range.
#[derive(Debug, thiserror::Error)]
#[error("{name} must be {range}, got {value}")]
pub struct InvalidSampling {
    /// The setting, as its command-line flag names it (`top-p`).
    pub name: &'static str,
    /// The values it accepts, e.g. `in (0, 1]`.
    pub range: &'static str,
    /// The value given.
    pub value: String,
}

impl SamplingParams {
    /// Whether the token is the argmax of the logits as the model gives them: greedy with no
    /// repetition penalty. The decode loop then takes it on the device and reads back one id
    /// per row rather than the whole vocabulary's logits.
    pub fn is_plain_argmax(&self) -> bool {
        self.temperature <= 0.0 && self.repetition_penalty == 1.0
    }

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

    /// The next token for one position's `logits` (one per vocabulary entry, read off the
    /// device), penalising the tokens in `context`. The probabilities are computed on the CPU
    /// in f32, in one buffer ([`ops::softmax_in_place`]).
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Result<u32> {
        let mut probs = logits.to_vec();
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            apply_repeat_penalty(&mut probs, penalty as f32, context);
        }
        let vocab = probs.len();
        let temperature = self.params.temperature;
        if temperature <= 0.0 {
            let logits = Tensor::from_vec(probs, vocab, &Device::Cpu)?;
            return logits.argmax(D::Minus1)?.to_scalar::<u32>();
        }
        ops::softmax_in_place(&mut probs, (1.0 / temperature) as f32);
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
                let nucleus = top_p.map(|p| apply_top_p(&probs, p));
                Ok(self.draw(&probs, nucleus.as_deref())? as u32)
            }
            Some(k) => {
                // The k most likely tokens (in `select_nth_unstable_by`'s order), then top-p
                // among them if it would drop any.
                let mut order: Vec<usize> = (0..vocab).collect();
                let (top, _, _) =
                    order.select_nth_unstable_by(k, |&i, &j| probs[j].total_cmp(&probs[i]));
                let kept: Vec<f32> = top.iter().map(|&i| probs[i]).collect();
                let top_p = top_p.filter(|p| *p < kept.iter().sum::<f32>());
                let nucleus = top_p.map(|p| apply_top_p(&kept, p));
                let index = self.draw(&kept, nucleus.as_deref())?;
                Ok(top[index] as u32)
            }
        }
    }

    /// One draw of an index with probability proportional to `weights`, among the indices
    /// `among` (ascending) where every other weight counts as zero. `WeightedIndex` is built
    /// over those alone: a zero weight is never drawn and adds nothing to the running sums it
    /// builds, so the sums at the other indices, their total, the random number drawn and the
    /// index it lands on are those of a draw over all of `weights` with the others zeroed
    /// (what the sampler drew before; a nucleus is often a few tokens of 128K).
    fn draw(&mut self, weights: &[f32], among: Option<&[usize]>) -> Result<usize> {
        let Some(among) = among else {
            let distribution = WeightedIndex::new(weights).map_err(Error::wrap)?;
            return Ok(distribution.sample(&mut self.rng));
        };
        let distribution =
            WeightedIndex::new(among.iter().map(|&i| weights[i])).map_err(Error::wrap)?;
        Ok(among[distribution.sample(&mut self.rng)])
    }
}

/// One row's draw for [`sample_rows`]: its sampler, its logits and the context its repetition
/// penalty looks at.
pub type RowDraw<'a> = (&'a mut Sampler, &'a [f32], &'a [u32]);

/// The next token of each row of a batch (`None` where the row draws nothing), the rows drawn
/// in parallel on the CPU's threads ([`Sampler::sample`] each). Every row's draw is its own
/// sampler's, so the tokens are those of drawing the rows one after another; a batch of
/// samples of a 128K vocabulary drew one row after another in as many times one row's 0.4–2
/// ms, against a GPU step of about 1 ms. A lone draw stays on the calling thread.
pub fn sample_rows(rows: Vec<Option<RowDraw<'_>>>) -> Result<Vec<Option<u32>>> {
    use rayon::prelude::*;
    let draw = |row: Option<RowDraw>| {
        row.map(|(sampler, logits, context)| sampler.sample(logits, context))
            .transpose()
    };
    match rows.iter().flatten().nth(1) {
        None => rows.into_iter().map(draw).collect(),
        Some(_) => rows.into_par_iter().map(draw).collect(),
    }
}

/// [`sample_rows`] over `logits` `[rows, vocab]` as a decoder gives them (any dtype, any
/// device: read back once, in f32), each row with its sampler and the context its repetition
/// penalty looks at (`None` where the row draws nothing).
pub fn sample_logits(
    logits: &Tensor,
    rows: Vec<Option<(&mut Sampler, &[u32])>>,
) -> Result<Vec<Option<u32>>> {
    let row_logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let draws = rows
        .into_iter()
        .zip(&row_logits)
        .map(|(row, logits)| row.map(|(sampler, context)| (sampler, logits.as_slice(), context)))
        .collect();
    sample_rows(draws)
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

/// Top-p (nucleus): the ids, ascending, of the most likely tokens until their probabilities
/// sum to `p` (not renormalised; the draw weighs them), ties in probability going to the lower
/// id: what a stable sort of every id by descending probability keeps, bit for bit. Only the
/// likeliest tokens' probabilities are sorted, and only the values: one pass sums the
/// probabilities by binary exponent and mantissa's top bits, and the tokens of the buckets that
/// hold `p` (with room for rounding) come first in the full order, so their values are the ones
/// sorted (sorting a 128K vocabulary's ids took 5 ms a token). Where that is most of the
/// vocabulary (a flat distribution), or should the candidates' sum fall short after all,
/// every token's value is sorted.
fn apply_top_p(probs: &[f32], p: f32) -> Vec<usize> {
    let n = probs.len();
    // The nucleus holds at least p / max tokens.
    let max = probs.iter().copied().fold(0.0f32, f32::max);
    let mut ids: Vec<usize> = if (p / max) as usize > n / 4 {
        (0..n).collect()
    } else {
        // Probabilities are not negative: their bits order as their values do.
        const SHIFT: u32 = 19;
        let bucket = |x: f32| (x.to_bits() >> SHIFT) as usize;
        let mut mass = vec![0f64; (u32::MAX >> SHIFT) as usize + 1];
        for &x in probs.iter() {
            mass[bucket(x)] += f64::from(x);
        }
        let mut total = 0.0;
        let from = (0..mass.len())
            .rev()
            .find(|&b| {
                total += mass[b];
                total >= f64::from(p) + 1e-3
            })
            .unwrap_or(0);
        (0..n).filter(|&i| bucket(probs[i]) >= from).collect()
    };
    loop {
        match nucleus_end(probs, &ids, p) {
            Some(end) => return nucleus_ids(probs, ids, end),
            // Every token together falls short of p: all are kept.
            None if ids.len() == n => return ids,
            None => ids = (0..n).collect(),
        }
    }
}

/// `x`'s place in `f32::total_cmp`'s order, as an unsigned integer (negatives' bits
/// inverted, the sign bit set on the others).
fn total_order(x: f32) -> u32 {
    let bits = x.to_bits();
    match bits >> 31 {
        1 => !bits,
        _ => bits | 1 << 31,
    }
}

/// Where the nucleus ends among the tokens `ids` (every token, or candidates that come first
/// in the full order): the last kept probability's [`total_order`] and how many of the tokens
/// with exactly that probability are kept (the lowest ids), or `None` if their sum never
/// reaches `p`. The running sum adds the probabilities in descending order, as a stable sort of
/// the ids gives them, and tied values add alike in any order: the values alone are sorted.
fn nucleus_end(probs: &[f32], ids: &[usize], p: f32) -> Option<(u32, usize)> {
    let mut keys: Vec<u32> = ids.iter().map(|&i| total_order(probs[i])).collect();
    keys.sort_unstable_by(|a, b| b.cmp(a));
    let mut total = 0.0;
    let kept = keys.iter().position(|&key| {
        let past = total >= p;
        total += from_total_order(key);
        past
    })?;
    let last = keys[kept - 1];
    let tied = keys[..kept]
        .iter()
        .rev()
        .take_while(|&&key| key == last)
        .count();
    Some((last, tied))
}

/// The f32 whose [`total_order`] is `key`.
fn from_total_order(key: u32) -> f32 {
    f32::from_bits(match key >> 31 {
        1 => key & !(1 << 31),
        _ => !key,
    })
}

/// The nucleus's ids among `ids` (ascending), given where it ends ([`nucleus_end`]): the more
/// likely tokens, and the first `tied` of those as likely as the last one kept.
fn nucleus_ids(probs: &[f32], ids: Vec<usize>, (last, tied): (u32, usize)) -> Vec<usize> {
    let mut ties = 0;
    ids.into_iter()
        .filter(|&i| match total_order(probs[i]).cmp(&last) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => {
                ties += 1;
                ties <= tied
            }
            std::cmp::Ordering::Less => false,
        })
        .collect()
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
    use rand::Rng;

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
        let logits = [3.0f32, 2.9, -5.0, -5.0];
        let mut s = Sampler::new(SamplingParams {
            min_p: Some(0.5),
            ..params()
        });
        for _ in 0..50 {
            assert!(s.sample(&logits, &[]).unwrap() < 2);
        }
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_choice() {
        let logits = [1.0f32, 1.1, 0.9, 1.05];
        let mut greedy = Sampler::new(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            ..params()
        });
        // Token 1 is penalised below token 3.
        assert_eq!(greedy.sample(&logits, &[1]).unwrap(), 3);
        assert_eq!(greedy.sample(&logits, &[]).unwrap(), 1);
    }

    /// Logits whose softmax at temperature 1 is `probs`.
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn draws(params: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params);
        (0..n).map(|_| s.sample(logits, &[]).unwrap()).collect()
    }

    #[test]
    fn temperature_zero_is_argmax_whatever_the_other_settings() {
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..20 {
            let values: Vec<f32> = (0..50).map(|_| rng.random_range(-4.0..4.0)).collect();
            let best = (0..values.len())
                .max_by(|&i, &j| values[i].total_cmp(&values[j]))
                .unwrap() as u32;
            let greedy = SamplingParams {
                temperature: 0.0,
                top_k: Some(3),
                top_p: Some(0.5),
                min_p: Some(0.2),
                ..params()
            };
            assert!(draws(greedy, &values, 5).iter().all(|&t| t == best));
        }
    }

    /// The decode loop takes `ops::argmax` of the logits where `is_plain_argmax` holds: that
    /// must be the token the sampler picks, ties (to the lowest index) included.
    #[test]
    fn plain_argmax_is_the_greedy_sampler_pick() {
        let mut rng = StdRng::seed_from_u64(9);
        let greedy = SamplingParams {
            temperature: 0.0,
            ..params()
        };
        assert!(greedy.is_plain_argmax());
        let penalised = SamplingParams {
            repetition_penalty: 1.3,
            ..greedy.clone()
        };
        assert!(!penalised.is_plain_argmax() && !params().is_plain_argmax());
        // Values on a coarse grid, so that most rows hold ties for the largest.
        let rows: Vec<Vec<f32>> = (0..20)
            .map(|_| (0..40).map(|_| rng.random_range(0..8) as f32).collect())
            .collect();
        let logits = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
        let argmax = ops::argmax(&logits).unwrap().to_vec1::<u32>().unwrap();
        for (row, want) in rows.iter().zip(argmax) {
            assert_eq!(draws(greedy.clone(), row, 1), vec![want]);
        }
    }

    #[test]
    fn top_k_and_top_p_never_pick_excluded_tokens() {
        // Sorted probabilities 0.4, 0.3, 0.15, 0.1, 0.05 at tokens 2, 0, 4, 1, 3.
        let logits = logits_of(&[0.3, 0.1, 0.4, 0.05, 0.15]);
        let only = |params: SamplingParams, allowed: &[u32]| {
            let got = draws(params, &logits, 2000);
            assert!(got.iter().all(|t| allowed.contains(t)), "{got:?}");
            // Every allowed token does come up.
            assert!(allowed.iter().all(|t| got.contains(t)), "{allowed:?}");
        };
        only(
            SamplingParams {
                top_k: Some(1),
                ..params()
            },
            &[2],
        );
        only(
            SamplingParams {
                top_k: Some(3),
                ..params()
            },
            &[2, 0, 4],
        );
        // Tokens are kept until the kept mass reaches p: 0.4 < 0.6, then 0.7 >= 0.6.
        only(
            SamplingParams {
                top_p: Some(0.6),
                ..params()
            },
            &[2, 0],
        );
        only(
            SamplingParams {
                top_p: Some(0.75),
                ..params()
            },
            &[2, 0, 4],
        );
        only(
            SamplingParams {
                top_k: Some(3),
                top_p: Some(0.5),
                ..params()
            },
            &[2, 0],
        );
        // min-p 0.3: below 0.3 * 0.4 = 0.12 is dropped.
        only(
            SamplingParams {
                min_p: Some(0.3),
                ..params()
            },
            &[2, 0, 4],
        );
    }

    /// The probabilities with every token outside [`apply_top_p`]'s nucleus zeroed.
    fn zero_outside_nucleus(probs: &mut [f32], p: f32) {
        let kept: Vec<(usize, f32)> = apply_top_p(probs, p)
            .into_iter()
            .map(|i| (i, probs[i]))
            .collect();
        probs.fill(0.0);
        kept.into_iter().for_each(|(i, prob)| probs[i] = prob);
    }

    /// Top-p by sorting every token stably, as the sampler did before it sorted only the
    /// likeliest: every token outside the nucleus zeroed.
    fn full_sort(probs: &mut [f32], p: f32) {
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

    /// `vocab` logits drawn uniformly from `[0, spread)` and rounded to bf16 (as a bf16
    /// model's are: many ties).
    fn bf16_logits(rng: &mut StdRng, vocab: usize, spread: f32) -> Vec<f32> {
        (0..vocab)
            .map(|_| f32::from_bits((rng.random::<f32>() * spread).to_bits() & 0xffff_0000))
            .collect()
    }

    /// The softmax of [`bf16_logits`].
    fn bf16_softmax(rng: &mut StdRng, vocab: usize, spread: f32) -> Vec<f32> {
        softmax(&bf16_logits(rng, vocab, spread))
    }

    /// `llmtool generate`'s default sampling: temperature 0.8, top-p 0.95.
    fn generate_defaults() -> SamplingParams {
        SamplingParams {
            temperature: 0.8,
            top_p: Some(0.95),
            ..params()
        }
    }

    /// The softmax of `logits`, computed plainly.
    fn softmax(logits: &[f32]) -> Vec<f32> {
        let max = logits.iter().copied().fold(f32::MIN, f32::max);
        let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    }

    /// What top-p costs a token of a 128K vocabulary, against sorting every token, from flat
    /// to peaked distributions: `cargo test --release -p llmtool-generate top_p_cost --
    /// --ignored --nocapture` (a measurement, printed; nothing is asserted of the times).
    #[test]
    #[ignore]
    fn top_p_cost() {
        let mut rng = StdRng::seed_from_u64(1);
        for spread in [0.05, 0.5, 5.0, 20.0, 60.0, 150.0] {
            let probs = bf16_softmax(&mut rng, 128_256, spread);
            let time = |f: fn(&mut [f32], f32)| {
                let start = std::time::Instant::now();
                for _ in 0..20 {
                    f(&mut probs.clone(), 0.95);
                }
                start.elapsed().as_secs_f64() * 1e3 / 20.0
            };
            let (full, kept) = (time(full_sort), time(zero_outside_nucleus));
            let mut nucleus = probs.clone();
            zero_outside_nucleus(&mut nucleus, 0.95);
            let size = nucleus.iter().filter(|p| **p > 0.0).count();
            println!(
                "spread {spread:>5}: nucleus {size:>6} tokens; every token sorted {full:.3} ms, \
                 the likeliest {kept:.3} ms"
            );
        }
    }

    /// `total_order` orders as `f32::total_cmp` and `from_total_order` inverts it.
    #[test]
    fn total_order_is_total_cmp_as_integers() {
        let values = [
            f32::NEG_INFINITY,
            -1.5,
            -0.0,
            0.0,
            f32::from_bits(1),
            1e-30,
            0.25,
            1.0,
            f32::INFINITY,
            f32::NAN,
        ];
        for a in values {
            assert_eq!(from_total_order(total_order(a)).to_bits(), a.to_bits());
            for b in values {
                assert_eq!(
                    total_order(a).cmp(&total_order(b)),
                    a.total_cmp(&b),
                    "{a} {b}"
                );
            }
        }
    }

    /// [`apply_top_p`] keeps what sorting every token gives: probabilities flat and peaked, with
    /// ties, zeros, a nucleus of one token and of all, vocabularies of one token to 128K.
    #[test]
    fn top_p_keeps_the_nucleus_of_the_full_sort() {
        let mut rng = StdRng::seed_from_u64(3);
        for (vocab, spread, levels) in [
            (1, 1.0, 0),
            (7, 1.0, 3),
            (1000, 0.5, 0),
            (1000, 8.0, 4),
            (5000, 30.0, 0),
            (128_256, 3.0, 0),
            (128_256, 12.0, 16),
        ] {
            let logits: Vec<f32> = (0..vocab)
                .map(|_| {
                    let x: f32 = rng.random::<f32>() * spread;
                    // A few levels give many ties.
                    if levels > 0 {
                        (x * levels as f32).floor()
                    } else {
                        x
                    }
                })
                .collect();
            let mut probs = softmax(&logits);
            probs[vocab / 2] = 0.0;
            for p in [0.05f32, 0.5, 0.9, 0.95, 0.999, 1.0] {
                let (mut got, mut want) = (probs.clone(), probs.clone());
                zero_outside_nucleus(&mut got, p);
                full_sort(&mut want, p);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "vocab {vocab}, spread {spread}, p {p}"
                );
            }
        }
    }

    /// The sampler as it drew before its draws took only the nucleus: top-p by a stable sort
    /// of every token, which zeroes the others, and `WeightedIndex` over every weight (its
    /// probabilities from the same softmax, [`ops::softmax_in_place`]).
    struct OpByOpSampler {
        rng: StdRng,
        params: SamplingParams,
        /// Zeroes the tokens outside the nucleus.
        top_p: fn(&mut [f32], f32),
    }

    impl OpByOpSampler {
        fn new(params: SamplingParams, top_p: fn(&mut [f32], f32)) -> Self {
            let rng = StdRng::seed_from_u64(params.seed);
            Self { rng, params, top_p }
        }

        fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
            let mut values = logits.to_vec();
            if self.params.repetition_penalty != 1.0 {
                let penalty = self.params.repetition_penalty as f32;
                apply_repeat_penalty(&mut values, penalty, context);
            }
            let (vocab, mut probs) = (values.len(), values);
            ops::softmax_in_place(&mut probs, (1.0 / self.params.temperature) as f32);
            if let Some(min_p) = self.params.min_p {
                apply_min_p(&mut probs, min_p as f32);
            }
            let top_p = self.params.top_p.filter(|p| *p < 1.0).map(|p| p as f32);
            let mut draw = |weights: &[f32]| {
                let distribution = WeightedIndex::new(weights).unwrap();
                distribution.sample(&mut self.rng)
            };
            match self.params.top_k.filter(|k| *k < vocab) {
                None => {
                    if let Some(p) = top_p {
                        (self.top_p)(&mut probs, p);
                    }
                    draw(&probs) as u32
                }
                Some(k) => {
                    let mut order: Vec<usize> = (0..vocab).collect();
                    let (top, _, _) =
                        order.select_nth_unstable_by(k, |&i, &j| probs[j].total_cmp(&probs[i]));
                    let mut kept: Vec<f32> = top.iter().map(|&i| probs[i]).collect();
                    if let Some(p) = top_p.filter(|p| *p < kept.iter().sum::<f32>()) {
                        (self.top_p)(&mut kept, p);
                    }
                    top[draw(&kept)] as u32
                }
            }
        }
    }

    /// The sampler draws what it drew with every token sorted for top-p and `WeightedIndex`
    /// over every weight: vocabularies of one token to 128K, flat to peaked bf16-like logits,
    /// an infinite one, every setting, ten seeds of 30 draws each (two for 128K).
    #[test]
    fn draws_equal_the_op_by_op_samplers() {
        let mut rng = StdRng::seed_from_u64(11);
        for (vocab, spread) in [
            (1, 1.0),
            (5, 3.0),
            (1000, 0.5),
            (3000, 30.0),
            (128_256, 20.0),
        ] {
            let mut logits: Vec<f32> = (0..vocab)
                .map(|_| {
                    let x = (rng.random::<f32>() - 0.3) * spread;
                    f32::from_bits(x.to_bits() & 0xffff_0000)
                })
                .collect();
            if vocab > 5 {
                logits[vocab / 2] = f32::NEG_INFINITY;
            }
            let context: Vec<u32> = (0..vocab.min(40) as u32).step_by(3).collect();
            for params in [
                generate_defaults(),
                SamplingParams {
                    top_k: Some(40),
                    top_p: Some(0.9),
                    ..params()
                },
                SamplingParams {
                    temperature: 1.3,
                    min_p: Some(0.05),
                    repetition_penalty: 1.2,
                    ..params()
                },
                SamplingParams {
                    temperature: 0.7,
                    top_p: Some(0.5),
                    top_k: Some(vocab.div_ceil(2)),
                    ..params()
                },
            ] {
                // Each draw of the reference sorts the whole vocabulary.
                let seeds = if vocab > 10_000 { 2 } else { 10 };
                for seed in 0..seeds {
                    let params = SamplingParams {
                        seed,
                        ..params.clone()
                    };
                    let mut sampler = Sampler::new(params.clone());
                    let mut op_by_op = OpByOpSampler::new(params, full_sort);
                    for _ in 0..30 {
                        let want = op_by_op.sample(&logits, &context);
                        assert_eq!(sampler.sample(&logits, &context).unwrap(), want);
                    }
                }
            }
        }
    }

    /// What a token's draw costs with a 128K vocabulary at `generate`'s defaults (temperature
    /// 0.8, top-p 0.95), from flat to peaked logits, against a draw weighing every token (top-p
    /// zeroing the others): `cargo test
    /// --release -p llmtool-generate sample_cost -- --ignored --nocapture` (a measurement,
    /// printed; nothing is asserted of the times).
    #[test]
    #[ignore]
    fn sample_cost() {
        let mut rng = StdRng::seed_from_u64(1);
        let params = generate_defaults();
        for spread in [0.5f32, 5.0, 20.0, 60.0, 150.0] {
            let logits = bf16_logits(&mut rng, 128_256, spread);
            let mut sampler = Sampler::new(params.clone());
            // As the sampler drew before it weighed the nucleus alone.
            let mut op_by_op = OpByOpSampler::new(params.clone(), zero_outside_nucleus);
            let runs = 40;
            let start = std::time::Instant::now();
            (0..runs).for_each(|_| {
                std::hint::black_box(op_by_op.sample(&logits, &[]));
            });
            let before = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
            let start = std::time::Instant::now();
            (0..runs).for_each(|_| {
                std::hint::black_box(sampler.sample(&logits, &[]).unwrap());
            });
            let after = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
            let mut nucleus = logits.clone();
            ops::softmax_in_place(&mut nucleus, (1.0 / 0.8f64) as f32);
            zero_outside_nucleus(&mut nucleus, 0.95);
            let size = nucleus.iter().filter(|p| **p > 0.0).count();
            println!(
                "spread {spread:>5}: nucleus {size:>6} tokens; every token weighed {before:.3} ms \
                 a token, the nucleus {after:.3} ms"
            );
        }
    }

    /// Rows drawn together take the tokens each row's sampler draws alone, in every step: six
    /// rows of a 5,000-token vocabulary, each with its own seed, settings and context (a
    /// penalty), one of them drawing nothing (its sampler not advanced), and every seventh
    /// step only one drawing (on the calling thread).
    #[test]
    fn rows_drawn_together_are_each_rows_own_draws() {
        let mut rng = StdRng::seed_from_u64(3);
        let logits: Vec<Vec<f32>> = (0..6)
            .map(|_| (0..5000).map(|_| rng.random_range(-3.0..3.0)).collect())
            .collect();
        let settings = |row: usize| SamplingParams {
            temperature: 0.5 + 0.2 * row as f64,
            top_p: (row % 2 == 0).then_some(0.9),
            top_k: (row == 3).then_some(40),
            repetition_penalty: if row == 1 { 1.3 } else { 1.0 },
            seed: 11 + row as u64,
            ..params()
        };
        let context: Vec<u32> = (0..200).map(|i| i * 7).collect();
        let mut together: Vec<Sampler> = (0..6).map(|r| Sampler::new(settings(r))).collect();
        let mut alone: Vec<Sampler> = (0..6).map(|r| Sampler::new(settings(r))).collect();
        for step in 0..30 {
            let draws_at = |r: usize| match step % 7 {
                6 => r == 2,
                _ => r != step % 6,
            };
            let draws = together
                .iter_mut()
                .zip(&logits)
                .enumerate()
                .map(|(r, (s, l))| draws_at(r).then_some((s, l.as_slice(), context.as_slice())))
                .collect();
            let got = sample_rows(draws).unwrap();
            let want: Vec<Option<u32>> = alone
                .iter_mut()
                .zip(&logits)
                .enumerate()
                .map(|(r, (s, l))| draws_at(r).then(|| s.sample(l, &context).unwrap()))
                .collect();
            assert_eq!(got, want, "step {step}");
        }
    }

    /// What drawing a batch's rows in parallel saves: eight rows of a 128K vocabulary, flat
    /// to peaked, one after another against [`sample_rows`] on this machine's threads:
    /// `cargo test --release -p llmtool-generate sample_rows_cost -- --ignored --nocapture`
    /// (printed; nothing is asserted of the times).
    #[test]
    #[ignore]
    fn sample_rows_cost() {
        let mut rng = StdRng::seed_from_u64(1);
        let params = generate_defaults();
        for spread in [0.5f32, 20.0, 150.0] {
            let logits: Vec<Vec<f32>> = (0..8)
                .map(|_| bf16_logits(&mut rng, 128_256, spread))
                .collect();
            let mut samplers: Vec<Sampler> = (0..8).map(|_| Sampler::new(params.clone())).collect();
            let runs = 10;
            let start = std::time::Instant::now();
            for _ in 0..runs {
                for (s, l) in samplers.iter_mut().zip(&logits) {
                    std::hint::black_box(s.sample(l, &[]).unwrap());
                }
            }
            let one_by_one = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
            let start = std::time::Instant::now();
            for _ in 0..runs {
                let draws = samplers
                    .iter_mut()
                    .zip(&logits)
                    .map(|(s, l)| Some((s, l.as_slice(), &[][..])))
                    .collect();
                std::hint::black_box(sample_rows(draws).unwrap());
            }
            let together = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
            println!(
                "spread {spread:>5}: 8 rows one after another {one_by_one:.2} ms a step, in \
                 parallel on {} threads {together:.2} ms",
                rayon::current_num_threads()
            );
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits = logits_of(&[0.3, 0.1, 0.4, 0.05, 0.15]);
        for p in [
            params(),
            SamplingParams {
                top_k: Some(3),
                ..params()
            },
            SamplingParams {
                top_p: Some(0.8),
                temperature: 1.5,
                ..params()
            },
        ] {
            let run = |seed| draws(SamplingParams { seed, ..p.clone() }, &logits, 40);
            assert_eq!(run(1), run(1));
            assert_ne!(run(1), run(2));
        }
    }

    #[test]
    fn draws_follow_the_tempered_softmax() {
        let probs = [0.5f32, 0.25, 0.15, 0.1];
        let logits = logits_of(&probs);
        let n = 20_000;
        for temperature in [1.0f64, 2.0, 0.5] {
            // softmax(log p / t) is p^(1/t), normalised.
            let tempered: Vec<f64> = probs
                .iter()
                .map(|p| (*p as f64).powf(1.0 / temperature))
                .collect();
            let total: f64 = tempered.iter().sum();
            let got = draws(
                SamplingParams {
                    temperature,
                    ..params()
                },
                &logits,
                n,
            );
            for (token, p) in tempered.iter().map(|p| p / total).enumerate() {
                let seen = got.iter().filter(|&&t| t == token as u32).count() as f64 / n as f64;
                let sigma = (p * (1.0 - p) / n as f64).sqrt();
                assert!(
                    (seen - p).abs() < 5.0 * sigma,
                    "temperature {temperature}, token {token}: {seen} vs {p}"
                );
            }
        }
    }

    #[test]
    fn repetition_penalty_scales_each_seen_token_once() {
        let mut logits = vec![2.0f32, -2.0, 1.0, 4.0];
        apply_repeat_penalty(&mut logits, 2.0, &[0, 1, 0, 9]);
        assert_eq!(logits, [1.0, -4.0, 1.0, 4.0]);
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
