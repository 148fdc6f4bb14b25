//! One row: the task's measurement in torch_ref.py's fields, and the peak memory field.

use super::generation::{greedy, prefill, prefill_flops, sampled};
use super::rows::{LoraBase, Mode, Preset, Settings, Task};
use super::timed;
use super::training::{lora_model, random_batch, time_training};
use candle_core::Device;
use model::Llama;
use serde_json::{json, Value};
use train::distributed::Collective;
use train::gradients;
use train::init::random_weights;

/// Measures one row. The JSON has torch_ref.py's fields for the task, plus `tool`. The train
/// and lora rows run on every rank of `collective` (`ranks` in the row when there are
/// several, `tokens_per_s` counting the tokens of all of them); the other tasks on one.
pub fn measure(
    task: Task,
    preset: Preset,
    mode: Mode,
    s: &Settings,
    device: &Device,
    collective: &dyn Collective,
) -> anyhow::Result<Value> {
    let ranks = collective.world_size();
    let cfg = preset.config(s.seq);
    let (dtype, recompute) = (mode.dtype(), mode.checkpointed());
    // As the reference: the peak covers the model, optimizer state and the steps.
    ops::device::reset_peak_memory(device)?;
    let in_use_at_start = ops::device::device_memory_in_use(device);
    // A 4-bit base is drawn and quantized on the host, as `finetune` quantizes a checkpoint:
    // the device never holds its full-precision weights.
    let drawn_on = match task {
        Task::Lora(LoraBase::Nf4) => &Device::Cpu,
        _ => device,
    };
    let weights = random_weights(&cfg, 0, drawn_on)?;
    let measured = match task {
        Task::Train => {
            let (weights, vars) = weights.into_trainable()?;
            let model = Llama::new(&cfg, &weights, dtype)?;
            let (step_s, loss) = time_training(&model, &vars, s, recompute, device, collective)?;
            let params = cfg.parameter_count();
            let tokens_per_s = (ranks * s.batch * s.seq) as f64 / step_s;
            json!({"params": params, "step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s,
                   "model_tflops": 6.0 * params as f64 * tokens_per_s / 1e12, "loss": loss})
        }
        Task::Lora(base) => {
            let (model, vars) = lora_model(&cfg, weights, base, s.lora, dtype, device)?;
            let (step_s, loss) = time_training(&model, &vars, s, recompute, device, collective)?;
            let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
            let tokens_per_s = (ranks * s.batch * s.seq) as f64 / step_s;
            // As torch_ref.py: forward and input gradient of the base (4 x its parameters per
            // token), forward and both gradients of the adapter (6 x).
            let base_params = (cfg.parameter_count() - trainable) as f64;
            let flops = 4.0 * base_params + 6.0 * trainable as f64;
            let mut row = json!({"trainable": trainable, "rank": s.lora.rank,
                   "alpha": 2 * s.lora.rank, "lora_targets": s.lora.targets_name(),
                   "step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s,
                   "model_tflops": flops * tokens_per_s / 1e12, "loss": loss});
            // Named only where drawn, so rows without dropout read as they always have.
            if s.lora.dropout > 0.0 {
                row["lora_dropout"] = json!(s.lora.dropout);
            }
            row
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
        Task::Prefill => {
            let model = generation_model(&cfg, &weights, dtype)?;
            let step_s = timed(device, s.warmup, s.steps, || {
                prefill(&model, s.seq, s.gen_tokens)
            })?;
            json!({"prompt_tokens": s.seq, "step_ms": step_s * 1e3,
                   "tokens_per_s": s.seq as f64 / step_s,
                   "model_tflops": prefill_flops(&cfg, s.seq) / step_s / 1e12})
        }
        Task::Generate => {
            let model = generation_model(&cfg, &weights, dtype)?;
            let runs = (s.steps / 4).max(1);
            match s.sampling {
                Some(sampling) => {
                    let run_s = timed(device, 1, runs, || {
                        sampled(&model, s.gen_tokens, sampling).map(drop)
                    })?;
                    let tokens = s.gen_tokens * sampling.samples;
                    let mut row = json!({"new_tokens": s.gen_tokens, "ms": run_s * 1e3,
                                         "tokens_per_s": tokens as f64 / run_s,
                                         "temperature": sampling.temperature,
                                         "top_p": sampling.top_p});
                    // Named only for a batch, so single-sample rows read as they always have.
                    if sampling.samples > 1 {
                        row["samples"] = json!(sampling.samples);
                    }
                    row
                }
                None => {
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
            }
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
    if ranks > 1 {
        row.insert("ranks".into(), ranks.into());
    }
    insert_peak_memory(&mut row, device, in_use_at_start);
    Ok(Value::Object(row))
}

/// A model as `llmtool generate` loads it: stored in the compute dtype, projections stacked.
fn generation_model(
    cfg: &model::LlamaConfig,
    weights: &model::Weights,
    dtype: candle_core::DType,
) -> anyhow::Result<Llama> {
    let mut model = Llama::new(cfg, &weights.to_dtype(dtype)?, dtype)?;
    model.fuse_projections()?;
    Ok(model)
}

/// torch_ref.py's `peak_mb`: process peak RSS on the CPU (as its `ru_maxrss`), the memory
/// pool's high-water mark since the row began on CUDA (as `torch.cuda.max_memory_allocated`),
/// and on CUDA its `peak_smi_mb`, measured the same way (nvidia-smi's view: total − free, plus
/// reserve released during the row). Elsewhere `peak_mb` is null and `peak_note` says why.
/// On CUDA, where `peak_smi_mb` goes besides the pool's peak: `reserved_peak_mb`, what the
/// pool held from the driver at its peak (fragmentation included), and `in_use_at_start_mb`,
/// device memory in use when the row began (`in_use_at_start`: the CUDA context, loaded
/// modules and workspaces, nothing of the row's).
fn insert_peak_memory(
    fields: &mut serde_json::Map<String, Value>,
    device: &Device,
    in_use_at_start: Option<u64>,
) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    if device.is_cpu() {
        let peak = train::memory::peak_resident_bytes().map(mib);
        fields.insert("peak_mb".into(), json!(peak));
    } else if let Some(peak) = ops::device::peak_memory(device) {
        fields.insert("peak_mb".into(), json!(mib(peak)));
        let breakdown = [
            ("peak_smi_mb", ops::device::peak_device_memory(device)),
            (
                "reserved_peak_mb",
                ops::device::peak_reserved_memory(device),
            ),
            ("in_use_at_start_mb", in_use_at_start),
        ];
        for (field, bytes) in breakdown {
            if let Some(bytes) = bytes {
                fields.insert(field.into(), json!(mib(bytes)));
            }
        }
    } else {
        fields.insert("peak_mb".into(), Value::Null);
        fields.insert(
            "peak_note".into(),
            "no allocator statistics on this device".into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use config::LoraSection;
    use train::distributed::Single;
    use train::Adapter;

    #[test]
    fn every_task_gives_a_row_with_the_reference_fields() {
        let s = Settings {
            batch: 1,
            seq: 8,
            steps: 1,
            warmup: 0,
            gen_tokens: 2,
            sampling: None,
            lora: Default::default(),
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
            (Task::Eval, &["step_ms", "batch", "seq", "peak_mb"][..]),
            (
                Task::Prefill,
                &["prompt_tokens", "step_ms", "model_tflops", "peak_mb"][..],
            ),
            (Task::Generate, &["new_tokens", "ms", "peak_mb"][..]),
        ] {
            let row = measure(task, Preset::Tiny, Mode::Fp32, &s, &Device::Cpu, &Single).unwrap();
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
            sampling: None,
            lora: Default::default(),
        };
        let tiny = |task| measure(task, Preset::Tiny, Mode::Fp32, &s, &Device::Cpu, &Single);
        for base in [LoraBase::Frozen, LoraBase::Frozen16, LoraBase::Plain] {
            let row = tiny(Task::Lora(base)).unwrap();
            assert_eq!(row["lora_base"], base.name(), "{row}");
            assert_eq!(row["trainable"], 6 * 4 * 8 * (384 + 384), "{row}");
            assert_eq!(
                <LoraBase as clap::ValueEnum>::from_str(base.name(), false),
                Ok(base)
            );
        }
        let row = tiny(Task::Eval).unwrap();
        assert!(row.get("lora_base").is_none(), "{row}");
    }

    fn row_trainable_of_tiny_lora() -> usize {
        let cfg = Preset::Tiny.config(8);
        let lora = LoraSection::default();
        let adapter = Adapter::init(&lora, &cfg, 0, &Device::Cpu).unwrap();
        adapter.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }
}
