//! Text generation with a preallocated KV cache: the prompt runs in one forward pass, then one
//! token per step, streamed as complete UTF-8. A [`Session`] keeps its cache between calls, so a
//! prompt that extends the previous one (the next chat turn) only runs its new tokens.

mod sampler;
mod stream;

pub use data::chat::{ChatError, ChatTemplate, Message};
pub use sampler::{InvalidSampling, Sampler, SamplingParams};
pub use stream::{Stop, StopStrings, TextStream};

use candle_core::Tensor;
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
    PromptTooLong { tokens: usize, context: usize },
    /// Nothing to condition on.
    #[error("the prompt is empty and the model has no BOS token to start from")]
    EmptyPrompt,
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
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// End-of-sequence ids: generation stops when one is sampled.
    pub eos: Vec<u32>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Eos,
    StopString,
    MaxTokens,
    /// The model's context is full.
    Context,
}

/// The outcome of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Every sampled token except a final EOS.
    pub tokens: Vec<u32>,
    /// The text streamed out (cut before a stop string).
    pub text: String,
    pub finish: Finish,
    /// Prompt tokens that ran through the model (those already cached did not).
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generation_time: Duration,
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

/// A model, its tokenizer and a KV cache holding the tokens run so far.
pub struct Session<'a> {
    decoder: Decoder<'a>,
    tokenizer: &'a Tokenizer,
    /// The tokens whose keys and values are in the cache, in order.
    cached: Vec<u32>,
}

impl<'a> Session<'a> {
    /// A session whose cache is preallocated for `capacity` positions.
    pub fn new(
        model: &'a Llama,
        tokenizer: &'a Tokenizer,
        capacity: usize,
    ) -> Result<Self, GenerateError> {
        Ok(Self {
            decoder: Decoder::new(model, capacity)?,
            tokenizer,
            cached: Vec::new(),
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
        if !self.cached.is_empty() {
            let cached_text = self
                .tokenizer
                .decode(&self.cached, false)
                .map_err(tokenizer_error)?;
            if let Some(rest) = text.strip_prefix(&cached_text) {
                let mut ids = self.cached.clone();
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
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if prompt.len() >= self.context() {
            return Err(GenerateError::PromptTooLong {
                tokens: prompt.len(),
                context: self.context(),
            });
        }
        let reused = self.reusable_prefix(prompt);
        let start = Instant::now();
        let mut logits = self.run(&prompt[reused..])?;
        let prompt_time = start.elapsed();

        let start = Instant::now();
        let mut sampler = Sampler::new(settings.sampling.clone());
        let mut stream = TextStream::new(self.tokenizer);
        let mut stops = StopStrings::new(&settings.stop);
        let mut context_ids = prompt.to_vec();
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut finish = Finish::MaxTokens;
        let mut emit_text = |piece: &str, text: &mut String| {
            text.push_str(piece);
            emit(piece)
        };
        while tokens.len() < settings.max_tokens {
            let next = sampler.sample(&logits, &context_ids)?;
            if settings.eos.contains(&next) {
                finish = Finish::Eos;
                break;
            }
            tokens.push(next);
            context_ids.push(next);
            let piece = stream.push(next).map_err(tokenizer_error)?;
            match stops.feed(&piece) {
                Stop::Continue(piece) => emit_text(&piece, &mut text)?,
                Stop::Stopped(piece) => {
                    emit_text(&piece, &mut text)?;
                    finish = Finish::StopString;
                    break;
                }
            }
            if tokens.len() == settings.max_tokens {
                break;
            }
            if self.cached.len() >= self.context() {
                finish = Finish::Context;
                break;
            }
            logits = self.run(&[next])?;
        }
        if finish != Finish::StopString {
            let rest = stream.finish().map_err(tokenizer_error)?;
            let rest = match stops.feed(&rest) {
                Stop::Continue(piece) => piece + &stops.finish(),
                Stop::Stopped(piece) => piece,
            };
            emit_text(&rest, &mut text)?;
        }
        Ok(Generation {
            tokens,
            text,
            finish,
            prompt_tokens: prompt.len() - reused,
            prompt_time,
            generation_time: start.elapsed(),
        })
    }

    /// Why one-token steps run op by op rather than replaying a captured CUDA graph, if they
    /// do ([`Decoder::op_by_op_reason`]).
    pub fn op_by_op_reason(&self) -> Option<&str> {
        self.decoder.op_by_op_reason()
    }

    /// How many leading tokens of `prompt` the cache already holds; resets the cache when it
    /// holds anything else. At least one token is always left to run (for its logits).
    fn reusable_prefix(&mut self, prompt: &[u32]) -> usize {
        let usable = self.cached.len() < prompt.len() && prompt.starts_with(&self.cached);
        if !usable {
            self.decoder.reset();
            self.cached.clear();
        }
        self.cached.len()
    }

    /// Runs `ids` after the cached tokens; returns the logits `[vocab]` of the last one.
    ///
    /// With LongRoPE, the step that first takes the sequence past the original context runs
    /// the whole sequence again: the cached keys were rotated with the short factors, and from
    /// there on every position uses the long ones (as transformers' Phi-3 recomputes its cache
    /// at that step).
    fn run(&mut self, ids: &[u32]) -> Result<Tensor, GenerateError> {
        let cached = self.cached.len();
        let switches = self
            .decoder
            .model()
            .config
            .longrope_context()
            .is_some_and(|original| {
                cached > 0 && cached <= original && cached + ids.len() > original
            });
        if switches {
            let all = [self.cached.as_slice(), ids].concat();
            self.decoder.reset();
            self.cached.clear();
            return self.run(&all);
        }
        let logits = self.decoder.forward(ids)?;
        self.cached.extend_from_slice(ids);
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
