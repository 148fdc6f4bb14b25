//! A run directory and its rules: what it holds, when a new run may start in it, which config
//! changes a resume refuses, and the threads a run trains on.

use config::Config;
use std::path::Path;

/// The resolved config of a run, as saved in its directory.
pub const RUN_CONFIG: &str = "config.yaml";

/// Why a run cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The directory holds a run and neither resuming nor starting over was asked for.
    #[error("{} already holds a run: continue it with `llmtool train --resume {}`, or start over with --force", .0.display(), .0.display())]
    Occupied(std::path::PathBuf),
    /// The training threads could not start.
    #[error("starting the training threads: {0}")]
    Threads(String),
    /// The training thread panicked.
    #[error("the training thread panicked")]
    Panicked,
}

/// Refuses to overwrite an existing run unless resuming or forced.
pub fn guard_run_dir(dir: &Path, resume: bool, force: bool) -> Result<(), RunError> {
    let holds_run = dir.join(RUN_CONFIG).exists() || dir.join(crate::state::STATE_FILE).exists();
    if holds_run && !resume && !force {
        return Err(RunError::Occupied(dir.to_path_buf()));
    }
    if force && !resume {
        for stale in ["metrics.jsonl", "loss.svg", crate::state::STATE_FILE] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
    }
    Ok(())
}

/// Keys whose change makes a saved state unusable or the resumed run not a continuation.
pub fn incompatible_keys(saved: &Config, given: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    if saved.model != given.model {
        keys.push("model.*".to_string());
    }
    let (a, b) = (&saved.training, &given.training);
    for (name, same) in [
        ("training.seq_len", a.seq_len == b.seq_len),
        ("training.batch_size", a.batch_size == b.batch_size),
        ("training.grad_accum", a.grad_accum == b.grad_accum),
        ("training.seed", a.seed == b.seed),
        ("training.sampling", a.sampling == b.sampling),
    ] {
        if !same {
            keys.push(name.to_string());
        }
    }
    if saved.data != given.data {
        keys.push("data.*".to_string());
    }
    keys
}

/// Runs `f` on a worker of a rayon pool whose threads have 256 MiB stacks: candle's backward
/// pass and tensor drops recurse once per graph node. Inside the pool, every parallel kernel and
/// GEMM starts on this thread and hands only its other half to another worker; from outside it
/// would hand all of it over and sleep until woken, two thread switches per op.
pub fn on_big_stack<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, RunError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(256 << 20)
        .build()
        .map_err(|e| RunError::Threads(e.to_string()))?;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.install(f)))
        .map_err(|_| RunError::Panicked)
}
