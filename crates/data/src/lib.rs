//! The data pipeline: markdown files in, packed token shards and a manifest out.
//!
//! `corpus` finds and reads files, `markdown` cleans them into documents, `dedup` removes
//! duplicates and picks each document's split, `tokenizer` trains or loads the BPE, `shards`
//! writes the dataset and `loader` reads it back for training. `jsonl` reads fine-tuning
//! examples (text, prompt/completion, chat) instead.

#![warn(missing_docs)]

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
    /// A `data.roots` entry does not exist.
    #[error("{}: input path does not exist", .0.display())]
    MissingRoot(PathBuf),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A `data.include` or `data.exclude` pattern is not a valid glob.
    #[error("invalid glob pattern `{pattern}`: {message}")]
    Glob {
        /// The pattern as written.
        pattern: String,
        /// What is wrong with it.
        message: String,
    },
    /// A tokenizer could not be loaded, trained or saved, or is not the dataset's.
    #[error("{}: {message}", path.display())]
    Tokenizer {
        /// The `tokenizer.json`.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// `manifest.json` could not be parsed or written.
    #[error("{}: invalid manifest: {message}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A shard's size disagrees with the manifest.
    #[error("{}: {message}", path.display())]
    Shard {
        /// The shard file.
        path: PathBuf,
        /// The sizes that disagree, and the fix.
        message: String,
    },
    /// Cleaning left no document.
    #[error("no documents left after cleaning ({files} files read, {skipped} skipped): check data.roots, data.include and data.min_chars")]
    Empty {
        /// Files found under the roots and read.
        files: usize,
        /// Files and folders left out (unreadable, binary, no text after cleaning, too short).
        skipped: usize,
    },
    /// A split holds fewer tokens than one training window needs.
    #[error("the {split} split has {tokens} tokens, fewer than seq_len + 1 = {needed}: add data, lower training.seq_len or change data.val_fraction")]
    TooShort {
        /// `train` or `val`.
        split: String,
        /// Tokens in the split.
        tokens: u64,
        /// Tokens one window needs: `seq_len + 1`.
        needed: u64,
    },
    /// A line of a JSONL file is not a valid example.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        /// The JSONL file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },
    /// The JSONL files left no training example.
    #[error("no training examples in {files} JSONL files ({val} in the validation split, {unscored} with nothing to score within training.seq_len): add examples, raise training.seq_len or lower data.val_fraction")]
    NoExamples {
        /// JSONL files read.
        files: usize,
        /// Examples that went to the validation split.
        val: usize,
        /// Examples with no scored token left within `seq_len + 1` tokens.
        unscored: usize,
    },
    /// The dataset's destination exists and is not a dataset.
    #[error("{}: {message}", path.display())]
    Output {
        /// The destination folder.
        path: PathBuf,
        /// Why it is not replaced.
        message: String,
    },
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
