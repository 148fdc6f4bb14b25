//! What a benchmark row names: the model preset, the mode (dtype and checkpointing), the task,
//! and the batch settings shared by every row.

use candle_core::DType;
use model::LlamaConfig;
use serde_json::json;

/// A model size of the benchmark, as in torch_ref.py.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 14M parameters.
    Tiny,
    /// 47M parameters.
    Small,
    /// 110M parameters.
    Base,
    /// Llama-3.2-1B's shape (1.24B parameters).
    #[value(name = "1b")]
    OneB,
    /// Llama-3.1-8B's shape (8.03B parameters).
    #[value(name = "8b")]
    EightB,
}

impl Preset {
    /// The name in `--sizes` and in a row's `preset` field.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Base => "base",
            Preset::OneB => "1b",
            Preset::EightB => "8b",
        }
    }

    /// The model config for sequences of `seq` tokens.
    pub fn config(self, seq: usize) -> LlamaConfig {
        // hidden, layers, heads, kv_heads, ffn, vocab, tied, rope_theta
        let (h, layers, heads, kv, ffn, vocab, tied, theta) = match self {
            Preset::Tiny => (384, 6, 6, 6, 1024, 8192, true, 10000.0),
            Preset::Small => (512, 12, 8, 8, 1408, 16384, true, 10000.0),
            Preset::Base => (768, 12, 12, 12, 2048, 32000, true, 10000.0),
            Preset::OneB => (2048, 16, 32, 8, 8192, 128256, true, 500000.0),
            Preset::EightB => (4096, 32, 32, 8, 14336, 128256, false, 500000.0),
        };
        serde_json::from_value(json!({
            "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": ffn, "vocab_size": vocab,
            "max_position_embeddings": seq.max(2048), "tie_word_embeddings": tied,
            "rope_theta": theta,
        }))
        .expect("every key a preset lacks has a default in LlamaConfig")
    }
}

/// The compute dtype and gradient checkpointing of a row: torch_ref.py's modes (less
/// `torch.compile`), and `fp16`, llmtool's own (it checks and times the f16 kernels;
/// torch_ref.py has no such rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// f32 compute.
    #[value(name = "fp32")]
    Fp32,
    /// bf16 compute.
    #[value(name = "bf16")]
    Bf16,
    /// f32 compute with gradient checkpointing.
    #[value(name = "fp32+ckpt")]
    Fp32Ckpt,
    /// bf16 compute with gradient checkpointing.
    #[value(name = "bf16+ckpt")]
    Bf16Ckpt,
    /// f16 compute; llmtool's own mode, with no torch_ref.py row.
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
    /// Full training step of every parameter.
    Train,
    /// Training step of a LoRA adapter, once per `--lora-base`.
    Lora,
    /// Forward pass and loss without gradients.
    Eval,
    /// A `--seq`-token prompt into an empty KV cache, batch 1.
    Prefill,
    /// Greedy decoding with the KV cache.
    Generate,
}

/// What to measure: one of `train`, `lora`, `eval`, `prefill`, `generate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Full training step of every parameter.
    Train,
    /// Training step of a LoRA adapter on q/k/v/o over a base held as the [`LoraBase`] says
    /// (the name `lora` parses with the frozen base).
    Lora(LoraBase),
    /// Forward pass and loss without gradients.
    Eval,
    /// A `--seq`-token prompt into an empty KV cache, batch 1: the cache and the last
    /// position's logits, as generation starts.
    Prefill,
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
            Task::Prefill => "prefill",
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
    /// As [`LoraBase::Frozen`], stored in the mode's compute dtype (bf16 or f16; f32 in fp32
    /// modes) as `lora.base_dtype: bf16` stores it: no cast of the base at each use. The
    /// reference's `--lora-base-dtype bf16`, issue 19's "bf16 base".
    Frozen16,
    /// Candle `Var`s left out of the optimizer, as naive candle code does: the projections take
    /// the plain-matmul path, and backward computes, and the grad store keeps, the gradient of
    /// every base weight.
    Plain,
    /// QLoRA, as `lora.base_dtype: nf4` holds it: the blocks' projections 4-bit NF4, the rest
    /// in the compute dtype.
    Nf4,
}

impl LoraBase {
    /// The name in `--lora-base` and in a row's `lora_base` field.
    pub fn name(self) -> &'static str {
        match self {
            LoraBase::Frozen => "frozen",
            LoraBase::Frozen16 => "frozen16",
            LoraBase::Plain => "plain",
            LoraBase::Nf4 => "nf4",
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
    /// How the generate rows sample: `None` is greedy.
    pub sampling: Option<Sampling>,
    /// The lora rows' adapter.
    pub lora: LoraShape,
}

/// The sampling of sampled generate rows, as `llmtool generate --temperature T --top-p P`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature, above 0.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: Option<f64>,
    /// Samples of the prompt decoded as one batch (seeds 0, 1, ..), at least 1.
    pub samples: usize,
}

impl Sampling {
    /// The parameters of sample `i`'s sampler: no other filter, no penalty, seed `i`.
    pub fn params(&self, i: usize) -> generate::SamplingParams {
        generate::SamplingParams {
            temperature: self.temperature,
            top_k: None,
            top_p: self.top_p,
            min_p: None,
            repetition_penalty: 1.0,
            seed: i as u64,
        }
    }
}

/// The adapter of a `lora` row: rank (alpha twice it, as torch_ref.py), whether it adapts
/// every linear layer of the blocks or q/k/v/o only, and its dropout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraShape {
    /// The adapter's rank; alpha is twice it.
    pub rank: usize,
    /// Adapt every linear layer of the blocks, not only q/k/v/o.
    pub all_linear: bool,
    /// Dropout on the adapter's input (`lora.dropout`); 0, torch_ref.py's default, draws no
    /// masks.
    pub dropout: f64,
}

impl Default for LoraShape {
    /// torch_ref.py's default: r 8 on q/k/v/o.
    fn default() -> Self {
        Self {
            rank: 8,
            all_linear: false,
            dropout: 0.0,
        }
    }
}

impl LoraShape {
    /// The `lora` section of such an adapter.
    pub fn section(self) -> config::LoraSection {
        let targets: &[&str] = match self.all_linear {
            true => &["all-linear"],
            false => &["q_proj", "k_proj", "v_proj", "o_proj"],
        };
        config::LoraSection {
            r: self.rank,
            alpha: 2.0 * self.rank as f64,
            dropout: self.dropout,
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
            ..config::LoraSection::default()
        }
    }

    /// torch_ref.py's `lora_targets` field.
    pub fn targets_name(self) -> &'static str {
        match self.all_linear {
            true => "all",
            false => "q_proj,k_proj,v_proj,o_proj",
        }
    }
}
