//! The configuration schema with its defaults. Every key here is documented in docs/config.md;
//! a test checks that the two agree.

use super::numbers::{count, fraction, non_negative, optional_count, positive, whole};
use super::vocab::VocabSize;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A whole resolved configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Model shape, or the pretrained model to start from.
    pub model: ModelSection,
    /// Where the markdown comes from and how it is cleaned, split and tokenized.
    pub data: DataSection,
    /// Optimizer, schedule, batch and checkpoint settings.
    pub training: TrainingSection,
    /// LoRA adapter settings for `finetune --lora`.
    pub lora: LoraSection,
    /// Perplexity evaluation settings.
    pub eval: EvalSection,
    /// Sampling settings for `generate`.
    pub generate: GenerateSection,
    /// Where results are written.
    pub output: OutputSection,
}

/// The `model` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A Hugging Face model directory or hub id to start from; its `config.json` then decides
    /// the shape and the shape keys below are ignored.
    pub pretrained: Option<String>,
    /// Width of the residual stream; divisible by `num_attention_heads`, with an even head size.
    #[serde(deserialize_with = "count")]
    pub hidden_size: usize,
    /// Number of transformer blocks.
    #[serde(deserialize_with = "count")]
    pub num_hidden_layers: usize,
    /// Query heads per attention layer.
    #[serde(deserialize_with = "count")]
    pub num_attention_heads: usize,
    /// Key/value heads; must divide `num_attention_heads` (fewer is grouped-query attention).
    #[serde(deserialize_with = "count")]
    pub num_key_value_heads: usize,
    /// Width of the SwiGLU feed-forward layer.
    #[serde(deserialize_with = "count")]
    pub intermediate_size: usize,
    /// Token embeddings: `auto` (the trained tokenizer's size) or a number.
    pub vocab_size: VocabSize,
    /// Longest sequence in tokens the model supports; `training.seq_len` may not exceed it.
    #[serde(deserialize_with = "count")]
    pub max_position_embeddings: usize,
    /// RoPE base frequency.
    #[serde(deserialize_with = "positive")]
    pub rope_theta: f64,
    /// Epsilon added to the mean square in RMSNorm.
    #[serde(deserialize_with = "positive")]
    pub rms_norm_eps: f64,
    /// Share the output head's weights with the token embedding.
    pub tie_word_embeddings: bool,
    /// Standard deviation of the normal initialisation of linear and embedding weights.
    #[serde(deserialize_with = "positive")]
    pub initializer_range: f64,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            pretrained: None,
            hidden_size: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            num_key_value_heads: 8,
            intermediate_size: 1408,
            vocab_size: VocabSize::Auto,
            max_position_embeddings: 1024,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            initializer_range: 0.02,
        }
    }
}

/// What the cleaned documents look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextFormat {
    /// Cleaned markdown: the model learns to write markdown.
    Markdown,
    /// Plain text rendered from the markdown.
    Text,
}

/// What happens to YAML/TOML front matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrontMatter {
    /// Removed.
    Drop,
    /// Removed, but its `title:` becomes the top heading.
    Title,
}

/// What happens to raw HTML blocks (`<script>`/`<style>` are always dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HtmlBlocks {
    /// Kept verbatim.
    Keep,
    /// Removed.
    Drop,
    /// Reduced to their text content.
    Text,
}

/// Keep or drop a kind of content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepOrDrop {
    /// Kept.
    Keep,
    /// Removed.
    Drop,
}

/// How files become documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Chunking {
    /// One document per file.
    File,
    /// One document per heading section, with the heading path prepended.
    Section,
}

/// Which duplicates are removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dedup {
    /// Keep everything.
    None,
    /// Remove documents whose normalized text is identical.
    Exact,
    /// Exact, plus near-duplicates by MinHash over word shingles.
    Near,
}

/// The `data` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Files or folders to read, relative to the working directory.
    pub roots: Vec<PathBuf>,
    /// Glob patterns a file must match (relative to its root).
    pub include: Vec<String>,
    /// Glob patterns that exclude a file.
    pub exclude: Vec<String>,
    /// Whether documents stay cleaned markdown or are rendered as plain text.
    pub format: TextFormat,
    /// What happens to YAML/TOML front matter.
    pub front_matter: FrontMatter,
    /// What happens to raw HTML blocks.
    pub html: HtmlBlocks,
    /// Whether fenced code blocks are kept.
    pub code: KeepOrDrop,
    /// Whether template directives (`{{#include ...}}`, Hugo shortcodes) are kept.
    pub templates: KeepOrDrop,
    /// Keep link URLs (`[text](url)`) instead of only the link text.
    pub link_urls: bool,
    /// One document per file or per heading section.
    pub chunking: Chunking,
    /// Documents shorter than this many characters after cleaning are skipped.
    #[serde(deserialize_with = "whole")]
    pub min_chars: usize,
    /// Longer sections are split at paragraph boundaries; `null` for no limit.
    #[serde(deserialize_with = "optional_count")]
    pub max_chars: Option<usize>,
    /// Which duplicate documents are removed.
    pub dedup: Dedup,
    /// Estimated Jaccard similarity of word shingles above which a document is a near-duplicate, in
    /// [0, 1).
    #[serde(deserialize_with = "fraction")]
    pub near_dup_threshold: f64,
    /// Share of documents in the validation split, picked by document hash, in [0, 1).
    #[serde(deserialize_with = "fraction")]
    pub val_fraction: f64,
    /// Decode invalid UTF-8 with replacement characters instead of skipping the file.
    pub lossy_utf8: bool,
    /// An existing `tokenizer.json`; when unset a byte-level BPE is trained on the corpus.
    pub tokenizer: Option<PathBuf>,
    /// Special tokens of a trained tokenizer; the first one separates documents.
    pub special_tokens: Vec<String>,
    /// Where the built dataset goes; defaults to `<output.dir>/dataset`.
    pub dataset_dir: Option<PathBuf>,
    /// Variables of the chat template when JSONL `messages` are rendered, as keyword arguments
    /// of transformers' `apply_chat_template` (`enable_thinking: false`).
    pub chat_template_args: std::collections::BTreeMap<String, serde_json::Value>,
    /// JSONL fine-tuning examples: several whole examples a row, each attending only to its own
    /// tokens (off: one example a row, padded).
    pub packing: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            roots: vec![PathBuf::from("docs"), PathBuf::from("data")],
            include: vec!["**/*.md".into(), "**/*.markdown".into()],
            exclude: vec![],
            format: TextFormat::Markdown,
            front_matter: FrontMatter::Drop,
            html: HtmlBlocks::Text,
            code: KeepOrDrop::Keep,
            templates: KeepOrDrop::Drop,
            link_urls: false,
            chunking: Chunking::File,
            min_chars: 32,
            max_chars: None,
            dedup: Dedup::Near,
            near_dup_threshold: 0.8,
            val_fraction: 0.05,
            lossy_utf8: false,
            tokenizer: None,
            special_tokens: vec!["<|endoftext|>".into()],
            dataset_dir: None,
            chat_template_args: Default::default(),
            packing: true,
        }
    }
}

impl DataSection {
    /// The dataset directory for a run writing to `output_dir`.
    pub fn dataset_dir(&self, output: &OutputSection) -> PathBuf {
        self.dataset_dir
            .clone()
            .unwrap_or_else(|| output.dir.join("dataset"))
    }
}

/// Learning-rate schedule shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Cosine decay to `min_lr`.
    Cosine,
    /// Linear decay to `min_lr`.
    Linear,
    /// Constant at `lr`.
    Constant,
    /// Warmup-stable-decay: constant, then linear decay over the last `decay_fraction`.
    Wsd,
}

/// Floating-point type used for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16: f32's exponent range with an 8-bit significand.
    Bf16,
    /// 16-bit IEEE half precision.
    F16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// The names the configs use (`f32`, `bf16`, `f16`), for command-line flags.
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            _ => Err(format!("expected f32, bf16 or f16, got `{text}`")),
        }
    }
}

impl Precision {
    /// The candle dtype for this precision.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
        }
    }
}

/// How the frozen base weights of a LoRA fine-tune are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseDtype {
    /// Dense, in f32.
    F32,
    /// Dense, in bfloat16.
    Bf16,
    /// Dense, in IEEE half precision.
    F16,
    /// QLoRA: the blocks' projections as 4-bit NormalFloat (bitsandbytes' NF4 with double
    /// quantization), everything else in the checkpoint's own dtype.
    Nf4,
}

impl BaseDtype {
    /// The candle dtype of a dense base, `None` for NF4.
    pub fn dense(self) -> Option<candle_core::DType> {
        match self {
            Self::F32 => Some(candle_core::DType::F32),
            Self::Bf16 => Some(candle_core::DType::BF16),
            Self::F16 => Some(candle_core::DType::F16),
            Self::Nf4 => None,
        }
    }
}

/// How training windows are drawn from the token stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Random windows, reproducible from the seed and step.
    Random,
    /// Consecutive windows, epoch after epoch.
    Sequential,
}

/// What a non-finite loss or gradient does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop with the step number; the last checkpoint stays intact.
    Stop,
    /// Skip the batch and continue.
    Skip,
}

/// The `training` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSection {
    /// Tokens per training window; at most `model.max_position_embeddings`.
    #[serde(deserialize_with = "count")]
    pub seq_len: usize,
    /// Windows per micro-batch.
    #[serde(deserialize_with = "count")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step, their gradients summed then averaged.
    #[serde(deserialize_with = "count")]
    pub grad_accum: usize,
    /// Optimizer steps to run; exactly one of `max_steps`, `epochs`, `max_tokens` is set.
    #[serde(deserialize_with = "optional_count")]
    pub max_steps: Option<usize>,
    /// Passes over the training split, possibly fractional; the alternative to `max_steps`.
    pub epochs: Option<f64>,
    /// Training tokens to consume; the alternative to `max_steps`.
    pub max_tokens: Option<u64>,
    /// Peak learning rate, reached at the end of the warm-up.
    #[serde(deserialize_with = "positive")]
    pub lr: f64,
    /// Learning rate at the end of the decay, at most `lr`.
    #[serde(deserialize_with = "non_negative")]
    pub min_lr: f64,
    /// Steps of linear learning-rate warm-up from 0, below `max_steps`.
    #[serde(deserialize_with = "whole")]
    pub warmup_steps: usize,
    /// Shape of the learning rate after the warm-up.
    pub schedule: ScheduleKind,
    /// With `wsd`: the final share of steps spent decaying, in [0, 1).
    #[serde(deserialize_with = "fraction")]
    pub decay_fraction: f64,
    /// Decoupled AdamW weight decay, not applied to norms, biases and embeddings.
    #[serde(deserialize_with = "non_negative")]
    pub weight_decay: f64,
    /// AdamW first-moment decay, in [0, 1).
    #[serde(deserialize_with = "fraction")]
    pub beta1: f64,
    /// AdamW second-moment decay, in [0, 1).
    #[serde(deserialize_with = "fraction")]
    pub beta2: f64,
    /// AdamW epsilon, added to the square root of the second moment in the update's denominator.
    #[serde(deserialize_with = "positive")]
    pub eps: f64,
    /// Global gradient-norm clipping threshold; 0 disables clipping.
    #[serde(deserialize_with = "non_negative")]
    pub grad_clip: f64,
    /// Compute precision; master weights and optimizer state stay f32.
    pub dtype: Precision,
    /// Recompute each block in the backward pass instead of storing its activations.
    pub grad_checkpoint: bool,
    /// Seeds initialisation, data order and dropout.
    pub seed: u64,
    /// How training windows are drawn.
    pub sampling: Sampling,
    /// Steps between validation passes; the best checkpoint is kept by validation loss.
    #[serde(deserialize_with = "count")]
    pub eval_every: usize,
    /// Validation batches per pass.
    #[serde(deserialize_with = "count")]
    pub eval_batches: usize,
    /// Steps between resumable checkpoints.
    #[serde(deserialize_with = "count")]
    pub save_every: usize,
    /// Steps between lines in `metrics.jsonl`, each logging the mean loss over those steps.
    #[serde(deserialize_with = "count")]
    pub log_every: usize,
    /// What a non-finite loss or gradient does.
    pub on_nan: OnNonFinite,
    /// `auto`, `cpu`, `cuda`, `cuda:N` or `metal`; `--device` overrides it.
    pub device: String,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            seq_len: 256,
            batch_size: 8,
            grad_accum: 1,
            max_steps: Some(1000),
            epochs: None,
            max_tokens: None,
            lr: 6e-4,
            min_lr: 6e-5,
            warmup_steps: 100,
            schedule: ScheduleKind::Cosine,
            decay_fraction: 0.2,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            dtype: Precision::F32,
            grad_checkpoint: false,
            seed: 1337,
            sampling: Sampling::Random,
            eval_every: 100,
            eval_batches: 10,
            save_every: 100,
            log_every: 10,
            on_nan: OnNonFinite::Stop,
            device: "auto".into(),
        }
    }
}

/// The `lora` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// Adapter rank.
    #[serde(deserialize_with = "count")]
    pub r: usize,
    /// Scale numerator: updates are scaled by `alpha / r`, or `alpha / sqrt(r)` with `rslora`.
    #[serde(deserialize_with = "positive")]
    pub alpha: f64,
    /// Dropout probability on the adapter input, in [0, 1).
    #[serde(deserialize_with = "fraction")]
    pub dropout: f64,
    /// Projections to adapt: `q_proj`..`down_proj` (or `q`, `k`, `v`, `o`, `gate`, `up`,
    /// `down`), or `all-linear`.
    pub target_modules: Vec<String>,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
    /// Storage type of the frozen base weights (`nf4`: QLoRA's 4-bit base).
    pub base_dtype: BaseDtype,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            rslora: false,
            base_dtype: BaseDtype::F32,
        }
    }
}

/// The `eval` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Window length in tokens; `null` uses the model's `max_position_embeddings`.
    #[serde(deserialize_with = "optional_count")]
    pub context: Option<usize>,
    /// Tokens the window advances; `null` uses half the context.
    #[serde(deserialize_with = "optional_count")]
    pub stride: Option<usize>,
    /// Windows per forward pass.
    #[serde(deserialize_with = "count")]
    pub batch_size: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            context: None,
            stride: None,
            batch_size: 8,
        }
    }
}

/// The `generate` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateSection {
    /// New tokens to sample.
    #[serde(deserialize_with = "count")]
    pub max_tokens: usize,
    /// 0 means greedy.
    #[serde(deserialize_with = "non_negative")]
    pub temperature: f64,
    /// Keep only the `k` most likely tokens; `null` keeps all.
    #[serde(deserialize_with = "optional_count")]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens with this total probability, in (0, 1].
    pub top_p: Option<f64>,
    /// Drop tokens below `min_p` times the top token's probability, in [0, 1); `null` drops none.
    pub min_p: Option<f64>,
    /// Penalty on tokens already in the context: positive logits are divided by it, negative ones
    /// multiplied; 1 disables it.
    #[serde(deserialize_with = "positive")]
    pub repetition_penalty: f64,
    /// Sampling seed: the same seed gives the same text.
    pub seed: u64,
    /// Strings that end generation.
    pub stop: Vec<String>,
}

impl Default for GenerateSection {
    fn default() -> Self {
        Self {
            max_tokens: 200,
            temperature: 0.8,
            top_k: None,
            top_p: Some(0.95),
            min_p: None,
            repetition_penalty: 1.0,
            seed: 42,
            stop: vec![],
        }
    }
}

/// The `output` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// The run directory.
    pub dir: PathBuf,
    /// Write `loss.svg` at each evaluation and at the end.
    pub plot: bool,
    /// The dtype the saved model's weights are stored in.
    pub dtype: SavedDtype,
}

/// The dtype a saved model's weights are stored in (`output.dtype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SavedDtype {
    /// The base model's dtype when fine-tuning all weights, else f32 (the precision of the
    /// master weights training updates).
    #[default]
    Auto,
    /// Stored as f32.
    F32,
    /// Stored as bfloat16.
    Bf16,
    /// Stored as IEEE half precision.
    F16,
}

impl std::str::FromStr for SavedDtype {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            _ => Err(format!("expected auto, f32, bf16 or f16, got `{text}`")),
        }
    }
}

impl SavedDtype {
    /// The dtype to store, given the base model's (`None` when training from scratch or
    /// when the base names none).
    pub fn resolve(self, base: Option<candle_core::DType>) -> candle_core::DType {
        match self {
            Self::Auto => base.unwrap_or(candle_core::DType::F32),
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
        }
    }
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("runs/small"),
            plot: true,
            dtype: SavedDtype::Auto,
        }
    }
}
