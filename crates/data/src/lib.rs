//! The data pipeline: markdown files in, packed token shards and a manifest out.
//!
//! `corpus` finds and reads files, `markdown` cleans them into documents, `dedup` removes
//! duplicates and picks each document's split, `tokenizer` trains or loads the BPE, `shards`
//! writes the dataset and `loader` reads it back for training. `jsonl` reads fine-tuning
//! examples (text, prompt/completion, chat) instead.

pub mod build;
pub mod chat;
pub mod corpus;
pub mod dedup;
pub mod jsonl;
pub mod loader;
pub mod markdown;
pub mod progress;
pub mod shards;
pub mod tokenizer;

pub use build::{build, BuildOptions, BuildReport};
pub use corpus::{clean_documents, Corpus, Document, Skipped};
pub use loader::{Batches, Dataset, TokenShards};
pub use shards::Manifest;
pub use tokenizers::Tokenizer;

use std::path::PathBuf;

/// Everything that can go wrong turning markdown into a dataset, or reading one back.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: input path does not exist", .0.display())]
    MissingRoot(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid glob pattern `{pattern}`: {message}")]
    Glob { pattern: String, message: String },
    #[error("{}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("{}: invalid manifest: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Shard { path: PathBuf, message: String },
    #[error("no documents left after cleaning ({files} files read, {skipped} skipped): check data.roots, data.include and data.min_chars")]
    Empty { files: usize, skipped: usize },
    #[error("the {split} split has {tokens} tokens, fewer than seq_len + 1 = {needed}: add data, lower training.seq_len or change data.val_fraction")]
    TooShort {
        split: String,
        tokens: u64,
        needed: u64,
    },
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("no training examples in {files} JSONL files ({val} in the validation split, {unscored} with nothing to score within training.seq_len): add examples, raise training.seq_len or lower data.val_fraction")]
    NoExamples {
        files: usize,
        val: usize,
        unscored: usize,
    },
    #[error("{}: {message}", path.display())]
    Output { path: PathBuf, message: String },
}

impl DataError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Lowercase hex of a SHA-256 digest.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
