//! Bad model inputs given to the real binary (issue 18, items 7, 8 and 9): `config.json` values
//! that used to panic (exit 101) or be accepted, weights for more layers than the config has,
//! NaN weights, and a context too long to allocate. Each is exit 1 with one line naming the
//! file and the key or tensor, and nothing written.

mod common;

use common::{copy_fixture, fixture, json, llmtool};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A copy of tiny-llama in `parent/model` with `edit` applied to its config.json.
fn model_dir(parent: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> PathBuf {
    let dir = parent.join("model");
    copy_fixture("tiny-llama", &dir);
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    dir
}

fn set(key: &str, value: Value) -> impl FnOnce(&mut serde_json::Map<String, Value>) + '_ {
    move |c| {
        c.insert(key.into(), value);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs llmtool with `args`; asserts exit 1 and one line on stderr, and returns that line.
fn one_error_line(args: &[&str]) -> String {
    let out = llmtool().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    stderr.trim_end().to_string()
}

/// Asserts `line` is an error line that ends with `want` (commands may name what they were
/// loading first).
fn assert_ends_with(line: &str, want: &str) {
    assert!(
        line.starts_with("error: ") && line.ends_with(want),
        "{line:?} vs {want:?}"
    );
}

/// `eval` of the fixture's text with the model in `dir`.
fn eval_error(dir: &Path) -> String {
    let text = fixture("tiny-llama/eval.txt");
    one_error_line(&[
        "eval",
        "--model",
        s(dir),
        "--data",
        s(&text),
        "--device",
        "cpu",
    ])
}

/// A finetune config of 2 steps on a few notes with the base model `base`.
fn finetune_config(parent: &Path, base: &Path) -> PathBuf {
    let notes = parent.join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    for i in 0..4 {
        let text = format!("# Note {i}\n\nThe quick brown fox jumps over the lazy dog.\n");
        std::fs::write(notes.join(format!("n{i}.md")), text).unwrap();
    }
    let config = format!(
        "model:\n  pretrained: {}\ndata:\n  roots: [{}]\n  dedup: none\n  val_fraction: 0.3\n\
         training:\n  seq_len: 16\n  batch_size: 2\n  max_steps: 2\n  warmup_steps: 1\n\
         output:\n  dir: {}\n",
        base.display(),
        notes.display(),
        parent.join("run").display()
    );
    let path = parent.join("ft.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
fn zero_heads_or_positions_are_one_line_naming_the_file_and_the_key_in_every_command() {
    for key in [
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = model_dir(tmp.path(), set(key, Value::from(0)));
        let want = format!(
            "{}: {key}: must be at least 1, got 0",
            dir.join("config.json").display()
        );
        assert_ends_with(&eval_error(&dir), &want);
        let generate = [
            "generate",
            "--model",
            s(&dir),
            "--prompt",
            "The",
            "--device",
            "cpu",
        ];
        assert_ends_with(&one_error_line(&generate), &want);
        let (adapter, out) = (fixture("tiny-llama-lora"), tmp.path().join("merged"));
        let merge = [
            "merge",
            "--model",
            s(&dir),
            "--adapter",
            s(&adapter),
            "--out",
            s(&out),
        ];
        assert_ends_with(&one_error_line(&merge), &want);
        assert!(!out.exists(), "merge wrote {}", out.display());
        let config = finetune_config(tmp.path(), &dir);
        for lora in [true, false] {
            let mut args = vec!["finetune", s(&config)];
            args.extend(lora.then_some("--lora"));
            assert_ends_with(&one_error_line(&args), &want);
            let run = tmp.path().join("run");
            assert!(!run.exists(), "finetune wrote {}", run.display());
        }
    }
}

#[test]
fn a_vocabulary_of_three_tokens_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path(), set("vocab_size", Value::from(3)));
    assert_ends_with(
        &eval_error(&dir),
        &format!(
            "{}: vocab_size: must be at least 16, got 3",
            dir.join("config.json").display()
        ),
    );
}

#[test]
fn fewer_layers_than_the_weights_hold_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path(), set("num_hidden_layers", Value::from(1)));
    assert_ends_with(
        &eval_error(&dir),
        &format!(
            "{}: tensor model.layers.1.input_layernorm.weight is not part of the model \
             config.json describes (num_hidden_layers is 1, the weights have a layer 1)",
            dir.join("model.safetensors").display()
        ),
    );
}

/// Puts one NaN into tensor `name` of the safetensors `file`.
fn poison(file: &Path, name: &str) {
    let cpu = candle_core::Device::Cpu;
    let mut tensors: Vec<_> = candle_core::safetensors::load(file, &cpu)
        .unwrap()
        .into_iter()
        .collect();
    let (_, t) = tensors.iter_mut().find(|(n, _)| n == name).unwrap();
    let mut values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[3] = f32::NAN;
    *t = candle_core::Tensor::from_vec(values, t.dims(), &cpu).unwrap();
    llmtool::model::weights::save_safetensors(&tensors, file).unwrap();
}

#[test]
fn nan_weights_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path(), |_| {});
    let file = dir.join("model.safetensors");
    let name = "model.layers.1.self_attn.o_proj.weight";
    poison(&file, name);
    assert_ends_with(
        &eval_error(&dir),
        &format!(
            "{}: tensor {name} holds 1 NaN or infinite values",
            file.display()
        ),
    );
}

#[test]
fn nan_adapter_weights_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("tiny-llama-lora").join(file), adapter.join(file)).unwrap();
    }
    let file = adapter.join("adapter_model.safetensors");
    let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    poison(&file, name);
    let text = fixture("tiny-llama/eval.txt");
    let line = one_error_line(&[
        "eval",
        "--model",
        s(&fixture("tiny-llama")),
        "--adapter",
        s(&adapter),
        "--data",
        s(&text),
    ]);
    assert!(
        line.contains(&format!("tensor {name} holds 1 NaN or infinite values")),
        "{line}"
    );
}

#[test]
fn a_context_past_32_bits_is_refused_with_the_number_and_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(
        tmp.path(),
        set("max_position_embeddings", 1_000_000_000_000u64.into()),
    );
    let line = eval_error(&dir);
    assert!(
        line.ends_with(
            "config.json: max_position_embeddings: 1000000000000 is more than llmtool can \
             address (at most 4294967295: positions are 32-bit)"
        ),
        "{line}"
    );
}

/// 2³¹ positions: all RoPE rows would be 2³¹ × 8 × 2 floats (128 GiB, and the f64 angles
/// twice that); under a 4 GiB address-space limit eval runs only if they are made as used.
#[cfg(target_os = "linux")]
#[test]
fn a_long_context_is_not_allocated_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(
        tmp.path(),
        set("max_position_embeddings", (1u64 << 31).into()),
    );
    let text = fixture("tiny-llama/eval.txt");
    let bin = assert_cmd::cargo::cargo_bin("llmtool");
    let out = std::process::Command::new("sh")
        .args(["-c", "ulimit -v 4194304 && exec \"$@\"", "sh"])
        .arg(bin)
        .args(["eval", "--model", s(&dir), "--data", s(&text), "--json"])
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = &json("tiny-llama/expected.json")["eval"]["single_window"]["nll_mean"];
    let got = rows[0]["metrics"]["nll_mean"].as_f64().unwrap();
    assert!(
        (got / want.as_f64().unwrap() - 1.0).abs() < 1e-5,
        "{got} vs {want}"
    );
}
