//! `llmtool config show|validate`.

use crate::cli::{ConfigArgs, ConfigCommand};
use anyhow::Result;
use std::path::Path;

/// Loads the config named by `args`, with its overrides.
pub fn load(args: &ConfigArgs) -> Result<config::Config> {
    load_file(&args.config, &args.overrides)
}

/// The checks of the layers above the config (LoRA target names), which every load runs.
const LAYER_CHECKS: &[config::Check] = &[train::lora::config_issues];

/// Loads a config file with overrides, checked by every layer: the config's own checks and
/// those of the layers above it.
pub fn load_file(path: &Path, overrides: &[config::Override]) -> Result<config::Config> {
    Ok(config::load_with(path, overrides, LAYER_CHECKS)?)
}

/// [`load_file`] of the text of `path`, already read ([`config::read_text`]).
pub fn load_text(
    text: &str,
    path: &Path,
    overrides: &[config::Override],
) -> Result<config::Config> {
    Ok(config::load_str_with(text, path, overrides, LAYER_CHECKS)?)
}

/// The device `training.device` names.
pub fn training_device(config: &config::Config) -> Result<config::DeviceSpec> {
    use anyhow::Context;
    config
        .training
        .device
        .parse()
        .context("training.device in the config")
}

/// Runs `config show` or `config validate`.
pub fn run(command: ConfigCommand) -> Result<()> {
    match command {
        ConfigCommand::Show(args) => {
            let config = load(&args)?;
            print!("{}", serde_norway::to_string(&config)?);
        }
        ConfigCommand::Validate(args) => {
            load(&args)?;
            println!("{}: ok", args.config.display());
        }
    }
    Ok(())
}
