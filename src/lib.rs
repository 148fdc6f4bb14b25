//! llmtool: build datasets from markdown, train and fine-tune Llama-style models, evaluate and
//! sample them, on CPU, CUDA or Metal through candle.

//!
//! This package is the command-line layer: argument parsing ([`cli`]), one module per command
//! ([`commands`]) and the benchmark harness ([`mod@bench`]). The work is done by the layer crates
//! under `crates/`, re-exported here under their short names so that the tests and examples
//! reach every layer through `llmtool::`.

#![warn(missing_docs)]

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

/// Raised by the launcher of a multi-process run when a rank failed; the launcher exits with
/// the rank's code, so a scheduler sees what the rank reported.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RanksFailed {
    /// The exit code to end with.
    pub code: i32,
    /// Which rank failed, and how.
    pub message: String,
}

/// The process exit code for an error: 128 + the signal's number for an interruption (130 for
/// Ctrl-C, 143 for SIGTERM, 129 for SIGHUP, as shells report them), a failed rank's code for
/// its launcher, 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if let Some(interrupted) = e.downcast_ref::<Interrupted>() {
        return 128 + interrupted.signal;
    }
    e.downcast_ref::<RanksFailed>()
        .map_or(1, |failed| failed.code)
}

/// An error and its causes on one line, `: `-separated, leaving out a cause whose text the
/// message already holds (library errors often print their source, and `{:#}` would repeat it:
/// "No such file or directory (os error 2): No such file or directory (os error 2)").
pub fn error_message(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone (os error 2)");
        let e = anyhow::Error::new(io).context("x.yaml: cannot read config: gone (os error 2)");
        assert_eq!(
            error_message(&e),
            "x.yaml: cannot read config: gone (os error 2)"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_message(&e), "outer: inner");
    }
}
