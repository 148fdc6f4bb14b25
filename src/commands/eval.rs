//! `llmtool eval`: score text with one or more models (and adapters), print a comparison.

use super::runtime::{load_model, Runtime};
use crate::cli::EvalArgs;
use anyhow::{Context, Result};
use eval::{
    dataset_documents, jsonl_documents, read_documents, tokenize, Document, DocumentScore,
    Evaluator, Metrics, Tally, TokenizedDocument, WindowSpec,
};
use generate::ChatTemplate;
use model::config::TokenIds;
use model::LoadedModel;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One model (with or without an adapter) and its scores.
#[derive(Debug, Serialize)]
struct Row {
    model: PathBuf,
    adapter: Option<PathBuf>,
    context: usize,
    stride: usize,
    /// `None` when no document had two tokens.
    metrics: Option<Metrics>,
    tokens_per_second: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    files: Vec<FileRow>,
}

#[derive(Debug, Serialize)]
struct FileRow {
    file: String,
    metrics: Option<Metrics>,
}

/// Runs `llmtool eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    let runtime = Runtime::open(&args.runtime)?;
    let (jsonl, texts): (Vec<PathBuf>, Vec<PathBuf>) =
        args.data.iter().cloned().partition(|p| is_jsonl_file(p));
    let documents = match &args.dataset {
        Some(_) => Vec::new(),
        None if texts.is_empty() => Vec::new(),
        None => read_documents(&texts, &runtime.config.data)?,
    };
    let inputs = Inputs {
        documents: &documents,
        jsonl: &jsonl,
    };
    let adapters: Vec<Option<&Path>> = std::iter::once(None)
        .chain(args.adapters.iter().map(|a| Some(a.as_path())))
        .collect();
    let mut rows = Vec::new();
    for model in &args.models {
        for adapter in &adapters {
            rows.push(score(&args, &runtime, &inputs, model, *adapter)?);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(())
}

/// What `--data` names: documents to tokenize, and JSONL files of fine-tuning examples.
struct Inputs<'a> {
    documents: &'a [Document],
    jsonl: &'a [PathBuf],
}

/// A `.jsonl` file: scored as fine-tuning examples, not as text.
fn is_jsonl_file(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e == "jsonl")
}

fn score(
    args: &EvalArgs,
    runtime: &Runtime,
    inputs: &Inputs,
    model: &Path,
    adapter: Option<&Path>,
) -> Result<Row> {
    let loaded = load_model(model, adapter, &args.runtime, &runtime.device)?;
    let settings = &runtime.config.eval;
    let max_context = loaded.model.config.max_position_embeddings;
    let context = args.context.or(settings.context).unwrap_or(max_context);
    let stride = args.stride.or(settings.stride).unwrap_or(context / 2);
    let spec = WindowSpec::new(context, stride, max_context)
        .with_context(|| format!("--context/--stride for {}", model.display()))?;
    let tokenized = tokenized_inputs(args, &loaded, inputs, model)?;
    let evaluator = Evaluator {
        model: &loaded.model,
        spec,
        batch_size: args.batch_size.unwrap_or(settings.batch_size).max(1),
    };
    let bar = data::progress::bar(0, "windows");
    bar.set_message(label(model, adapter));
    let start = Instant::now();
    let mut tokens_run = 0usize;
    let scores = evaluator.evaluate(&tokenized, |p| {
        bar.set_length(p.total_windows as u64);
        bar.inc(p.windows as u64);
        tokens_run += p.tokens;
    })?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let mut total = Tally::default();
    scores.iter().for_each(|s| total.merge(&s.tally));
    let files = if args.per_file {
        per_file(&scores)
    } else {
        Vec::new()
    };
    Ok(Row {
        model: model.to_path_buf(),
        adapter: adapter.map(Path::to_path_buf),
        context,
        stride,
        metrics: total.metrics(),
        tokens_per_second: tokens_run as f64 / seconds.max(1e-9),
        files,
    })
}

/// The model's view of the input: the documents tokenized with its tokenizer and the JSONL
/// examples rendered with its chat template, or the dataset.
fn tokenized_inputs(
    args: &EvalArgs,
    loaded: &LoadedModel,
    inputs: &Inputs,
    model: &Path,
) -> Result<Vec<TokenizedDocument>> {
    if let Some(dir) = &args.dataset {
        return Ok(dataset_documents(
            dir,
            &args.split,
            &loaded.tokenizer,
            &model.display().to_string(),
        )?);
    }
    let mut tokenized = tokenize(&loaded.tokenizer, inputs.documents)?;
    if !inputs.jsonl.is_empty() {
        let eos_id = loaded
            .model
            .config
            .eos_token_id
            .as_ref()
            .and_then(TokenIds::first)
            .with_context(|| {
                format!(
                    "{}: config.json has no eos_token_id, which JSONL examples end with",
                    model.display()
                )
            })?;
        let template = ChatTemplate::load(&loaded.dir);
        for path in inputs.jsonl {
            tokenized.extend(jsonl_documents(
                path,
                &loaded.tokenizer,
                eos_id,
                template.as_ref().map_err(|e| e.to_string()),
            )?);
        }
    }
    Ok(tokenized)
}

/// Document scores summed per source file, in input order.
fn per_file(scores: &[DocumentScore]) -> Vec<FileRow> {
    let mut files: Vec<(String, Tally)> = Vec::new();
    for score in scores {
        match files.last_mut() {
            Some((name, tally)) if *name == score.name => tally.merge(&score.tally),
            _ => files.push((score.name.clone(), score.tally)),
        }
    }
    files
        .into_iter()
        .map(|(file, tally)| FileRow {
            file,
            metrics: tally.metrics(),
        })
        .collect()
}

fn label(model: &Path, adapter: Option<&Path>) -> String {
    match adapter {
        Some(a) => format!("{} + {}", model.display(), a.display()),
        None => model.display().to_string(),
    }
}

fn print_table(rows: &[Row]) {
    let mut lines = vec![[
        "model".to_string(),
        "tokens".into(),
        "bytes".into(),
        "nll".into(),
        "± se".into(),
        "ppl".into(),
        "bits/byte".into(),
        "tok/s".into(),
    ]];
    let cells = |name: String, m: &Option<Metrics>, speed: String| match m {
        Some(m) => [
            name,
            m.tokens.to_string(),
            m.bytes.to_string(),
            format!("{:.4}", m.nll_mean),
            format!("{:.4}", m.nll_stderr),
            format!("{:.3}", m.perplexity),
            format!("{:.4}", m.bits_per_byte),
            speed,
        ],
        None => [
            name,
            "0".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            speed,
        ],
    };
    for row in rows {
        let name = label(&row.model, row.adapter.as_deref());
        lines.push(cells(
            name,
            &row.metrics,
            format!("{:.0}", row.tokens_per_second),
        ));
        for f in &row.files {
            lines.push(cells(format!("  {}", f.file), &f.metrics, String::new()));
        }
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for line in &lines {
        let mut out = format!("{:<w$}", line[0], w = widths[0]);
        for (cell, w) in line.iter().zip(&widths).skip(1) {
            out.push_str(&format!("  {cell:>w$}"));
        }
        println!("{}", out.trim_end());
    }
    if let Some(row) = rows.first() {
        println!(
            "(context {}, stride {}; nll in nats per token, ± its standard error)",
            row.context, row.stride
        );
    }
}
