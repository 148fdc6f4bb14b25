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

pub use config;
pub use data;
pub use eval;
pub use generate;
pub use model;
pub use ops;
pub use train;

/// Exit status for interrupted runs (128 + SIGINT), as shells report Ctrl-C.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Raised when a run stopped because the user pressed Ctrl-C (after saving its state).
#[derive(Debug, thiserror::Error)]
#[error("interrupted: {0}")]
pub struct Interrupted(pub String);

/// The process exit code for an error: 130 for an interruption, 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<Interrupted>().is_some() {
        EXIT_INTERRUPTED
    } else {
        1
    }
}
