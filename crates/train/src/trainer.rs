//! The training loop: accumulate, clip, step, log, evaluate, checkpoint, resume.
//! It reads top to bottom like nanoGPT's, with every side effect in a named helper.

use super::distributed::buckets::BucketPlan;
use super::distributed::{self, Collective, CollectiveError, ReduceError};
use super::gradients::{self, Batch, Gradients};
use super::metrics::{Metrics, Record};
use super::optim::{self, clip_scale, global_norm, AdamW, AdamWParams};
use super::schedule::Schedule;
use super::state::{self, Progress, STATE_FILE};
use candle_core::{Tensor, Var};
use config::{Config, OnNonFinite};
use model::{Llama, ModelError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Where training windows come from. Batches are pure functions of their cursor, so a resumed
/// run sees exactly the data it would have seen.
pub trait BatchSource {
    /// `rows` training windows starting at window number `cursor`.
    fn train_batch(&self, cursor: u64, rows: usize) -> Result<Batch, String>;
    /// Validation batch number `index`, or `None` when there is no validation data.
    fn val_batch(&self, index: u64, rows: usize) -> Result<Option<Batch>, String>;
    /// Training windows in one epoch.
    fn train_windows(&self) -> u64;
}

/// Errors that stop a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Building, running or saving the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Writing `metrics.jsonl` failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The [`BatchSource`] could not produce a batch.
    #[error("data: {0}")]
    Data(String),
    /// The saved training state does not fit this run.
    #[error("cannot resume from {path}: {message}")]
    Resume {
        /// The training-state file.
        path: PathBuf,
        /// What does not fit (a missing or mis-shaped parameter).
        message: String,
    },
    /// A non-finite loss or gradient with `training.on_nan: stop`.
    #[error("non-finite {what} at step {step}; stopped with the last checkpoint intact (set training.on_nan: skip to skip such batches)")]
    NonFinite {
        /// `loss` or `gradient`.
        what: &'static str,
        /// The step whose loss or gradient was non-finite, counted from 1.
        step: u64,
    },
    /// Another rank of a multi-process run stopped, failed or fell out of step.
    #[error(transparent)]
    Distributed(#[from] CollectiveError),
    /// A signal stopped the run after a resumable checkpoint.
    #[error("stopped by signal {signal} at step {step}, after saving a checkpoint in {}", run_dir.display())]
    Interrupted {
        /// The last step completed and checkpointed.
        step: u64,
        /// The run directory to resume from.
        run_dir: PathBuf,
        /// The signal that asked the run to stop (2 for Ctrl-C, 15 for SIGTERM, 1 for SIGHUP).
        signal: i32,
    },
}

/// What a run tells its caller as it goes; presenting it (a progress bar, log lines) is the
/// caller's business. The run's files (metrics.jsonl, loss.svg, checkpoints) are the trainer's.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The run starts, or resumes, after `step` of `total` steps.
    Started {
        /// Steps already completed (0 for a new run).
        step: u64,
        /// Optimizer steps the budget asks for.
        total: u64,
    },
    /// An optimizer step finished. `loss` is the mean training loss of the steps since the
    /// last logged step (this one included), `tokens_per_sec` their throughput.
    Stepped {
        /// Steps completed, this one included.
        step: u64,
        /// Mean training loss since the last logged step.
        loss: f64,
        /// Learning rate of this step.
        lr: f64,
        /// Data tokens (padding excluded) per second since the last logged step.
        tokens_per_sec: f64,
    },
    /// A logged step (every `training.log_every` steps, and the last): the values written to
    /// metrics.jsonl, as [`Event::Stepped`] has them.
    Logged {
        /// Steps completed, this one included.
        step: u64,
        /// Mean training loss since the previous logged step.
        loss: f64,
        /// Learning rate of this step.
        lr: f64,
        /// Data tokens (padding excluded) per second since the previous logged step.
        tokens_per_sec: f64,
    },
    /// A validation pass finished; `best` when it is the lowest validation loss so far.
    /// `train_loss` is the mean training loss over the last logging interval.
    Validated {
        /// Steps completed when the pass ran.
        step: u64,
        /// Mean training loss over the last logging interval.
        train_loss: f64,
        /// Mean validation loss over up to `training.eval_batches` batches.
        val_loss: f64,
        /// Whether `val_loss` is the lowest so far (the run then saves `best/`).
        best: bool,
    },
    /// Something the user should read that does not stop the run (a skipped batch, a plot
    /// that could not be drawn).
    Note(String),
    /// The run stops: finished, paused, or `interrupted` (after its checkpoint).
    Stopped {
        /// Whether a signal stopped the run.
        interrupted: bool,
    },
}

/// Receives a run's [`Event`]s. Any `FnMut(Event)` is one.
pub trait Reporter {
    /// Handles one event.
    fn report(&mut self, event: Event);
}

impl<F: FnMut(Event)> Reporter for F {
    fn report(&mut self, event: Event) {
        self(event)
    }
}

/// Switches that do not belong in the config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the run directory's training state.
    pub resume: bool,
    /// Save and return after this many steps in this invocation (time-sliced jobs).
    pub stop_after_steps: Option<u64>,
    /// Set to a signal's number (Ctrl-C, SIGTERM, SIGHUP) to save a resumable checkpoint and
    /// stop; 0 while the run may go on.
    pub interrupt: Arc<AtomicUsize>,
}

/// What a finished (or paused) run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps completed, across resumes (skipped batches included).
    pub steps: u64,
    /// Optimizer steps the budget asks for.
    pub total_steps: u64,
    /// Data tokens consumed (padding excluded), across resumes.
    pub tokens: u64,
    /// Training loss of the last step this invocation applied; `None` if it applied none.
    pub last_loss: Option<f64>,
    /// Lowest validation loss so far; `None` without validation data.
    pub best_val_loss: Option<f64>,
    /// Training time in seconds, across resumes.
    pub elapsed: f64,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Where the latest artifact is.
    pub artifact: PathBuf,
}

/// Writes the trained artifact (an HF model dir, or an adapter dir) to a directory.
pub type SaveArtifact<'a> = dyn Fn(&Path) -> Result<(), ModelError> + 'a;

/// A model with its trainable parameters, ready to train on a [`BatchSource`].
pub struct Trainer<'a> {
    /// The run's resolved configuration.
    pub config: &'a Config,
    /// The model whose `vars` are trained.
    pub model: &'a Llama,
    /// The parameters to train, by name (full model or adapters).
    pub vars: Vec<(String, Var)>,
    /// Where metrics, plots, checkpoints and artifacts are written.
    pub run_dir: PathBuf,
    /// Writes `run_dir/<artifact>` (latest) and `run_dir/best`.
    pub save_artifact: &'a SaveArtifact<'a>,
    /// Directory name of the latest artifact: `model` or `adapter`.
    pub artifact: &'static str,
    /// The ranks training together ([`distributed::Single`] for one process). Each rank takes
    /// its share of every step's windows; rank 0 writes the run directory.
    pub collective: &'a dyn Collective,
}

impl From<ReduceError> for TrainError {
    fn from(e: ReduceError) -> Self {
        match e {
            ReduceError::Collective(e) => Self::Distributed(e),
            ReduceError::Candle(e) => Self::Candle(e),
        }
    }
}

/// Optimizer steps the config asks for, given the epoch size of the data and the number of
/// ranks (each takes `batch_size × grad_accum` windows a step).
pub fn total_steps(config: &Config, windows_per_epoch: u64, world_size: u64) -> u64 {
    let t = &config.training;
    let windows_per_step = (t.batch_size * t.grad_accum) as u64 * world_size;
    if let Some(steps) = t.max_steps {
        steps as u64
    } else if let Some(epochs) = t.epochs {
        ((epochs * windows_per_epoch as f64) / windows_per_step as f64)
            .ceil()
            .max(1.0) as u64
    } else {
        let tokens = t.max_tokens.unwrap_or(0);
        tokens.div_ceil(windows_per_step * t.seq_len as u64).max(1)
    }
}

impl Trainer<'_> {
    fn state_path(&self) -> PathBuf {
        self.run_dir.join(STATE_FILE)
    }

    /// Trains to the configured budget (or until interrupted), checkpointing as configured and
    /// telling `reporter` what happens.
    pub fn run(
        &self,
        data: &dyn BatchSource,
        opts: &TrainOptions,
        reporter: &mut dyn Reporter,
    ) -> Result<TrainSummary, TrainError> {
        let t = &self.config.training;
        let (rank, world) = (
            self.collective.rank() as u64,
            self.collective.world_size() as u64,
        );
        let total = total_steps(self.config, data.train_windows(), world);
        let schedule = Schedule::new(t, total as usize);
        let mut optimizer = AdamW::new(
            &self.vars,
            AdamWParams {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
            },
        )?;
        let mut progress = Progress {
            step: 0,
            cursor: 0,
            tokens: 0,
            best_val_loss: None,
            elapsed: 0.0,
            interval_loss: 0.0,
            interval_steps: 0,
            ranks: world,
        };
        if opts.resume {
            progress = self.restore(&mut optimizer)?;
        }
        optim::keep_model_copies(&mut optimizer, self.model, t.grad_checkpoint)?;
        self.share_parameters()?;
        let buckets = BucketPlan::for_vars(&self.vars);
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        // The other ranks keep their metrics to themselves.
        let mut metrics = match self.writes_run_dir() {
            true => Metrics::open(&metrics_path, opts.resume.then_some(progress.step))
                .map_err(io(&metrics_path))?,
            false => Metrics::in_memory(),
        };
        reporter.report(Event::Started {
            step: progress.step,
            total,
        });
        let started = Instant::now();
        let elapsed_before = progress.elapsed;
        let mut last_loss = None;
        let mut window_start = (Instant::now(), progress.tokens);
        let first_step = progress.step;
        // Every step takes `grad_accum × world` micro-batches of `rows` windows, the ranks
        // sharing them out (distributed::window_start).
        let rows = t.batch_size as u64;
        let micro_batches = t.grad_accum as u64 * world;

        while progress.step < total {
            let step = progress.step;
            let lr = schedule.lr_at(step as usize);
            let mut grads = Gradients::new();
            let scale = 1.0 / micro_batches as f64;
            let mut losses = Vec::with_capacity(t.grad_accum);
            let mut tokens = 0;
            let copies = optimizer.compute_copies()?;
            for micro in 0..t.grad_accum as u64 {
                let window = distributed::window_start(progress.cursor, micro, rank, world, rows);
                let batch = data
                    .train_batch(window, t.batch_size)
                    .map_err(TrainError::Data)?;
                tokens += batch.real_tokens() as u64;
                // Adapter dropout masks are a function of the seed and the data cursor, so a
                // resumed run draws the same masks.
                let mask_seed = t.seed.rotate_left(32) ^ window;
                self.model.set_adapter_dropout_seed(Some(mask_seed));
                losses.push(gradients::accumulate(
                    self.model,
                    &self.vars,
                    &batch,
                    scale,
                    t.grad_checkpoint,
                    copies.as_ref(),
                    &mut grads,
                )?);
            }
            progress.cursor += micro_batches * rows;
            // The sums over the ranks: every rank then clips, steps and logs the same numbers.
            if world > 1 {
                buckets.all_reduce(&self.vars, &mut grads, self.collective)?;
            }
            // Prepared while the device still runs the passes: only the norm's read between
            // the passes and the update.
            let update = optimizer.prepare(&grads, lr)?;
            let grad_norm = global_norm(&grads)?;
            // Read once the norm has waited for the device (see `PendingLoss`).
            let mut loss = 0.0;
            for micro_loss in &losses {
                loss += scale * micro_loss.read()?;
            }
            if world > 1 {
                let sums = distributed::sum_f64(self.collective, &[loss, tokens as f64])?;
                (loss, tokens) = (sums[0], sums[1] as u64);
            }
            progress.step += 1;
            progress.tokens += tokens;
            progress.elapsed = elapsed_before + started.elapsed().as_secs_f64();
            let bad = if !loss.is_finite() {
                Some("loss")
            } else if !grad_norm.is_finite() {
                Some("gradient")
            } else {
                None
            };
            if let Some(what) = bad {
                match t.on_nan {
                    OnNonFinite::Stop => {
                        return Err(TrainError::NonFinite {
                            what,
                            step: step + 1,
                        })
                    }
                    OnNonFinite::Skip => {
                        let note = format!("step {}: non-finite {what}, batch skipped", step + 1);
                        reporter.report(Event::Note(note));
                        continue;
                    }
                }
            }
            optimizer.step_prepared(update, clip_scale(grad_norm, t.grad_clip))?;
            drop(grads);
            last_loss = Some(loss);
            progress.interval_loss += loss;
            progress.interval_steps += 1;
            let mean_loss = progress.interval_loss / progress.interval_steps as f64;

            let now = progress.step;
            let rate = {
                let secs = window_start.0.elapsed().as_secs_f64().max(1e-9);
                (progress.tokens - window_start.1) as f64 / secs
            };
            reporter.report(Event::Stepped {
                step: now,
                loss: mean_loss,
                lr,
                tokens_per_sec: rate,
            });
            if now % t.log_every as u64 == 0 || now == total {
                reporter.report(Event::Logged {
                    step: now,
                    loss: mean_loss,
                    lr,
                    tokens_per_sec: rate,
                });
                metrics
                    .push(Record {
                        step: now,
                        loss: Some(mean_loss),
                        lr: Some(lr),
                        grad_norm: Some(grad_norm),
                        tokens: progress.tokens,
                        tokens_per_sec: Some(rate),
                        elapsed: progress.elapsed,
                        ..Record::default()
                    })
                    .map_err(io(&metrics_path))?;
                window_start = (Instant::now(), progress.tokens);
                (progress.interval_loss, progress.interval_steps) = (0.0, 0);
            }
            if now % t.eval_every as u64 == 0 || now == total {
                if let Some(val) = self.validate(data)? {
                    let improved = progress.best_val_loss.is_none_or(|b| val < b);
                    reporter.report(Event::Validated {
                        step: now,
                        train_loss: mean_loss,
                        val_loss: val,
                        best: improved,
                    });
                    metrics
                        .push(Record {
                            step: now,
                            val_loss: Some(val),
                            val_ppl: Some(val.exp()),
                            tokens: progress.tokens,
                            elapsed: progress.elapsed,
                            ..Record::default()
                        })
                        .map_err(io(&metrics_path))?;
                    if improved {
                        progress.best_val_loss = Some(val);
                        if self.writes_run_dir() {
                            (self.save_artifact)(&self.run_dir.join("best"))?;
                        }
                    }
                }
                self.plot(&metrics, reporter);
            }
            let signal = self.agreed_signal(opts.interrupt.load(Ordering::SeqCst))?;
            let interrupted = signal != 0;
            let paused = opts.stop_after_steps.is_some_and(|n| now - first_step >= n);
            let save = now % t.save_every as u64 == 0 || now == total || interrupted || paused;
            if save && self.writes_run_dir() {
                self.checkpoint(&optimizer, &progress)?;
            }
            if interrupted {
                reporter.report(Event::Stopped { interrupted: true });
                return Err(TrainError::Interrupted {
                    step: now,
                    run_dir: self.run_dir.clone(),
                    signal: signal as i32,
                });
            }
            if paused {
                break;
            }
        }
        reporter.report(Event::Stopped { interrupted: false });
        self.plot(&metrics, reporter);
        Ok(TrainSummary {
            steps: progress.step,
            total_steps: total,
            tokens: progress.tokens,
            last_loss,
            best_val_loss: progress.best_val_loss,
            elapsed: progress.elapsed,
            run_dir: self.run_dir.clone(),
            artifact: self.run_dir.join(self.artifact),
        })
    }

    /// Mean validation loss over the configured number of batches, which the ranks share.
    fn validate(&self, data: &dyn BatchSource) -> Result<Option<f64>, TrainError> {
        let t = &self.config.training;
        self.model.set_adapter_dropout_seed(None);
        let mut total = 0.0;
        let mut count = 0.0;
        let (rank, world) = (self.collective.rank(), self.collective.world_size());
        for i in (rank..t.eval_batches).step_by(world) {
            let batch = data.val_batch(i as u64, t.batch_size);
            let Some(batch) = batch.map_err(TrainError::Data)? else {
                break;
            };
            total += gradients::loss_only(self.model, &batch)?;
            count += 1.0;
        }
        let sums = distributed::sum_f64(self.collective, &[total, count])?;
        Ok((sums[1] > 0.0).then(|| sums[0] / sums[1]))
    }

    /// Gives every rank rank 0's parameters (the same initialisation or resumed state).
    fn share_parameters(&self) -> Result<(), TrainError> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        for (_, var) in &self.vars {
            let shared = distributed::broadcast_tensor(self.collective, var.as_tensor())?;
            var.set(&shared.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// The stop signal every rank acts on at the end of a step: this rank's own, else the first
    /// any rank received (0 while none did), so that all ranks stop after the same step.
    fn agreed_signal(&self, own: usize) -> Result<usize, TrainError> {
        if self.collective.world_size() == 1 {
            return Ok(own);
        }
        let all = self.collective.all_gather(&(own as u64).to_le_bytes())?;
        let first = all
            .iter()
            .filter_map(|bytes| bytes.as_slice().try_into().ok().map(u64::from_le_bytes))
            .find(|signal| *signal != 0);
        Ok(match own {
            0 => first.unwrap_or(0) as usize,
            own => own,
        })
    }

    /// Whether this process writes the run directory (metrics, the plot, checkpoints, `best/`):
    /// rank 0 alone, so that ranks training together never write the same file.
    fn writes_run_dir(&self) -> bool {
        self.collective.rank() == 0
    }

    fn plot(&self, metrics: &Metrics, reporter: &mut dyn Reporter) {
        if self.config.output.plot && self.writes_run_dir() {
            if let Err(e) = metrics.plot(&self.run_dir.join("loss.svg")) {
                reporter.report(Event::Note(format!(
                    "warning: could not draw loss.svg: {e}"
                )));
            }
        }
    }

    /// Saves the artifact and the exact training state.
    fn checkpoint(&self, optimizer: &AdamW, progress: &Progress) -> Result<(), TrainError> {
        (self.save_artifact)(&self.run_dir.join(self.artifact))?;
        let params: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        state::save(&self.state_path(), &params, optimizer.state(), progress)?;
        Ok(())
    }

    /// Loads weights, optimizer moments and progress saved by a previous run.
    fn restore(&self, optimizer: &mut AdamW) -> Result<Progress, TrainError> {
        let path = self.state_path();
        let resume_error = |message: String| TrainError::Resume {
            path: path.clone(),
            message,
        };
        let saved = state::load(&path, self.model.device())?;
        for (name, var) in &self.vars {
            let t = saved.params.get(name).ok_or_else(|| {
                resume_error(format!("parameter {name} is not in the saved state"))
            })?;
            if t.shape() != var.shape() {
                return Err(resume_error(format!(
                    "parameter {name} was saved with shape {:?} but the config needs {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        let world = self.collective.world_size() as u64;
        if saved.progress.ranks != world {
            let processes = |n: u64| match n {
                1 => "1 process".to_string(),
                n => format!("{n} processes"),
            };
            return Err(resume_error(format!(
                "the run was trained by {} and this run has {}: every step's batch would \
                 change (resume with --gpus {})",
                processes(saved.progress.ranks),
                processes(world),
                saved.progress.ranks
            )));
        }
        optimizer
            .load_state(&saved.optimizer, saved.progress.step)
            .map_err(|name| {
                resume_error(format!("optimizer state {name} is missing or mis-shaped"))
            })?;
        Ok(saved.progress)
    }
}
