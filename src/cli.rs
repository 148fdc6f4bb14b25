//! Command-line definitions. Each command's help carries a one-line example.

use crate::bench::{LoraBase, Mode, Preset, TaskName};
use clap::{Args, Parser, Subcommand};
use config::DeviceSpec;
use config::Override;
use std::path::PathBuf;

/// Train, fine-tune, evaluate and sample Llama-style language models on your own markdown.
#[derive(Debug, Parser)]
#[command(name = "llmtool", version, about, long_about = None)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// A config file plus `--set` overrides, shared by every command that reads one.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The YAML config file.
    pub config: PathBuf,
    /// Override a key, type-checked like the file (repeatable): --set training.lr=3e-4
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<Override>,
}

/// `llmtool estimate`.
#[derive(Debug, Args)]
pub struct EstimateArgs {
    /// The config file and its overrides.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Plan a LoRA fine-tune of `model.pretrained` (as `finetune --lora`): the base stored as
    /// `lora.base_dtype` (nf4: QLoRA's 4-bit projections), the adapter the only thing trained.
    #[arg(long)]
    pub lora: bool,
}

/// `llmtool train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The YAML config file (optional with --resume: the run's saved config is used).
    pub config: Option<PathBuf>,
    /// Override a key (repeatable): --set training.max_steps=2000
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<Override>,
    /// Continue the run in this directory exactly where its last checkpoint left it.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Start over even if the output directory already holds a run.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// auto, cpu, cuda, cuda:N or metal (overrides training.device).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Save a resumable checkpoint and stop after this many steps (for time-limited jobs).
    #[arg(long, value_name = "N")]
    pub stop_after_steps: Option<u64>,
    /// Data-parallel training over several processes.
    #[command(flatten)]
    pub launch: LaunchArgs,
}

/// Data-parallel training: one process per GPU (or CPU share), as torchrun starts them.
#[derive(Debug, Args, Clone)]
pub struct LaunchArgs {
    /// Train on N GPUs of this machine, one process each, each taking batch_size x grad_accum
    /// windows of every step (a step takes N times one process's windows, as DDP's global
    /// batch). With the CPU as device, N processes share the cores.
    #[arg(
        long,
        visible_alias = "nproc-per-node",
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub gpus: Option<u16>,
    /// Machines in the run: start the same command on each, with its own --node-rank.
    #[arg(long, value_name = "M", default_value_t = 1, requires = "gpus",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub nnodes: u16,
    /// This machine's number, from 0 (machine 0 runs rank 0, which writes the run directory).
    #[arg(long, value_name = "K", default_value_t = 0, requires = "gpus")]
    pub node_rank: u16,
    /// Where rank 0 listens (default 127.0.0.1; machine 0's address with --nnodes).
    #[arg(long, value_name = "HOST", requires = "gpus")]
    pub master_addr: Option<String>,
    /// Rank 0's port (default: a free one on one machine, 29500 with --nnodes).
    #[arg(long, value_name = "PORT", requires = "gpus")]
    pub master_port: Option<u16>,
}

/// `llmtool finetune`.
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// The flags `train` takes (config, overrides, resume, device, force).
    #[command(flatten)]
    pub run: TrainArgs,
    /// Train LoRA adapters (lora.* keys) on the frozen base and write a PEFT adapter
    /// directory; without it every weight is trained and an HF model directory is written.
    #[arg(long)]
    pub lora: bool,
    /// The adapter directory's format: peft (adapter_model.safetensors, for PEFT and
    /// llmtool) or mlx (adapters.safetensors, for mlx-lm's --adapter-path; llmtool reads both).
    #[arg(
        long,
        default_value = "peft",
        value_name = "peft|mlx",
        requires = "lora"
    )]
    pub adapter_format: train::lora::AdapterFormat,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model from scratch on the configured markdown.
    ///
    /// Example: llmtool train configs/small.yaml
    Train(TrainArgs),
    /// Fine-tune a pretrained Hugging Face model (model.pretrained) on the configured data.
    ///
    /// Example: llmtool finetune configs/lora.yaml --lora
    Finetune(FinetuneArgs),
    /// Parameter count and peak training memory of a config, before loading anything.
    ///
    /// Example: llmtool estimate configs/base.yaml --set training.grad_checkpoint=true
    Estimate(EstimateArgs),
    /// Show or check a config file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Measure perplexity and bits per byte of one or more models on text.
    ///
    /// Example: llmtool eval --model runs/small/model --adapter runs/lora/adapter --data notes/ --per-file
    Eval(EvalArgs),
    /// Generate text from a prompt, a file, stdin or a chat.
    ///
    /// Example: llmtool generate --model runs/small/model --prompt "# Getting started" --max-tokens 200
    Generate(GenerateArgs),
    /// Build a token dataset from markdown, or inspect one.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train a byte-level BPE tokenizer on the corpus.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Fold a LoRA adapter into its base model and write a plain Hugging Face model directory.
    ///
    /// The sum `W + scale * B A` is computed in f32; the result loads in llmtool and in
    /// transformers without PEFT.
    ///
    /// Example: llmtool merge --model HuggingFaceTB/SmolLM2-135M --adapter runs/lora/adapter --out runs/merged
    Merge(MergeArgs),
    /// Write a model (with a LoRA adapter merged on the fly) as a GGUF file for llama.cpp and
    /// Ollama, with an Ollama Modelfile beside it.
    ///
    /// Tensor names, layouts, hyperparameters and the tokenizer are written as llama.cpp's
    /// convert_hf_to_gguf.py writes them for Llama/Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and
    /// Phi-3. The file is written beside its destination and renamed into place.
    ///
    /// Example: llmtool export --gguf --model runs/small/model --out runs/small.gguf --quant q8_0
    Export(ExportArgs),
    /// Measure training, LoRA, evaluation and generation throughput on random tokens, with the
    /// shapes, rows and JSON fields of bench/torch_ref.py (PyTorch) so the two compare.
    ///
    /// Example: llmtool bench --device cpu --sizes tiny --batch 8 --seq 256 --steps 3
    Bench(BenchArgs),
}

/// `llmtool bench` arguments (the same flags and defaults as torch_ref.py).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Comma-separated presets: tiny (14M), small (47M), base (110M), 1b (Llama-3.2-1B's
    /// shape), 8b (Llama-3.1-8B's); random weights.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tiny,small")]
    pub sizes: Vec<Preset>,
    /// Comma-separated tasks.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "train,lora,eval,prefill,generate"
    )]
    pub tasks: Vec<TaskName>,
    /// Comma-separated modes [default: fp32 on the CPU, fp32,bf16,bf16+ckpt on GPUs]
    #[arg(long, value_enum, value_delimiter = ',')]
    pub modes: Vec<Mode>,
    /// Comma-separated bases of the lora task, each its own row: frozen (the base's weight
    /// gradients are never computed; stored in f32), frozen16 (the same, stored in the mode's
    /// dtype, as `lora.base_dtype: bf16`), plain (candle vars the optimizer does not get,
    /// whose weight gradients candle computes anyway, as naive candle code does) or nf4
    /// (QLoRA: the projections 4-bit, as `lora.base_dtype: nf4`).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "frozen",
        value_name = "BASES"
    )]
    pub lora_base: Vec<LoraBase>,
    /// The lora rows' rank (alpha is twice it, as in bench/torch_ref.py).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// What the lora rows adapt: qkvo (q/k/v/o) or all (every linear layer of the blocks).
    #[arg(long, value_enum, default_value = "qkvo")]
    pub lora_targets: LoraTargets,
    /// The lora rows' dropout on the adapter input (lora.dropout; bench/torch_ref.py's
    /// --lora-dropout), a mask drawn for every step.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub lora_dropout: f64,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Timed steps per row (generation runs steps / 4 times, at least once).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps before timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Tokens to generate per generation run.
    #[arg(long, default_value_t = 256)]
    pub gen_tokens: usize,
    /// The generate rows sample at this temperature, each step's logits read back and drawn
    /// from on the CPU as `llmtool generate` does (0: greedy, the argmax on the device).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// With --temperature: nucleus sampling mass, in (0, 1].
    #[arg(long, requires = "temperature")]
    pub top_p: Option<f64>,
    /// With --temperature: the generate rows decode N samples of the prompt as one batch, as
    /// `llmtool generate --num-samples N` does (tokens/s counts every sample's tokens).
    #[arg(long, default_value_t = 1, requires = "temperature")]
    pub samples: usize,
    /// Also append each row as a JSON line to FILE.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Time the train and lora rows on several processes, as `train --gpus N` runs them
    /// (--tasks train,lora only).
    #[command(flatten)]
    pub launch: LaunchArgs,
    /// Instead of throughput, check every fused op against its reference on this device
    /// (forward and gradients, per mode's dtype, at the presets' shapes and at edge-case
    /// shapes) and time both; exits non-zero if any op is over its tolerance.
    #[arg(long)]
    pub ops: bool,
}

/// The projections a benchmark's LoRA rows adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoraTargets {
    /// q_proj, k_proj, v_proj and o_proj.
    Qkvo,
    /// Every linear layer of the blocks.
    All,
}

/// Where and how a model runs.
#[derive(Debug, Args)]
pub struct RuntimeArgs {
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Compute precision (weights are converted on load): f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: config::Precision,
    /// Quantize the blocks' projections to 4-bit NF4 as the model loads, as a QLoRA fine-tune
    /// (`lora.base_dtype: nf4`) does: its adapters then see the base they were trained on. A
    /// checkpoint that bitsandbytes quantized loads as NF4 without it.
    #[arg(long)]
    pub nf4: bool,
    /// A config file whose `eval`/`generate` sections give the defaults for unset flags.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// `llmtool eval`
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A model directory (repeatable: one row each in the comparison table).
    #[arg(long = "model", required = true, value_name = "DIR")]
    pub models: Vec<PathBuf>,
    /// A LoRA adapter, PEFT or mlx-lm (repeatable): each model is scored bare and with each
    /// adapter.
    #[arg(long = "adapter", visible_alias = "adapter-path", value_name = "DIR")]
    pub adapters: Vec<PathBuf>,
    /// Files or folders to score: .md/.markdown (cleaned like the data pipeline, with the
    /// config's `data` settings) and .txt (as is); a .jsonl file's examples are scored as
    /// fine-tuning reads them (completions and assistant turns only).
    #[arg(long = "data", num_args = 1.., value_name = "PATH", required_unless_present = "dataset", conflicts_with = "dataset")]
    pub data: Vec<PathBuf>,
    /// A dataset built by `llmtool data build` (its tokenizer must be the model's).
    #[arg(long, value_name = "DIR")]
    pub dataset: Option<PathBuf>,
    /// The dataset split to score.
    #[arg(long, default_value = "val", value_parser = ["val", "train"], requires = "dataset")]
    pub split: String,
    /// Window length in tokens [default: eval.context, else the model's context].
    #[arg(long)]
    pub context: Option<usize>,
    /// Tokens each window advances; must be below the context [default: eval.stride, else half the context].
    #[arg(long)]
    pub stride: Option<usize>,
    /// Windows per forward pass [default: eval.batch_size].
    #[arg(long, value_parser = values::count)]
    pub batch_size: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Add a row per input file.
    #[arg(long)]
    pub per_file: bool,
    /// Where and how the model runs.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `llmtool generate`
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model directory.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A LoRA adapter (PEFT or mlx-lm) applied on top of the model.
    #[arg(long, visible_alias = "adapter-path", value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The prompt text (else --prompt-file, else stdin).
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// New tokens per sample [default: generate.max_tokens].
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Softmax temperature; 0 is greedy [default: generate.temperature].
    #[arg(long, visible_alias = "temp", allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Drop tokens below this fraction of the top token's probability, in [0, 1).
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f64>,
    /// Penalise tokens already in the context (1 disables).
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f64>,
    /// Sampling seed: the same seed gives the same text.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this string appears (repeatable); it is not printed.
    #[arg(long = "stop", value_name = "STR")]
    pub stop: Vec<String>,
    /// Independent samples of the same prompt (seeds seed, seed+1, ...), decoded as one
    /// batch: the prompt runs once, each step runs a token of every sample. Sample i is the
    /// text `--num-samples 1 --seed seed+i` prints. Each prints as a `--- sample i of N ---`
    /// block, in order: the first unfinished one streams, later ones show when it ends.
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message for --chat and --interactive.
    #[arg(long)]
    pub system: Option<String>,
    /// A variable of the chat template, as a keyword argument of transformers'
    /// apply_chat_template (repeatable): KEY=VALUE, the value read as JSON when it is JSON
    /// (false, 3, "x"), else as a string. Example: --chat-arg enable_thinking=false
    #[arg(long = "chat-arg", value_name = "KEY=VALUE", value_parser = values::chat_arg)]
    pub chat_args: Vec<(String, serde_json::Value)>,
    /// Chat turn by turn: each stdin line is a user message (the KV cache is kept between turns).
    #[arg(long, conflicts_with_all = ["prompt_file", "num_samples"])]
    pub interactive: bool,
    /// Keep the end of a prompt that does not fit the context instead of failing.
    #[arg(long)]
    pub truncate: bool,
    /// Where and how the model runs.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `llmtool data ...`
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Clean, deduplicate, split and tokenize the markdown under `data.roots` into token
    /// shards plus manifest.json in `data.dataset_dir`; does nothing when already up to date.
    ///
    /// Example: llmtool data build configs/small.yaml --set data.chunking=section
    Build(DataBuildArgs),
    /// Summarize a built dataset: documents, tokens, length histogram, duplicates, skipped files.
    ///
    /// Example: llmtool data stats runs/small/dataset
    Stats(DataStatsArgs),
}

/// Arguments of `data build`.
#[derive(Debug, Args)]
pub struct DataBuildArgs {
    /// The config file and its overrides.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Rebuild even if the manifest shows the same inputs, settings and tokenizer.
    #[arg(long)]
    pub force: bool,
    /// Also write the cleaned, deduplicated documents to FILE as JSON lines (one string each).
    #[arg(long, value_name = "FILE")]
    pub dump_text: Option<PathBuf>,
}

/// Arguments of `data stats`.
#[derive(Debug, Args)]
pub struct DataStatsArgs {
    /// A dataset directory (holding manifest.json).
    pub dir: PathBuf,
}

/// `llmtool tokenizer ...`
#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE (`model.vocab_size` tokens, `data.special_tokens`) on the cleaned
    /// corpus and write a tokenizer.json that Hugging Face tokenizers/transformers load.
    ///
    /// Example: llmtool tokenizer train configs/small.yaml --out tokenizer.json
    Train(TokenizerTrainArgs),
}

/// Arguments of `tokenizer train`.
#[derive(Debug, Args)]
pub struct TokenizerTrainArgs {
    /// The config file and its overrides.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Where to write tokenizer.json [default: <output.dir>/tokenizer.json]
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Replace an existing file at the output path.
    #[arg(long)]
    pub force: bool,
}

/// `llmtool merge` arguments.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model: a Hugging Face model directory or a hub id (owner/name).
    #[arg(long, value_name = "DIR|ID")]
    pub model: String,
    /// The adapter directory: PEFT (adapter_config.json + adapter_model.safetensors) or
    /// mlx-lm (adapter_config.json + adapters.safetensors).
    #[arg(long, visible_alias = "adapter-path", value_name = "DIR")]
    pub adapter: PathBuf,
    /// Where to write the merged model directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace --out if it already exists and is not empty.
    #[arg(long)]
    pub force: bool,
    /// The dtype of the merged weights: auto (the base's), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: config::SavedDtype,
}

/// `llmtool export` arguments.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Write GGUF (llama.cpp, Ollama); the only export format so far.
    #[arg(long, required = true)]
    pub gguf: bool,
    /// The model: a Hugging Face model directory or a hub id (owner/name).
    #[arg(long, value_name = "DIR|ID")]
    pub model: String,
    /// A LoRA adapter directory (PEFT or mlx-lm) to merge into the model first.
    #[arg(long, visible_alias = "adapter-path", value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The GGUF file to write; an Ollama `Modelfile` is written in the same directory.
    #[arg(long, value_name = "FILE.gguf")]
    pub out: PathBuf,
    /// Tensor types: f16, bf16, q8_0, or q4_k_m (Q4_K with Q6_K where llama.cpp's Q4_K_M
    /// keeps more bits). Vectors stay f32.
    #[arg(long, value_enum, default_value = "f16")]
    pub quant: QuantName,
    /// Replace --out and its Modelfile if they exist.
    #[arg(long)]
    pub force: bool,
}

/// `--quant` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantName {
    /// Matrices in f16.
    F16,
    /// Matrices in bf16.
    Bf16,
    /// Matrices in 8-bit blocks (llama.cpp's `Q8_0`).
    #[value(name = "q8_0")]
    Q8_0,
    /// llama.cpp's `Q4_K_M`: Q4_K for most matrices, Q6_K where it keeps more bits.
    #[value(name = "q4_k_m")]
    Q4KM,
}

/// `llmtool config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the fully resolved config (defaults filled in) as YAML.
    ///
    /// Example: llmtool config show configs/small.yaml --set training.lr=1e-3
    Show(ConfigArgs),
    /// Check a config and report every problem with its file, line and key.
    ///
    /// Example: llmtool config validate configs/small.yaml
    Validate(ConfigArgs),
}

/// Parsers for options whose range clap's types do not say.
mod values {
    /// `KEY=VALUE`, the value parsed as JSON when it is JSON, else taken as a string.
    pub fn chat_arg(text: &str) -> Result<(String, serde_json::Value), String> {
        let (key, value) = text
            .split_once('=')
            .filter(|(key, _)| !key.is_empty())
            .ok_or_else(|| format!("expected KEY=VALUE, got `{text}`"))?;
        let value = serde_json::from_str(value)
            .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
        Ok((key.to_string(), value))
    }

    /// A whole number of at least 1.
    pub fn count(text: &str) -> Result<usize, String> {
        match text.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!("must be a whole number >= 1, got `{text}`")),
        }
    }
}
