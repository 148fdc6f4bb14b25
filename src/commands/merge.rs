//! `llmtool merge`: fold a LoRA adapter into its base model.

use crate::cli::MergeArgs;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use model::hub;
use model::io::{self, ModelFiles};
use model::tokenizer_files::TokenizerSource;
use std::path::Path;
use train::{lora, Adapter};

/// Merges `args.adapter` into `args.model` and writes the result to `args.out`.
pub fn run(args: &MergeArgs) -> Result<()> {
    refuse_to_overwrite(&args.out, args.force)?;
    let base_dir = hub::resolve(&args.model)?;
    let device = Device::Cpu;
    let base = io::load(&base_dir, DType::F32, &device)?;
    let config = &base.model.config;
    let adapter = Adapter::load(&args.adapter, config, DType::F32, &device)?;
    let merged = lora::merge(&base.model.named_parameters()?, &adapter)?;
    io::save(
        &args.out,
        &ModelFiles {
            config,
            tensors: &merged,
            tokenizer: TokenizerSource::Base(&base_dir),
            dtype: args.dtype.resolve(config.stored_dtype()),
        },
    )?;
    println!(
        "merged {} adapted projections (r = {}, scale = {}) of {} into {} -> {}",
        adapter.modules().count(),
        adapter.config.r,
        adapter.scale(),
        args.adapter.display(),
        args.model,
        args.out.display()
    );
    Ok(())
}

/// Fails when `out` exists and is not an empty directory, unless `force`.
fn refuse_to_overwrite(out: &Path, force: bool) -> Result<()> {
    let empty_dir = out
        .read_dir()
        .map(|mut entries| entries.next().is_none())
        .unwrap_or(false);
    if out.exists() && !empty_dir && !force {
        bail!(
            "{} already exists and is not empty; pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}
