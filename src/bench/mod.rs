//! Throughput benchmark with the shapes, tasks, modes and JSON fields of
//! `bench/torch_ref.py` (PyTorch + transformers + PEFT), so rows of the two tools join on
//! `(task, preset, mode)`. Every task runs the same code as the real commands: training steps go
//! through `train::gradients::accumulate`, clipping and AdamW, as `llmtool train` does.
//!
//! One job per file: what a row names (`rows.rs`: presets, modes, tasks, settings), measuring
//! a row and its memory field (`measure.rs`), the training and LoRA steps it times
//! (`training.rs`), greedy decoding (`generation.rs`), the op check's rows (`op_check.rs`), and
//! here the timing loop they share.

mod generation;
mod measure;
mod op_check;
mod rows;
mod training;

pub use measure::measure;
pub use op_check::{adamw_row, op_rows};
pub use rows::{LoraBase, LoraShape, Mode, Preset, Sampling, Settings, Task, TaskName};

use candle_core::Device;
use std::time::Instant;

/// Seconds per call of `f` after `warmup` calls, with the device synchronized around the timing.
fn timed(
    device: &Device,
    warmup: usize,
    steps: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..steps {
        f()?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / steps.max(1) as f64)
}
