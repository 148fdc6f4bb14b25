//! Named tensors a model is built from, with errors that name the file and the tensor.

use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Errors loading or saving model files.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file is missing from a model directory.
    #[error("{path}: missing ({what})")]
    Missing { path: PathBuf, what: String },
    /// `config.json` (or another JSON file) is malformed or unsupported.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A safetensors file is corrupt or unreadable.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// A tensor the model needs is not in the weights.
    #[error("{source_name}: tensor {name} is missing")]
    MissingTensor { source_name: String, name: String },
    /// A tensor has the wrong shape for the config.
    #[error("{source_name}: tensor {name} has shape {got:?}, the config needs {expected:?}")]
    Shape {
        source_name: String,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A tokenizer does not fit the model.
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A LoRA adapter is malformed, unsupported, or does not fit the base model.
    #[error("{path}: {message}")]
    Adapter { path: PathBuf, message: String },
    /// LoRA settings that cannot apply to this model (unknown module, bad rank).
    #[error("lora: {0}")]
    Lora(String),
    /// A base model could not be found locally or on the Hugging Face Hub.
    #[error("{0}")]
    Hub(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Named tensors plus a description of where they came from (for messages).
#[derive(Debug, Clone, Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    source_name: String,
}

impl Weights {
    /// Wraps tensors that came from `source_name`.
    pub fn new(tensors: HashMap<String, Tensor>, source_name: impl Into<String>) -> Self {
        Self {
            tensors,
            source_name: source_name.into(),
        }
    }

    /// Reads every tensor of the safetensors files `paths` onto `device` as `dtype`
    /// (floating-point tensors only are converted).
    pub fn read(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let mut tensors = HashMap::new();
        for path in paths {
            let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let corrupt = |message: String| ModelError::Safetensors {
                path: path.clone(),
                message,
            };
            let loaded = candle_core::safetensors::load_buffer(&bytes, device)
                .map_err(|e| corrupt(e.to_string()))?;
            for (name, t) in loaded {
                let t = if t.dtype().is_float() && t.dtype() != dtype {
                    t.to_dtype(dtype)?
                } else {
                    t
                };
                tensors.insert(name, t);
            }
        }
        let source_name = match paths {
            [one] => one.display().to_string(),
            _ => paths
                .first()
                .and_then(|p| p.parent())
                .map_or_else(String::new, |d| d.display().to_string()),
        };
        Ok(Self::new(tensors, source_name))
    }

    /// The tensor `name`, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = self.maybe(name).ok_or_else(|| ModelError::MissingTensor {
            source_name: self.source_name.clone(),
            name: name.into(),
        })?;
        if t.dims() != shape {
            return Err(ModelError::Shape {
                source_name: self.source_name.clone(),
                name: name.into(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    /// The tensor `name` if present.
    pub fn maybe(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).cloned()
    }

    /// Turns every tensor into a trainable `Var` (copying it); returns the weights that now
    /// refer to the vars, and the vars sorted by name.
    pub fn into_trainable(self) -> Result<(Self, Vec<(String, Var)>), ModelError> {
        let mut vars: Vec<(String, Var)> = self
            .tensors
            .into_iter()
            .map(|(name, t)| Ok((name, Var::from_tensor(&t)?)))
            .collect::<candle_core::Result<_>>()?;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let tensors = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        Ok((Self::new(tensors, self.source_name), vars))
    }

    /// The same weights stored as `dtype` (inference computes in the stored dtype without a
    /// conversion per forward).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self, ModelError> {
        let tensors = self
            .tensors
            .iter()
            .map(|(name, t)| Ok((name.clone(), t.to_dtype(dtype)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self::new(tensors, self.source_name.clone()))
    }

    /// Names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Where these weights came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }
}

/// Writes `tensors` as a safetensors file with `{"format": "pt"}` metadata (which transformers
/// requires), through a temporary file renamed into place.
pub fn save_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<(), ModelError> {
    save_safetensors_with_metadata(tensors, path, HashMap::new())
}

/// [`save_safetensors`] with extra header metadata.
pub fn save_safetensors_with_metadata(
    tensors: &[(String, Tensor)],
    path: &Path,
    mut metadata: HashMap<String, String>,
) -> Result<(), ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    metadata.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(
        contiguous.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
    )
    .map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomic(path, &bytes).map_err(io)
}

/// Writes `bytes` to `path` through a temporary file in the same directory, so a crash never
/// leaves a half-written file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
