//! `llmtool train`: build the dataset if needed, initialise or resume a model, train, report.

use crate::cli::TrainArgs;
use crate::config::{self, Config, TrainingSection};
use crate::data::build::{build, BuildOptions};
use crate::data::loader::Dataset;
use crate::memory;
use crate::model::{self, Llama, LlamaConfig};
use crate::train::dataset_source::DatasetBatches;
use crate::train::trainer::SaveArtifact;
use crate::train::{init, BatchSource, TrainError, TrainOptions, TrainSummary, Trainer};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Var};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The resolved config of a run, as saved in its directory.
pub const RUN_CONFIG: &str = "config.yaml";

/// Runs `llmtool train` on a thread with a big stack.
pub fn run(args: TrainArgs) -> Result<()> {
    on_big_stack(move || train(args))?
}

fn train(args: TrainArgs) -> Result<()> {
    let session = open_session(resolve_config(&args)?, &args, |config| {
        build_dataset(config, config.model.vocab_size)
    })?;
    let (config, dataset) = (&session.config, &session.data);
    let model_config = LlamaConfig::from_section(&config.model, Some(dataset.eos_id()));
    let t = &config.training;
    let weights = init::random_weights(&model_config, t.seed, &session.device)?;
    let (weights, vars) = weights.into_trainable()?;
    let llama = Llama::new(&model_config, &weights, t.dtype.dtype())?;
    let tokenizer_path = dataset.dir.join("tokenizer.json");
    let save = |dir: &Path| model::io::save_model(dir, &llama, &tokenizer_path);
    execute(&session, &args, &llama, vars, &save, "model")
}

/// A run about to start: its config, device and training data (by default the built dataset).
pub struct Session<D = Dataset> {
    pub config: Config,
    pub device: Device,
    pub data: D,
}

/// Training data a session holds: it hands the trainer its batches.
pub trait TrainData {
    /// The batches for `training`'s window length, sampling and seed.
    fn batches(&self, training: &TrainingSection) -> Result<Box<dyn BatchSource + '_>>;
}

impl TrainData for Dataset {
    fn batches(&self, t: &TrainingSection) -> Result<Box<dyn BatchSource + '_>> {
        let batches = DatasetBatches::new(self, t.seq_len, t.sampling, t.seed)?;
        if !batches.has_validation() {
            eprintln!("warning: the validation split is shorter than one window; no validation loss (raise data.val_fraction)");
        }
        Ok(Box::new(batches))
    }
}

/// Guards the run directory, opens the device, loads the training data with `load` and
/// records the resolved config in the run directory.
pub fn open_session<D>(
    config: Config,
    args: &TrainArgs,
    load: impl FnOnce(&Config) -> Result<D>,
) -> Result<Session<D>> {
    let run_dir = &config.output.dir;
    guard_run_dir(run_dir, args.resume.is_some(), args.force)?;
    let device_name = args.device.as_deref().unwrap_or(&config.training.device);
    let device = crate::device::open(device_name)?;
    let data = load(&config)?;
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    if args.resume.is_none() {
        let yaml = serde_norway::to_string(&config)?;
        model::weights::write_atomic(&run_dir.join(RUN_CONFIG), yaml.as_bytes())
            .with_context(|| format!("writing {}", run_dir.join(RUN_CONFIG).display()))?;
    }
    Ok(Session {
        config,
        device,
        data,
    })
}

/// Builds (or reuses) the configured markdown dataset and opens it, checking its tokenizer
/// fits a model with `vocab_size` embeddings (before the run directory gets its config).
pub fn build_dataset(config: &Config, vocab_size: usize) -> Result<Dataset> {
    let report = build(config, &BuildOptions::default()).context("building the dataset")?;
    let dataset = Dataset::open(&report.dir)?;
    eprintln!(
        "dataset {}: {} documents, {} train / {} val tokens{}",
        report.dir.display(),
        report.manifest.counts.documents,
        dataset.train.len(),
        dataset.val.len(),
        if report.up_to_date {
            " (up to date)"
        } else {
            ""
        }
    );
    check_vocab(&dataset, vocab_size)?;
    Ok(dataset)
}

/// Fails when the dataset's tokenizer has more tokens than the model has embeddings.
fn check_vocab(dataset: &Dataset, vocab_size: usize) -> Result<()> {
    if dataset.vocab_size() > vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model has only {vocab_size} embeddings",
            dataset.dir.join("tokenizer.json").display(),
            dataset.vocab_size(),
        );
    }
    Ok(())
}

/// Trains `vars` of `model` on the session's data with Ctrl-C handling, then prints the
/// summary.
pub fn execute<D: TrainData>(
    session: &Session<D>,
    args: &TrainArgs,
    model: &Llama,
    vars: Vec<(String, Var)>,
    save: &SaveArtifact,
    artifact: &'static str,
) -> Result<()> {
    let config = &session.config;
    let t = &config.training;
    let run_dir = config.output.dir.clone();
    let batches = session.data.batches(t)?;
    let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "training {} of {} parameters on {} ({:?}), batch {} x {} x {} accumulation",
        memory::count(trainable),
        memory::count(model.config.parameter_count()),
        crate::device::describe(&session.device),
        t.dtype,
        t.batch_size,
        t.seq_len,
        t.grad_accum
    );
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    // A second Ctrl-C while saving is ignored: the checkpoint must finish.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    let trainer = Trainer {
        config,
        model,
        vars,
        run_dir: run_dir.clone(),
        save_artifact: save,
        artifact,
    };
    let opts = TrainOptions {
        resume: args.resume.is_some(),
        stop_after_steps: args.stop_after_steps,
        interrupt,
        show_progress: true,
    };
    match trainer.run(&*batches, &opts) {
        Ok(summary) => {
            print_summary(&summary);
            Ok(())
        }
        Err(TrainError::Interrupted { step, run_dir }) => Err(crate::Interrupted(format!(
            "saved a checkpoint at step {step}; resume with `--resume {}`",
            run_dir.display()
        ))
        .into()),
        Err(e) => Err(e.into()),
    }
}

fn print_summary(summary: &TrainSummary) {
    let run_dir = &summary.run_dir;
    let done = summary.steps >= summary.total_steps;
    println!(
        "{}",
        if done {
            "training finished"
        } else {
            "training paused"
        }
    );
    println!("  steps        {} / {}", summary.steps, summary.total_steps);
    println!("  tokens       {}", summary.tokens);
    if let Some(l) = summary.last_loss {
        println!("  last loss    {l:.4}");
    }
    if let Some(v) = summary.best_val_loss {
        println!(
            "  best val     {v:.4} (ppl {:.2}) in {}",
            v.exp(),
            run_dir.join("best").display()
        );
    }
    println!("  time         {:.1} s", summary.elapsed);
    if let Some(peak) = memory::peak_resident_bytes() {
        println!("  peak memory  {}", memory::human(peak));
    }
    println!("  output       {}", summary.artifact.display());
    println!("  metrics      {}", run_dir.join("metrics.jsonl").display());
    if !done {
        println!("  resume with  --resume {}", run_dir.display());
    }
}

/// Runs `f` on a worker of a rayon pool whose threads have 256 MiB stacks: candle's backward
/// pass and tensor drops recurse once per graph node. Inside the pool, every parallel kernel and
/// GEMM starts on this thread and hands only its other half to another worker; from outside it
/// would hand all of it over and sleep until woken, two thread switches per op.
pub fn on_big_stack<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(256 << 20)
        .build()
        .context("starting the training threads")?;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.install(f)))
        .map_err(|_| anyhow::anyhow!("the training thread panicked"))
}

/// The config to train with: the file (plus `--set`), or the saved config of the run being
/// resumed (plus `--set`), checked against the file when both are given.
pub fn resolve_config(args: &TrainArgs) -> Result<Config> {
    let Some(run_dir) = &args.resume else {
        let Some(path) = &args.config else {
            bail!("give a config file (llmtool train configs/small.yaml) or --resume RUN_DIR");
        };
        return Ok(config::load(path, &args.overrides)?);
    };
    let saved_path = run_dir.join(RUN_CONFIG);
    if !saved_path.is_file() {
        bail!(
            "{}: missing; {} does not hold a run to resume",
            saved_path.display(),
            run_dir.display()
        );
    }
    let config = match &args.config {
        None => config::load(&saved_path, &args.overrides)?,
        Some(path) => {
            let saved = config::load(&saved_path, &[])?;
            let given = config::load(path, &args.overrides)?;
            let differences = incompatible_keys(&saved, &given);
            if !differences.is_empty() {
                bail!(
                    "{} cannot resume {}: {} differ from the saved run (use a new output.dir, or drop the config to resume as saved)",
                    path.display(),
                    run_dir.display(),
                    differences.join(", ")
                );
            }
            given
        }
    };
    Ok(Config {
        output: crate::config::OutputSection {
            dir: run_dir.clone(),
            ..config.output.clone()
        },
        ..config
    })
}

/// Keys whose change makes a saved state unusable or the resumed run not a continuation.
fn incompatible_keys(saved: &Config, given: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    if saved.model != given.model {
        keys.push("model.*".to_string());
    }
    let (a, b) = (&saved.training, &given.training);
    for (name, same) in [
        ("training.seq_len", a.seq_len == b.seq_len),
        ("training.batch_size", a.batch_size == b.batch_size),
        ("training.grad_accum", a.grad_accum == b.grad_accum),
        ("training.seed", a.seed == b.seed),
        ("training.sampling", a.sampling == b.sampling),
    ] {
        if !same {
            keys.push(name.to_string());
        }
    }
    if saved.data != given.data {
        keys.push("data.*".to_string());
    }
    keys
}

/// Refuses to overwrite an existing run unless resuming or forced.
fn guard_run_dir(dir: &Path, resume: bool, force: bool) -> Result<()> {
    let holds_run =
        dir.join(RUN_CONFIG).exists() || dir.join(crate::train::state::STATE_FILE).exists();
    if holds_run && !resume && !force {
        bail!(
            "{} already holds a run: continue it with `llmtool train --resume {}`, or start over with --force",
            dir.display(),
            dir.display()
        );
    }
    if force && !resume {
        for stale in ["metrics.jsonl", "loss.svg", crate::train::state::STATE_FILE] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
    }
    Ok(())
}
