//! Throughput benchmark with the shapes, tasks, modes and JSON fields of
//! `bench/torch_ref.py` (PyTorch + transformers + PEFT), so rows of the two tools join on
//! `(task, preset, mode)`. Every task runs the same code as the real commands: training steps go
//! through [`gradients::accumulate`], clipping and [`AdamW`], as `llmtool train` does.

use candle_core::{DType, Device, Var};
use config::LoraSection;
use model::{Decoder, Llama, LlamaConfig, Weights};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::time::Instant;
use train::gradients::{self, Batch, Gradients};
use train::init::random_weights;
use train::optim::{clip_scale, global_norm, AdamW, AdamWParams};
use train::Adapter;

/// A model size of the benchmark, as in torch_ref.py (tied embeddings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 14M parameters.
    Tiny,
    /// 47M parameters.
    Small,
    /// 110M parameters.
    Base,
}

impl Preset {
    /// The name in `--sizes` and in a row's `preset` field.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Base => "base",
        }
    }

    /// The model config for sequences of `seq` tokens.
    pub fn config(self, seq: usize) -> LlamaConfig {
        // hidden, layers, heads, kv_heads, ffn, vocab
        let (h, layers, heads, kv, ffn, vocab) = match self {
            Preset::Tiny => (384, 6, 6, 6, 1024, 8192),
            Preset::Small => (512, 12, 8, 8, 1408, 16384),
            Preset::Base => (768, 12, 12, 12, 2048, 32000),
        };
        serde_json::from_value(json!({
            "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": ffn, "vocab_size": vocab,
            "max_position_embeddings": seq.max(2048), "tie_word_embeddings": true,
        }))
        .expect("every key a preset lacks has a default in LlamaConfig")
    }
}

/// The compute dtype and gradient checkpointing of a row: torch_ref.py's modes (less
/// `torch.compile`), and `fp16`, llmtool's own (it checks and times the f16 kernels;
/// torch_ref.py has no such rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    #[value(name = "fp32")]
    Fp32,
    #[value(name = "bf16")]
    Bf16,
    #[value(name = "fp32+ckpt")]
    Fp32Ckpt,
    #[value(name = "bf16+ckpt")]
    Bf16Ckpt,
    #[value(name = "fp16")]
    Fp16,
}

impl Mode {
    /// The name in `--modes` and in a row's `mode` field.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Fp32 => "fp32",
            Mode::Bf16 => "bf16",
            Mode::Fp32Ckpt => "fp32+ckpt",
            Mode::Bf16Ckpt => "bf16+ckpt",
            Mode::Fp16 => "fp16",
        }
    }

    /// The compute dtype.
    pub fn dtype(self) -> DType {
        match self {
            Mode::Fp32 | Mode::Fp32Ckpt => DType::F32,
            Mode::Bf16 | Mode::Bf16Ckpt => DType::BF16,
            Mode::Fp16 => DType::F16,
        }
    }

    /// Whether training recomputes each block in backward (gradient checkpointing).
    pub fn checkpointed(self) -> bool {
        matches!(self, Mode::Fp32Ckpt | Mode::Bf16Ckpt)
    }
}

/// The tasks `--tasks` names; `lora` runs once per `--lora-base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskName {
    Train,
    Lora,
    Eval,
    Generate,
}

/// What to measure: one of `train`, `lora`, `eval`, `generate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Full training step of every parameter.
    Train,
    /// Training step of a LoRA adapter on q/k/v/o over a base held as the [`LoraBase`] says
    /// (the name `lora` parses with the frozen base).
    Lora(LoraBase),
    /// Forward pass and loss without gradients.
    Eval,
    /// Greedy decoding with the KV cache.
    Generate,
}

impl Task {
    /// The name torch_ref.py uses.
    pub fn name(self) -> &'static str {
        match self {
            Task::Train => "train",
            Task::Lora(_) => "lora",
            Task::Eval => "eval",
            Task::Generate => "generate",
        }
    }
}

/// How the base weights under a `lora` row's adapter are held (`--lora-base`). The trained
/// parameters (the adapter's) and the math are the same either way; what differs is the work
/// and memory spent on gradients nobody uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoraBase {
    /// Plain tensors: every projection goes through [`ops::frozen_linear`], so no weight
    /// gradient is computed or stored (what `llmtool finetune --lora` does).
    Frozen,
    /// Candle `Var`s left out of the optimizer, as naive candle code does: the projections take
    /// the plain-matmul path, and backward computes, and the grad store keeps, the gradient of
    /// every base weight.
    Plain,
}

impl LoraBase {
    /// The name in `--lora-base` and in a row's `lora_base` field.
    pub fn name(self) -> &'static str {
        match self {
            LoraBase::Frozen => "frozen",
            LoraBase::Plain => "plain",
        }
    }
}

/// Batch shape and repetitions shared by every measurement.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Timed steps per row.
    pub steps: usize,
    /// Untimed steps before timing.
    pub warmup: usize,
    /// New tokens per generation run.
    pub gen_tokens: usize,
}

/// Measures one row. The JSON has torch_ref.py's fields for the task, plus `tool`.
pub fn measure(
    task: Task,
    preset: Preset,
    mode: Mode,
    s: &Settings,
    device: &Device,
) -> anyhow::Result<Value> {
    let cfg = preset.config(s.seq);
    let (dtype, recompute) = (mode.dtype(), mode.checkpointed());
    // As the reference: the peak covers the model, optimizer state and the steps.
    ops::device::reset_peak_memory(device)?;
    let weights = random_weights(&cfg, 0, device)?;
    let measured = match task {
        Task::Train => {
            let (weights, vars) = weights.into_trainable()?;
            let model = Llama::new(&cfg, &weights, dtype)?;
            let step_s = time_training(&model, &vars, s, recompute, device)?;
            let params = cfg.parameter_count();
            let tokens_per_s = (s.batch * s.seq) as f64 / step_s;
            json!({"params": params, "step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s,
                   "model_tflops": 6.0 * params as f64 * tokens_per_s / 1e12})
        }
        Task::Lora(base) => {
            let (model, vars) = lora_model(&cfg, weights, base, dtype, device)?;
            let step_s = time_training(&model, &vars, s, recompute, device)?;
            let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
            json!({"trainable": trainable, "step_ms": step_s * 1e3,
                   "tokens_per_s": (s.batch * s.seq) as f64 / step_s})
        }
        Task::Eval => {
            // As `llmtool eval` loads a model: stored in the compute dtype.
            let model = Llama::new(&cfg, &weights.to_dtype(dtype)?, dtype)?;
            let batch = random_batch(&cfg, s, 1);
            let step_s = timed(device, s.warmup, s.steps, || {
                gradients::loss_only(&model, &batch).map(drop)
            })?;
            json!({"step_ms": step_s * 1e3, "tokens_per_s": (s.batch * s.seq) as f64 / step_s})
        }
        Task::Generate => {
            // As `llmtool generate` loads a model: stored in the compute dtype, projections
            // stacked.
            let mut model = Llama::new(&cfg, &weights.to_dtype(dtype)?, dtype)?;
            model.fuse_projections()?;
            let runs = (s.steps / 4).max(1);
            let mut op_by_op_reason = None;
            let run_s = timed(device, 1, runs, || {
                op_by_op_reason = greedy(&model, s.gen_tokens, true)?.1;
                Ok(())
            })?;
            let mut row = json!({"new_tokens": s.gen_tokens, "ms": run_s * 1e3,
                                 "tokens_per_s": s.gen_tokens as f64 / run_s});
            match op_by_op_reason {
                Some(reason) => row["steps"] = json!(reason),
                None => {
                    // Whether replaying the captured step changes a token.
                    let (replayed, _) = greedy(&model, s.gen_tokens, true)?;
                    let (reference, _) = greedy(&model, s.gen_tokens, false)?;
                    row["steps"] = json!("captured graph");
                    row["same_tokens_as_op_by_op"] = json!(replayed == reference);
                }
            }
            row
        }
    };
    let mut row = serde_json::Map::new();
    row.insert("tool".into(), "llmtool".into());
    row.insert("task".into(), task.name().into());
    row.insert("preset".into(), preset.name().into());
    row.insert("mode".into(), mode.name().into());
    if let Task::Lora(base) = task {
        row.insert("lora_base".into(), base.name().into());
    }
    if let Value::Object(measured) = measured {
        row.extend(measured);
    }
    if matches!(task, Task::Train | Task::Lora(_) | Task::Eval) {
        row.insert("batch".into(), s.batch.into());
        row.insert("seq".into(), s.seq.into());
    }
    if matches!(task, Task::Train | Task::Lora(_)) {
        insert_peak_memory(&mut row, device);
    }
    Ok(Value::Object(row))
}

/// The model over `weights` held as `base` says, with a fresh adapter attached (torch_ref.py's:
/// r 8, alpha 16, no dropout, on q/k/v/o), and the adapter's vars: the only ones the optimizer
/// gets.
fn lora_model(
    cfg: &LlamaConfig,
    weights: Weights,
    base: LoraBase,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(Llama, Vec<(String, Var)>)> {
    let weights = match base {
        LoraBase::Frozen => weights,
        // The vars of the base are dropped here: the model holds their tensors, which is all
        // candle needs to compute and keep their gradients.
        LoraBase::Plain => weights.into_trainable()?.0,
    };
    let mut model = Llama::new(cfg, &weights, dtype)?;
    let lora = LoraSection {
        dropout: 0.0,
        ..LoraSection::default()
    };
    let adapter = Adapter::init(&lora, cfg, 0, device)?;
    adapter.attach(&mut model)?;
    Ok((model, adapter.vars()))
}

/// torch_ref.py's `peak_mb`: process peak RSS on the CPU (as its `ru_maxrss`), the memory
/// pool's high-water mark since the row began on CUDA (as `torch.cuda.max_memory_allocated`).
/// Elsewhere the field is null and `peak_note` says why.
fn insert_peak_memory(fields: &mut serde_json::Map<String, Value>, device: &Device) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    if device.is_cpu() {
        let peak = train::memory::peak_resident_bytes().map(mib);
        fields.insert("peak_mb".into(), json!(peak));
    } else if let Some(peak) = ops::device::peak_memory(device) {
        fields.insert("peak_mb".into(), json!(mib(peak)));
    } else {
        fields.insert("peak_mb".into(), Value::Null);
        fields.insert(
            "peak_note".into(),
            "no allocator statistics on this device".into(),
        );
    }
}

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

/// Seconds per full training step of `vars`: forward, backward, clipping to norm 1, AdamW
/// (lr 3e-4, weight decay 0.1 as the reference).
fn time_training(
    model: &Llama,
    vars: &[(String, Var)],
    s: &Settings,
    recompute: bool,
    device: &Device,
) -> candle_core::Result<f64> {
    let params = AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut optimizer = AdamW::new(vars, params)?;
    let batch = random_batch(&model.config, s, 0);
    timed(device, s.warmup, s.steps, || {
        let mut grads = Gradients::new();
        gradients::accumulate(model, vars, &batch, 1.0, recompute, &mut grads)?;
        let norm = global_norm(&grads)?;
        optimizer.step(&grads, 3e-4, clip_scale(norm, 1.0))
    })
}

/// `batch × seq` uniformly random inputs and targets, every position scored.
fn random_batch(cfg: &LlamaConfig, s: &Settings, seed: u64) -> Batch {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = s.batch * s.seq;
    let mut ids = || -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(0..cfg.vocab_size as u32))
            .collect()
    };
    Batch {
        inputs: ids(),
        targets: ids(),
        weights: None,
        rows: s.batch,
        seq_len: s.seq,
    }
}

/// Greedy decoding of `new_tokens` tokens after a random 16-token prompt, with a KV cache,
/// replaying captured steps where the device can (`replay`) or op by op. Returns the tokens
/// and, where one-token steps ran op by op, why.
fn greedy(
    model: &Llama,
    new_tokens: usize,
    replay: bool,
) -> candle_core::Result<(Vec<u32>, Option<String>)> {
    const PROMPT: usize = 16;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let vocab = model.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..PROMPT).map(|_| rng.random_range(0..vocab)).collect();
    let mut decoder = match replay {
        true => Decoder::new(model, PROMPT + new_tokens)?,
        false => Decoder::op_by_op(model, PROMPT + new_tokens)?,
    };
    let mut logits = decoder.forward(&prompt)?;
    let mut out = Vec::with_capacity(new_tokens);
    for _ in 0..new_tokens {
        let next = logits.argmax(0)?.to_scalar::<u32>()?;
        out.push(next);
        if out.len() < new_tokens {
            logits = decoder.forward(&[next])?;
        }
    }
    Ok((out, decoder.op_by_op_reason().map(str::to_owned)))
}

/// One row per fused op at the shapes of `preset` (and once per dtype the edge-case shapes,
/// when `preset` is `None`): the op's relative error against its reference in the compute dtype
/// of `mode`, the tolerance, and forward + backward milliseconds of both.
pub fn op_rows(preset: Option<Preset>, mode: Mode, s: &Settings, device: &Device) -> Vec<Value> {
    use ops::check::{self, tolerance};
    let dtype = mode.dtype();
    let cases = match preset {
        Some(preset) => check::model_cases(&preset.config(s.seq).op_shape(), s.batch, s.seq),
        None => check::edge_cases(),
    };
    let mut rows = Vec::new();
    for case in cases {
        let preset = preset.map_or("edge", Preset::name);
        let mut row = json!({"tool": "llmtool", "task": "ops", "preset": preset,
                             "mode": mode.name(), "op": case.name, "shapes": case.shapes(),
                             "tolerance": tolerance(dtype)});
        match check::run_case(&case, device, dtype, s.steps.clamp(1, 5)) {
            Ok(r) => {
                row["max_rel_error"] = json!(r.error);
                row["ok"] = json!(r.error < tolerance(dtype));
                row["fused_ms"] = json!(r.fused_ms);
                row["reference_ms"] = json!(r.reference_ms);
                row["speedup"] = json!(r.reference_ms / r.fused_ms);
            }
            Err(e) => {
                row["ok"] = json!(false);
                row["error"] = json!(format!("{e:#}"));
            }
        }
        rows.push(row);
    }
    rows
}

/// The optimizer row of the op check: fused AdamW and gradient norm against the composite.
pub fn adamw_row(device: &Device) -> Value {
    let tolerance = 1e-5;
    match train::optim::adamw_error(device) {
        Ok(error) => json!({"tool": "llmtool", "task": "ops", "preset": "edge", "mode": "fp32",
                            "op": "adamw", "max_rel_error": error, "tolerance": tolerance,
                            "ok": error < tolerance}),
        Err(e) => json!({"tool": "llmtool", "task": "ops", "op": "adamw", "ok": false,
                         "error": format!("{e:#}")}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn every_task_gives_a_row_with_the_reference_fields() {
        let s = Settings {
            batch: 1,
            seq: 8,
            steps: 1,
            warmup: 0,
            gen_tokens: 2,
        };
        for (task, fields) in [
            (
                Task::Train,
                &["params", "step_ms", "model_tflops", "peak_mb"][..],
            ),
            (
                Task::Lora(LoraBase::Frozen),
                &["trainable", "step_ms", "peak_mb", "lora_base"][..],
            ),
            (Task::Eval, &["step_ms", "batch", "seq"][..]),
            (Task::Generate, &["new_tokens", "ms"][..]),
        ] {
            let row = measure(task, Preset::Tiny, Mode::Fp32, &s, &Device::Cpu).unwrap();
            assert_eq!(row["task"], task.name());
            assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0, "{row}");
            for f in fields {
                assert!(row.get(*f).is_some(), "{f} missing from {row}");
            }
        }
        assert_eq!(row_trainable_of_tiny_lora(), 6 * 4 * 8 * (384 + 384));
        use clap::ValueEnum;
        for mode in Mode::value_variants() {
            assert_eq!(Mode::from_str(mode.name(), false), Ok(*mode));
        }
        assert_eq!(Mode::from_str("bf16+ckpt", false), Ok(Mode::Bf16Ckpt));
        assert!(Mode::Bf16Ckpt.checkpointed() && !Mode::Fp16.checkpointed());
        assert_eq!(Mode::Fp16.dtype(), DType::F16);
        for preset in Preset::value_variants() {
            assert_eq!(Preset::from_str(preset.name(), false), Ok(*preset));
        }
    }

    #[test]
    fn lora_rows_name_their_base_and_other_rows_do_not() {
        let s = Settings {
            batch: 1,
            seq: 4,
            steps: 1,
            warmup: 0,
            gen_tokens: 1,
        };
        for base in [LoraBase::Frozen, LoraBase::Plain] {
            let row =
                measure(Task::Lora(base), Preset::Tiny, Mode::Fp32, &s, &Device::Cpu).unwrap();
            assert_eq!(row["lora_base"], base.name(), "{row}");
            assert_eq!(row["trainable"], 6 * 4 * 8 * (384 + 384), "{row}");
            assert_eq!(
                <LoraBase as clap::ValueEnum>::from_str(base.name(), false),
                Ok(base)
            );
        }
        let row = measure(Task::Eval, Preset::Tiny, Mode::Fp32, &s, &Device::Cpu).unwrap();
        assert!(row.get("lora_base").is_none(), "{row}");
    }

    /// A model small enough for exact checks, with every base matrix shape unique: q/k/v/o
    /// 16x16, gate/up 40x16, down 16x40, embedding (tied head) 50x16.
    fn small_config() -> LlamaConfig {
        serde_json::from_value(json!({
            "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "intermediate_size": 40, "vocab_size": 50,
            "max_position_embeddings": 16, "tie_word_embeddings": true,
        }))
        .unwrap()
    }

    /// The LoRA model of `small_config` over the same seeded base, held as `base` says, with
    /// every B set to the same nonzero values (a fresh B is zero, which makes A's gradient zero).
    fn small_lora(base: LoraBase) -> (Llama, Vec<(String, Var)>) {
        let cfg = small_config();
        let weights = random_weights(&cfg, 3, &Device::Cpu).unwrap();
        let (model, vars) = lora_model(&cfg, weights, base, DType::F32, &Device::Cpu).unwrap();
        for (name, var) in &vars {
            if name.ends_with("lora_B.weight") {
                let n = var.elem_count() as f32;
                let values = Tensor::arange(0f32, n, &Device::Cpu)
                    .and_then(|t| t.affine(1.0 / n as f64, -0.5))
                    .and_then(|t| t.reshape(var.shape()))
                    .unwrap();
                var.set(&values).unwrap();
            }
        }
        (model, vars)
    }

    /// The gradient store of one plain backward pass of `model` over a 2 x 3 batch.
    fn backward(model: &Llama) -> candle_core::backprop::GradStore {
        let ids = Tensor::new(&[[1u32, 7, 30], [49, 0, 12]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[7u32, 30, 2, 0, 12, 5], &Device::Cpu).unwrap();
        let weights = Tensor::ones(6, DType::F32, &Device::Cpu).unwrap();
        let logits = model.forward(&ids, None).unwrap().reshape((6, 50)).unwrap();
        let loss = ops::masked_mean_nll(&logits, &targets, &weights).unwrap();
        loss.backward().unwrap()
    }

    /// Values held by gradients in `store` shaped like a base weight (or, as candle keys a
    /// plain matmul's weight gradient, its broadcast transpose): `[.., out, in]` or `[.., in,
    /// out]` for a base matrix `[out, in]`.
    fn base_shaped_gradient_values(store: &candle_core::backprop::GradStore) -> usize {
        let base = [(16, 16), (40, 16), (16, 40), (50, 16)];
        store
            .get_ids()
            .filter_map(|&id| store.get_id(id))
            .filter(|g| {
                let d = g.dims();
                d.len() >= 2 && {
                    let last = (d[d.len() - 2], d[d.len() - 1]);
                    base.iter().any(|&(o, i)| last == (o, i) || last == (i, o))
                }
            })
            .map(Tensor::elem_count)
            .sum()
    }

    #[test]
    fn plain_base_stores_weight_gradients_and_frozen_base_computes_none() {
        let (plain, _) = small_lora(LoraBase::Plain);
        let store = backward(&plain);
        for (name, w) in plain.named_parameters() {
            if w.rank() == 2 {
                let g = store.get(&w);
                assert!(
                    g.is_some_and(|g| g.dims() == w.dims()),
                    "{name}: no gradient"
                );
            }
        }
        // q/k/v/o, gate/up/down of 2 layers and the embedding.
        let per_layer = 4 * 16 * 16 + 3 * 40 * 16;
        assert!(base_shaped_gradient_values(&store) >= 2 * per_layer + 50 * 16);

        let (frozen, _) = small_lora(LoraBase::Frozen);
        let store = backward(&frozen);
        for (name, w) in frozen.named_parameters() {
            assert!(store.get(&w).is_none(), "{name} got a gradient");
        }
        assert_eq!(base_shaped_gradient_values(&store), 0);
    }

    #[test]
    fn adapter_gradients_are_the_same_over_a_plain_and_a_frozen_base() {
        let cfg = small_config();
        let s = Settings {
            batch: 2,
            seq: 5,
            steps: 1,
            warmup: 0,
            gen_tokens: 1,
        };
        let batch = random_batch(&cfg, &s, 4);
        let (plain, plain_vars) = small_lora(LoraBase::Plain);
        let (frozen, frozen_vars) = small_lora(LoraBase::Frozen);
        for recompute in [false, true] {
            let (mut a, mut b) = (Gradients::new(), Gradients::new());
            let loss_a =
                gradients::accumulate(&plain, &plain_vars, &batch, 1.0, recompute, &mut a).unwrap();
            let loss_b =
                gradients::accumulate(&frozen, &frozen_vars, &batch, 1.0, recompute, &mut b)
                    .unwrap();
            assert!((loss_a - loss_b).abs() < 1e-6, "{loss_a} vs {loss_b}");
            // Every adapter tensor, and nothing else: the base's gradients are not collected.
            assert_eq!(a.len(), 2 * 4 * 2);
            for (name, ga) in &a {
                let gb = &b[name];
                let diff = (ga - gb).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                let size = ga.abs().unwrap().max_all().unwrap();
                assert!(size.to_scalar::<f32>().unwrap() > 0.0, "{name} is zero");
                assert!(
                    diff <= 1e-6,
                    "{name}: differs by {diff} (recompute {recompute})"
                );
            }
        }
    }

    fn row_trainable_of_tiny_lora() -> usize {
        let cfg = Preset::Tiny.config(8);
        let lora = LoraSection::default();
        let adapter = Adapter::init(&lora, &cfg, 0, &Device::Cpu).unwrap();
        adapter.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }
}
