//! Text generation with a preallocated KV cache: the prompt runs in one forward pass, then one
//! token per step, streamed as complete UTF-8. Several samples of one prompt decode as one
//! batch: the prompt runs once, each step runs one token of every sample, and each sample draws
//! with its own seeded sampler, so sample `i` is the text a single generation seeded `seed + i`
//! gives. A [`Session`] keeps its cache between calls, so a prompt that extends the previous one
//! (the next chat turn) only runs its new tokens. Each sample's own state (its sampler, text
//! stream, stop strings and end) is a `Continuation` (continuation.rs).
//!
//! Below the session, its tests check batches against single generations,
//! per-row ends and session reuse.

#![warn(missing_docs)]

mod continuation;
mod sampler;
mod stream;

pub use data::chat::{ChatError, ChatTemplate, Message};
pub use sampler::{sample_logits, sample_rows, InvalidSampling, RowDraw, Sampler, SamplingParams};
pub use stream::{Stop, StopStrings, TextStream};

use candle_core::Tensor;
use continuation::{any_active, end_active, next_tokens, take_tokens, Continuation};
use model::{Decoder, Llama, LlamaConfig};
use std::path::Path;
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;

/// Errors during generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The prompt leaves no room to generate.
    #[error(
        "the prompt is {tokens} tokens but the model's context is {context}; shorten it or pass \
         --truncate to keep its last tokens"
    )]
    PromptTooLong {
        /// Tokens in the prompt.
        tokens: usize,
        /// Positions the model supports.
        context: usize,
    },
    /// Nothing to condition on.
    #[error("the prompt is empty and the model has no BOS token to start from")]
    EmptyPrompt,
    /// Zero samples asked for.
    #[error("the number of samples must be at least 1")]
    NoSamples,
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Writing the streamed text failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

fn tokenizer_error(e: tokenizers::Error) -> GenerateError {
    GenerateError::Tokenizer(e.to_string())
}

/// What ends a generation besides `max_tokens`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSettings {
    /// The most new tokens each sample gets.
    pub max_tokens: usize,
    /// The sampling of the first sample; sample `i` of a batch is seeded `seed + i`.
    pub sampling: SamplingParams,
    /// Strings that end a sample when they appear in its text; they are not streamed.
    pub stop: Vec<String>,
    /// End-of-sequence ids: generation stops when one is sampled.
    pub eos: Vec<u32>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token was sampled.
    Eos,
    /// The text reached one of the stop strings.
    StopString,
    /// `max_tokens` tokens were sampled.
    MaxTokens,
    /// The model's context is full.
    Context,
}

/// The outcome of one generation (one sample of a batch).
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Every sampled token except a final EOS.
    pub tokens: Vec<u32>,
    /// The text streamed out (cut before a stop string).
    pub text: String,
    /// Why the sample ended.
    pub finish: Finish,
    /// Prompt tokens that ran through the model (those already cached did not); the samples
    /// of a batch share them.
    pub prompt_tokens: usize,
    /// Time of the prompt's forward pass, which the samples of a batch share.
    pub prompt_time: Duration,
    /// From the end of the prompt to this sample's end (the samples of a batch decode
    /// together, so this is the batch's time until this sample finished).
    pub generation_time: Duration,
}

/// What a generation streams out for one sample, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streamed<'t> {
    /// More text: complete UTF-8, never part of a stop string.
    Text(&'t str),
    /// The sample is done, for this reason: nothing more comes for it.
    Done(Finish),
}

/// The end-of-sequence ids of the model in `dir`: `generation_config.json`'s `eos_token_id`
/// (a number or a list), else `config.json`'s.
pub fn eos_ids(dir: &Path, config: &LlamaConfig) -> Vec<u32> {
    let from_generation_config = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("eos_token_id").cloned())
        .and_then(|v| serde_json::from_value::<model::config::TokenIds>(v).ok());
    from_generation_config
        .or_else(|| config.eos_token_id.clone())
        .map(|ids| ids.to_vec())
        .unwrap_or_default()
}

/// Keeps at most the last `keep` tokens of `ids`.
pub fn keep_tail(ids: &[u32], keep: usize) -> &[u32] {
    &ids[ids.len().saturating_sub(keep)..]
}

/// A model, its tokenizer and a KV cache holding the tokens run so far, for one sequence or a
/// batch of them.
pub struct Session<'a> {
    decoder: Decoder<'a>,
    tokenizer: &'a Tokenizer,
    /// The tokens whose keys and values are in the cache, in order, one list per row.
    cached: Vec<Vec<u32>>,
    /// Greedy steps that may be enqueued before the host reads the oldest's picks, where not
    /// the decoder's choice (2 where it runs ahead, else 1): tests run ahead on the CPU.
    steps_ahead: Option<usize>,
}

impl<'a> Session<'a> {
    /// A session whose cache is preallocated for `capacity` positions (per sample).
    pub fn new(
        model: &'a Llama,
        tokenizer: &'a Tokenizer,
        capacity: usize,
    ) -> Result<Self, GenerateError> {
        Ok(Self {
            decoder: Decoder::new(model, capacity)?,
            tokenizer,
            cached: vec![Vec::new()],
            steps_ahead: None,
        })
    }

    /// The model's context length.
    pub fn context(&self) -> usize {
        self.decoder.model().config.max_position_embeddings
    }

    /// Tokenizes `text` as a continuation of what is cached when it extends the cached text,
    /// so the cached tokens are reused as they are; otherwise tokenizes it whole.
    pub fn continuation_ids(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        let encode = |t: &str| -> Result<Vec<u32>, GenerateError> {
            Ok(self
                .tokenizer
                .encode(t, false)
                .map_err(tokenizer_error)?
                .get_ids()
                .to_vec())
        };
        if let Some(cached) = self.shared_cached().filter(|c| !c.is_empty()) {
            let cached_text = self
                .tokenizer
                .decode(cached, false)
                .map_err(tokenizer_error)?;
            if let Some(rest) = text.strip_prefix(&cached_text) {
                let mut ids = cached.to_vec();
                ids.extend(encode(rest)?);
                return Ok(ids);
            }
        }
        encode(text)
    }

    /// Generates a continuation of `prompt`, passing each piece of text to `emit` as soon as it
    /// is complete. Cached tokens that begin `prompt` are not run again.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        settings: &GenerationSettings,
        mut emit: impl FnMut(&str) -> std::io::Result<()>,
    ) -> Result<Generation, GenerateError> {
        let mut one = self.generate_samples(prompt, settings, 1, |_, streamed| match streamed {
            Streamed::Text(piece) => emit(piece),
            Streamed::Done(_) => Ok(()),
        })?;
        one.pop().ok_or(GenerateError::NoSamples)
    }

    /// Generates `samples` continuations of `prompt` as one batch, sample `i` drawn with the
    /// seed `settings.sampling.seed + i`: the prompt runs once, then every step runs one token
    /// of each sample. `emit` gets each sample's text as soon as it is complete, tagged with the
    /// sample's index, and then its end; samples end independently (a finished one is still
    /// stepped, its tokens ignored, until the last ends: the batch, and a captured step, keep
    /// their shape). Cached tokens that begin `prompt` in every row are not run again.
    pub fn generate_samples(
        &mut self,
        prompt: &[u32],
        settings: &GenerationSettings,
        samples: usize,
        mut emit: impl FnMut(usize, Streamed<'_>) -> std::io::Result<()>,
    ) -> Result<Vec<Generation>, GenerateError> {
        self.check_prompt(prompt)?;
        self.use_rows(samples)?;
        let reused = self.reusable_prefix(prompt);
        let start = Instant::now();
        let logits = self.run(vec![prompt[reused..].to_vec(); samples])?;
        let prompt_time = start.elapsed();

        let mut rows: Vec<Continuation> = (0..samples)
            .map(|i| Continuation::new(self.tokenizer, settings, i, prompt))
            .collect();
        self.decode(&mut rows, logits, settings, &mut emit)?;
        let prompt_tokens = prompt.len() - reused;
        Ok(rows
            .into_iter()
            .map(|r| r.into_generation(prompt_tokens, prompt_time))
            .collect())
    }

    /// Samples each unfinished row from its row of `logits`, then runs the batch one step
    /// further, until every row has ended.
    fn decode(
        &mut self,
        rows: &mut [Continuation],
        mut logits: Tensor,
        settings: &GenerationSettings,
        emit: &mut impl FnMut(usize, Streamed<'_>) -> std::io::Result<()>,
    ) -> Result<(), GenerateError> {
        if settings.max_tokens == 0 {
            end_active(rows, Finish::MaxTokens, emit)?;
        }
        let longrope = self.decoder.model().config.longrope_context().is_some();
        if settings.sampling.is_plain_argmax() && !longrope {
            return self.decode_greedy(rows, &logits, settings, emit);
        }
        while any_active(rows) {
            let next = next_tokens(rows, &logits, &settings.sampling)?;
            take_tokens(rows, next, settings, emit)?;
            if self.decoder.len() >= self.context() {
                end_active(rows, Finish::Context, emit)?;
            } else if any_active(rows) {
                logits = self.run(rows.iter().map(|r| vec![r.last_token()]).collect())?;
            }
        }
        Ok(())
    }

    /// [`Session::decode`] for greedy decoding with no penalty: each step's picks stay on the
    /// device for the next step ([`Decoder::enqueue_greedy`]), and where the decoder runs
    /// ahead of the host, the next step is enqueued before this one's picks are read, so the
    /// device does not wait for the host to stream text between steps. A step run ahead that
    /// turns out not to be wanted (every row ended) is taken back out of the cache. (Not
    /// with LongRoPE, whose switch to the long factors reruns the sequence: [`Session::run`].)
    fn decode_greedy(
        &mut self,
        rows: &mut [Continuation],
        logits: &Tensor,
        settings: &GenerationSettings,
        emit: &mut impl FnMut(usize, Streamed<'_>) -> std::io::Result<()>,
    ) -> Result<(), GenerateError> {
        let ahead = (self.steps_ahead).unwrap_or(if self.decoder.runs_ahead() { 2 } else { 1 });
        let mut picks = ops::argmax(logits)?.to_vec1::<u32>()?;
        take_tokens(rows, picks.iter().copied().map(Some), settings, emit)?;
        // The tokens each enqueued step runs, oldest first: `None` for the picks of the step
        // before it, read when that step's are.
        let mut enqueued: std::collections::VecDeque<Option<Vec<u32>>> = Default::default();
        loop {
            while enqueued.len() < ahead && self.another_step(rows, enqueued.len(), settings) {
                let tokens = enqueued.is_empty().then(|| picks.clone());
                self.decoder.enqueue_greedy(tokens.as_deref())?;
                enqueued.push_back(tokens);
            }
            let Some(tokens) = enqueued.pop_front() else {
                break;
            };
            let ran = tokens.unwrap_or_else(|| picks.clone());
            picks = self.decoder.greedy_picks()?;
            for (cached, token) in self.cached.iter_mut().zip(ran) {
                cached.push(token);
            }
            take_tokens(rows, picks.iter().copied().map(Some), settings, emit)?;
            if !any_active(rows) {
                break;
            }
        }
        if !enqueued.is_empty() {
            self.decoder.drop_unread()?;
        }
        // What else ends a sample here was seen as its tokens were taken.
        end_active(rows, Finish::Context, emit)
    }

    /// Whether a step that runs the picks of the step `ahead` steps after the last one read
    /// can be wanted: some row is still active, will be after taking those picks as far as
    /// `max_tokens` goes, and the cache is not at the model's context.
    fn another_step(
        &self,
        rows: &[Continuation],
        ahead: usize,
        settings: &GenerationSettings,
    ) -> bool {
        self.decoder.len() < self.context()
            && rows
                .iter()
                .any(|r| r.is_active() && r.produced() + ahead < settings.max_tokens)
    }

    /// Why one-token steps run op by op rather than replaying a captured CUDA graph, if they
    /// do ([`Decoder::op_by_op_reason`]).
    pub fn op_by_op_reason(&self) -> Option<&str> {
        self.decoder.op_by_op_reason()
    }

    /// Refuses a prompt that is empty or leaves no room to generate.
    fn check_prompt(&self, prompt: &[u32]) -> Result<(), GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if prompt.len() >= self.context() {
            return Err(GenerateError::PromptTooLong {
                tokens: prompt.len(),
                context: self.context(),
            });
        }
        Ok(())
    }

    /// Decodes `rows` sequences from here on: a new decoder, with an empty cache, when that
    /// is not how many the current one decodes.
    fn use_rows(&mut self, rows: usize) -> Result<(), GenerateError> {
        if rows == 0 {
            return Err(GenerateError::NoSamples);
        }
        if self.decoder.rows() != rows {
            let (model, capacity) = (self.decoder.model(), self.decoder.capacity());
            self.decoder = Decoder::batched(model, capacity, rows)?;
            self.cached = vec![Vec::new(); rows];
        }
        Ok(())
    }

    /// The tokens cached in every row, when all rows hold the same ones.
    fn shared_cached(&self) -> Option<&[u32]> {
        let first = self.cached.first()?;
        self.cached
            .iter()
            .all(|row| row == first)
            .then_some(first.as_slice())
    }

    /// How many leading tokens of `prompt` every row of the cache already holds; resets the
    /// cache when it holds anything else. At least one token is always left to run (for its
    /// logits).
    fn reusable_prefix(&mut self, prompt: &[u32]) -> usize {
        let reusable = self
            .shared_cached()
            .filter(|cached| cached.len() < prompt.len() && prompt.starts_with(cached))
            .map(<[u32]>::len);
        reusable.unwrap_or_else(|| {
            self.reset();
            0
        })
    }

    /// Empties the cache.
    fn reset(&mut self) {
        self.decoder.reset();
        self.cached.iter_mut().for_each(Vec::clear);
    }

    /// Runs `ids[r]` after row `r`'s cached tokens (as many in every row); returns the logits
    /// `[rows, vocab]` of each row's last one.
    ///
    /// With LongRoPE, the step that first takes the sequences past the original context runs
    /// them whole again: the cached keys were rotated with the short factors, and from there
    /// on every position uses the long ones (as transformers' Phi-3 recomputes its cache at
    /// that step).
    fn run(&mut self, ids: Vec<Vec<u32>>) -> Result<Tensor, GenerateError> {
        let cached = self.decoder.len();
        let new = ids.first().map_or(0, Vec::len);
        let switches = self
            .decoder
            .model()
            .config
            .longrope_context()
            .is_some_and(|original| cached > 0 && cached <= original && cached + new > original);
        if switches {
            let whole = self
                .cached
                .iter()
                .zip(ids)
                .map(|(cached, new)| [cached.as_slice(), &new].concat())
                .collect();
            self.reset();
            return self.run(whole);
        }
        let logits = self.decoder.forward_rows(&ids)?;
        for (cached, new) in self.cached.iter_mut().zip(ids) {
            cached.extend(new);
        }
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use model::LoadedModel;

    fn load(name: &str) -> LoadedModel {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name);
        model::load(&dir, DType::F32, &Device::Cpu).unwrap()
    }

    fn settings(max_tokens: usize, sampling: SamplingParams) -> GenerationSettings {
        GenerationSettings {
            max_tokens,
            sampling,
            stop: Vec::new(),
            eos: Vec::new(),
        }
    }

    fn sampling(temperature: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            seed: 11,
        }
    }

    /// The settings the equality tests sweep: filtered draws, a repetition penalty, greedy.
    fn sweep() -> [SamplingParams; 3] {
        [
            SamplingParams {
                top_k: Some(40),
                top_p: Some(0.9),
                min_p: Some(0.02),
                ..sampling(1.1)
            },
            SamplingParams {
                repetition_penalty: 1.3,
                ..sampling(0.9)
            },
            sampling(0.0),
        ]
    }

    /// What a batch streamed: each sample's text and its end, and the order samples ended in.
    #[derive(Default)]
    struct Streams {
        text: Vec<String>,
        done: Vec<Option<Finish>>,
        order: Vec<usize>,
    }

    /// `samples` samples of `prompt` as one batch, what they streamed, and each as a single
    /// generation seeded `seed + i` in a fresh session.
    fn batch_and_singles(
        loaded: &LoadedModel,
        prompt: &[u32],
        settings: &GenerationSettings,
        samples: usize,
    ) -> (Vec<Generation>, Streams, Vec<Generation>) {
        let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
        let capacity = prompt.len() + settings.max_tokens;
        let mut session = Session::new(model, tokenizer, capacity).unwrap();
        let mut streams = Streams {
            text: vec![String::new(); samples],
            done: vec![None; samples],
            order: Vec::new(),
        };
        let batch = session
            .generate_samples(prompt, settings, samples, |i, streamed| {
                assert!(
                    streams.done[i].is_none(),
                    "sample {i} streamed after its end"
                );
                match streamed {
                    Streamed::Text(piece) => streams.text[i].push_str(piece),
                    Streamed::Done(finish) => {
                        streams.done[i] = Some(finish);
                        streams.order.push(i);
                    }
                }
                Ok(())
            })
            .unwrap();
        let singles = (0..samples)
            .map(|i| {
                let mut one = settings.clone();
                one.sampling.seed += i as u64;
                let mut session = Session::new(model, tokenizer, capacity).unwrap();
                session.generate(prompt, &one, |_| Ok(())).unwrap()
            })
            .collect();
        (batch, streams, singles)
    }

    /// Tokens, text and end of each sample; times differ between runs.
    fn outcomes(generations: &[Generation]) -> Vec<(Vec<u32>, String, Finish)> {
        generations
            .iter()
            .map(|g| (g.tokens.clone(), g.text.clone(), g.finish))
            .collect()
    }

    #[test]
    fn samples_of_a_batch_are_single_generations_seeded_seed_plus_i() {
        // Gemma 2 slides a window shorter than the sequence, Phi-3 rotates part of each head,
        // and the LongRoPE fixture switches to its long factors (re-running every row) at 16.
        for name in [
            "tiny-llama",
            "tiny-gemma2",
            "tiny-phi3",
            "tiny-phi3-longrope",
        ] {
            let loaded = load(name);
            let prompt = [5u32, 71, 9, 130, 44, 2, 88, 19, 60, 7];
            for sampling in sweep() {
                for samples in [1, 3] {
                    let settings = settings(14, sampling.clone());
                    let (batch, streams, singles) =
                        batch_and_singles(&loaded, &prompt, &settings, samples);
                    let context = format!("{name}, {sampling:?}, {samples} samples");
                    assert_eq!(outcomes(&batch), outcomes(&singles), "{context}");
                    let texts: Vec<&String> = batch.iter().map(|g| &g.text).collect();
                    assert_eq!(streams.text.iter().collect::<Vec<_>>(), texts, "{context}");
                    let ends: Vec<_> = batch.iter().map(|g| Some(g.finish)).collect();
                    assert_eq!(streams.done, ends, "{context}");
                    assert!(batch.iter().all(|g| g.prompt_tokens == prompt.len()));
                    if sampling.temperature == 0.0 {
                        assert!(
                            batch.iter().all(|g| g.tokens == batch[0].tokens),
                            "{context}"
                        );
                    } else if samples > 1 {
                        assert_ne!(batch[0].tokens, batch[1].tokens, "{context}");
                    }
                }
            }
        }
    }

    #[test]
    fn samples_end_independently_and_stop_streaming() {
        let loaded = load("tiny-llama");
        let prompt = [5u32, 71, 9, 130, 44];
        let free = settings(12, sampling(1.0));
        let (free, _, _) = batch_and_singles(&loaded, &prompt, &free, 3);
        // An end-of-sequence id that sample 1 draws third, and a stop string inside sample 2's
        // text: those two end early, each at its own step.
        let mut ending = settings(12, sampling(1.0));
        ending.eos = vec![free[1].tokens[2]];
        let stop_text = &free[2].text;
        let cut = stop_text.char_indices().nth(4).map_or(0, |(at, _)| at);
        ending.stop = vec![stop_text[cut..].chars().take(2).collect()];
        let (batch, streams, singles) = batch_and_singles(&loaded, &prompt, &ending, 3);
        assert_eq!(outcomes(&batch), outcomes(&singles));
        let finishes: Vec<Finish> = batch.iter().map(|g| g.finish).collect();
        assert_eq!(finishes[1], Finish::Eos, "{finishes:?}");
        assert_eq!(finishes[2], Finish::StopString, "{finishes:?}");
        assert!(batch[1].tokens.len() < 12 && batch[2].tokens.len() < 12);
        // Samples are reported done in the order they ended, an early end before the rest.
        let last = *streams.order.last().unwrap();
        assert!(batch
            .iter()
            .all(|g| g.tokens.len() <= batch[last].tokens.len()));
        assert_eq!(streams.order.len(), 3);
        // No tokens asked for: every sample ends at once, with nothing.
        let none = settings(0, sampling(1.0));
        let (batch, streams, _) = batch_and_singles(&loaded, &prompt, &none, 2);
        assert!(batch
            .iter()
            .all(|g| g.tokens.is_empty() && g.finish == Finish::MaxTokens));
        assert_eq!(streams.order, [0, 1]);
    }

    /// Greedy steps enqueued two ahead of the host (as on CUDA) end samples, stream and leave
    /// the cache as steps one at a time do: at an end-of-sequence id (the step run ahead is
    /// taken back out), a stop string, `max_tokens` and a full context; the next turn then
    /// reuses the same cached tokens.
    #[test]
    fn greedy_steps_run_ahead_end_and_cache_as_steps_one_at_a_time() {
        let loaded = load("tiny-llama");
        let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
        let prompt = [5u32, 71, 9, 130, 44];
        let free = settings(20, sampling(0.0));
        let mut session = Session::new(model, tokenizer, 64).unwrap();
        let free = session.generate(&prompt, &free, |_| Ok(())).unwrap();
        let mut eos = settings(20, sampling(0.0));
        eos.eos = vec![free.tokens[6]];
        let mut stop = settings(20, sampling(0.0));
        let cut = free.text.char_indices().nth(5).map_or(0, |(at, _)| at);
        stop.stop = vec![free.text[cut..].chars().take(2).collect()];
        let context = model.config.max_position_embeddings;
        let max = settings(9, sampling(0.0));
        for (case, settings, finish) in [
            ("eos", eos, Finish::Eos),
            ("stop", stop, Finish::StopString),
            ("max", max, Finish::MaxTokens),
        ] {
            let [one, ahead] = [1, 2].map(|ahead| {
                let mut session = Session::new(model, tokenizer, context).unwrap();
                session.steps_ahead = Some(ahead);
                let mut streamed = String::new();
                let first = session
                    .generate(&prompt, &settings, |piece| {
                        streamed.push_str(piece);
                        Ok(())
                    })
                    .unwrap();
                assert_eq!(streamed, first.text, "{case}, {ahead} ahead");
                let cached = (session.cached.clone(), session.decoder.len());
                let mut turn = session.cached[0].clone();
                turn.extend([12, 40]);
                let second = session.generate(&turn, &settings, |_| Ok(())).unwrap();
                (
                    outcomes(&[first, second.clone()]),
                    cached,
                    second.prompt_tokens,
                )
            });
            assert_eq!(ahead, one, "{case}");
            assert_eq!(one.0[0].2, finish, "{case}");
            assert_eq!(ahead.2, 2, "{case}: the second turn reran cached tokens");
            assert_eq!(ahead.1 .0[0].len(), ahead.1 .1, "{case}");
        }
        assert_eq!(free.finish, Finish::MaxTokens);
        // A context that fills: the tiny Llama holds 128 positions.
        let long = settings(200, sampling(0.0));
        let runs = [1, 2].map(|ahead| {
            let mut session = Session::new(model, tokenizer, context).unwrap();
            session.steps_ahead = Some(ahead);
            let g = session.generate(&prompt, &long, |_| Ok(())).unwrap();
            (outcomes(&[g]), session.decoder.len())
        });
        assert_eq!(runs[0], runs[1]);
        assert_eq!(runs[1].0[0].2, Finish::Context);
    }

    #[test]
    fn a_session_switches_between_batch_sizes_and_reuses_only_shared_rows() {
        let loaded = load("tiny-llama");
        let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
        let prompt = [5u32, 71, 9, 130, 44];
        let settings = settings(6, sampling(1.0));
        let mut session = Session::new(model, tokenizer, 32).unwrap();
        let first = session.generate(&prompt, &settings, |_| Ok(())).unwrap();
        let batch = session
            .generate_samples(&prompt, &settings, 2, |_, _| Ok(()))
            .unwrap();
        assert_eq!(
            outcomes(&batch[..1]),
            outcomes(std::slice::from_ref(&first))
        );
        assert_eq!(batch[0].prompt_tokens, prompt.len());
        // The rows differ now: nothing cached is reused, and the ids of a continuation are
        // tokenized whole.
        assert_eq!(session.continuation_ids("ab").unwrap().len(), 2);
        let again = session.generate(&prompt, &settings, |_| Ok(())).unwrap();
        assert_eq!(outcomes(&[again]), outcomes(&[first]));
        let message = session
            .generate_samples(&prompt, &settings, 0, |_, _| Ok(()))
            .unwrap_err();
        assert!(matches!(message, GenerateError::NoSamples));
    }

    #[test]
    fn eos_comes_from_generation_config_then_config() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
        let mut config = model::io::read_config(&fixture).unwrap();
        config.eos_token_id = Some(model::config::TokenIds::One(5));
        assert_eq!(eos_ids(dir.path(), &config), [5]);
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [1, 2]}"#,
        )
        .unwrap();
        assert_eq!(eos_ids(dir.path(), &config), [1, 2]);
        assert_eq!(keep_tail(&[1, 2, 3], 2), [2, 3]);
    }
}
