//! A LoRA adapter: made fresh, read from and written to a PEFT or mlx-lm directory, checked
//! against its base, and attached to a model.

use super::layer::LoraLayer;
use super::mlx::{AdapterFormat, MlxAdapterConfig};
use super::peft::{expand_targets, AdapterConfig};
use candle_core::{DType, Device, Result, Tensor, Var};
use config::LoraSection;
use model::config::LlamaConfig;
use model::io::{read_config, read_json};
use model::names::Module;
use model::weights::{save_safetensors, write_atomic, ModelError, Weights};
use model::Llama;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A LoRA adapter: its PEFT config and the A/B matrices of each adapted module.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The adapter's `adapter_config.json`.
    pub config: AdapterConfig,
    /// Module path (`model.layers.0.self_attn.q_proj`) to `(A [r, in], B [out, r])`.
    pub(super) modules: BTreeMap<String, (Tensor, Tensor)>,
}

impl Adapter {
    /// Wraps the projections this adapter adapts in `model` (replacing any adapter attached
    /// before). The model then computes `W x + scale * B A dropout(x)` there; the adapter's
    /// tensors are shared, so gradients land on [`Adapter::vars`].
    pub fn attach(&self, model: &mut Llama) -> std::result::Result<(), ModelError> {
        // On CUDA the frozen projections are stacked first (as for inference), so that the
        // updates of a stack's parts compute as one product with it (`ops::stacked_lora_linear`,
        // which runs there only: elsewhere the stack would go unused).
        if model.device().is_cuda() {
            model.fuse_projections()?;
        }
        let (scale, dropout) = (self.scale(), self.config.lora_dropout);
        for (id, (path, (a, b))) in self.modules().enumerate() {
            let linear = model.linear_mut(path).ok_or_else(|| {
                ModelError::Lora(format!("the adapter adapts {path}, which this model lacks"))
            })?;
            let (out, inp) = linear.weight.dims2()?;
            if a.dims()[1..] != [inp] || b.dims()[..1] != [out] || a.dim(0)? != b.dim(1)? {
                return Err(ModelError::Lora(format!(
                    "{path}: A {:?} and B {:?} do not fit the weight [{out}, {inp}]",
                    a.dims(),
                    b.dims()
                )));
            }
            let layer = LoraLayer::new(a.clone(), b.clone(), scale, dropout, id as u64);
            linear.adapter = Some(Arc::new(layer));
        }
        Ok(())
    }

    /// A new trainable adapter for `cfg` with the settings of `lora`: A drawn like PEFT's
    /// `kaiming_uniform_(a=sqrt(5))` (uniform in `±1/sqrt(in)`) from `seed`, B zero, both f32
    /// `Var`s on `device`.
    pub fn init(
        lora: &LoraSection,
        cfg: &LlamaConfig,
        seed: u64,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let targets = expand_targets(&lora.target_modules, &model::Family::of(cfg))
            .map_err(ModelError::Lora)?;
        let shapes = target_shapes(cfg, &targets);
        check_rank(lora.r, &shapes).map_err(ModelError::Lora)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut modules = BTreeMap::new();
        for (path, out, inp) in shapes {
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..lora.r * inp)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (lora.r, inp), device)?)?;
            let b = Var::zeros((out, lora.r), DType::F32, device)?;
            modules.insert(path, (a.as_tensor().clone(), b.as_tensor().clone()));
        }
        Ok(Self {
            config: AdapterConfig::new(lora, &targets),
            modules,
        })
    }

    /// Reads the adapter in `dir` (PEFT's or mlx-lm's, see [`AdapterFormat::of_dir`]) for the
    /// base model `cfg`, as frozen `dtype` tensors. Fails with the file and key when it does
    /// not fit the base.
    pub fn load(
        dir: &Path,
        cfg: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let format = AdapterFormat::of_dir(dir);
        let config_path = dir.join("adapter_config.json");
        let bad_config = |message| ModelError::Adapter {
            path: config_path.clone(),
            message,
        };
        let what = "the adapter's adapter_config.json";
        let read = match format {
            AdapterFormat::Peft => {
                let config: AdapterConfig = read_json(&config_path, what)?;
                config.check_supported().map_err(bad_config)?;
                ReadConfig::Peft(Box::new(config))
            }
            AdapterFormat::Mlx => {
                let config: MlxAdapterConfig = read_json(&config_path, what)?;
                config.check_supported().map_err(bad_config)?;
                ReadConfig::Mlx(config)
            }
        };
        let path = dir.join(format.weights_file());
        if !path.is_file() {
            return Err(ModelError::Missing {
                path,
                what: "the adapter weights (PEFT's adapter_model.safetensors; convert an adapter_model.bin with save_pretrained(safe_serialization=True)), or mlx-lm's adapters.safetensors".into(),
            });
        }
        let weights = Weights::read(std::slice::from_ref(&path), dtype, device)?;
        let r = match &read {
            ReadConfig::Peft(config) => config.r,
            ReadConfig::Mlx(config) => config.lora_parameters.rank,
        };
        let modules =
            collect_modules(&weights, cfg, r, format).map_err(|message| ModelError::Adapter {
                path: path.clone(),
                message,
            })?;
        let config = match read {
            ReadConfig::Peft(config) => *config,
            ReadConfig::Mlx(config) => config.to_peft(modules.keys().map(String::as_str)),
        };
        check_base(&config, dir, cfg).map_err(bad_config)?;
        Ok(Self { config, modules })
    }

    /// Writes `adapter_config.json` and the weights (f32) into `dir` in `format`, creating
    /// it; each file is replaced atomically. `num_hidden_layers` is the base's (mlx-lm's
    /// config names how many blocks are adapted).
    pub fn save(
        &self,
        dir: &Path,
        format: AdapterFormat,
        num_hidden_layers: usize,
    ) -> std::result::Result<(), ModelError> {
        let tensors = self
            .modules
            .iter()
            .flat_map(|(path, (a, b))| [(path, a, true), (path, b, false)])
            .map(|(path, t, is_a)| {
                let t = t.to_dtype(DType::F32)?;
                let t = if format.transposed() {
                    t.t()?.contiguous()?
                } else {
                    t
                };
                Ok((format.tensor_name(path, is_a), t))
            })
            .collect::<Result<Vec<_>>>()?;
        save_safetensors(&tensors, &dir.join(format.weights_file()))?;
        let path = dir.join("adapter_config.json");
        let json = match format {
            AdapterFormat::Peft => serde_json::to_string_pretty(&self.config),
            AdapterFormat::Mlx => serde_json::to_string_pretty(&MlxAdapterConfig::from_peft(
                &self.config,
                self.modules.keys().map(String::as_str),
                num_hidden_layers,
            )),
        }
        .map_err(|e| ModelError::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, json.as_bytes()).map_err(|source| ModelError::Io { path, source })
    }

    /// The factor on `B A x` (see [`AdapterConfig::scale`]).
    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    /// Every adapter tensor under its PEFT name, sorted by name.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.modules
            .iter()
            .flat_map(|(path, (a, b))| {
                [
                    (AdapterFormat::Peft.tensor_name(path, true), a.clone()),
                    (AdapterFormat::Peft.tensor_name(path, false), b.clone()),
                ]
            })
            .collect()
    }

    /// The trainable tensors as `Var`s under their PEFT names, sorted by name: what the
    /// optimizer updates. Empty for an adapter loaded frozen (see [`Adapter::into_trainable`]).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.tensors()
            .into_iter()
            .filter(|(_, t)| t.is_variable())
            .filter_map(|(n, t)| Var::from_tensor(&t).ok().map(|v| (n, v)))
            .collect()
    }

    /// The same adapter with every tensor copied into an f32 `Var`, to continue training one
    /// that was loaded from disk.
    pub fn into_trainable(self) -> std::result::Result<Self, ModelError> {
        let trainable = |t: &Tensor| -> Result<Tensor> {
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?
                .as_tensor()
                .clone())
        };
        let modules = self
            .modules
            .iter()
            .map(|(p, (a, b))| Ok((p.clone(), (trainable(a)?, trainable(b)?))))
            .collect::<Result<_>>()?;
        Ok(Self {
            config: self.config,
            modules,
        })
    }

    /// Module paths with their `(A, B)`, sorted by path.
    pub fn modules(&self) -> impl Iterator<Item = (&String, &(Tensor, Tensor))> {
        self.modules.iter()
    }
}

/// An adapter directory's `adapter_config.json`, in its format.
enum ReadConfig {
    Peft(Box<AdapterConfig>),
    Mlx(MlxAdapterConfig),
}

/// Groups the tensors of an adapter file in `format` by module, checks them against the base
/// `cfg`, and returns them as PEFT holds them (A `[r, in]`, B `[out, r]`).
fn collect_modules(
    weights: &Weights,
    cfg: &LlamaConfig,
    r: usize,
    format: AdapterFormat,
) -> std::result::Result<BTreeMap<String, (Tensor, Tensor)>, String> {
    let all: Vec<&str> = Module::of(&model::Family::of(cfg))
        .into_iter()
        .map(Module::name)
        .collect();
    let shapes: BTreeMap<String, (usize, usize)> = target_shapes(cfg, &all)
        .into_iter()
        .map(|(p, out, inp)| (p, (out, inp)))
        .collect();
    let mut names: Vec<&String> = weights.names().collect();
    names.sort();
    let mut parts: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for name in names {
        let (module, is_a) = format.parse(name).ok_or_else(|| {
            format!("unexpected tensor {name}: only the LoRA A/B matrices of the projections are supported")
        })?;
        let &(out, inp) = shapes.get(module).ok_or_else(|| {
            format!("tensor {name} adapts {module}, which the base model does not have: the adapter was made for another model")
        })?;
        let expected = match (is_a, format.transposed()) {
            (true, false) => [r, inp],
            (false, false) => [out, r],
            (true, true) => [inp, r],
            (false, true) => [r, out],
        };
        let t = weights
            .maybe(name)
            .ok_or_else(|| format!("tensor {name} is unreadable"))?;
        if t.dims() != expected {
            return Err(format!(
                "tensor {name} has shape {:?}, the base model (and r = {r}) needs {expected:?}: the adapter was made for another model",
                t.dims()
            ));
        }
        let t = if format.transposed() {
            t.t()
                .and_then(|t| t.contiguous())
                .map_err(|e| e.to_string())?
        } else {
            t
        };
        let slot = parts.entry(module.to_string()).or_default();
        if is_a {
            slot.0 = Some(t);
        } else {
            slot.1 = Some(t);
        }
    }
    let modules = pair_up(parts, format)?;
    let with_shapes: Vec<_> = modules
        .keys()
        .map(|p| (p.clone(), shapes[p].0, shapes[p].1))
        .collect();
    check_rank(r, &with_shapes)?;
    Ok(modules)
}

/// The `(A, B)` of each module, failing when one of the two is missing.
fn pair_up(
    parts: BTreeMap<String, (Option<Tensor>, Option<Tensor>)>,
    format: AdapterFormat,
) -> std::result::Result<BTreeMap<String, (Tensor, Tensor)>, String> {
    if parts.is_empty() {
        return Err("holds no LoRA A/B tensors".into());
    }
    parts
        .into_iter()
        .map(|(module, pair)| match pair {
            (Some(a), Some(b)) => Ok((module, (a, b))),
            (None, _) => Err(format!("{} is missing", format.tensor_name(&module, true))),
            (_, None) => Err(format!("{} is missing", format.tensor_name(&module, false))),
        })
        .collect()
}

/// Checks `base_model_name_or_path` when it names a model directory that exists (as given or
/// beside the adapter directory); a bare hub name or a path from another machine is accepted.
fn check_base(
    config: &AdapterConfig,
    adapter_dir: &Path,
    cfg: &LlamaConfig,
) -> std::result::Result<(), String> {
    let Some(name) = config.base_model_name_or_path.as_deref() else {
        return Ok(());
    };
    let beside = adapter_dir.parent().map(|p| p.join(name));
    let candidates = [Some(PathBuf::from(name)), beside];
    let Some(dir) = candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("config.json").is_file())
    else {
        return Ok(());
    };
    let Ok(named) = read_config(&dir) else {
        return Ok(());
    };
    match config_difference(&named, cfg) {
        Some(diff) => Err(format!(
            "base_model_name_or_path {name:?} ({}) is a different model from the base given ({diff}); use the base the adapter was trained on",
            dir.display()
        )),
        None => Ok(()),
    }
}

/// The first architectural field where `named` (the adapter's base) and `given` differ.
fn config_difference(named: &LlamaConfig, given: &LlamaConfig) -> Option<String> {
    let fields = [
        (
            "architectures",
            format!("{:?}", named.architectures),
            format!("{:?}", given.architectures),
        ),
        (
            "hidden_size",
            named.hidden_size.to_string(),
            given.hidden_size.to_string(),
        ),
        (
            "intermediate_size",
            named.intermediate_size.to_string(),
            given.intermediate_size.to_string(),
        ),
        (
            "num_hidden_layers",
            named.num_hidden_layers.to_string(),
            given.num_hidden_layers.to_string(),
        ),
        (
            "num_attention_heads",
            named.num_attention_heads.to_string(),
            given.num_attention_heads.to_string(),
        ),
        (
            "num_key_value_heads",
            named.kv_heads().to_string(),
            given.kv_heads().to_string(),
        ),
        (
            "vocab_size",
            named.vocab_size.to_string(),
            given.vocab_size.to_string(),
        ),
        (
            "tie_word_embeddings",
            named.tie_word_embeddings.to_string(),
            given.tie_word_embeddings.to_string(),
        ),
        (
            "rope_theta",
            named.theta().to_string(),
            given.theta().to_string(),
        ),
    ];
    fields
        .into_iter()
        .find(|(_, a, b)| a != b)
        .map(|(key, a, b)| format!("{key} {a} there, {b} here"))
}

/// Module path (`model.layers.0.self_attn.q_proj`) with its weight's `(out, in)`, for every
/// projection of `cfg` whose name is in `targets`, layer by layer in a block's order.
pub(crate) fn target_shapes(cfg: &LlamaConfig, targets: &[&str]) -> Vec<(String, usize, usize)> {
    let modules = Module::of(&model::Family::of(cfg));
    (0..cfg.num_hidden_layers)
        .flat_map(|i| {
            modules
                .iter()
                .filter(|m| targets.contains(&m.name()))
                .map(move |m| {
                    let (out, inp) = m.shape(cfg);
                    (m.path(i), out, inp)
                })
        })
        .collect()
}

/// Checks that rank `r` fits every module `(path, out, in)`.
fn check_rank(r: usize, modules: &[(String, usize, usize)]) -> std::result::Result<(), String> {
    if r == 0 {
        return Err("r is 0: the rank must be at least 1".into());
    }
    match modules.iter().find(|(_, out, inp)| r > *out.min(inp)) {
        Some((path, out, inp)) => Err(format!(
            "r = {r} is larger than {path} ({out}x{inp}) allows; use r <= {}",
            out.min(inp)
        )),
        None => Ok(()),
    }
}
