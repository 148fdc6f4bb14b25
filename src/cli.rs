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
