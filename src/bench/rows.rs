//! What a benchmark row names: the model preset, the mode (dtype and checkpointing), the task,
//! and the batch settings shared by every row.

use candle_core::DType;
use model::LlamaConfig;
use serde_json::json;

/// A model size of the benchmark, as in torch_ref.py (tied embeddings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 14M parameters.
    Tiny,
    /// 47M parameters.
    Small,
    /// 110M parameters.
    Base,
}

impl Preset {
    /// The name in `--sizes` and in a row's `preset` field.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Base => "base",
        }
    }

    /// The model config for sequences of `seq` tokens.
    pub fn config(self, seq: usize) -> LlamaConfig {
        // hidden, layers, heads, kv_heads, ffn, vocab
        let (h, layers, heads, kv, ffn, vocab) = match self {
            Preset::Tiny => (384, 6, 6, 6, 1024, 8192),
            Preset::Small => (512, 12, 8, 8, 1408, 16384),
            Preset::Base => (768, 12, 12, 12, 2048, 32000),
        };
        serde_json::from_value(json!({
            "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": ffn, "vocab_size": vocab,
            "max_position_embeddings": seq.max(2048), "tie_word_embeddings": true,
        }))
        .expect("every key a preset lacks has a default in LlamaConfig")
    }
}

/// The compute dtype and gradient checkpointing of a row: torch_ref.py's modes (less
/// `torch.compile`), and `fp16`, llmtool's own (it checks and times the f16 kernels;
/// torch_ref.py has no such rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    #[value(name = "fp32")]
    Fp32,
    #[value(name = "bf16")]
    Bf16,
    #[value(name = "fp32+ckpt")]
    Fp32Ckpt,
    #[value(name = "bf16+ckpt")]
    Bf16Ckpt,
    #[value(name = "fp16")]
    Fp16,
}

impl Mode {
    /// The name in `--modes` and in a row's `mode` field.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Fp32 => "fp32",
            Mode::Bf16 => "bf16",
            Mode::Fp32Ckpt => "fp32+ckpt",
            Mode::Bf16Ckpt => "bf16+ckpt",
            Mode::Fp16 => "fp16",
        }
    }

    /// The compute dtype.
    pub fn dtype(self) -> DType {
        match self {
            Mode::Fp32 | Mode::Fp32Ckpt => DType::F32,
            Mode::Bf16 | Mode::Bf16Ckpt => DType::BF16,
            Mode::Fp16 => DType::F16,
        }
    }

    /// Whether training recomputes each block in backward (gradient checkpointing).
    pub fn checkpointed(self) -> bool {
        matches!(self, Mode::Fp32Ckpt | Mode::Bf16Ckpt)
    }
}

/// The tasks `--tasks` names; `lora` runs once per `--lora-base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskName {
    Train,
    Lora,
    Eval,
    Generate,
}

/// What to measure: one of `train`, `lora`, `eval`, `generate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Full training step of every parameter.
    Train,
    /// Training step of a LoRA adapter on q/k/v/o over a base held as the [`LoraBase`] says
    /// (the name `lora` parses with the frozen base).
    Lora(LoraBase),
    /// Forward pass and loss without gradients.
    Eval,
    /// Greedy decoding with the KV cache.
    Generate,
}

impl Task {
    /// The name torch_ref.py uses.
    pub fn name(self) -> &'static str {
        match self {
            Task::Train => "train",
            Task::Lora(_) => "lora",
            Task::Eval => "eval",
            Task::Generate => "generate",
        }
    }
}

/// How the base weights under a `lora` row's adapter are held (`--lora-base`). The trained
/// parameters (the adapter's) and the math are the same either way; what differs is the work
/// and memory spent on gradients nobody uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoraBase {
    /// Plain tensors: every projection goes through [`ops::frozen_linear`], so no weight
    /// gradient is computed or stored (what `llmtool finetune --lora` does).
    Frozen,
    /// Candle `Var`s left out of the optimizer, as naive candle code does: the projections take
    /// the plain-matmul path, and backward computes, and the grad store keeps, the gradient of
    /// every base weight.
    Plain,
}

impl LoraBase {
    /// The name in `--lora-base` and in a row's `lora_base` field.
    pub fn name(self) -> &'static str {
        match self {
            LoraBase::Frozen => "frozen",
            LoraBase::Plain => "plain",
        }
    }
}

/// Batch shape and repetitions shared by every measurement.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Timed steps per row.
    pub steps: usize,
    /// Untimed steps before timing.
    pub warmup: usize,
    /// New tokens per generation run.
    pub gen_tokens: usize,
}
