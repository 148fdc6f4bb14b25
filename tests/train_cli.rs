//! `llmtool train` and `llmtool estimate` end to end on a tiny model and corpus.

mod common;

use common::{assert_fails_naming, llmtool, tiny_training_run as setup};
use predicates::prelude::*;
use std::path::Path;

/// The tiny run of `setup` in `dir`, paused after 2 of its 4 steps: its config and run directory.
fn paused_run(dir: &Path) -> (String, std::path::PathBuf) {
    let config = setup(dir);
    llmtool()
        .args(["train", &config, "--stop-after-steps", "2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("training paused"))
        .stdout(predicate::str::contains("resume with"));
    (config, dir.join("run"))
}

#[test]
fn trains_writes_a_loadable_model_and_guards_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    // Off a terminal (the test's pipe) each logged step is a plain line.
    llmtool()
        .args(["train", &config])
        .assert()
        .success()
        .stdout(predicate::str::contains("training finished"))
        .stdout(predicate::str::contains("steps        4 / 4"))
        .stderr(
            predicate::str::is_match(
                r"step +1/4: loss \d+\.\d{4}, lr [0-9.e-]+, \d+ tok/s, ETA \d+s",
            )
            .unwrap(),
        )
        .stderr(predicate::str::contains("step      4/4: loss"));
    let run = dir.path().join("run");
    for f in [
        "config.yaml",
        "metrics.jsonl",
        "loss.svg",
        "training_state.safetensors",
        "model/model.safetensors",
        "model/tokenizer_config.json",
        "model/special_tokens_map.json",
        "model/generation_config.json",
        "best/config.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let loaded = llmtool::model::load(
        &run.join("model"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(loaded.model.config.num_hidden_layers, 2);
    assert_eq!(loaded.model.config.torch_dtype.as_deref(), Some("float32"));
    let tokenizer_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("model/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        tokenizer_config["tokenizer_class"],
        "PreTrainedTokenizerFast"
    );
    assert_eq!(tokenizer_config["eos_token"], "<|endoftext|>");
    let before = std::fs::read(run.join("training_state.safetensors")).unwrap();
    llmtool()
        .args(["train", &config])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("already holds a run"))
        .stderr(predicate::str::contains("--resume"));
    assert_eq!(
        before,
        std::fs::read(run.join("training_state.safetensors")).unwrap(),
        "refused run wrote nothing"
    );
}

#[test]
fn paused_run_resumes_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let (config, run) = paused_run(dir.path());
    llmtool()
        .args(["train", "--resume", run.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains("steps        4 / 4"));
    // A config that changes the model cannot resume this run.
    assert_fails_naming(
        &[
            "train",
            &config,
            "--resume",
            run.to_str().unwrap(),
            "--set",
            "model.hidden_size=64",
        ],
        "model.*",
    );
    // Nothing to resume.
    assert_fails_naming(
        &[
            "train",
            "--resume",
            dir.path().join("nowhere").to_str().unwrap(),
        ],
        "does not hold a run to resume",
    );
}

#[test]
fn resume_keeps_the_runs_dataset_when_the_corpus_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (_, run) = paused_run(dir.path());
    let tokenizer = || std::fs::read(run.join("dataset/tokenizer.json")).unwrap();
    let (before, manifest) = (
        tokenizer(),
        std::fs::read(run.join("dataset/manifest.json")),
    );
    std::fs::write(
        dir.path().join("notes/added.md"),
        "# A new note\n\nZebras quietly juxtapose vexing quartz glyphs.\n",
    )
    .unwrap();
    llmtool()
        .args(["train", "--resume", run.to_str().unwrap()])
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "the corpus changed since this run started",
        ))
        .stderr(predicate::str::contains("added.md"))
        .stdout(predicate::str::contains("steps        4 / 4"));
    assert_eq!(tokenizer(), before, "the run's tokenizer was retrained");
    assert_eq!(
        std::fs::read(run.join("dataset/manifest.json")).unwrap(),
        manifest.unwrap()
    );
}

#[test]
fn resume_refuses_data_that_changed_under_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let shared = dir.path().join("shared-dataset");
    let set_dataset = format!("data.dataset_dir={}", shared.display());
    llmtool()
        .args([
            "train",
            &config,
            "--set",
            &set_dataset,
            "--stop-after-steps",
            "2",
        ])
        .assert()
        .success();
    std::fs::write(
        dir.path().join("notes/added.md"),
        "# Another note\n\nMore words.\n",
    )
    .unwrap();
    // Someone rebuilds the shared dataset from the changed corpus.
    llmtool()
        .args(["data", "build", &config, "--set", &set_dataset])
        .assert()
        .success();
    let run = dir.path().join("run");
    let state = std::fs::read(run.join("training_state.safetensors")).unwrap();
    llmtool()
        .args(["train", "--resume", run.to_str().unwrap()])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "data.fingerprint: the training data differs",
        ))
        .stderr(predicate::str::contains("--force"));
    assert_eq!(
        std::fs::read(run.join("training_state.safetensors")).unwrap(),
        state
    );
}

#[test]
fn vocab_size_auto_sizes_the_embedding_to_the_trained_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    llmtool()
        .args(["train", &config, "--set", "model.vocab_size=auto"])
        .assert()
        .success();
    let run = dir.path().join("run");
    let read = |p: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(run.join(p)).unwrap()).unwrap()
    };
    let tokens = read("dataset/manifest.json")["tokenizer"]["vocab_size"]
        .as_u64()
        .unwrap();
    let rows = read("model/config.json")["vocab_size"].as_u64().unwrap();
    assert!(
        tokens < 16384,
        "a small corpus gives a small tokenizer: {tokens}"
    );
    assert_eq!(rows, tokens.next_multiple_of(64), "{tokens} tokens");
}

/// Starts `train config --set training.max_steps=100000 ...` and waits until it logged two
/// steps (so it holds the lock and has trained).
#[cfg(unix)]
fn long_run(dir: &Path, config: &str, extra: &[&str]) -> std::process::Child {
    let mut args = vec!["train", config, "--set", "training.max_steps=100000"];
    args.extend(extra);
    common::start_logging_run(dir, &args)
}

#[cfg(unix)]
#[test]
fn a_second_writer_is_refused_naming_the_first_ones_pid() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let mut first = long_run(
        dir.path(),
        &config,
        &["--set", "training.save_every=100000"],
    );
    let run = dir.path().join("run");
    let config_before = std::fs::read(run.join("config.yaml")).unwrap();
    for args in [
        vec!["train", config.as_str(), "--set", "training.lr=0.1"],
        vec!["train", "--resume", run.to_str().unwrap()],
        vec!["train", config.as_str(), "--force"],
    ] {
        llmtool()
            .args(&args)
            .assert()
            .code(1)
            .stderr(predicate::str::contains(format!(
                "is in use by process {}",
                first.id()
            )));
    }
    assert_eq!(
        std::fs::read(run.join("config.yaml")).unwrap(),
        config_before
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // The lock dies with its holder, however it ended: the killed run (no checkpoint yet)
    // resumes from step 0 with its saved config.
    llmtool()
        .args([
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--stop-after-steps",
            "1",
        ])
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "has no checkpoint yet: starting the run from step 0",
        ))
        .stdout(predicate::str::contains("training paused"));
}

#[test]
fn a_failed_force_run_leaves_the_old_run_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    llmtool().args(["train", &config]).assert().success();
    let run = dir.path().join("run");
    let snapshot = |run: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = [
            "config.yaml",
            "training_state.safetensors",
            "model/model.safetensors",
            "metrics.jsonl",
        ]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(run.join(f)).unwrap()))
        .collect();
        files.sort();
        files
    };
    let before = snapshot(&run);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    llmtool()
        .args(["train", &config, "--force", "--set"])
        .arg(format!("data.roots=[{}]", empty.display()))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no documents"));
    assert_eq!(snapshot(&run), before, "the old run is back as it was");
    assert!(!run.join(".replaced-run").exists());
    // And it can still be resumed (it is finished: nothing left to do).
    llmtool()
        .args(["train", "--resume", run.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains("steps        4 / 4"));
}

#[test]
fn corrupt_state_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, run) = paused_run(dir.path());
    std::fs::write(run.join("training_state.safetensors"), b"garbage").unwrap();
    assert_fails_naming(
        &["train", "--resume", run.to_str().unwrap()],
        "training_state.safetensors: not a valid safetensors file",
    );
}

#[test]
fn estimate_splits_memory() {
    // An empty output directory: the preset's own (runs/small) holds a built dataset once the
    // README's first command has run, and its tokenizer would size the embedding.
    let dir = tempfile::tempdir().unwrap();
    let output = format!("output.dir={}", dir.path().display());
    llmtool()
        .args(["estimate", "configs/small.yaml", "--set", &output])
        .assert()
        .success()
        .stdout(predicate::str::contains("parameters"))
        .stdout(predicate::str::contains("AdamW moments"))
        .stdout(predicate::str::contains("peak, checkpointed"))
        .stdout(predicate::str::contains("weight copies").not());
    // In bf16 AdamW keeps a bf16 copy of the small preset's 46.94M weights.
    llmtool()
        .args([
            "estimate",
            "configs/small.yaml",
            "--set",
            "training.dtype=bf16",
            "--set",
            &output,
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "weight copies (bf16)           90 MiB",
        ));
}

#[test]
fn non_finite_loss_stops_with_the_step_or_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let blow_up = [
        "--set",
        "training.lr=1e30",
        "--set",
        "training.grad_clip=0",
        "--set",
        "training.warmup_steps=0",
    ];
    llmtool()
        .args(["train", &config])
        .args(blow_up)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("non-finite"))
        .stderr(predicate::str::contains("at step"));
    llmtool()
        .args(["train", &config, "--force", "--set", "training.on_nan=skip"])
        .args(blow_up)
        .assert()
        .success()
        .stderr(predicate::str::contains("batch skipped"));
}

/// Starts a long run, waits for its first steps, sends `signal` and checks that the run saved
/// a resumable checkpoint and exited with `code`, as Ctrl-C, `timeout`, Slurm and a closed
/// terminal expect.
#[cfg(unix)]
fn signal_saves_a_resumable_checkpoint(signal: &str, code: i32) {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let child = common::start_logging_run(
        dir.path(),
        &[
            "train",
            &config,
            "--set",
            "training.max_steps=100000",
            "--set",
            "training.save_every=100000",
        ],
    );
    std::process::Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{signal}: {stderr}");
    assert!(
        stderr.contains("resume with `llmtool train --resume"),
        "{stderr}"
    );
    let run = dir.path().join("run");
    assert!(run.join("training_state.safetensors").is_file());
    llmtool()
        .args([
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--stop-after-steps",
            "1",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("training paused"));
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_resumable_checkpoint_and_exits_130() {
    signal_saves_a_resumable_checkpoint("INT", 130);
}

#[cfg(unix)]
#[test]
fn sigterm_saves_a_resumable_checkpoint_and_exits_143() {
    signal_saves_a_resumable_checkpoint("TERM", 143);
}

#[cfg(unix)]
#[test]
fn sighup_saves_a_resumable_checkpoint_and_exits_129() {
    signal_saves_a_resumable_checkpoint("HUP", 129);
}
