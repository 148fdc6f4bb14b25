//! Hugging Face model directories: `config.json`, `model.safetensors` (or shards with
//! `model.safetensors.index.json`), and the tokenizer files of [`crate::tokenizer_files`].

use super::config::LlamaConfig;
use super::llama::Llama;
use super::quantized::WeightStorage;
use super::tokenizer_files::TokenizerSource;
use super::weights::{new_dir_builder, save_safetensors, write_atomic, ModelError, Weights};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// A model loaded from a directory, with its tokenizer.
pub struct LoadedModel {
    /// The model, its weights on the requested device.
    pub model: Llama,
    /// The directory's `tokenizer.json`.
    pub tokenizer: tokenizers::Tokenizer,
    /// The directory it was loaded from.
    pub dir: PathBuf,
}

/// Reads and parses the JSON file `path`; a missing file is [`ModelError::Missing`] naming `what`
/// it is.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::Missing {
                path: path.to_path_buf(),
                what: what.into(),
            }
        } else {
            ModelError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads and checks `DIR/config.json`.
pub fn read_config(dir: &Path) -> Result<LlamaConfig, ModelError> {
    let path = dir.join("config.json");
    let config: LlamaConfig = read_json(&path, "the model's config.json")?;
    let json: serde_json::Value = read_json(&path, "the model's config.json")?;
    crate::family::check_unsupported(&json)
        .and_then(|()| config.check())
        .map_err(|message| ModelError::Config { path, message })?;
    Ok(config)
}

/// The safetensors files holding the weights of the model in `dir`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return Err(ModelError::Missing {
            path: single,
            what: "model weights: model.safetensors or model.safetensors.index.json".into(),
        });
    }
    let index: serde_json::Value = read_json(&index_path, "the shard index")?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Config {
            path: index_path.clone(),
            message: "weight_map: missing or not an object".into(),
        })?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Reads `DIR/tokenizer.json` and checks it fits a model with `vocab_size` embeddings.
pub fn read_tokenizer(dir: &Path, vocab_size: usize) -> Result<tokenizers::Tokenizer, ModelError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(ModelError::Missing {
            path,
            what: "the tokenizer; copy the base model's tokenizer.json here".into(),
        });
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
        path: path.clone(),
        message: format!("cannot load: {e}"),
    })?;
    let size = tokenizer.get_vocab_size(true);
    if size > vocab_size {
        return Err(ModelError::Tokenizer {
            path,
            message: format!(
                "has {size} tokens but the model has only {vocab_size} embeddings: it belongs to another model"
            ),
        });
    }
    Ok(tokenizer)
}

/// Loads the model in `dir` for inference (frozen weights, q/k/v and gate/up projections
/// stacked: [`Llama::fuse_projections`]) computing in `dtype`, with its tokenizer.
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel, ModelError> {
    load_as(dir, WeightStorage::Dense(dtype), dtype, device)
}

/// [`load`] with the weights stored as `storage` (NF4 projections, for instance) and
/// computing in `compute`.
pub fn load_as(
    dir: &Path,
    storage: WeightStorage,
    compute: DType,
    device: &Device,
) -> Result<LoadedModel, ModelError> {
    let mut loaded = load_stored(dir, storage, compute, device)?;
    loaded.model.fuse_projections()?;
    Ok(loaded)
}

/// Loads the model in `dir` with its frozen weights stored as `storage` (e.g. bf16 or NF4 for
/// a LoRA base) and computing in `compute`, with its tokenizer.
pub fn load_stored(
    dir: &Path,
    storage: impl Into<WeightStorage>,
    compute: DType,
    device: &Device,
) -> Result<LoadedModel, ModelError> {
    let storage = storage.into();
    let config = read_config(dir)?;
    let tokenizer = read_tokenizer(dir, config.vocab_size)?;
    let weights = Weights::read_stored(&weight_files(dir)?, storage, device)?;
    Ok(LoadedModel {
        model: Llama::new(&config, &weights, compute)?,
        tokenizer,
        dir: dir.to_path_buf(),
    })
}

/// Everything written into a model directory.
pub struct ModelFiles<'a> {
    /// The model's config, written as `config.json`.
    pub config: &'a LlamaConfig,
    /// The weights by Hugging Face name, written as safetensors.
    pub tensors: &'a [(String, Tensor)],
    /// `tokenizer.json` and the files transformers reads beside it.
    pub tokenizer: TokenizerSource<'a>,
    /// The dtype the weights are stored in (`config.json` names it).
    pub dtype: DType,
}

/// Writes a complete model directory at `dir`, replacing any previous one only once the new
/// one is complete (written beside it, then renamed).
pub fn save(dir: &Path, files: &ModelFiles) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let staging = new_dir_builder()
        .prefix(".model-")
        .tempdir_in(parent)
        .map_err(io(parent))?;
    let tmp = staging.path();
    let stored: Vec<(String, Tensor)> = files
        .tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(files.dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    save_safetensors(&stored, &tmp.join("model.safetensors"))?;
    let mut config = files.config.clone();
    config.set_stored_dtype(files.dtype);
    let json = serde_json::to_string_pretty(&config).map_err(|e| ModelError::Config {
        path: dir.join("config.json"),
        message: e.to_string(),
    })?;
    write_atomic(&tmp.join("config.json"), json.as_bytes()).map_err(io(dir))?;
    files.tokenizer.write(tmp, &config)?;
    replace_dir(staging.keep(), dir)
}

/// Writes `model` (its config and current weights, stored as `dtype`) with `tokenizer` as a
/// model directory.
pub fn save_model(
    dir: &Path,
    model: &Llama,
    tokenizer: TokenizerSource,
    dtype: DType,
) -> Result<(), ModelError> {
    let tensors = model.named_parameters()?;
    save(
        dir,
        &ModelFiles {
            config: &model.config,
            tensors: &tensors,
            tokenizer,
            dtype,
        },
    )
}

/// Moves the finished directory `new` to `dir`, keeping the old one until the move is done.
fn replace_dir(new: PathBuf, dir: &Path) -> Result<(), ModelError> {
    let io = |source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let old = dir.with_extension("old");
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io)?;
        }
        std::fs::rename(dir, &old).map_err(io)?;
    }
    std::fs::rename(&new, dir).map_err(io)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io)?;
    }
    Ok(())
}
