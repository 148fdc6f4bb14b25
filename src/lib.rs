//! llmtool: build datasets from markdown, train and fine-tune Llama-style models, evaluate and
//! sample them, on CPU, CUDA or Metal through candle.

//!
//! This package is the command-line layer: argument parsing ([`cli`]), one module per command
//! ([`commands`]) and the benchmark harness ([`bench`]). The work is done by the layer crates
//! under `crates/`, re-exported here under their short names so that the tests and examples
//! reach every layer through `llmtool::`.

pub mod bench;
pub mod cli;
pub mod commands;
pub mod report;
pub mod signals;

pub use config;
pub use data;
pub use eval;
pub use generate;
pub use model;
pub use ops;
pub use train;

/// Raised when a run stopped on a signal (Ctrl-C, SIGTERM, SIGHUP) after saving its state.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: {message}")]
pub struct Interrupted {
    /// The signal's number.
    pub signal: i32,
    /// What was saved and how to continue.
    pub message: String,
}

/// The process exit code for an error: 128 + the signal's number for an interruption (130 for
/// Ctrl-C, 143 for SIGTERM, 129 for SIGHUP, as shells report them), 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<Interrupted>() {
        Some(interrupted) => 128 + interrupted.signal,
        None => 1,
    }
}
