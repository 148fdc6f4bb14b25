//! GGUF export: a model of a supported family as llama.cpp's `convert_hf_to_gguf.py` writes it
//! (tensor names and layouts, hyperparameters, the tokenizer and chat template), in f16, bf16,
//! q8_0 or q4_k_m, plus an Ollama `Modelfile` beside it. The tensors come in under their Hugging
//! Face names (a loaded or LoRA-merged model's `named_parameters`); [`export`] renames,
//! re-lays and quantizes them, and writes the file atomically.

mod arch;
mod modelfile;
mod quant;
mod vocab;

pub use arch::{gguf_tensor_name, permute_rotary, Arch};
pub use modelfile::modelfile;
pub use quant::{tensor_type, Counters, Quant};
pub use vocab::{SpacePrefix, TokenizerModel, Vocab};

use crate::config::LlamaConfig;
use crate::family::Family;
use crate::weights::new_file_builder;
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};

/// Errors of a GGUF export; each names the file, key or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The model cannot be expressed as a llama.cpp architecture.
    #[error("{0}")]
    Unsupported(String),
    /// The tokenizer files cannot be carried into GGUF.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What cannot be carried over.
        message: String,
    },
    /// A tensor has no GGUF name, or cannot be converted.
    #[error("tensor {name}: {message}")]
    Tensor {
        /// The tensor's Hugging Face name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The output exists and `force` was not given.
    #[error("{0}: already exists; pass --force to replace it")]
    Exists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A tensor operation (conversion, quantization) failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// What to export and how.
pub struct ExportOptions<'a> {
    /// The model directory the tokenizer files (`tokenizer.json`, `tokenizer_config.json`,
    /// `chat_template.jinja`) are read from.
    pub model_dir: &'a Path,
    /// The type the matrices are stored in.
    pub quant: Quant,
    /// Written as `general.name`.
    pub name: &'a str,
}

/// A GGUF file's contents before writing.
pub struct Gguf {
    /// The key-value metadata (`general.*`, the architecture's hyperparameters, `tokenizer.*`),
    /// in the order written.
    pub metadata: Vec<(String, gguf_file::Value)>,
    /// The tensors under their GGUF names, converted and quantized.
    pub tensors: Vec<(String, QTensor)>,
    /// Things llama.cpp will do differently from llmtool (printed by the command).
    pub warnings: Vec<String>,
    /// The tokenizer as written (also used for the Ollama `Modelfile`).
    pub vocab: Vocab,
}

/// Builds the GGUF contents of a model of `config` with HF-named `tensors`.
pub fn build(
    config: &LlamaConfig,
    tensors: &[(String, Tensor)],
    options: &ExportOptions,
) -> Result<Gguf, GgufError> {
    let family = Family::of(config);
    let arch = Arch::of(&family)?;
    let vocab = Vocab::read(options.model_dir, config)?;
    let mut warnings = arch::warnings(arch, config, &family);
    warnings.extend(vocab.warnings());
    let name = safe_name(options.name, &vocab, &mut warnings);
    let mut metadata = arch::metadata(arch, config, &family, options.quant, &name);
    metadata.extend(vocab.metadata());
    let mut out = Vec::new();
    for (name, factors) in arch::rope_tensors(arch, config)? {
        out.push((name, quantize(&factors, quant::F32)?));
    }
    let layers = config.num_hidden_layers;
    let has_lm_head = tensors.iter().any(|(n, _)| n == crate::names::LM_HEAD);
    let has_output = has_lm_head || arch == Arch::Phi3;
    let mut counters = quant::Counters::default();
    for (hf, tensor) in tensors {
        let Some(name) = gguf_tensor_name(hf, &family)? else {
            continue;
        };
        let t = arch::relayout(arch, config, hf, tensor.to_dtype(DType::F32)?)?;
        let ty = tensor_type(
            options.quant,
            &name,
            t.dims(),
            layers,
            has_output,
            &mut counters,
        );
        let q = quantize(&t, ty).map_err(|e| GgufError::Tensor {
            name: hf.clone(),
            message: e.to_string(),
        })?;
        out.push((name, q));
    }
    if arch == Arch::Phi3 && !has_lm_head {
        // llama.cpp's phi3 graph reads `output.weight`; a tied model gets a copy of the table.
        let embed = tensors
            .iter()
            .find(|(n, _)| n == crate::names::EMBED_TOKENS);
        if let Some((_, t)) = embed {
            let t = t.to_dtype(DType::F32)?;
            let ty = tensor_type(
                options.quant,
                "output.weight",
                t.dims(),
                layers,
                true,
                &mut counters,
            );
            out.push(("output.weight".into(), quantize(&t, ty)?));
        }
    }
    Ok(Gguf {
        metadata,
        tensors: out,
        warnings,
        vocab,
    })
}

/// `general.name`, less a quirk of llama.cpp: a name containing `phi3` or `phi-3` makes it
/// look up Phi-3's SentencePiece tokens (`</s>`, `<unk>`, `<s>`, `<|endoftext|>`) by text, and
/// fail to load a vocabulary without them.
fn safe_name(name: &str, vocab: &Vocab, warnings: &mut Vec<String>) -> String {
    let lower = name.to_lowercase();
    let phi3 = lower.contains("phi3") || lower.contains("phi-3");
    let tokens: std::collections::HashSet<&str> = vocab.tokens.iter().map(String::as_str).collect();
    let lacks = ["</s>", "<unk>", "<s>", "<|endoftext|>"]
        .iter()
        .any(|t| !tokens.contains(t));
    if !(phi3 && lacks) {
        return name.to_string();
    }
    let safe = lower.replace("phi-3", "phi 3").replace("phi3", "phi 3");
    warnings.push(format!(
        "general.name is {safe:?}, not {name:?}: llama.cpp would look up Phi-3's SentencePiece \
         tokens in a vocabulary named phi3 and fail to load this one"
    ));
    safe
}

/// `t` stored as `ty`. candle's quantizer reads the tensor's whole storage, so a view (the
/// model's q/k/v are views of one stacked matrix) is copied out first.
fn quantize(t: &Tensor, ty: candle_core::quantized::GgmlDType) -> candle_core::Result<QTensor> {
    let owned = Tensor::from_vec(
        t.flatten_all()?.to_vec1::<f32>()?,
        t.shape(),
        &candle_core::Device::Cpu,
    )?;
    QTensor::quantize(&owned, ty)
}

/// Writes `gguf` to `path` through a temporary file in the same directory, renamed into place
/// once complete; an existing `path` is replaced only with `force`.
pub fn write(gguf: &Gguf, path: &Path, force: bool) -> Result<(), GgufError> {
    if path.exists() && !force {
        return Err(GgufError::Exists(path.to_path_buf()));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GgufError::Io { path, source }
    };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = new_file_builder()
        .prefix(".llmtool-export")
        .tempfile_in(dir)
        .map_err(io(dir))?;
    let mut writer = std::io::BufWriter::new(tmp.as_file());
    let metadata: Vec<(&str, &gguf_file::Value)> =
        gguf.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> =
        gguf.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut writer, &metadata, &tensors)?;
    use std::io::Write;
    writer.flush().map_err(io(path))?;
    drop(writer);
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| GgufError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// [`build`] then [`fn@write`].
pub fn export(
    config: &LlamaConfig,
    tensors: &[(String, Tensor)],
    options: &ExportOptions,
    out: &Path,
    force: bool,
) -> Result<Gguf, GgufError> {
    if out.exists() && !force {
        return Err(GgufError::Exists(out.to_path_buf()));
    }
    let gguf = build(config, tensors, options)?;
    write(&gguf, out, force)?;
    Ok(gguf)
}
