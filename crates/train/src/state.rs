//! `training_state.safetensors`: everything an exact resume needs (weights, AdamW moments,
//! step, data cursor, best validation loss), in one file written atomically.

use candle_core::{Device, Tensor};
use model::weights::{save_safetensors_with_metadata, ModelError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// File name inside the run directory.
pub const STATE_FILE: &str = "training_state.safetensors";
const PROGRESS_KEY: &str = "llmtool_progress";

/// Scalars of the training state, stored in the safetensors header metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps completed.
    pub step: u64,
    /// Training windows consumed (the data cursor).
    pub cursor: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Best validation loss so far.
    pub best_val_loss: Option<f64>,
    /// Seconds spent training so far.
    pub elapsed: f64,
    /// Sum of the training losses of the steps since the last logged step (their mean is what
    /// the log shows), stored exactly so that a resumed run logs the same mean.
    #[serde(default, with = "exact_f64")]
    pub interval_loss: f64,
    /// How many steps `interval_loss` sums.
    #[serde(default)]
    pub interval_steps: u64,
    /// Processes that trained the run (each takes its share of every step's windows); states
    /// saved before multi-process training existed come from one.
    #[serde(default = "one")]
    pub ranks: u64,
}

fn one() -> u64 {
    1
}

/// An `f64` stored as the hex digits of its bits: JSON float parsing may land one ulp off, and
/// a resumed run must continue from exactly the same sum.
mod exact_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{:016x}", value.to_bits()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        let hex = String::deserialize(deserializer)?;
        u64::from_str_radix(&hex, 16)
            .map(f64::from_bits)
            .map_err(serde::de::Error::custom)
    }
}

/// Writes parameters (`param.NAME`), optimizer state (`m.NAME`, `v.NAME`) and progress.
pub fn save(
    path: &Path,
    params: &[(String, Tensor)],
    optimizer: Vec<(String, Tensor)>,
    progress: &Progress,
) -> Result<(), ModelError> {
    let mut tensors: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| (format!("param.{n}"), t.clone()))
        .collect();
    tensors.extend(optimizer);
    let progress = serde_json::to_string(progress).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let metadata = HashMap::from([(PROGRESS_KEY.to_string(), progress)]);
    save_safetensors_with_metadata(&tensors, path, metadata)
}

/// A loaded training state.
pub struct SavedState {
    /// The trained parameters by name.
    pub params: HashMap<String, Tensor>,
    /// The AdamW moments, as `m.NAME` and `v.NAME`.
    pub optimizer: HashMap<String, Tensor>,
    /// Step, data cursor and the other scalars.
    pub progress: Progress,
}

/// Reads a state written by [`save`].
pub fn load(path: &Path, device: &Device) -> Result<SavedState, ModelError> {
    let bad = |message: String| ModelError::Config {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::Missing {
                path: path.to_path_buf(),
                what: "the training state of the run to resume".into(),
            }
        } else {
            ModelError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let corrupt = |e: &dyn std::fmt::Display| ModelError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(&e))?;
    let progress = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(PROGRESS_KEY))
        .ok_or_else(|| bad("not an llmtool training state (no progress record)".into()))?;
    let progress: Progress =
        serde_json::from_str(progress).map_err(|e| bad(format!("progress record: {e}")))?;
    let all = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| corrupt(&e))?;
    let mut params = HashMap::new();
    let mut optimizer = HashMap::new();
    for (name, t) in all {
        match name.strip_prefix("param.") {
            Some(n) => {
                params.insert(n.to_string(), t);
            }
            None => {
                optimizer.insert(name, t);
            }
        }
    }
    Ok(SavedState {
        params,
        optimizer,
        progress,
    })
}
