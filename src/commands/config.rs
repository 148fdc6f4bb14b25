//! `llmtool config show|validate`.

use crate::cli::{ConfigArgs, ConfigCommand};
use anyhow::Result;

/// Loads the config named by `args`, with its overrides.
pub fn load(args: &ConfigArgs) -> Result<crate::config::Config> {
    Ok(crate::config::load(&args.config, &args.overrides)?)
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
