//! `llmtool merge`: fold a LoRA adapter into its base model.

use crate::cli::MergeArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use model::hub;
use model::io::{self, ModelFiles};
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
    let merged = lora::merge(&base.model.named_parameters(), &adapter)?;
    io::save(
        &args.out,
        &ModelFiles {
            config,
            tensors: &merged,
            tokenizer: &base_dir.join("tokenizer.json"),
        },
    )?;
    copy_tokenizer_config(&base_dir, &args.out)?;
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

/// Copies the base's `tokenizer_config.json` (chat template, special tokens) when it has one.
fn copy_tokenizer_config(base: &Path, out: &Path) -> Result<()> {
    let source = base.join("tokenizer_config.json");
    if source.is_file() {
        std::fs::copy(&source, out.join("tokenizer_config.json"))
            .with_context(|| format!("copying {}", source.display()))?;
    }
    Ok(())
}
