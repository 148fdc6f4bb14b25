//! A training session, shared by `train` and `finetune`: the config resolved against a resumed
//! run, the run directory guarded, the device opened, the data loaded, then the trainer run with
//! Ctrl-C handling and a one-screen summary.
//!
//! In a multi-process run (the environment names a world, see [`train::distributed::env`])
//! every rank connects to rank 0 first. Rank 0 then does what a single process does; the other
//! ranks write nothing: they wait for rank 0 to hold the run directory and to have its data,
//! then load that same data (by its fingerprint) and train on their share of every step.

use super::launch::{join_run, Rank};
use crate::cli::TrainArgs;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Var};
use config::{Config, TrainingSection};
use data::build::{build, BuildOptions};
use data::loader::Dataset;
use data::Manifest;
use model::Llama;
use train::dataset_source::DatasetBatches;
use train::distributed::env::WorldEnv;
use train::distributed::{self, Collective};
use train::memory;
use train::run::{incompatible_keys, RunDir, DATA_PIN, RUN_CONFIG};
use train::trainer::SaveArtifact;
use train::{BatchSource, TrainError, TrainOptions, TrainSummary, Trainer};

/// A run about to start: its config, device and training data (by default the built dataset).
pub struct Session<D = Dataset> {
    /// How the user continues this run: `train`, `finetune` or `finetune --lora`, with the
    /// `--gpus` it ran with.
    pub command: String,
    /// The run directory, held until the session ends; only rank 0 of a multi-process run
    /// holds it (and writes it).
    pub _run: Option<RunDir>,
    /// Whether the run continues from a checkpoint.
    pub continuing: bool,
    pub config: Config,
    pub device: Device,
    pub data: D,
    /// The ranks training together: [`Single`] for one process.
    pub collective: Box<dyn Collective>,
}

/// What rank 0 tells the other ranks once it holds the run directory and its data.
#[derive(serde::Serialize, serde::Deserialize)]
struct RankZeroReady {
    /// Whether the run continues from a checkpoint.
    continuing: bool,
    /// The fingerprint of the training data.
    fingerprint: String,
    /// The resolved config, which every rank must share.
    config: String,
}

/// Training data a session holds: it hands the trainer its batches.
pub trait TrainData {
    /// The batches for `training`'s window length, sampling and seed.
    fn batches(&self, training: &TrainingSection) -> Result<Box<dyn BatchSource + '_>>;

    /// What identifies this data: a resumed run must train on data with the fingerprint it
    /// started on.
    fn fingerprint(&self) -> Result<String>;
}

impl TrainData for Dataset {
    fn fingerprint(&self) -> Result<String> {
        Ok(Manifest::read(&self.dir)?.fingerprint)
    }

    fn batches(&self, t: &TrainingSection) -> Result<Box<dyn BatchSource + '_>> {
        let batches = DatasetBatches::new(self, t.seq_len, t.sampling, t.seed)?;
        if !batches.has_validation() {
            eprintln!("warning: the validation split is shorter than one window; no validation loss (raise data.val_fraction)");
        }
        Ok(Box::new(batches))
    }
}

/// Guards the run directory, opens the device, loads the training data with `load` and
/// records the resolved config and the data's fingerprint in the run directory. When a run
/// with a checkpoint is resumed, `load` is given the fingerprint of the data the run started
/// on, and data with another fingerprint is refused. In a multi-process run, ranks other than 0
/// wait for rank 0 and are given its fingerprint.
pub fn open_session<D: TrainData>(
    command: &'static str,
    config: Config,
    args: &TrainArgs,
    load: impl FnOnce(&Config, Option<&str>) -> Result<D>,
) -> Result<Session<D>> {
    let spec = match args.device {
        Some(spec) => spec,
        None => super::config::training_device(&config)?,
    };
    let Rank {
        world,
        device,
        collective,
    } = join_run(spec)?;
    let command = continue_as(command, world.as_ref());
    if collective.rank() != 0 {
        return join_rank_zero(command, config, collective, device, load);
    }
    if collective.world_size() > 1 && device.is_cuda() && !cfg!(feature = "nccl") {
        eprintln!(
            "note: this build has no NCCL (build with --features nccl): the gradients travel \
             through host memory and rank 0 over TCP"
        );
    }
    let run = RunDir::open(&config.output.dir)?;
    run.admit(args.resume.is_some(), args.force, &command)?;
    if args.resume.is_some() && !run.has_checkpoint() {
        eprintln!(
            "{} has no checkpoint yet: starting the run from step 0 with its saved config",
            run.path().display()
        );
    }
    let continuing = args.resume.is_some() && run.has_checkpoint();
    let pin = match continuing {
        true => run.data_pin()?,
        false => None,
    };
    let data = load(&config, pin.as_deref())?;
    let fingerprint = data.fingerprint()?;
    match &pin {
        Some(pin) if *pin != fingerprint => bail!(
            "{}: the training data differs from the data this run started on (fingerprint {} \
             now {}); resuming would train on other tokens. Restore the data, or start over \
             with `llmtool {command} CONFIG --force`",
            run.path().join(DATA_PIN).display(),
            short(pin),
            short(&fingerprint)
        ),
        Some(_) => {}
        // Runs made before the pin existed are resumed as they were.
        None if continuing => {}
        None => run.pin_data(&fingerprint)?,
    }
    let yaml = serde_norway::to_string(&config)?;
    if args.resume.is_none() {
        let path = run.path().join(RUN_CONFIG);
        model::weights::write_atomic(&path, yaml.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if collective.world_size() > 1 {
        let ready = RankZeroReady {
            continuing,
            fingerprint,
            config: yaml,
        };
        distributed::broadcast(&*collective, &serde_json::to_vec(&ready)?)?;
    }
    Ok(Session {
        command,
        _run: Some(run),
        continuing,
        config,
        device,
        data,
        collective,
    })
}

/// A rank other than 0 joins the run once rank 0 holds it: same config, the data of rank 0's
/// fingerprint, nothing written.
fn join_rank_zero<D: TrainData>(
    command: String,
    config: Config,
    collective: Box<dyn Collective>,
    device: Device,
    load: impl FnOnce(&Config, Option<&str>) -> Result<D>,
) -> Result<Session<D>> {
    let rank = collective.rank();
    let message = distributed::broadcast(&*collective, &[])?;
    let ready: RankZeroReady =
        serde_json::from_slice(&message).context("rank 0's start message")?;
    if serde_norway::to_string(&config)? != ready.config {
        bail!("rank {rank}'s config differs from rank 0's: every rank must run the same config and --set overrides");
    }
    let data = load(&config, Some(&ready.fingerprint))?;
    let fingerprint = data.fingerprint()?;
    if fingerprint != ready.fingerprint {
        bail!(
            "rank {rank}'s training data differs from rank 0's (fingerprint {} where rank 0 \
             has {}): every rank must see the same data",
            short(&fingerprint),
            short(&ready.fingerprint)
        );
    }
    Ok(Session {
        command,
        _run: None,
        continuing: ready.continuing,
        config,
        device,
        data,
        collective,
    })
}

/// `command` with the process counts of `world`, as the user restarts the run (a resume with
/// other counts is refused).
fn continue_as(command: &str, world: Option<&WorldEnv>) -> String {
    match world {
        None => command.to_string(),
        Some(w) if w.machines() == 1 => format!("{command} --gpus {}", w.world_size),
        Some(w) => format!(
            "{command} --gpus {} --nnodes {}",
            w.local_world_size,
            w.machines()
        ),
    }
}

/// The first 12 hex digits of a fingerprint, enough to tell two apart in a message.
fn short(fingerprint: &str) -> &str {
    fingerprint.get(..12).unwrap_or(fingerprint)
}

/// Builds (or reuses) the configured markdown dataset and opens it, checking its tokenizer
/// fits a model with `vocab_size` embeddings, if the model has a fixed number (before the run
/// directory gets its config).
/// With `pin` (a resumed run's data fingerprint), a dataset already built with that
/// fingerprint is used as it is, even where the corpus changed since: its tokenizer is the
/// one the run's weights were trained with.
pub fn build_dataset(
    config: &Config,
    vocab_size: Option<usize>,
    pin: Option<&str>,
) -> Result<Dataset> {
    if let Some(dataset) = pin.and_then(|pin| pinned_dataset(config, pin)) {
        check_vocab(&dataset, vocab_size)?;
        return Ok(dataset);
    }
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

/// The dataset in the configured dataset directory when it is the one with fingerprint `pin`,
/// after saying what changed in the corpus since it was built.
fn pinned_dataset(config: &Config, pin: &str) -> Option<Dataset> {
    let dir = config.data.dataset_dir(&config.output);
    let manifest = Manifest::read(&dir).ok().filter(|m| m.fingerprint == pin)?;
    let dataset = Dataset::open(&dir).ok()?;
    match data::build::changes_since(config, &manifest) {
        Ok(changes) if changes.is_empty() => {}
        Ok(changes) => eprintln!(
            "note: the corpus changed since this run started ({}); the run goes on with the \
             dataset it started on, {}. Start a new run to train on the changed corpus",
            changes.join("; "),
            dir.display()
        ),
        Err(e) => eprintln!("note: could not compare the corpus with the run's dataset: {e}"),
    }
    eprintln!(
        "dataset {}: {} documents, {} train / {} val tokens (the run's own)",
        dir.display(),
        manifest.counts.documents,
        dataset.train.len(),
        dataset.val.len(),
    );
    Some(dataset)
}

/// Fails when the dataset's tokenizer has more tokens than the model has embeddings.
fn check_vocab(dataset: &Dataset, vocab_size: Option<usize>) -> Result<()> {
    if let Some(vocab_size) = vocab_size.filter(|v| dataset.vocab_size() > *v) {
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
    let (rank, world) = (session.collective.rank(), session.collective.world_size());
    if rank == 0 {
        eprintln!(
            "training {} of {} parameters on {}{} ({:?}), batch {} x {} x {} accumulation",
            memory::count(trainable),
            memory::count(model.config.parameter_count()),
            match world {
                1 => String::new(),
                n => format!("{n} ranks, rank 0 on "),
            },
            ops::device::describe(&session.device),
            t.dtype,
            t.batch_size,
            t.seq_len,
            t.grad_accum
        );
    }
    let interrupt = crate::signals::stop_requests().context("installing the signal handlers")?;
    let trainer = Trainer {
        config,
        model,
        vars,
        run_dir: run_dir.clone(),
        save_artifact: save,
        artifact,
        collective: &*session.collective,
    };
    let opts = TrainOptions {
        resume: session.continuing,
        stop_after_steps: args.stop_after_steps,
        interrupt,
    };
    // Rank 0 tells the user how the run goes; the other ranks only fail loudly.
    let result = match rank {
        0 => trainer.run(&*batches, &opts, &mut crate::report::RunProgress::new()),
        _ => trainer.run(&*batches, &opts, &mut |_| {}),
    };
    match result {
        Ok(summary) if rank == 0 => {
            print_summary(&summary, &session.command);
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(TrainError::Interrupted {
            step,
            run_dir,
            signal,
        }) => Err(crate::Interrupted {
            signal,
            message: match rank {
                0 => format!(
                    "saved a checkpoint at step {step}; resume with `llmtool {} --resume {}`",
                    session.command,
                    run_dir.display()
                ),
                _ => format!("stopped with the other ranks after step {step}"),
            },
        }
        .into()),
        Err(e) => Err(e.into()),
    }
}

fn print_summary(summary: &TrainSummary, command: &str) {
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
        println!(
            "  resume with  llmtool {command} --resume {}",
            run_dir.display()
        );
    }
}

/// The config to train with: the file (plus `--set`), or the saved config of the run being
/// resumed (plus `--set`), checked against the file when both are given.
pub fn resolve_config(args: &TrainArgs) -> Result<Config> {
    let Some(run_dir) = &args.resume else {
        let Some(path) = &args.config else {
            bail!("give a config file (llmtool train configs/small.yaml) or --resume RUN_DIR");
        };
        return super::config::load_file(path, &args.overrides);
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
        None => load_saved(&saved_path, &args.overrides)?,
        Some(path) => {
            let saved = load_saved(&saved_path, &[])?;
            let given = super::config::load_file(path, &args.overrides)?;
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
        output: config::OutputSection {
            dir: run_dir.clone(),
            ..config.output.clone()
        },
        ..config
    })
}

/// A run's saved config with `overrides`. A run saved before `data.packing` existed (its file
/// has no such key) resumes unpacked, as it ran, unless an override sets the key: its batches
/// stay the ones it started with.
fn load_saved(path: &std::path::Path, overrides: &[config::Override]) -> Result<Config> {
    let text = config::read_text(path)?;
    let mut config = super::config::load_text(&text, path, overrides)?;
    let saved: serde_norway::Value =
        serde_norway::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    let recorded = saved.get("data").and_then(|d| d.get("packing")).is_some();
    if !recorded && !overrides.iter().any(|o| o.key == "data.packing") {
        config.data.packing = false;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resume_hint_carries_the_process_counts() {
        let world = |size: &str, local: &str| {
            let vars = [
                ("WORLD_SIZE", size),
                ("RANK", "0"),
                ("LOCAL_WORLD_SIZE", local),
            ];
            WorldEnv::from_vars(|name| {
                vars.iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| value.to_string())
            })
            .unwrap()
        };
        assert_eq!(continue_as("train", None), "train");
        let one_machine = world("4", "4");
        assert_eq!(
            continue_as("finetune --lora", one_machine.as_ref()),
            "finetune --lora --gpus 4"
        );
        let two_machines = world("8", "4");
        assert_eq!(
            continue_as("train", two_machines.as_ref()),
            "train --gpus 4 --nnodes 2"
        );
    }

    #[test]
    fn a_run_saved_before_packing_existed_resumes_unpacked() {
        let dir = tempfile::tempdir().unwrap();
        let small =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/small.yaml"));
        let old = dir.path().join("old.yaml");
        std::fs::write(&old, small.unwrap()).unwrap();
        assert!(!load_saved(&old, &[]).unwrap().data.packing);
        let packed: config::Override = "data.packing=true".parse().unwrap();
        assert!(load_saved(&old, &[packed]).unwrap().data.packing);
        let mut config = load_saved(&old, &[]).unwrap();
        config.data.packing = true;
        let new = dir.path().join("new.yaml");
        std::fs::write(&new, serde_norway::to_string(&config).unwrap()).unwrap();
        assert!(load_saved(&new, &[]).unwrap().data.packing);
    }
}
