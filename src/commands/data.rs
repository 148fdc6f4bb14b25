//! `llmtool data build|stats`.

use crate::cli::{DataBuildArgs, DataCommand, DataStatsArgs};
use anyhow::{Context, Result};
use data::{self, BuildOptions, BuildReport, Manifest};
use std::collections::BTreeMap;

/// Runs `data build` or `data stats`.
pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Build(args) => build(&args),
        DataCommand::Stats(args) => stats(&args),
    }
}

fn build(args: &DataBuildArgs) -> Result<()> {
    let config = super::config::load(&args.config)?;
    let options = BuildOptions {
        force: args.force,
        dump_text: args.dump_text.clone(),
    };
    let report = data::build(&config, &options)
        .with_context(|| format!("building the dataset of {}", args.config.config.display()))?;
    print_build_summary(&report);
    Ok(())
}

fn print_build_summary(report: &BuildReport) {
    let m = &report.manifest;
    let c = &m.counts;
    let dir = report.dir.display();
    if report.up_to_date {
        println!(
            "{dir}: up to date ({} files, {} documents, {} tokens); --force rebuilds",
            c.files, c.documents, c.tokens
        );
        return;
    }
    let secs = report.elapsed.as_secs_f64();
    let mb = report.bytes_read as f64 / 1e6;
    println!("dataset       {dir}");
    println!(
        "files         {} read, {} skipped",
        c.files, c.skipped_files
    );
    println!(
        "documents     {} kept, {} duplicates removed, {} too short",
        c.documents, c.duplicates, c.short_documents
    );
    println!(
        "tokens        {} ({:.2} chars/token, vocab {}, {:?})",
        c.tokens, c.chars_per_token, m.tokenizer.vocab_size, m.token_dtype
    );
    println!(
        "train / val   {} / {} tokens, {} / {} documents",
        m.train.tokens, m.val.tokens, m.train.documents, m.val.documents
    );
    println!(
        "time          {secs:.2} s, {mb:.2} MB at {:.2} MB/s",
        mb / secs.max(1e-9)
    );
    for reason in top_reasons(m, 3) {
        println!("skipped       {reason}");
    }
}

/// The most common skip reasons, `count x reason (example path)`.
fn top_reasons(manifest: &Manifest, n: usize) -> Vec<String> {
    let mut by_reason: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in &manifest.skipped {
        by_reason.entry(&s.reason).or_default().push(&s.path);
    }
    let mut reasons: Vec<_> = by_reason.into_iter().collect();
    reasons.sort_by_key(|(_, paths)| std::cmp::Reverse(paths.len()));
    reasons
        .into_iter()
        .take(n)
        .map(|(reason, paths)| format!("{} x {reason} (e.g. {})", paths.len(), paths[0]))
        .collect()
}

fn stats(args: &DataStatsArgs) -> Result<()> {
    let m = Manifest::read(&args.dir)
        .with_context(|| "run `llmtool data build CONFIG` first".to_string())?;
    // Its shards and tokenizer must be the ones the manifest describes.
    data::loader::Dataset::open(&args.dir)?;
    let c = &m.counts;
    println!("dataset       {}", args.dir.display());
    println!(
        "files         {} read ({:.2} MB), {} skipped",
        c.files,
        c.bytes as f64 / 1e6,
        c.skipped_files
    );
    println!(
        "documents     {} (train {}, val {})",
        c.documents, m.train.documents, m.val.documents
    );
    println!(
        "tokens        {} (train {}, val {}), {:.2} chars/token",
        c.tokens, m.train.tokens, m.val.tokens, c.chars_per_token
    );
    println!(
        "tokenizer     {} tokens, eos {:?} = {}, {}",
        m.tokenizer.vocab_size, m.tokenizer.eos_token, m.tokenizer.eos_id, m.tokenizer.source
    );
    println!(
        "duplicates    {} removed ({} too short)",
        c.duplicates, c.short_documents
    );
    for d in m.duplicates.iter().take(5) {
        println!(
            "              {} ~ {} ({:?}, {:.2})",
            d.document, d.duplicate_of, d.kind, d.similarity
        );
    }
    println!("length (tokens per document)");
    let widest = m
        .length_histogram
        .iter()
        .map(|b| b.documents)
        .max()
        .unwrap_or(1)
        .max(1);
    for b in &m.length_histogram {
        let bar = "#".repeat((b.documents * 40).div_ceil(widest));
        println!(
            "  {:>7}-{:<7} {:>7} {bar}",
            b.min_tokens, b.max_tokens, b.documents
        );
    }
    for reason in top_reasons(&m, 5) {
        println!("skipped       {reason}");
    }
    Ok(())
}
