//! What to score: files (markdown goes through the data pipeline's cleaning, so evaluation
//! sees text the way training did; `.txt` files are read as they are), or a split of a built
//! dataset.

use super::{Document, TokenizedDocument};
use config::DataSection;
use data::{markdown, Dataset};
use std::path::{Path, PathBuf};

/// Errors reading evaluation inputs.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A path could not be read.
    #[error("{path}: {message}")]
    Read {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Nothing to score.
    #[error("no .md, .markdown or .txt files under {0}")]
    Empty(String),
    /// The dataset could not be opened. Kept as text: `DataError`'s messages already include
    /// their source, which an error chain would print twice.
    #[error("cannot open the dataset {path}: {message}")]
    Dataset {
        /// The dataset folder.
        path: PathBuf,
        /// The data layer's error, as text.
        message: String,
    },
    /// The dataset's tokens mean nothing to this model.
    #[error("{dataset} was tokenized with a different tokenizer than {model} uses; evaluate it with --data on the source files instead")]
    TokenizerMismatch {
        /// The dataset folder.
        dataset: String,
        /// The model, as the command names it.
        model: String,
    },
    /// A JSONL file with a bad line.
    #[error("{0}")]
    Jsonl(String),
    /// A dataset split to score that does not exist.
    #[error("unknown split {0:?}: expected train or val")]
    Split(String),
}

const EXTENSIONS: [&str; 3] = ["md", "markdown", "txt"];

fn has_text_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The documents in `paths`: files as given (any extension; markdown by extension), folders
/// walked for `.md`, `.markdown` and `.txt` files in sorted order, leaving out hidden and
/// git-ignored files as the data build does ([`data::corpus::walk`]). Markdown is cleaned and
/// chunked as `data` says; each document is named after its file.
pub fn read_documents(paths: &[PathBuf], data: &DataSection) -> Result<Vec<Document>, InputError> {
    let mut files = Vec::new();
    for path in paths {
        let read_error = |message: String| InputError::Read {
            path: path.clone(),
            message,
        };
        if path.is_dir() {
            let mut found: Vec<PathBuf> = data::corpus::walk(path)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| read_error(e.to_string()))?
                .into_iter()
                .filter(|e| {
                    e.file_type().is_some_and(|t| t.is_file()) && has_text_extension(e.path())
                })
                .map(|e| e.into_path())
                .collect();
            files.append(&mut found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(read_error("no such file or folder".into()));
        }
    }
    if files.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(InputError::Empty(names.join(", ")));
    }
    let mut documents = Vec::new();
    for file in &files {
        documents.extend(read_file(file, data)?);
    }
    Ok(documents)
}

fn read_file(path: &Path, data: &DataSection) -> Result<Vec<Document>, InputError> {
    let text = std::fs::read_to_string(path).map_err(|e| InputError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let is_markdown = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "md" | "markdown"));
    let texts = if is_markdown {
        markdown::documents(&markdown::clean(&text, data).markdown, data)
    } else {
        vec![text]
    };
    let name = path.display().to_string();
    Ok(texts
        .into_iter()
        .map(|text| Document {
            name: name.clone(),
            text,
        })
        .collect())
}

/// The documents of one split of the dataset in `dir`, cut at its end-of-text tokens (each
/// keeps its EOS: predicting the end of a document is part of the task). `tokenizer` is the
/// model's, which must be the dataset's.
pub fn dataset_documents(
    dir: &Path,
    split: &str,
    tokenizer: &tokenizers::Tokenizer,
    model: &str,
) -> Result<Vec<TokenizedDocument>, InputError> {
    let dataset = Dataset::open(dir).map_err(|e| InputError::Dataset {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    if dataset.tokenizer.get_vocab(true) != tokenizer.get_vocab(true) {
        return Err(InputError::TokenizerMismatch {
            dataset: dir.display().to_string(),
            model: model.to_string(),
        });
    }
    let shards = match split {
        "train" => &dataset.train,
        "val" => &dataset.val,
        other => return Err(InputError::Split(other.to_string())),
    };
    let tokens = shards.read(0, shards.len() as usize);
    let eos = dataset.eos_id();
    let name = format!("{}:{split}", dir.display());
    let mut documents = Vec::new();
    for ids in tokens.split_inclusive(|t| *t == eos) {
        // Bytes of the text the scored tokens stand for (the EOS stands for none).
        let body = ids.strip_suffix(&[eos]).unwrap_or(ids);
        let bytes = match body.get(1..) {
            Some(rest) => tokenizer
                .decode(rest, true)
                .map_err(|e| InputError::Read {
                    path: dir.to_path_buf(),
                    message: format!("cannot decode the {split} split: {e}"),
                })?
                .len() as u64,
            None => 0,
        };
        documents.push(TokenizedDocument {
            name: name.clone(),
            ids: ids.to_vec(),
            bytes,
            scored: None,
        });
    }
    Ok(documents)
}

/// The examples of the JSONL file `path` as fine-tuning reads them ([`data::jsonl::read_file`]:
/// `text` lines scored whole, `prompt`/`completion` lines on the completion and the EOS after
/// it, `messages` lines on the assistant turns), one document each, not truncated (long
/// examples are scored over sliding windows). Examples with nothing scored are left out.
pub fn jsonl_documents(
    path: &Path,
    tokenizer: &tokenizers::Tokenizer,
    eos_id: u32,
    chat_template: Result<&data::chat::ChatTemplate, String>,
) -> Result<Vec<TokenizedDocument>, InputError> {
    let read_error = |message: String| InputError::Read {
        path: path.to_path_buf(),
        message,
    };
    let options = data::jsonl::ExampleOptions {
        tokenizer,
        eos_id,
        chat_template,
        seq_len: usize::MAX - 1,
        val_fraction: 0.0,
    };
    // DataError's message names the file and line already.
    let lines =
        data::jsonl::read_file(path, &options).map_err(|e| InputError::Jsonl(e.to_string()))?;
    let name = path.display().to_string();
    let mut documents = Vec::new();
    for (example, _) in lines.into_iter().filter_map(|line| line.example) {
        let scored: Vec<bool> = example.weights.iter().map(|&w| w != 0.0).collect();
        let scored_ids: Vec<u32> = example
            .tokens
            .iter()
            .zip(&scored)
            .skip(1)
            .filter(|(_, &s)| s)
            .map(|(&id, _)| id)
            .collect();
        let bytes = tokenizer
            .decode(&scored_ids, true)
            .map_err(|e| read_error(format!("cannot decode an example: {e}")))?
            .len() as u64;
        documents.push(TokenizedDocument {
            name: name.clone(),
            ids: example.tokens,
            bytes,
            scored: Some(scored),
        });
    }
    Ok(documents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_walked_in_order_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.md"), "# B").unwrap();
        std::fs::write(dir.path().join("a.txt"), "a").unwrap();
        std::fs::write(dir.path().join("c.bin"), "x").unwrap();
        let data = DataSection::default();
        let docs = read_documents(&[dir.path().to_path_buf()], &data).unwrap();
        let names: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(names, ["a", "# B"]);
        let missing = read_documents(&[dir.path().join("nope")], &data).unwrap_err();
        assert!(missing.to_string().contains("no such file"));
        let empty = tempfile::tempdir().unwrap();
        assert!(read_documents(&[empty.path().to_path_buf()], &data).is_err());
    }
}
