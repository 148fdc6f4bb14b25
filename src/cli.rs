//! Command-line definitions. Each command's help carries a one-line example.

use crate::config::Override;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Train, fine-tune, evaluate and sample Llama-style language models on your own markdown.
#[derive(Debug, Parser)]
#[command(name = "llmtool", version, about, long_about = None)]
pub struct Cli {
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

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show or check a config file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Fold a LoRA adapter into its base model and write a plain Hugging Face model directory.
    ///
    /// The sum `W + scale * B A` is computed in f32; the result loads in llmtool and in
    /// transformers without PEFT.
    ///
    /// Example: llmtool merge --model HuggingFaceTB/SmolLM2-135M --adapter runs/lora --out runs/merged
    Merge(MergeArgs),
}

/// `llmtool merge` arguments.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model: a Hugging Face model directory or a hub id (owner/name).
    #[arg(long, value_name = "DIR|ID")]
    pub model: String,
    /// The PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// Where to write the merged model directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace --out if it already exists and is not empty.
    #[arg(long)]
    pub force: bool,
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
