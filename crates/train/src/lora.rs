//! LoRA adapters in PEFT format: `adapter_config.json` + `adapter_model.safetensors` with keys
//! like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, A `[r, in]`,
//! B `[out, r]`, and the forward `W x + scale * B (A dropout(x))`.

use candle_core::{DType, Device, Result, Tensor, Var};
use config::{Config, LoraSection};
use model::config::LlamaConfig;
use model::io::{read_config, read_json};
use model::names::Projection;
use model::weights::{save_safetensors, write_atomic, ModelError, Weights};
use model::{LinearAdapter, Llama};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The prefix PEFT puts before a module path in adapter tensor names.
const PEFT_PREFIX: &str = "base_model.model.";

/// The low-rank update of one projection: `y += scale * dropout(x) @ A^T @ B^T`.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// Probability of zeroing an input feature during training.
    pub dropout: f64,
    /// Distinguishes this layer's dropout mask from the others' in the same step.
    id: u64,
    /// The seed of this layer's mask for this step, or [`NO_DROPOUT`] (evaluation). Shared
    /// and atomic so the trainer can switch it through a shared reference to the model.
    mask_seed: Arc<AtomicU64>,
}

/// `mask_seed` value meaning dropout is off.
const NO_DROPOUT: u64 = u64::MAX;

impl LoraLayer {
    /// A layer with dropout off until [`LinearAdapter::set_dropout_seed`] turns it on.
    pub fn new(a: Tensor, b: Tensor, scale: f64, dropout: f64, id: u64) -> Self {
        Self {
            a,
            b,
            scale,
            dropout,
            id,
            mask_seed: Arc::new(AtomicU64::new(NO_DROPOUT)),
        }
    }

    /// This step's dropout mask for `x` (in `x`'s dtype), or `None` when dropout is off.
    fn mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match self.mask_seed.load(Ordering::Relaxed) {
            seed if seed != NO_DROPOUT && self.dropout > 0.0 => {
                let mask = dropout_mask(x.dims(), self.dropout, seed, x.device())?;
                Ok(Some(mask.to_dtype(x.dtype())?))
            }
            _ => Ok(None),
        }
    }
}

impl LinearAdapter for LoraLayer {
    /// Turns dropout on with masks drawn from `seed` (mixed with this layer's id), or off.
    /// The same seed gives the same mask, so a recomputed forward (checkpointing) matches.
    fn set_dropout_seed(&self, seed: Option<u64>) {
        let mixed = seed.map_or(NO_DROPOUT, |s| {
            splitmix64(s ^ splitmix64(self.id)).min(NO_DROPOUT - 1)
        });
        self.mask_seed.store(mixed, Ordering::Relaxed);
    }

    /// The update `scale * dropout(x) @ A^T @ B^T`, computed in `dtype`.
    fn update(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let x = match self.mask(x)? {
            Some(mask) => x.mul(&mask)?,
            None => x.clone(),
        };
        let a = ops::cast(&self.a, dtype)?;
        let b = ops::cast(&self.b, dtype)?;
        // Scaling the small B rather than the output keeps one activation-sized tensor less.
        ops::linear(&ops::linear(&x, &a)?, &(b * self.scale)?)
    }

    /// `x @ weight.t()` for a frozen `weight` plus this update, as one graph node
    /// ([`ops::lora_linear`]), computed in `dtype`.
    fn forward_with_frozen(&self, x: &Tensor, weight: &Tensor, dtype: DType) -> Result<Tensor> {
        let mask = self.mask(x)?;
        let a = ops::cast(&self.a, dtype)?;
        let b = ops::cast(&self.b, dtype)?;
        ops::lora_linear(x, weight, &a, &b, self.scale, mask.as_ref())
    }
}

/// An inverted-dropout mask of `shape`: 0 with probability `p`, else `1 / (1 - p)`, the same
/// for the same seed. On the CPU it is drawn from a seeded host generator; on a GPU from the
/// device generator reseeded with `seed` (drawing activation-sized masks on the host and
/// copying them over would cost more than the step itself). Masks differ between backends.
fn dropout_mask(shape: &[usize], p: f64, seed: u64, device: &Device) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    if !device.is_cpu() {
        device.set_seed(seed)?;
        let uniform = Tensor::rand(0f32, 1f32, shape, device)?;
        return uniform.ge(p)?.to_dtype(DType::F32)? * keep;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random::<f64>() < p {
                0.0
            } else {
                keep as f32
            }
        })
        .collect();
    Tensor::from_vec(values, shape, device)
}

/// A 64-bit mixing function (SplitMix64's finaliser).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `target_modules` in `adapter_config.json`: a list of module names, or one string (PEFT
/// treats a string as a regular expression, except `all-linear`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

/// `adapter_config.json` as PEFT 0.21 reads and writes it (the fields llmtool uses; PEFT fills
/// in defaults for the rest, and older PEFT versions load it too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    #[serde(serialize_with = "plain_number")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default = "no_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    pub layers_pattern: Option<serde_json::Value>,
    #[serde(default = "init_true")]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub inference_mode: bool,
}

fn no_bias() -> String {
    "none".into()
}

fn init_true() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

/// Writes whole numbers without a fraction (`8`, as PEFT writes `lora_alpha`), others as floats.
fn plain_number<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

impl AdapterConfig {
    /// The config of a new adapter with these settings on the modules `targets` (long names).
    pub fn new(lora: &LoraSection, targets: &[&str]) -> Self {
        let mut names: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
        names.sort();
        Self {
            base_model_name_or_path: None,
            revision: None,
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: lora.r,
            lora_alpha: lora.alpha,
            lora_dropout: lora.dropout,
            target_modules: TargetModules::List(names),
            use_rslora: lora.rslora,
            use_dora: false,
            bias: no_bias(),
            fan_in_fan_out: false,
            modules_to_save: None,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            layers_to_transform: None,
            layers_pattern: None,
            init_lora_weights: init_true(),
            inference_mode: true,
        }
    }

    /// The factor on `B A x`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        let r = self.r as f64;
        if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }
    }

    /// Rejects PEFT features llmtool does not implement.
    fn check_supported(&self) -> std::result::Result<(), String> {
        let unsupported = [
            (self.peft_type != "LORA", "peft_type is not LORA"),
            (self.use_dora, "use_dora (DoRA) is not supported"),
            (
                self.bias != "none",
                "bias other than \"none\" is not supported",
            ),
            (self.fan_in_fan_out, "fan_in_fan_out is not supported"),
            (
                self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()),
                "modules_to_save is not supported",
            ),
            (
                !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty(),
                "rank_pattern/alpha_pattern (per-module ranks) are not supported",
            ),
        ];
        if let Some((_, why)) = unsupported.iter().find(|(bad, _)| *bad) {
            return Err(why.to_string());
        }
        if self.r == 0 {
            return Err("r is 0: the rank must be at least 1".into());
        }
        if let TargetModules::List(names) = &self.target_modules {
            expand_targets(names)?;
        }
        Ok(())
    }
}

/// Long projection names for `names` (long, short, or `all-linear`), without duplicates, in
/// a block's order.
pub fn expand_targets(names: &[String]) -> std::result::Result<Vec<&'static str>, String> {
    let mut out = Vec::new();
    for name in names {
        if name == "all-linear" {
            out.extend(Projection::ALL);
            continue;
        }
        let projection = Projection::from_name(name).ok_or_else(|| {
            format!(
                "target_modules names {name:?}, a module Llama-family models lack; they have {} (or all-linear)",
                known_targets()
            )
        })?;
        out.push(projection);
    }
    out.sort();
    out.dedup();
    Ok(out.into_iter().map(Projection::name).collect())
}

/// The projection names, comma-separated.
fn known_targets() -> String {
    Projection::ALL.map(Projection::name).join(", ")
}

/// The problems of the config's `lora.target_modules` (names the model's table lacks), for
/// [`config::load_with`].
pub fn config_issues(c: &Config) -> Vec<(String, String)> {
    c.lora
        .target_modules
        .iter()
        .enumerate()
        .filter(|(_, t)| *t != "all-linear" && Projection::from_name(t).is_none())
        .map(|(i, target)| {
            let message = format!(
                "unknown module {target:?}; expected one of {}, or all-linear",
                known_targets()
            );
            (format!("lora.target_modules.{i}"), message)
        })
        .collect()
}

/// Module path (`model.layers.0.self_attn.q_proj`) with its weight's `(out, in)`, for every
/// projection of `cfg` whose name is in `targets`, layer by layer in a block's order.
fn target_shapes(cfg: &LlamaConfig, targets: &[&str]) -> Vec<(String, usize, usize)> {
    (0..cfg.num_hidden_layers)
        .flat_map(|i| {
            Projection::ALL
                .into_iter()
                .filter(|p| targets.contains(&p.name()))
                .map(move |p| {
                    let (out, inp) = p.shape(cfg);
                    (p.path(i), out, inp)
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

/// A LoRA adapter: its PEFT config and the A/B matrices of each adapted module.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: AdapterConfig,
    /// Module path (`model.layers.0.self_attn.q_proj`) to `(A [r, in], B [out, r])`.
    modules: BTreeMap<String, (Tensor, Tensor)>,
}

impl Adapter {
    /// Wraps the projections this adapter adapts in `model` (replacing any adapter attached
    /// before). The model then computes `W x + scale * B A dropout(x)` there; the adapter's
    /// tensors are shared, so gradients land on [`Adapter::vars`].
    pub fn attach(&self, model: &mut Llama) -> std::result::Result<(), ModelError> {
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
        let targets = expand_targets(&lora.target_modules).map_err(ModelError::Lora)?;
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

    /// Reads the PEFT adapter in `dir` for the base model `cfg`, as frozen `dtype` tensors.
    /// Fails with the file and key when it does not fit the base.
    pub fn load(
        dir: &Path,
        cfg: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let config_path = dir.join("adapter_config.json");
        let config: AdapterConfig = read_json(&config_path, "the adapter's adapter_config.json")?;
        let bad_config = |message| ModelError::Adapter {
            path: config_path.clone(),
            message,
        };
        config.check_supported().map_err(bad_config)?;
        check_base(&config, dir, cfg).map_err(bad_config)?;
        let path = dir.join("adapter_model.safetensors");
        if !path.is_file() {
            return Err(ModelError::Missing {
                path,
                what: "the adapter weights (PEFT's adapter_model.safetensors; convert an adapter_model.bin with save_pretrained(safe_serialization=True))".into(),
            });
        }
        let weights = Weights::read(std::slice::from_ref(&path), dtype, device)?;
        let modules =
            collect_modules(&weights, cfg, config.r).map_err(|message| ModelError::Adapter {
                path: path.clone(),
                message,
            })?;
        Ok(Self { config, modules })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32, PEFT key names) into
    /// `dir`, creating it; each file is replaced atomically.
    pub fn save(&self, dir: &Path) -> std::result::Result<(), ModelError> {
        let tensors = self
            .tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
            .collect::<Result<Vec<_>>>()?;
        save_safetensors(&tensors, &dir.join("adapter_model.safetensors"))?;
        let path = dir.join("adapter_config.json");
        let json = serde_json::to_string_pretty(&self.config).map_err(|e| ModelError::Config {
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
                    (format!("{PEFT_PREFIX}{path}.lora_A.weight"), a.clone()),
                    (format!("{PEFT_PREFIX}{path}.lora_B.weight"), b.clone()),
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

/// Groups the tensors of an adapter file by module and checks them against the base `cfg`.
fn collect_modules(
    weights: &Weights,
    cfg: &LlamaConfig,
    r: usize,
) -> std::result::Result<BTreeMap<String, (Tensor, Tensor)>, String> {
    let all = Projection::ALL.map(Projection::name);
    let shapes: BTreeMap<String, (usize, usize)> = target_shapes(cfg, &all)
        .into_iter()
        .map(|(p, out, inp)| (p, (out, inp)))
        .collect();
    let mut names: Vec<&String> = weights.names().collect();
    names.sort();
    let mut parts: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for name in names {
        let (module, is_a) = parse_key(name)?;
        let &(out, inp) = shapes.get(module).ok_or_else(|| {
            format!("tensor {name} adapts {module}, which the base model does not have: the adapter was made for another model")
        })?;
        let expected = if is_a { [r, inp] } else { [out, r] };
        let t = weights
            .maybe(name)
            .ok_or_else(|| format!("tensor {name} is unreadable"))?;
        if t.dims() != expected {
            return Err(format!(
                "tensor {name} has shape {:?}, the base model (and r = {r}) needs {expected:?}: the adapter was made for another model",
                t.dims()
            ));
        }
        let slot = parts.entry(module.to_string()).or_default();
        if is_a {
            slot.0 = Some(t);
        } else {
            slot.1 = Some(t);
        }
    }
    let modules = pair_up(parts)?;
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
) -> std::result::Result<BTreeMap<String, (Tensor, Tensor)>, String> {
    if parts.is_empty() {
        return Err("holds no lora_A/lora_B tensors".into());
    }
    parts
        .into_iter()
        .map(|(module, pair)| match pair {
            (Some(a), Some(b)) => Ok((module, (a, b))),
            (None, _) => Err(format!("{PEFT_PREFIX}{module}.lora_A.weight is missing")),
            (_, None) => Err(format!("{PEFT_PREFIX}{module}.lora_B.weight is missing")),
        })
        .collect()
}

/// Splits a PEFT key into its module path and whether it is A (true) or B.
fn parse_key(name: &str) -> std::result::Result<(&str, bool), String> {
    let module_and_part = name.strip_prefix(PEFT_PREFIX);
    let parsed = module_and_part.and_then(|rest| {
        rest.strip_suffix(".lora_A.weight")
            .map(|m| (m, true))
            .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, false)))
    });
    parsed.ok_or_else(|| {
        format!(
            "unexpected tensor {name}: only lora_A/lora_B weights of the projections are supported"
        )
    })
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

/// The base parameters `base` with `adapter` folded in: `W + scale * B @ A`, computed in f32.
/// Fails if the adapter adapts a module `base` lacks.
pub fn merge(
    base: &[(String, Tensor)],
    adapter: &Adapter,
) -> std::result::Result<Vec<(String, Tensor)>, ModelError> {
    let scale = adapter.scale();
    let mut merged = 0;
    let mut out = Vec::with_capacity(base.len());
    for (name, w) in base {
        let pair = name
            .strip_suffix(".weight")
            .and_then(|m| adapter.modules.get(m));
        let w = match pair {
            Some((a, b)) => {
                merged += 1;
                let delta = b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?;
                (w.to_dtype(DType::F32)? + (delta * scale)?)?
            }
            None => w.clone(),
        };
        out.push((name.clone(), w));
    }
    if merged != adapter.modules.len() {
        return Err(ModelError::Lora(format!(
            "the adapter adapts {} modules but only {merged} exist in the base model",
            adapter.modules.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_mask_drops_about_p_and_keeps_the_mean() {
        let mask = dropout_mask(&[100, 100], 0.25, 9, &Device::Cpu).unwrap();
        let values = mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dropped = values.iter().filter(|v| **v == 0.0).count() as f64 / 1e4;
        let mean = values.iter().map(|v| *v as f64).sum::<f64>() / 1e4;
        assert!((dropped - 0.25).abs() < 0.02, "dropped {dropped}");
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        let again = dropout_mask(&[100, 100], 0.25, 9, &Device::Cpu).unwrap();
        assert_eq!(
            values,
            again.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn targets_expand_short_names_and_all_linear() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            expand_targets(&names(&["v", "q_proj", "q"])).unwrap(),
            ["q_proj", "v_proj"]
        );
        assert_eq!(expand_targets(&names(&["all-linear"])).unwrap().len(), 7);
        assert!(expand_targets(&names(&["c_attn"])).is_err());
    }

    #[test]
    fn alpha_is_written_like_peft() {
        let mut config = AdapterConfig::new(&LoraSection::default(), &["q_proj"]);
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["lora_alpha"], serde_json::json!(16));
        config.lora_alpha = 2.5;
        assert_eq!(serde_json::to_value(&config).unwrap()["lora_alpha"], 2.5);
        config.use_rslora = true;
        config.r = 4;
        assert_eq!(config.scale(), 1.25);
    }
}
