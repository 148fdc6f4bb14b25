//! `llmtool tokenizer train`.

use crate::cli::{TokenizerCommand, TokenizerTrainArgs};
use anyhow::{Context, Result};
use data::{build::unique_documents, clean_documents, tokenizer};

/// Runs `tokenizer train`.
pub fn run(command: TokenizerCommand) -> Result<()> {
    match command {
        TokenizerCommand::Train(args) => train(&args),
    }
}

fn train(args: &TokenizerTrainArgs) -> Result<()> {
    let config = super::config::load(&args.config)?;
    let data = &config.data;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| data.dataset_dir(&config.output).join("tokenizer.json"));
    let start = std::time::Instant::now();
    let corpus = clean_documents(&data.roots, data)?;
    let (documents, _) = unique_documents(&corpus, data);
    let kept: Vec<&str> = documents.iter().map(|d| d.text.as_str()).collect();
    let trained = tokenizer::train(
        &kept,
        config.model.vocab_size.tokenizer_target(),
        &data.special_tokens,
    )?;
    let json = tokenizer::to_json(&trained, &out)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = out.with_extension("json.tmp");
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{}: {} tokens trained on {} documents from {} files in {:.2} s",
        out.display(),
        trained.get_vocab_size(true),
        kept.len(),
        corpus.inputs.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
