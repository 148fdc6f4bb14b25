//! `llmtool bench`: the rows of `bench/torch_ref.py`, as JSON lines and a table.

use super::launch::Rank;
use crate::bench::{measure, LoraShape, Mode, Preset, Sampling, Settings, Task, TaskName};
use crate::cli::BenchArgs;
use crate::cli::LoraTargets;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::Write;

/// Runs `llmtool bench`, or starts its ranks (`--gpus N`).
pub fn run(args: BenchArgs) -> Result<()> {
    let several = args.launch.gpus.is_some_and(|n| n > 1) || args.launch.nnodes > 1;
    let inference = |t: &TaskName| !matches!(t, TaskName::Train | TaskName::Lora);
    if several && (args.ops || args.tasks.iter().any(inference)) {
        bail!("--gpus times the train and lora rows only: add --tasks train,lora (and no --ops)");
    }
    if super::launch::launched(&args.launch)? {
        return Ok(());
    }
    let Rank {
        device, collective, ..
    } = super::launch::join_run(args.device)?;
    // Every rank measures; rank 0 reports.
    let rank = collective.rank();
    // The reference's defaults: mixed precision and checkpointing only on GPUs.
    let modes = match args.modes.as_slice() {
        [] if device.is_cpu() => vec![Mode::Fp32],
        [] => vec![Mode::Fp32, Mode::Bf16, Mode::Bf16Ckpt],
        given => given.to_vec(),
    };
    // A `lora` task runs once per base, each its own row.
    let tasks: Vec<Task> = args
        .tasks
        .iter()
        .flat_map(|task| match task {
            TaskName::Train => vec![Task::Train],
            TaskName::Lora => args.lora_base.iter().map(|&b| Task::Lora(b)).collect(),
            TaskName::Eval => vec![Task::Eval],
            TaskName::Prefill => vec![Task::Prefill],
            TaskName::Generate => vec![Task::Generate],
        })
        .collect();
    if args.batch == 0 || args.seq == 0 || args.steps == 0 || args.rank == 0 {
        bail!("--batch, --seq, --steps and --rank must be at least 1");
    }
    if !(0.0..1.0).contains(&args.lora_dropout) {
        bail!(
            "--lora-dropout {}: give a probability from 0 up to 1",
            args.lora_dropout
        );
    }
    let settings = Settings {
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        warmup: args.warmup,
        gen_tokens: args.gen_tokens,
        sampling: sampling(&args)?,
        lora: LoraShape {
            rank: args.rank,
            all_linear: args.lora_targets == LoraTargets::All,
            dropout: args.lora_dropout,
        },
    };
    let mut out = match &args.out {
        Some(path) if rank == 0 => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        ),
        _ => None,
    };
    if rank == 0 {
        println!(
            "llmtool {} device {device:?} threads {}{}",
            env!("CARGO_PKG_VERSION"),
            rayon::current_num_threads(),
            match collective.world_size() {
                1 => String::new(),
                n => format!(" ranks {n}"),
            }
        );
    }
    if args.ops {
        return run_ops(&args, &modes, &settings, &device, out.as_mut());
    }
    let mut rows = Vec::new();
    for &preset in &args.sizes {
        for &task in &tasks {
            for &mode in &modes {
                // As the reference: checkpointing only applies to training.
                let inference = matches!(task, Task::Eval | Task::Prefill | Task::Generate);
                if inference && mode.checkpointed() {
                    continue;
                }
                let row = train::run::on_big_stack(|| {
                    measure(task, preset, mode, &settings, &device, &*collective)
                })?
                .unwrap_or_else(|e| error_row(task, preset, mode, &e));
                if rank != 0 {
                    continue;
                }
                println!("{row}");
                if let Some(file) = &mut out {
                    writeln!(file, "{row}").context("writing --out")?;
                }
                rows.push(row);
            }
        }
    }
    if rank == 0 {
        print_table(&rows);
    }
    Ok(())
}

/// The row of a measurement that failed: what it was, and the error.
fn error_row(task: Task, preset: Preset, mode: Mode, e: &anyhow::Error) -> Value {
    let mut row = json!({"tool": "llmtool", "task": task.name(), "preset": preset.name(),
                         "mode": mode.name(), "error": format!("{e:#}")});
    if let Task::Lora(base) = task {
        row["lora_base"] = base.name().into();
    }
    row
}

/// The reference's closing table: task, preset, mode, tokens/s, step ms, peak MB (the pool's,
/// and nvidia-smi's where measured). A `lora` row names its base after the task (`lora/plain`).
fn print_table(rows: &[Value]) {
    println!(
        "{:11} {:6} {:14} {:>12} {:>9} {:>9} {:>9}",
        "task", "preset", "mode", "tok/s", "step_ms", "peak_MB", "smi_MB"
    );
    let text = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_string();
    let number = |r: &Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    for r in rows {
        let task = match r["lora_base"].as_str() {
            Some(base) => format!("{}/{base}", text(r, "task")),
            None => text(r, "task"),
        };
        let (preset, mode) = (text(r, "preset"), text(r, "mode"));
        if let Some(e) = r["error"].as_str() {
            let short: String = e.chars().take(60).collect();
            println!("{task:11} {preset:6} {mode:14} ERROR {short}");
            continue;
        }
        let ms = r
            .get("step_ms")
            .map_or(number(r, "ms"), |v| v.as_f64().unwrap_or(0.0));
        let smi = match r["peak_smi_mb"].as_f64() {
            Some(mb) => format!("{mb:9.0}"),
            None => format!("{:>9}", "-"),
        };
        println!(
            "{task:11} {preset:6} {mode:14} {:12.0} {ms:9.2} {:9.0} {smi}",
            number(r, "tokens_per_s"),
            number(r, "peak_mb")
        );
    }
}

/// `llmtool bench --ops`: the op check rows, then a summary; an error if any op failed.
fn run_ops(
    args: &BenchArgs,
    modes: &[Mode],
    settings: &Settings,
    device: &candle_core::Device,
    mut out: Option<&mut std::fs::File>,
) -> Result<()> {
    let mut rows = vec![crate::bench::adamw_row(device)];
    for &mode in modes.iter().filter(|m| !m.checkpointed()) {
        let presets = std::iter::once(None).chain(args.sizes.iter().copied().map(Some));
        for preset in presets {
            rows.extend(crate::bench::op_rows(preset, mode, settings, device));
        }
    }
    for row in &rows {
        println!("{row}");
        if let Some(file) = out.as_deref_mut() {
            writeln!(file, "{row}").context("writing --out")?;
        }
    }
    println!(
        "{:6} {:6} {:18} {:>10} {:>10} {:>11} {:>8}",
        "preset", "mode", "op", "rel_err", "fused_ms", "composite", "speedup"
    );
    let text = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_string();
    let number = |r: &Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    for r in &rows {
        println!(
            "{:6} {:6} {:18} {:10.2e} {:10.3} {:11.3} {:7.1}x{}",
            text(r, "preset"),
            text(r, "mode"),
            text(r, "op"),
            number(r, "max_rel_error"),
            number(r, "fused_ms"),
            number(r, "reference_ms"),
            number(r, "speedup"),
            if r["ok"] == json!(true) {
                ""
            } else {
                "  FAILED"
            }
        );
    }
    let failed = rows.iter().filter(|r| r["ok"] != json!(true)).count();
    if failed > 0 {
        bail!("{failed} of {} op checks failed", rows.len());
    }
    Ok(())
}

/// The generate rows' sampling from `--temperature`, `--top-p` and `--samples`, checked as
/// `llmtool generate` checks them: `None` for greedy (a temperature of 0).
fn sampling(args: &BenchArgs) -> Result<Option<Sampling>> {
    if args.temperature == 0.0 {
        return Ok(None);
    }
    if args.samples == 0 {
        bail!("bench: --samples must be at least 1");
    }
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        samples: args.samples,
    };
    sampling.params(0).validate().context("bench")?;
    Ok(Some(sampling))
}
