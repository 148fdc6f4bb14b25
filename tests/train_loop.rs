//! The training loop on an in-memory token stream: it learns, checkpointing changes no
//! gradient, and a paused-then-resumed run ends bit-identical to an uninterrupted one.

mod common;

use candle_core::{DType, Device};
use common::{assert_curves_close, loss_curves};
use llmtool::config::Config;
use llmtool::model::{Llama, ModelError};
use llmtool::train::distributed::local::LocalGroup;
use llmtool::train::distributed::{Collective, Single};
use llmtool::train::gradients::{accumulate, Gradients, PendingLoss};
use llmtool::train::optim::{keep_model_copies, AdamW, AdamWParams};
use llmtool::train::{init, Batch, BatchSource, TrainError, TrainOptions, Trainer};
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// A repeated sentence of token ids; window k starts at a fixed pseudo-random offset.
struct Repeated {
    tokens: Vec<u32>,
    seq_len: usize,
}

impl Repeated {
    fn new(seq_len: usize) -> Self {
        let sentence = [5u32, 9, 13, 2, 40, 41, 7, 30, 22, 3, 17, 60];
        Self {
            tokens: sentence.iter().cycle().take(600).copied().collect(),
            seq_len,
        }
    }

    fn window_batch(&self, first: u64, rows: usize) -> Batch {
        let span = (self.tokens.len() - self.seq_len - 1) as u64;
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for k in first..first + rows as u64 {
            let start = ((k * 7919) % span) as usize;
            inputs.extend_from_slice(&self.tokens[start..start + self.seq_len]);
            targets.extend_from_slice(&self.tokens[start + 1..start + self.seq_len + 1]);
        }
        Batch::windows(inputs, targets, rows, self.seq_len)
    }
}

impl BatchSource for Repeated {
    fn train_batch(&self, cursor: u64, rows: usize) -> Result<Batch, String> {
        Ok(self.window_batch(cursor, rows))
    }
    fn val_batch(&self, index: u64, rows: usize) -> Result<Option<Batch>, String> {
        Ok(Some(
            self.window_batch(1_000_000 + index * rows as u64, rows),
        ))
    }
    fn train_windows(&self) -> u64 {
        100
    }
}

fn tiny_config(steps: usize) -> Config {
    let mut c = Config::default();
    c.model.hidden_size = 32;
    c.model.num_hidden_layers = 2;
    c.model.num_attention_heads = 4;
    c.model.num_key_value_heads = 2;
    c.model.intermediate_size = 64;
    c.model.vocab_size = llmtool::config::VocabSize::Tokens(64);
    c.model.max_position_embeddings = 64;
    c.training.seq_len = 16;
    c.training.batch_size = 4;
    c.training.max_steps = Some(steps);
    c.training.warmup_steps = 2;
    c.training.lr = 3e-3;
    c.training.min_lr = 3e-4;
    c.training.eval_every = 5;
    c.training.save_every = 5;
    c.training.log_every = 1;
    c
}

fn fresh(c: &Config) -> (Llama, Vec<(String, candle_core::Var)>) {
    let cfg = llmtool::train::init::scratch_config(&c.model, 64, Some(0));
    let weights = init::random_weights(&cfg, c.training.seed, &Device::Cpu).unwrap();
    let (weights, vars) = weights.into_trainable().unwrap();
    (Llama::new(&cfg, &weights, DType::F32).unwrap(), vars)
}

fn train(c: &Config, dir: &Path, opts: &TrainOptions) -> llmtool::train::TrainSummary {
    train_rank(c, c.training.seed, dir, opts, &Single).unwrap()
}

/// Trains on one rank of `collective`, from weights initialised with `init_seed`.
fn train_rank(
    c: &Config,
    init_seed: u64,
    dir: &Path,
    opts: &TrainOptions,
    collective: &dyn Collective,
) -> Result<llmtool::train::TrainSummary, TrainError> {
    let mut init_config = c.clone();
    init_config.training.seed = init_seed;
    let (model, vars) = fresh(&init_config);
    let save = |_: &Path| -> Result<(), ModelError> { Ok(()) };
    let trainer = Trainer {
        config: c,
        model: &model,
        vars,
        run_dir: dir.to_path_buf(),
        save_artifact: &save,
        artifact: "model",
        collective,
    };
    trainer.run(&Repeated::new(c.training.seq_len), opts, &mut |_| {})
}

#[test]
fn loss_goes_down_on_a_repeated_sentence() {
    let mut c = tiny_config(60);
    c.training.lr = 1e-2;
    c.training.min_lr = 1e-3;
    let dir = tempfile::tempdir().unwrap();
    let summary = train(&c, dir.path(), &TrainOptions::default());
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let first = first["loss"].as_f64().unwrap();
    let last = summary.last_loss.unwrap();
    assert!(first > 3.5, "starts near ln(64): {first}");
    assert!(last < 1.0, "learns the sentence: {first} -> {last}");
    assert!(summary.best_val_loss.unwrap() < 1.0);
    assert!(dir.path().join("loss.svg").is_file());
    assert!(dir.path().join("training_state.safetensors").is_file());
}

#[test]
fn checkpointing_gives_identical_gradients() {
    let c = tiny_config(1);
    let (model, vars) = fresh(&c);
    let batch = Repeated::new(16).window_batch(3, 4);
    let mut plain = Gradients::new();
    let mut recomputed = Gradients::new();
    let read = |loss: PendingLoss| loss.read().unwrap();
    let a = read(accumulate(&model, &vars, &batch, 1.0, false, None, &mut plain).unwrap());
    let b = read(accumulate(&model, &vars, &batch, 1.0, true, None, &mut recomputed).unwrap());
    assert_eq!(a, b);
    assert_eq!(plain.len(), vars.len(), "every parameter gets a gradient");
    for (name, g) in &plain {
        let r = &recomputed[name];
        let diff = (g - r)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(
            diff <= 1e-7,
            "{name}: checkpointed gradient differs by {diff}"
        );
    }
}

#[test]
fn resumed_run_matches_uninterrupted_run_exactly() {
    let mut c = tiny_config(12);
    // Paused at step 6, inside a logging interval: the resumed run must log the same mean.
    c.training.log_every = 4;
    let whole = tempfile::tempdir().unwrap();
    let full = train(&c, whole.path(), &TrainOptions::default());
    let split = tempfile::tempdir().unwrap();
    let first = train(
        &c,
        split.path(),
        &TrainOptions {
            stop_after_steps: Some(6),
            ..TrainOptions::default()
        },
    );
    assert_eq!(first.steps, 6);
    let before = std::fs::read_to_string(split.path().join("metrics.jsonl")).unwrap();
    let resumed = train(
        &c,
        split.path(),
        &TrainOptions {
            resume: true,
            ..TrainOptions::default()
        },
    );
    assert_eq!(resumed.steps, 12);
    assert_eq!(
        full.last_loss.unwrap().to_bits(),
        resumed.last_loss.unwrap().to_bits()
    );
    let curve = |d: &Path| {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v["loss"].as_f64())
            .collect::<Vec<_>>()
    };
    assert_eq!(curve(whole.path()), curve(split.path()), "same loss curve");
    assert_eq!(curve(whole.path()).len(), 3, "logged at steps 4, 8 and 12");
    let after = std::fs::read_to_string(split.path().join("metrics.jsonl")).unwrap();
    assert!(
        after.starts_with(&before),
        "lines before the checkpoint are kept byte for byte"
    );
}

/// The loss logged every `log_every` steps is the mean of the steps since the last log, not
/// the loss of the one batch that happened to be last.
#[test]
fn logged_loss_is_the_mean_over_the_logging_interval() {
    let losses = |log_every: usize| {
        let mut c = tiny_config(6);
        c.training.log_every = log_every;
        c.training.eval_every = 100;
        let dir = tempfile::tempdir().unwrap();
        let mut stepped = Vec::new();
        let (model, vars) = fresh(&c);
        let save = |_: &Path| -> Result<(), ModelError> { Ok(()) };
        let trainer = Trainer {
            config: &c,
            model: &model,
            vars,
            run_dir: dir.path().to_path_buf(),
            save_artifact: &save,
            artifact: "model",
            collective: &Single,
        };
        let mut reporter = |e: llmtool::train::Event| {
            if let llmtool::train::Event::Stepped { loss, .. } = e {
                stepped.push(loss);
            }
        };
        trainer
            .run(
                &Repeated::new(c.training.seq_len),
                &TrainOptions::default(),
                &mut reporter,
            )
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let logged: Vec<f64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v["loss"].as_f64())
            .collect();
        (stepped, logged)
    };
    let (each, logged_each) = losses(1);
    assert_eq!(each, logged_each, "log_every 1: every step's own loss");
    let (running, logged) = losses(3);
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    assert_eq!(logged, vec![mean(&each[..3]), mean(&each[3..])]);
    // The bar shows the running mean of the interval, which is what gets logged at its end.
    assert_eq!(running[1], mean(&each[..2]));
    assert_eq!(running[4], mean(&each[3..5]));
    assert_ne!(logged[0], each[2], "not the last batch's loss");
}

#[test]
fn bf16_compute_keeps_f32_master_weights_and_learns() {
    let mut c = tiny_config(20);
    c.training.dtype = llmtool::config::Precision::Bf16;
    c.training.lr = 1e-2;
    let cfg = llmtool::train::init::scratch_config(&c.model, 64, Some(0));
    let weights = init::random_weights(&cfg, c.training.seed, &Device::Cpu).unwrap();
    let (weights, vars) = weights.into_trainable().unwrap();
    let model = Llama::new(&cfg, &weights, DType::BF16).unwrap();
    let batch = Repeated::new(16).window_batch(0, 4);
    let mut grads = Gradients::new();
    accumulate(&model, &vars, &batch, 1.0, false, None, &mut grads).unwrap();
    for (name, var) in &vars {
        assert_eq!(var.dtype(), DType::F32, "{name} master weight");
        assert_eq!(grads[name].dtype(), DType::F32, "{name} gradient");
    }
    let dir = tempfile::tempdir().unwrap();
    let save = |_: &Path| -> Result<(), ModelError> { Ok(()) };
    let trainer = Trainer {
        config: &c,
        model: &model,
        vars,
        run_dir: dir.path().to_path_buf(),
        save_artifact: &save,
        artifact: "model",
        collective: &Single,
    };
    let summary = trainer
        .run(&Repeated::new(16), &TrainOptions::default(), &mut |_| {})
        .unwrap();
    assert!(
        summary.last_loss.unwrap() < 2.5,
        "bf16 run learns: {:?}",
        summary.last_loss
    );
}

/// The bf16 copies the optimizer keeps of the masters are their casts: steps that take them
/// compute bit for bit what steps that cast every master do, and they are taken (every master
/// has one after the first update; each block's gate and up, and its q, k and v, a stacked one
/// too).
#[test]
fn bf16_steps_with_the_optimizers_copies_equal_steps_that_cast() {
    let run = |keep: bool| {
        let c = tiny_config(1);
        let cfg = llmtool::train::init::scratch_config(&c.model, 64, Some(0));
        let weights = init::random_weights(&cfg, c.training.seed, &Device::Cpu).unwrap();
        let (weights, vars) = weights.into_trainable().unwrap();
        let model = Llama::new(&cfg, &weights, DType::BF16).unwrap();
        assert_eq!(model.stacked_masters().len(), 2 * c.model.num_hidden_layers);
        let params = AdamWParams {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut optimizer = AdamW::new(&vars, params).unwrap();
        keep_model_copies(&mut optimizer, &model, !keep).unwrap();
        let mut losses = Vec::new();
        for step in 0..4u64 {
            let copies = optimizer.compute_copies().unwrap();
            let kept = copies.as_ref().map_or(0, |c| c.len());
            let expected = match keep && step > 0 {
                true => vars.len() + 2 * c.model.num_hidden_layers,
                false => 0,
            };
            assert_eq!(kept, expected, "step {step}");
            let batch = Repeated::new(16).window_batch(4 * step, 4);
            let mut grads = Gradients::new();
            let loss = accumulate(
                &model,
                &vars,
                &batch,
                1.0,
                false,
                copies.as_ref(),
                &mut grads,
            );
            losses.push(loss.and_then(|loss| loss.read()).unwrap());
            optimizer.step(&grads, 1e-2, 1.0).unwrap();
        }
        let weights: Vec<Vec<f32>> = vars
            .iter()
            .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        (losses, weights)
    };
    let (kept, cast) = (run(true), run(false));
    assert!(kept.0[3] < kept.0[0], "it learns: {:?}", kept.0);
    assert_eq!(kept, cast);
}

/// Runs `world` ranks of the in-process stand-in in threads, each from its own random
/// initialisation (rank 0's is shared at the start), all given the same run directory.
fn train_ranks(
    c: &Config,
    world: usize,
    dir: &Path,
    interrupts: &[usize],
) -> Vec<Result<llmtool::train::TrainSummary, TrainError>> {
    let ranks = LocalGroup::ranks(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                let opts = TrainOptions {
                    interrupt: Arc::new(AtomicUsize::new(interrupts[rank.rank()])),
                    ..TrainOptions::default()
                };
                s.spawn(move || {
                    let seed = c.training.seed + 1000 * rank.rank() as u64;
                    train_rank(c, seed, dir, &opts, &rank)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// N ranks with `grad_accum` A train the same run as one rank with `grad_accum` A × N: each
/// rank takes its share of the step's windows, the gradients and losses are summed, and only
/// rank 0 writes. The curves agree to f32 rounding (the sums are added in another order).
#[test]
fn ranks_with_the_stand_in_follow_one_rank_with_their_accumulation() {
    let mut one = tiny_config(8);
    one.training.grad_accum = 4;
    one.training.batch_size = 2;
    one.training.eval_every = 4;
    one.training.eval_batches = 3;
    let single = tempfile::tempdir().unwrap();
    let alone = train(&one, single.path(), &TrainOptions::default());

    let mut shared = one.clone();
    shared.training.grad_accum = 2;
    let dir = tempfile::tempdir().unwrap();
    let results = train_ranks(&shared, 2, dir.path(), &[0, 0]);
    let summaries: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    let (loss, val) = loss_curves(dir.path());
    let (alone_loss, alone_val) = loss_curves(single.path());
    assert_curves_close(&loss, &alone_loss, "training loss");
    assert_curves_close(&val, &alone_val, "validation loss");
    assert_eq!(val.len(), 2, "validated at steps 4 and 8");
    for s in &summaries {
        assert_eq!((s.steps, s.tokens), (alone.steps, alone.tokens));
        // The step's loss is the same sum on both ranks.
        assert_eq!(
            s.last_loss.unwrap().to_bits(),
            summaries[0].last_loss.unwrap().to_bits()
        );
    }
    // One writer: the metrics are rank 0's alone, not one line per rank.
    assert_eq!(loss.len(), 8);
}

/// A signal that reaches one rank stops every rank after the same step, with rank 0's
/// checkpoint.
#[test]
fn a_signal_to_one_rank_stops_all_after_the_same_step() {
    let c = tiny_config(8);
    let dir = tempfile::tempdir().unwrap();
    let results = train_ranks(&c, 2, dir.path(), &[0, 15]);
    for result in results {
        match result {
            Err(TrainError::Interrupted { step, signal, .. }) => {
                assert_eq!((step, signal), (1, 15));
            }
            other => panic!("expected an interruption, got {:?}", other.map(|s| s.steps)),
        }
    }
    assert!(dir.path().join("training_state.safetensors").is_file());
}
