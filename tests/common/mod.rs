//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Copies the files of the fixture folder `name` into `to`, creating it: a model directory a
/// test may edit.
pub fn copy_fixture(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Runs `llmtool args` and asserts that it exits with status 1, `message` on its stderr.
pub fn assert_fails_naming(args: &[&str], message: &str) {
    llmtool()
        .args(args)
        .assert()
        .code(1)
        .stderr(predicates::str::contains(message));
}

/// Every tensor of a fixture safetensors file.
pub fn tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).expect("fixture tensors")
}

/// A fixture JSON file.
pub fn json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name)).expect("fixture json");
    serde_json::from_str(&text).expect("fixture json parses")
}

/// `max |a - b| / max |b|`: error relative to the reference's scale.
pub fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap();
    let b = b
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max(0).unwrap();
    let scale = b.abs().unwrap().max(0).unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
}

/// `tests/fixtures/...` ids as a u32 tensor.
pub fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(candle_core::DType::U32).unwrap()
}

/// The llmtool binary, run from the repository root.
pub fn llmtool() -> assert_cmd::Command {
    llmtool_in(Path::new(env!("CARGO_MANIFEST_DIR")))
}

/// The llmtool binary, run from `dir`.
pub fn llmtool_in(dir: &Path) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("llmtool").expect("binary built by cargo");
    cmd.current_dir(dir);
    cmd
}

/// The stdout of `cmd`, which must succeed (its stderr is the failure message).
pub fn stdout_of(cmd: &mut assert_cmd::Command) -> String {
    let out = cmd.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The error of `llmtool eval` on the model in `dir`: exit 1 and one line on stderr.
pub fn eval_error(dir: &Path) -> String {
    let out = llmtool()
        .args(["eval", "--device", "cpu", "--model"])
        .arg(dir)
        .args(["--data", "tests/fixtures/tiny-llama/eval.txt"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr.trim_end().to_string()
}

const TINY_CORPUS: &str =
    "# Notes\n\nThe quick brown fox jumps over the lazy dog. A small model learns \
to write markdown by reading markdown.\n\n## Lists\n\n- one item\n- two items\n- three items\n";

/// Writes a small corpus and a tiny config training into `DIR/run` into `dir`; returns the
/// config's path.
pub fn tiny_training_run(dir: &Path) -> String {
    let corpus = dir.join("notes");
    std::fs::create_dir_all(&corpus).unwrap();
    for i in 0..12 {
        let text = format!(
            "{TINY_CORPUS}\nNote number {i} says {}.\n",
            "hello world ".repeat(i + 1)
        );
        std::fs::write(corpus.join(format!("note{i}.md")), text).unwrap();
    }
    let config = format!(
        "model:\n  hidden_size: 32\n  num_hidden_layers: 2\n  num_attention_heads: 4\n  num_key_value_heads: 2\n  intermediate_size: 64\n  vocab_size: 300\n  max_position_embeddings: 64\n\
data:\n  roots: [{}]\n  dedup: none\n  val_fraction: 0.3\n\
training:\n  seq_len: 16\n  batch_size: 2\n  max_steps: 4\n  warmup_steps: 1\n  eval_every: 2\n  eval_batches: 2\n  save_every: 2\n  log_every: 1\n\
output:\n  dir: {}\n",
        corpus.display(),
        dir.join("run").display()
    );
    let path = dir.join("tiny.yaml");
    std::fs::write(&path, config).unwrap();
    path.to_string_lossy().into_owned()
}

/// The training losses and the validation losses logged in `run/metrics.jsonl`, in order.
pub fn loss_curves(run: &Path) -> (Vec<f64>, Vec<f64>) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics.jsonl");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a metrics record"))
        .collect();
    let column = |key: &str| records.iter().filter_map(|r| r[key].as_f64()).collect();
    (column("loss"), column("val_loss"))
}

/// Asserts two loss curves agree to f32 rounding (sums added in another order).
pub fn assert_curves_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "{what}: {a:?} vs {b:?}");
    }
}

/// Runs `llmtool ARGS` as one process with twice the accumulation into `dir/alone`, and asserts
/// that the run in `dir/run`, trained by two ranks from the same ARGS, logged the same training
/// and validation losses (to f32 rounding).
pub fn assert_two_ranks_train_as_one_process(dir: &Path, args: &[&str]) {
    let alone = dir.join("alone");
    llmtool()
        .args(args)
        .args(["--set", "training.grad_accum=2"])
        .args(["--set", &format!("output.dir={}", alone.display())])
        .assert()
        .success();
    let (two, one) = (loss_curves(&dir.join("run")), loss_curves(&alone));
    assert_curves_close(&two.0, &one.0, "training loss");
    assert_curves_close(&two.1, &one.1, "validation loss");
}

/// Starts `llmtool ARGS` (stdout discarded, stderr piped) and waits until the run in
/// `dir/run` logged two steps, so it holds its lock and has trained.
#[cfg(unix)]
pub fn start_logging_run(dir: &Path, args: &[&str]) -> std::process::Child {
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("llmtool"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("llmtool starts");
    let metrics = dir.join("run/metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&metrics).map_or(true, |t| t.lines().count() < 2) {
        assert!(
            std::time::Instant::now() < deadline,
            "training did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child
}

/// Mean next-token NLL of `model` over every position of `input_ids` `[b, t]`, as transformers
/// computes it with `labels=input_ids`.
pub fn hf_mean_nll(model: &llmtool::model::Llama, input_ids: &Tensor) -> Tensor {
    let (b, t) = input_ids.dims2().unwrap();
    let logits = model
        .forward(&input_ids.narrow(1, 0, t - 1).unwrap(), None)
        .unwrap()
        .reshape((b * (t - 1), ()))
        .unwrap();
    let targets = input_ids
        .narrow(1, 1, t - 1)
        .unwrap()
        .flatten_all()
        .unwrap();
    let weights = Tensor::ones(b * (t - 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    llmtool::ops::masked_mean_nll(&logits, &targets, &weights).unwrap()
}
