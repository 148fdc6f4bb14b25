//! `data build` as a library function: walk, read, clean, deduplicate, split, tokenize,
//! write; or nothing at all when the existing dataset was built from the same inputs.

use super::corpus::{self, display, Corpus, Document, Source};
use super::dedup::{deduplicate, validation_split, Removal};
use super::shards::{
    length_histogram, Counts, Manifest, Staging, TokenDtype, TokenizerInfo, FORMAT_VERSION,
    TOKENIZER,
};
use super::{sha256_hex, tokenizer, DataError};
use config::{Config, DataSection, VocabSize};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Options of `data build` beyond the config.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Rebuild even when the manifest says the dataset is up to date.
    pub force: bool,
    /// Also write the kept documents as JSON lines (one JSON string per document) here.
    pub dump_text: Option<PathBuf>,
}

/// What a build did.
#[derive(Debug)]
pub struct BuildReport {
    /// The dataset folder.
    pub dir: PathBuf,
    /// The dataset's manifest, as written (or as found when up to date).
    pub manifest: Manifest,
    /// True when nothing was rebuilt.
    pub up_to_date: bool,
    /// Bytes of input read.
    pub bytes_read: u64,
    /// Wall-clock time of the build.
    pub elapsed: Duration,
}

/// Builds (or confirms) the dataset described by `config` in `data.dataset_dir`.
pub fn build(config: &Config, options: &BuildOptions) -> Result<BuildReport, DataError> {
    let start = Instant::now();
    let data = &config.data;
    let dir = data.dataset_dir(&config.output);
    let Inputs {
        unwalkable,
        sources,
        tokenizer_file,
        fingerprint,
    } = read_inputs(config)?;
    let bytes_read = sources.iter().map(|s| s.bytes).sum();
    let report = |manifest, up_to_date| BuildReport {
        dir: dir.clone(),
        manifest,
        up_to_date,
        bytes_read,
        elapsed: start.elapsed(),
    };
    if !options.force && options.dump_text.is_none() {
        if let Ok(existing) = Manifest::read(&dir) {
            if existing.fingerprint == fingerprint && super::loader::Dataset::open(&dir).is_ok() {
                return Ok(report(existing, true));
            }
        }
    }

    let bar = crate::progress::bytes_bar(bytes_read);
    let found = sources.len();
    bar.set_message(format!("cleaning {found} files"));
    let mut corpus = corpus::clean_sources(sources, data, Some(&bar));
    corpus.skipped.splice(0..0, unwalkable);
    if corpus.documents.is_empty() {
        bar.finish_and_clear();
        return Err(DataError::Empty {
            files: found,
            skipped: corpus.skipped.len(),
        });
    }
    bar.set_message("deduplicating");
    let (kept, duplicates) = unique_documents(&corpus, data);
    if let Some(path) = &options.dump_text {
        dump_text(path, &kept)?;
    }

    let (tokenizer, source) = match (&data.tokenizer, &tokenizer_file) {
        (Some(path), Some(_)) => (
            tokenizer::load(path, config.model.vocab_size.limit())?,
            display(path),
        ),
        _ => {
            bar.set_message("training tokenizer");
            let texts: Vec<&str> = kept.iter().map(|d| d.text.as_str()).collect();
            (
                tokenizer::train(
                    &texts,
                    config.model.vocab_size.tokenizer_target(),
                    &data.special_tokens,
                )?,
                "trained".to_owned(),
            )
        }
    };
    let tokenizer_path = dir.join(TOKENIZER);
    let eos_id = tokenizer::eos_id(&tokenizer, &data.special_tokens, &tokenizer_path)?;
    let tokenizer_json = tokenizer::to_json(&tokenizer, &tokenizer_path)?;

    bar.set_message("tokenizing");
    let encoded: Vec<Vec<u32>> = kept
        .par_iter()
        .map(|d| tokenizer::encode_ids(&tokenizer, d.text.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|e| DataError::Tokenizer {
            path: tokenizer_path.clone(),
            message: e.to_string(),
        })?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    let (mut train_docs, mut val_docs) = (0, 0);
    let texts: Vec<&str> = kept.iter().map(|d| d.text.as_str()).collect();
    let validation = validation_split(&texts, data.val_fraction);
    for (ids, validation) in encoded.iter().zip(validation) {
        let (tokens, count) = if validation {
            (&mut val, &mut val_docs)
        } else {
            (&mut train, &mut train_docs)
        };
        tokens.extend_from_slice(ids);
        tokens.push(eos_id);
        *count += 1;
    }

    bar.set_message("writing");
    let vocab_size = tokenizer.get_vocab_size(true);
    let dtype = TokenDtype::for_vocab(vocab_size);
    let staging = Staging::new(&dir)?;
    staging.write(TOKENIZER, tokenizer_json.as_bytes())?;
    let train = staging.write_split("train", &train, dtype, train_docs)?;
    let val = staging.write_split("val", &val, dtype, val_docs)?;
    let chars: u64 = kept.iter().map(|d| d.text.chars().count() as u64).sum();
    let tokens = train.tokens + val.tokens;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        fingerprint,
        settings: settings(config)?,
        tokenizer: TokenizerInfo {
            file: TOKENIZER.into(),
            sha256: sha256_hex(tokenizer_json.as_bytes()),
            source,
            vocab_size,
            eos_token: tokenizer.id_to_token(eos_id).unwrap_or_default(),
            eos_id,
        },
        token_dtype: dtype,
        counts: Counts {
            files: corpus.inputs.len(),
            skipped_files: corpus.skipped.len(),
            bytes: bytes_read,
            documents: kept.len(),
            short_documents: corpus.short_documents,
            duplicates: duplicates.len(),
            chars,
            tokens,
            chars_per_token: chars as f64 / tokens.max(1) as f64,
        },
        train,
        val,
        length_histogram: length_histogram(encoded.iter().map(|ids| ids.len() as u64)),
        inputs: corpus.inputs,
        skipped: corpus.skipped,
        duplicates,
    };
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| DataError::Manifest {
        path: dir.join(super::shards::MANIFEST),
        message: e.to_string(),
    })?;
    staging.write(super::shards::MANIFEST, json.as_bytes())?;
    staging.commit()?;
    bar.finish_and_clear();
    Ok(report(manifest, false))
}

/// What a build reads before it decides whether to rebuild.
struct Inputs {
    /// Paths under the roots that could not be listed, as skipped files.
    unwalkable: Vec<super::corpus::Skipped>,
    sources: Vec<Source>,
    /// The configured `data.tokenizer` file's bytes.
    tokenizer_file: Option<Vec<u8>>,
    /// What the dataset built from these inputs records as its fingerprint.
    fingerprint: String,
}

fn read_inputs(config: &Config) -> Result<Inputs, DataError> {
    let data = &config.data;
    let (files, unwalkable) = corpus::list_files(&data.roots, data)?;
    let sources = corpus::read_sources(&files, data.lossy_utf8);
    let tokenizer_file = match &data.tokenizer {
        Some(path) => Some(std::fs::read(path).map_err(|e| DataError::io(path, e))?),
        None => None,
    };
    let fingerprint = fingerprint(config, &sources, tokenizer_file.as_deref())?;
    Ok(Inputs {
        unwalkable,
        sources,
        tokenizer_file,
        fingerprint,
    })
}

/// How the inputs `config` names now differ from those `manifest` was built from, one line per
/// kind of change (files added, removed or edited; data settings); empty
/// when a rebuild would write the same dataset. Reads and hashes every input file.
pub fn changes_since(config: &Config, manifest: &Manifest) -> Result<Vec<String>, DataError> {
    let inputs = read_inputs(config)?;
    if inputs.fingerprint == manifest.fingerprint {
        return Ok(Vec::new());
    }
    let before: std::collections::BTreeMap<&str, Option<&str>> = manifest
        .inputs
        .iter()
        .map(|i| (i.path.as_str(), Some(i.sha256.as_str())))
        .chain(
            manifest
                .skipped
                .iter()
                .map(|s| (s.path.as_str(), s.sha256.as_deref())),
        )
        .collect();
    let now: std::collections::BTreeMap<String, Option<&str>> = inputs
        .sources
        .iter()
        .map(|s| (display(&s.path), s.sha256.as_deref()))
        .collect();
    let added: Vec<&str> = now
        .keys()
        .map(String::as_str)
        .filter(|p| !before.contains_key(p))
        .collect();
    let removed: Vec<&str> = before
        .keys()
        .copied()
        .filter(|p| !now.contains_key(*p))
        .collect();
    let edited: Vec<&str> = now
        .iter()
        .filter(|(p, sha)| {
            before
                .get(p.as_str())
                .is_some_and(|old| old.is_some() && old != *sha)
        })
        .map(|(p, _)| p.as_str())
        .collect();
    let mut changes = Vec::new();
    for (what, paths) in [("added", added), ("removed", removed), ("edited", edited)] {
        if let Some(first) = paths.first() {
            let more = match paths.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            };
            changes.push(format!("{what}: {first}{more}"));
        }
    }
    let settings = settings(config)?;
    let keys = |v: &serde_json::Value| v.as_object().cloned().unwrap_or_default();
    let (old, new) = (keys(&manifest.settings), keys(&settings));
    let mut differing: Vec<&str> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(v))
        .map(|(k, _)| k.as_str())
        .collect();
    differing.extend(
        old.keys()
            .map(String::as_str)
            .filter(|k| !new.contains_key(*k)),
    );
    if !differing.is_empty() {
        changes.push(format!("data settings changed: {}", differing.join(", ")));
    }
    if changes.is_empty() {
        // Neither a listed file nor a setting: the data.tokenizer file, or a file that was
        // skipped (whose contents the manifest does not record).
        changes.push("data.tokenizer or a skipped file changed".to_string());
    }
    Ok(changes)
}

/// The documents left after deduplication, in order, and the removals.
pub fn unique_documents<'a>(
    corpus: &'a Corpus,
    data: &DataSection,
) -> (Vec<&'a Document>, Vec<Removal>) {
    let texts: Vec<&str> = corpus.documents.iter().map(|d| d.text.as_str()).collect();
    let names: Vec<String> = corpus.documents.iter().map(Document::name).collect();
    let (keep, duplicates) = deduplicate(&texts, &names, data.dedup, data.near_dup_threshold);
    let kept = corpus
        .documents
        .iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(d, _)| d)
        .collect();
    (kept, duplicates)
}

/// The settings that decide the dataset's bytes: the data section (less where it is
/// written) and the vocabulary size.
fn settings(config: &Config) -> Result<serde_json::Value, DataError> {
    let mut value = serde_json::to_value(&config.data).map_err(|e| DataError::Manifest {
        path: PathBuf::from("settings"),
        message: e.to_string(),
    })?;
    if let Some(map) = value.as_object_mut() {
        map.remove("dataset_dir");
        let vocab_size = match config.model.vocab_size {
            VocabSize::Auto => "auto".into(),
            VocabSize::Tokens(n) => n.into(),
        };
        map.insert("vocab_size".into(), vocab_size);
    }
    Ok(value)
}

fn fingerprint(
    config: &Config,
    sources: &[Source],
    tokenizer_file: Option<&[u8]>,
) -> Result<String, DataError> {
    let inputs: Vec<(String, Option<&str>)> = sources
        .iter()
        .map(|s| (display(&s.path), s.sha256.as_deref()))
        .collect();
    let key = serde_json::json!({
        "format_version": FORMAT_VERSION,
        "settings": settings(config)?,
        "inputs": inputs,
        "tokenizer": tokenizer_file.map(sha256_hex),
    });
    Ok(sha256_hex(key.to_string().as_bytes()))
}

fn dump_text(path: &Path, documents: &[&Document]) -> Result<(), DataError> {
    let file = std::fs::File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut out = std::io::BufWriter::new(file);
    for doc in documents {
        let line = serde_json::Value::String(doc.text.clone()).to_string();
        writeln!(out, "{line}").map_err(|e| DataError::io(path, e))?;
    }
    out.flush().map_err(|e| DataError::io(path, e))
}
