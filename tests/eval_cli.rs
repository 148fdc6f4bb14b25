//! `llmtool eval` run as a binary on the committed fixtures.

mod common;

use common::{fixture, json, llmtool};
use std::path::Path;

fn eval_json(args: &[&str]) -> serde_json::Value {
    let out = llmtool()
        .arg("eval")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_close(got: &serde_json::Value, want: &serde_json::Value) {
    let (got, want) = (got.as_f64().unwrap(), want.as_f64().unwrap());
    assert!(((got - want) / want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn base_and_adapter_rows_match_transformers_and_peft() {
    let (model, adapter, text) = (
        fixture("tiny-llama"),
        fixture("tiny-llama-lora"),
        fixture("tiny-llama/eval.txt"),
    );
    let rows = eval_json(&[
        "--model",
        path(&model),
        "--adapter",
        path(&adapter),
        "--data",
        path(&text),
        "--device",
        "cpu",
    ]);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let base = &json("tiny-llama/expected.json")["eval"]["single_window"];
    let lora = &json("tiny-llama-lora/expected.json")["eval"]["single_window"];
    assert!(rows[0]["adapter"].is_null());
    assert_close(&rows[0]["metrics"]["nll_mean"], &base["nll_mean"]);
    assert_close(&rows[1]["metrics"]["nll_mean"], &lora["nll_mean"]);
    assert_eq!(rows[1]["metrics"]["tokens"], 121);
    // The scored text is everything after the first token ("The").
    assert_eq!(rows[0]["metrics"]["bytes"], 396 - 3);
}

#[test]
fn sliding_window_from_flags_and_table_output() {
    let (model, text) = (fixture("tiny-llama"), fixture("tiny-llama/eval.txt"));
    let args = ["--model", path(&model), "--data", path(&text)];
    let rows = eval_json(&[&args[..], &["--context", "32", "--stride", "16"]].concat());
    let sliding = &json("tiny-llama/expected.json")["eval"]["sliding_window"];
    assert_close(&rows[0]["metrics"]["nll_mean"], &sliding["nll_mean"]);
    assert_eq!(rows[0]["metrics"]["tokens"], 121);
    let out = llmtool().arg("eval").args(args).output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("bits/byte") && table.contains("5.8949"),
        "{table}"
    );
}

#[test]
fn folders_give_per_file_rows() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("tiny-llama/eval.txt")).unwrap();
    std::fs::write(dir.path().join("a.txt"), &text).unwrap();
    std::fs::write(dir.path().join("b.md"), &text[..200]).unwrap();
    let model = fixture("tiny-llama");
    let rows = eval_json(&[
        "--model",
        path(&model),
        "--data",
        path(dir.path()),
        "--per-file",
        "--batch-size",
        "3",
    ]);
    let files = rows[0]["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    let sum: u64 = files
        .iter()
        .map(|f| f["metrics"]["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(rows[0]["metrics"]["tokens"].as_u64().unwrap(), sum);
}

fn one_error_line(args: &[&str]) -> String {
    let out = llmtool().arg("eval").args(args).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn bad_input_is_one_clear_line() {
    let (model, text) = (fixture("tiny-llama"), fixture("tiny-llama/eval.txt"));
    let (model, text) = (path(&model), path(&text));
    let err = one_error_line(&["--model", model, "--data", text, "--stride", "200"]);
    assert!(err.contains("stride 200"), "{err}");
    let err = one_error_line(&["--model", model, "--data", text, "--batch-size", "0"]);
    assert!(
        err.contains("'--batch-size <BATCH_SIZE>': must be a whole number >= 1, got `0`"),
        "{err}"
    );
    let err = one_error_line(&["--model", model, "--dataset", "no/such/dataset"]);
    assert!(
        err.contains("cannot open the dataset no/such/dataset"),
        "{err}"
    );
    let err = one_error_line(&["--model", model, "--data", "no/such/file.md"]);
    assert!(err.contains("no/such/file.md"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.path().join(f)).unwrap();
    }
    let err = one_error_line(&["--model", path(dir.path()), "--data", text]);
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn markdown_is_cleaned_like_the_data_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let plain = "The river and the hill are near the town, and the people walk home.";
    let md = "The river and the [hill](https://example.org/hill) are near the town, and the people walk home.\n";
    std::fs::write(dir.path().join("a.txt"), plain).unwrap();
    std::fs::write(dir.path().join("b.md"), md).unwrap();
    let model = fixture("tiny-llama");
    let rows = eval_json(&[
        "--model",
        path(&model),
        "--data",
        path(dir.path()),
        "--per-file",
    ]);
    let files = rows[0]["files"].as_array().unwrap();
    assert_eq!(files[0]["metrics"], files[1]["metrics"]);
}

#[test]
fn a_built_dataset_split_is_scored() {
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    let text = std::fs::read_to_string(fixture("tiny-llama/eval.txt")).unwrap();
    for (i, cut) in [400, 300, 200, 250].iter().enumerate() {
        std::fs::write(
            notes.join(format!("n{i}.md")),
            &text[..(*cut).min(text.len())],
        )
        .unwrap();
    }
    let config = format!(
        "model:\n  vocab_size: 320\ndata:\n  roots: [{}]\n  tokenizer: {}\n  dataset_dir: {}\n  dedup: none\n  val_fraction: 0.5\n",
        path(&notes),
        path(&fixture("tokenizer.json")),
        path(&dir.path().join("ds")),
    );
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config).unwrap();
    llmtool()
        .args(["data", "build", path(&config_path)])
        .assert()
        .success();
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("ds/manifest.json")).unwrap(),
    )
    .unwrap();
    let model = fixture("tiny-llama");
    let ds = dir.path().join("ds");
    let info = &manifest["train"];
    let rows = eval_json(&[
        "--model",
        path(&model),
        "--dataset",
        path(&ds),
        "--split",
        "train",
    ]);
    // Every token but the first of each document is scored (each ends with its EOS).
    let want = info["tokens"].as_u64().unwrap() - info["documents"].as_u64().unwrap();
    assert!(want > 0);
    assert_eq!(rows[0]["metrics"]["tokens"].as_u64().unwrap(), want);
    assert!(rows[0]["metrics"]["bits_per_byte"].as_f64().unwrap() > 0.0);
}
