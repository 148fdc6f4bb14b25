//! `llmtool tokenizer train`.

use crate::cli::{TokenizerCommand, TokenizerTrainArgs};
use anyhow::{bail, Context, Result};
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
    // Not inside the dataset: its tokenizer.json belongs to the token ids stored beside it.
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| config.output.dir.join("tokenizer.json"));
    if out.exists() && !args.force {
        bail!(
            "{} exists: pass --force to replace it, or --out to write elsewhere",
            out.display()
        );
    }
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
    model::weights::write_atomic(&out, json.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
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
