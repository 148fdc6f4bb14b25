//! Perplexity evaluation: every token of every document scored exactly once, long documents
//! through a sliding window (the Hugging Face perplexity guide's scheme, without its
//! off-by-one), windows batched across documents.

#![warn(missing_docs)]

mod inputs;
mod metrics;

pub use inputs::{dataset_documents, jsonl_documents, read_documents, InputError};

pub use metrics::{Metrics, Tally};

use candle_core::Tensor;
use model::Llama;

/// Errors from evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The window settings cannot work.
    #[error("invalid window: {0}")]
    Window(String),
    /// The tokenizer failed on a document.
    #[error("cannot tokenize {name}: {message}")]
    Tokenize {
        /// The document's name.
        name: String,
        /// The tokenizer's error.
        message: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A text to score, with the name it is reported under.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The name it is reported under (its file's path).
    pub name: String,
    /// The text to score.
    pub text: String,
}

/// How documents are cut into model inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    /// Tokens per window (at most the model's context).
    pub context: usize,
    /// Tokens each window advances.
    pub stride: usize,
}

impl WindowSpec {
    /// Checks `1 <= stride < context <= max_context`. Windows must overlap by at least one
    /// token: the first token of a window has no context inside it and cannot be scored.
    pub fn new(context: usize, stride: usize, max_context: usize) -> Result<Self, EvalError> {
        if context < 2 || context > max_context {
            return Err(EvalError::Window(format!(
                "context {context} must be between 2 and the model's {max_context} positions"
            )));
        }
        if stride == 0 || stride >= context {
            return Err(EvalError::Window(format!(
                "stride {stride} must be between 1 and context - 1 ({}): windows must overlap \
                 or the first token of each would go unscored",
                context - 1
            )));
        }
        Ok(Self { context, stride })
    }
}

/// One model input: tokens `begin..end` of a document, scoring the targets `score_from..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Index of the window's first token in the document.
    pub begin: usize,
    /// Index one past the window's last token.
    pub end: usize,
    /// Index of the first token scored as a target; the tokens before it are context only.
    pub score_from: usize,
}

/// The windows over a document of `n` tokens. Windows start every `stride` tokens; each scores
/// only the tokens the previous one did not reach, so every token but the first (which has no
/// context) is scored once. The last window is the first that reaches `n`.
pub fn windows(n: usize, spec: WindowSpec) -> Vec<Window> {
    let mut out = Vec::new();
    if n < 2 {
        return out;
    }
    let mut prev_end = 1;
    for begin in (0..n).step_by(spec.stride) {
        let end = (begin + spec.context).min(n);
        if end > prev_end {
            out.push(Window {
                begin,
                end,
                score_from: prev_end,
            });
            prev_end = end;
        }
        if end == n {
            break;
        }
    }
    out
}

/// Work done by one batch, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Windows in this batch.
    pub windows: usize,
    /// Tokens run in this batch.
    pub tokens: usize,
    /// Windows in the whole evaluation.
    pub total_windows: usize,
}

/// The scores of one document.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentScore {
    /// The document's name.
    pub name: String,
    /// Its scored tokens' negative log-likelihoods, summed, with the bytes they cover.
    pub tally: Tally,
}

/// A document as token ids, with the UTF-8 bytes its scored tokens cover.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedDocument {
    /// The name it is reported under.
    pub name: String,
    /// Token ids, no special tokens added.
    pub ids: Vec<u32>,
    /// UTF-8 bytes of text the scored tokens cover, for bits per byte.
    pub bytes: u64,
    /// Which tokens are scored as prediction targets; `None`: all but the first (which has no
    /// context). A fine-tuning example scores only its completion or assistant turns.
    pub scored: Option<Vec<bool>>,
}

/// Tokenizes documents the way they are scored: no special tokens added.
pub fn tokenize(
    tokenizer: &tokenizers::Tokenizer,
    documents: &[Document],
) -> Result<Vec<TokenizedDocument>, EvalError> {
    documents
        .iter()
        .map(|d| {
            let encoding =
                tokenizer
                    .encode(d.text.as_str(), false)
                    .map_err(|e| EvalError::Tokenize {
                        name: d.name.clone(),
                        message: e.to_string(),
                    })?;
            let bytes = match encoding.get_offsets() {
                [first, _, ..] => d.text.len().saturating_sub(first.1) as u64,
                _ => 0,
            };
            Ok(TokenizedDocument {
                name: d.name.clone(),
                ids: encoding.get_ids().to_vec(),
                bytes,
                scored: None,
            })
        })
        .collect()
}

/// Scores documents with one model.
pub struct Evaluator<'a> {
    /// The model to score with.
    pub model: &'a Llama,
    /// How documents are cut into windows.
    pub spec: WindowSpec,
    /// Windows per forward pass.
    pub batch_size: usize,
}

impl Evaluator<'_> {
    /// Scores every document. After each batch `progress` gets the windows and tokens just
    /// done and the total number of windows.
    pub fn evaluate(
        &self,
        documents: &[TokenizedDocument],
        mut progress: impl FnMut(Progress),
    ) -> Result<Vec<DocumentScore>, EvalError> {
        let mut scores: Vec<DocumentScore> = documents
            .iter()
            .map(|d| {
                let mut tally = Tally::default();
                tally.add_bytes(d.bytes);
                DocumentScore {
                    name: d.name.clone(),
                    tally,
                }
            })
            .collect();
        let jobs: Vec<(usize, Window)> = documents
            .iter()
            .enumerate()
            .flat_map(|(i, d)| {
                windows(d.ids.len(), self.spec)
                    .into_iter()
                    .map(move |w| (i, w))
            })
            .collect();
        for batch in jobs.chunks(self.batch_size.max(1)) {
            let inputs: Vec<&[u32]> = batch
                .iter()
                .map(|(d, w)| &documents[*d].ids[w.begin..w.end])
                .collect();
            let nll = self.token_nlls(&inputs)?;
            for ((d, w), row) in batch.iter().zip(&nll) {
                let scored = documents[*d].scored.as_deref();
                for pos in w.score_from..w.end {
                    if scored.is_some_and(|s| !s[pos]) {
                        continue;
                    }
                    // Logits at offset i predict the token at begin + i + 1.
                    scores[*d].tally.add_token(row[pos - 1 - w.begin] as f64);
                }
            }
            progress(Progress {
                windows: batch.len(),
                tokens: inputs.iter().map(|w| w.len()).sum(),
                total_windows: jobs.len(),
            });
        }
        Ok(scores)
    }

    /// Runs windows (right-padded to one length) and returns, per window, the NLL of each
    /// next token: entry `i` is the NLL of token `i + 1` given tokens `0..=i`.
    fn token_nlls(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>, EvalError> {
        let len = inputs.iter().map(|w| w.len()).max().unwrap_or(0);
        let device = self.model.device();
        let mut ids = Vec::with_capacity(inputs.len() * len);
        let mut targets = Vec::with_capacity(inputs.len() * len);
        for w in inputs {
            // Padding on the right never affects earlier positions under a causal mask.
            ids.extend(w.iter().copied().chain(std::iter::repeat(0)).take(len));
            targets.extend(w[1..].iter().copied().chain(std::iter::repeat(0)).take(len));
        }
        let ids = Tensor::from_vec(ids, (inputs.len(), len), device)?;
        let targets = Tensor::from_vec(targets, inputs.len() * len, device)?;
        let logits = self.model.forward(&ids, None)?.flatten_to(1)?;
        let nll = ops::token_nll(&logits, &targets)?
            .to_dtype(candle_core::DType::F32)?
            .reshape((inputs.len(), len))?;
        Ok(nll.to_vec2::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(context: usize, stride: usize) -> WindowSpec {
        WindowSpec::new(context, stride, 1024).unwrap()
    }

    #[test]
    fn sliding_windows_match_the_fixture_layout() {
        let w = windows(122, spec(32, 16));
        let begins: Vec<usize> = w.iter().map(|w| w.begin).collect();
        assert_eq!(begins, [0, 16, 32, 48, 64, 80, 96]);
        let scored: Vec<usize> = w.iter().map(|w| w.end - w.score_from).collect();
        assert_eq!(scored, [31, 16, 16, 16, 16, 16, 10]);
        assert_eq!(w.last().unwrap().end, 122);
    }

    #[test]
    fn every_token_but_the_first_is_scored_once() {
        for (n, c, s) in [
            (1, 4, 2),
            (2, 4, 2),
            (5, 4, 3),
            (9, 4, 1),
            (100, 7, 3),
            (6, 6, 5),
        ] {
            let mut count = vec![0; n];
            for w in windows(n, spec(c, s)) {
                assert!(w.end - w.begin <= c && w.score_from > w.begin);
                (w.score_from..w.end).for_each(|i| count[i] += 1);
            }
            let expected: Vec<usize> = (0..n).map(|i| usize::from(i > 0)).collect();
            assert_eq!(count, expected, "n={n} context={c} stride={s}");
        }
    }

    #[test]
    fn bad_windows_are_rejected() {
        assert!(WindowSpec::new(32, 0, 128).is_err());
        assert!(WindowSpec::new(32, 32, 128).is_err());
        assert!(WindowSpec::new(256, 16, 128).is_err());
        assert!(WindowSpec::new(1, 1, 128).is_err());
    }
}
