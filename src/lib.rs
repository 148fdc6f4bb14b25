//! llmtool: build datasets from markdown, train and fine-tune Llama-style models, evaluate and
//! sample them, on CPU, CUDA or Metal through candle.

pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod device;
pub mod eval;
pub mod generate;
pub mod memory;
pub mod model;
pub mod ops;
pub mod progress;
pub mod train;

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
