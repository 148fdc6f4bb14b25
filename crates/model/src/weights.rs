//! Named tensors a model is built from, with errors that name the file and the tensor.

use crate::quantized::{is_projection_weight, Bnb4bit, RawTensor, WeightStorage};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor, Var};
use ops::nf4::Nf4Tensor;
use ops::LinearWeight;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors loading or saving model files.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is missing from a model directory.
    #[error("{path}: missing ({what})")]
    Missing {
        /// Where the file was looked for.
        path: PathBuf,
        /// What the file is, and how to supply it.
        what: String,
    },
    /// `config.json` (or another JSON file) is malformed or unsupported.
    #[error("{path}: {message}")]
    Config {
        /// The JSON file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A safetensors file is corrupt or unreadable.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the model needs is not in the weights.
    #[error("{source_name}: tensor {name} is missing")]
    MissingTensor {
        /// Where the weights came from (a file or folder).
        source_name: String,
        /// The tensor's name, e.g. `model.layers.0.self_attn.q_proj.weight`.
        name: String,
    },
    /// A tensor has the wrong shape for the config.
    #[error("{source_name}: tensor {name} has shape {got:?}, the config needs {expected:?}")]
    Shape {
        /// Where the weights came from (a file or folder).
        source_name: String,
        /// The tensor's name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape stored.
        got: Vec<usize>,
    },
    /// A tensor holds NaN or infinite values.
    #[error("{path}: tensor {name} holds {count} NaN or infinite values")]
    NonFinite {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// How many of its values are NaN or infinite.
        count: usize,
    },
    /// The weights hold a tensor a model of the config does not have.
    #[error("{source_name}: tensor {name} is not part of the model config.json describes ({why})")]
    UnexpectedTensor {
        /// Where the weights came from (a file or folder).
        source_name: String,
        /// The first such tensor, by layer, then name.
        name: String,
        /// Why it does not belong (a layer past `num_hidden_layers`, or no such parameter).
        why: String,
    },
    /// A tokenizer does not fit the model.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong with it, or why it does not fit the model.
        message: String,
    },
    /// A LoRA adapter is malformed, unsupported, or does not fit the base model.
    #[error("{path}: {message}")]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
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

/// Named tensors plus a description of where they came from (for messages). Projections of a
/// 4-bit base are held apart, as NF4.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    quantized: HashMap<String, Arc<Nf4Tensor>>,
    source_name: String,
}

impl Weights {
    /// Wraps tensors that came from `source_name`.
    pub fn new(tensors: HashMap<String, Tensor>, source_name: impl Into<String>) -> Self {
        Self {
            tensors,
            quantized: HashMap::new(),
            source_name: source_name.into(),
        }
    }

    /// Reads every tensor of the safetensors files `paths` onto `device` as `dtype`
    /// (floating-point tensors only are converted).
    pub fn read(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self, ModelError> {
        Self::read_stored(paths, WeightStorage::Dense(dtype), device)
    }

    /// Reads the safetensors files `paths` onto `device`, stored as `storage` says. Each file
    /// is mapped, not read into memory, so the host holds no copy of a file beside the
    /// tensors taken from it. With [`WeightStorage::Nf4`], each projection is quantized as it
    /// is read, one tensor at a time on the host, so that device memory never holds the
    /// 16-bit model. Projections a checkpoint already stores in bitsandbytes' 4-bit format
    /// load as NF4 whatever `storage` says.
    pub fn read_stored(
        paths: &[PathBuf],
        storage: WeightStorage,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let dtype = storage.dense_dtype();
        let mut tensors = HashMap::new();
        let mut quantized = HashMap::new();
        let mut bnb = Bnb4bit::default();
        for path in paths {
            let io = |source| ModelError::Io {
                path: path.clone(),
                source,
            };
            let file = std::fs::File::open(path).map_err(io)?;
            // SAFETY: the map lives only while this file's tensors are copied out of it. Model
            // directories are written through temporary files renamed into place (by llmtool,
            // transformers and the hub client alike), which leaves an open map valid; a file
            // truncated in place by another program while it is read is the one case left
            // (safetensors' and candle's own loaders map their files the same way).
            let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            let corrupt = |message: String| ModelError::Safetensors {
                path: path.clone(),
                message,
            };
            let parsed = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| corrupt(e.to_string()))?;
            for (name, view) in parsed.iter() {
                let count = non_finite(view.dtype(), view.data());
                if count > 0 {
                    return Err(ModelError::NonFinite {
                        path: path.clone(),
                        name: name.to_string(),
                        count,
                    });
                }
            }
            for (name, view) in parsed.iter() {
                let raw = || RawTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                };
                if bnb.take(name, raw, path) {
                    continue;
                }
                if view.dtype() == safetensors::Dtype::U8 && name.ends_with(".weight") {
                    bnb.take_codes(name, raw(), path);
                    continue;
                }
                let quantize = matches!(storage, WeightStorage::Nf4(_))
                    && is_projection_weight(name)
                    && view.shape().len() == 2
                    && matches!(
                        view.dtype(),
                        safetensors::Dtype::F32
                            | safetensors::Dtype::BF16
                            | safetensors::Dtype::F16
                    );
                if quantize {
                    let host = view
                        .load(&Device::Cpu)
                        .map_err(|e| corrupt(e.to_string()))?;
                    let q = Nf4Tensor::quantize(&host, device)?;
                    quantized.insert(name.to_string(), Arc::new(q));
                    continue;
                }
                let t = view.load(device).map_err(|e| corrupt(e.to_string()))?;
                let t = if t.dtype().is_float() && t.dtype() != dtype {
                    t.to_dtype(dtype)?
                } else {
                    t
                };
                tensors.insert(name.to_string(), t);
            }
        }
        for (name, t) in bnb.build(device)? {
            quantized.insert(name, Arc::new(t));
        }
        let source_name = match paths {
            [one] => one.display().to_string(),
            _ => paths
                .first()
                .and_then(|p| p.parent())
                .map_or_else(String::new, |d| d.display().to_string()),
        };
        Ok(Self {
            tensors,
            quantized,
            source_name,
        })
    }

    /// The weight of a projection, `name`, checked against `shape`: dense, or NF4 where it
    /// was quantized.
    pub fn linear(&self, name: &str, shape: &[usize]) -> Result<LinearWeight, ModelError> {
        let Some(q) = self.quantized.get(name) else {
            return Ok(LinearWeight::Dense(self.get(name, shape)?));
        };
        self.check_shape(name, q.shape().dims(), shape)?;
        let (out, _) = q.shape().dims2()?;
        Ok(LinearWeight::Nf4 {
            tensor: q.clone(),
            rows: 0..out,
        })
    }

    /// The same weights with every dense tensor moved to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self, ModelError> {
        self.map_dense(|t| t.to_device(device))
    }

    /// The same weights with `f` applied to every dense tensor (NF4 ones kept as they are).
    fn map_dense(
        &self,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Self, ModelError> {
        let tensors = self
            .tensors
            .iter()
            .map(|(name, t)| Ok((name.clone(), f(t)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            tensors,
            quantized: self.quantized.clone(),
            source_name: self.source_name.clone(),
        })
    }

    /// The same weights with the blocks' projections quantized to NF4 on `device` (as
    /// [`WeightStorage::Nf4`] reads them), one tensor at a time.
    pub fn quantize_projections(mut self, device: &Device) -> Result<Self, ModelError> {
        let names: Vec<String> = self
            .tensors
            .keys()
            .filter(|n| is_projection_weight(n))
            .cloned()
            .collect();
        for name in names {
            if let Some(t) = self.tensors.remove(&name) {
                let q = Nf4Tensor::quantize(&t, device)?;
                self.quantized.insert(name, Arc::new(q));
            }
        }
        Ok(self)
    }

    /// The shape of tensor `name`, dense or NF4.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match self.tensors.get(name) {
            Some(t) => Some(t.dims().to_vec()),
            None => self.quantized.get(name).map(|q| q.shape().dims().to_vec()),
        }
    }

    /// Whether any weight is held as NF4.
    pub fn has_quantized(&self) -> bool {
        !self.quantized.is_empty()
    }

    fn check_shape(&self, name: &str, got: &[usize], shape: &[usize]) -> Result<(), ModelError> {
        match got == shape {
            true => Ok(()),
            false => Err(ModelError::Shape {
                source_name: self.source_name.clone(),
                name: name.into(),
                expected: shape.to_vec(),
                got: got.to_vec(),
            }),
        }
    }

    /// The tensor `name`, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = self.maybe(name).ok_or_else(|| ModelError::MissingTensor {
            source_name: self.source_name.clone(),
            name: name.into(),
        })?;
        self.check_shape(name, t.dims(), shape)?;
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
        let weights = Self {
            tensors,
            quantized: self.quantized,
            source_name: self.source_name,
        };
        Ok((weights, vars))
    }

    /// The same weights stored as `dtype` (inference computes in the stored dtype without a
    /// conversion per forward).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self, ModelError> {
        self.map_dense(|t| t.to_dtype(dtype))
    }

    /// These weights stored as `dtype`, converted one tensor at a time: each old tensor is
    /// freed as its copy is made (unless held elsewhere), so memory never holds the model in
    /// both dtypes, as [`Weights::to_dtype`] does until its result replaces the original.
    pub fn into_dtype(mut self, dtype: DType) -> Result<Self, ModelError> {
        let names: Vec<String> = self.tensors.keys().cloned().collect();
        for name in names {
            if let Some(t) = self.tensors.remove(&name) {
                let converted = t.to_dtype(dtype)?;
                drop(t);
                self.tensors.insert(name, converted);
            }
        }
        Ok(self)
    }

    /// Fails on the first tensor (in layer order) whose name is not in `expected`: weights
    /// for more layers than the config has, or for modules the architecture lacks, would
    /// otherwise be ignored and the model computed from part of its weights. Buffers that
    /// older transformers saved (`rotary_emb.inv_freq`) and an output head that the config
    /// ties to the embedding are left alone, as transformers does.
    pub fn check_unexpected<'a>(
        &self,
        expected: impl IntoIterator<Item = &'a str>,
        layers: usize,
        tied: bool,
    ) -> Result<(), ModelError> {
        let expected: std::collections::HashSet<&str> = expected.into_iter().collect();
        let harmless =
            |n: &str| n.ends_with(".rotary_emb.inv_freq") || (tied && n == crate::names::LM_HEAD);
        let layer_of = |n: &str| -> Option<usize> {
            n.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse()
                .ok()
        };
        let order = |n: &str| (layer_of(n).unwrap_or(usize::MAX), n.to_string());
        let first = self
            .names()
            .filter(|n| !expected.contains(n.as_str()) && !harmless(n.as_str()))
            .min_by(|a, b| order(a.as_str()).cmp(&order(b.as_str())));
        let Some(name) = first else { return Ok(()) };
        let why = match layer_of(name) {
            Some(i) if i >= layers => {
                format!("num_hidden_layers is {layers}, the weights have a layer {i}")
            }
            _ => "no such parameter in this architecture".to_string(),
        };
        Err(ModelError::UnexpectedTensor {
            source_name: self.source_name.clone(),
            name: name.clone(),
            why,
        })
    }

    /// Names of all tensors (dense and NF4).
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys().chain(self.quantized.keys())
    }

    /// Where these weights came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }
}

/// How many elements of a tensor's little-endian `data` of `dtype` are NaN or infinite (0 for
/// integer and 8-bit float types). One pass over the bytes, before they reach a device.
pub fn non_finite(dtype: safetensors::Dtype, data: &[u8]) -> usize {
    use safetensors::Dtype;
    // A float is NaN or infinite when its exponent bits are all ones.
    fn count<const N: usize>(data: &[u8], mask: u64, from: fn([u8; N]) -> u64) -> usize {
        let bad = |c: &[u8]| (from(c.try_into().unwrap()) & mask) == mask;
        // Most weights are finite: a branch-free pass first, counting only if one is not.
        let any = data
            .chunks(N * 4096)
            .any(|block| block.chunks_exact(N).fold(false, |acc, c| acc | bad(c)));
        match any {
            true => data.chunks_exact(N).filter(|c| bad(c)).count(),
            false => 0,
        }
    }
    match dtype {
        Dtype::F32 => count::<4>(data, 0x7f80_0000, |b| u32::from_le_bytes(b) as u64),
        Dtype::F64 => count::<8>(data, 0x7ff0_0000_0000_0000, u64::from_le_bytes),
        Dtype::F16 => count::<2>(data, 0x7c00, |b| u16::from_le_bytes(b) as u64),
        Dtype::BF16 => count::<2>(data, 0x7f80, |b| u16::from_le_bytes(b) as u64),
        _ => 0,
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
    let mut tmp = new_file_builder().tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// A `tempfile` builder whose files are created as `open(2)` creates new files: mode 0666
/// less the umask, where tempfile's default (0600) would survive the rename into place and
/// keep everyone else on the machine from reading the model.
pub fn new_file_builder<'a, 'b>() -> tempfile::Builder<'a, 'b> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder
}

/// A `tempfile` builder for directories made as `mkdir(2)` makes them: mode 0777 less the
/// umask (tempfile's default is 0700).
pub fn new_dir_builder<'a, 'b>() -> tempfile::Builder<'a, 'b> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o777));
    }
    builder
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;

    fn bytes<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|v| to(*v)).collect()
    }

    #[test]
    fn into_dtype_converts_every_tensor_as_to_dtype_does() {
        let dev = Device::Cpu;
        let tensors = HashMap::from([
            (
                "a".to_string(),
                Tensor::new(&[1.5f32, -2.25, 1e-3], &dev).unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::new(&[[0.1f32, 7.0]], &dev).unwrap(),
            ),
        ]);
        let weights = Weights::new(tensors, "test");
        let want = weights.to_dtype(DType::BF16).unwrap();
        let got = weights.into_dtype(DType::BF16).unwrap();
        for name in ["a", "b"] {
            let (g, w) = (got.maybe(name).unwrap(), want.maybe(name).unwrap());
            assert_eq!(g.dtype(), DType::BF16);
            let as_f32 = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(
                as_f32(&g).to_vec1::<f32>().unwrap(),
                as_f32(&w).to_vec1::<f32>().unwrap()
            );
        }
        assert_eq!(got.source_name(), "test");
    }

    #[test]
    fn non_finite_counts_nan_and_infinities_in_every_float_type() {
        let mut f32s = vec![0.5f32; 10_000];
        assert_eq!(non_finite(Dtype::F32, &bytes(&f32s, f32::to_le_bytes)), 0);
        (f32s[0], f32s[4097], f32s[9999]) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY);
        f32s[5] = f32::MAX;
        assert_eq!(non_finite(Dtype::F32, &bytes(&f32s, f32::to_le_bytes)), 3);
        let f64s = [1.0, f64::NAN, -0.0, f64::MIN_POSITIVE];
        assert_eq!(non_finite(Dtype::F64, &bytes(&f64s, f64::to_le_bytes)), 1);
        let halves = [
            half::f16::MAX,
            half::f16::INFINITY,
            half::f16::NAN,
            half::f16::ONE,
        ];
        assert_eq!(
            non_finite(Dtype::F16, &bytes(&halves, half::f16::to_le_bytes)),
            2
        );
        let brains = [
            half::bf16::MAX,
            half::bf16::NEG_INFINITY,
            half::bf16::MIN_POSITIVE,
        ];
        assert_eq!(
            non_finite(Dtype::BF16, &bytes(&brains, half::bf16::to_le_bytes)),
            1
        );
        // Integers never count, whatever their bits.
        assert_eq!(
            non_finite(Dtype::U32, &bytes(&[u32::MAX; 4], u32::to_le_bytes)),
            0
        );
    }
}
