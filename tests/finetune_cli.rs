//! `llmtool finetune` on the committed tiny HF model: LoRA writes a PEFT adapter whose weights
//! moved (also with gradient checkpointing), full fine-tuning writes an HF model.

mod common;

use common::{fixture, llmtool};
use predicates::prelude::*;
use std::path::Path;

fn setup(dir: &Path, extra: &str) -> String {
    let notes = dir.join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    for i in 0..10 {
        let text = format!(
            "# Note {i}\n\nThe quick brown fox jumps over the lazy dog, again and again, {} times.\n",
            i + 1
        );
        std::fs::write(notes.join(format!("n{i}.md")), text).unwrap();
    }
    let config = format!(
        "model:\n  pretrained: {}\ndata:\n  roots: [{}]\n  dedup: none\n  val_fraction: 0.3\n\
training:\n  seq_len: 16\n  batch_size: 2\n  max_steps: 3\n  warmup_steps: 1\n  lr: 0.01\n  eval_every: 3\n  save_every: 3\n{extra}\
lora:\n  r: 4\n  alpha: 8\n  dropout: 0.1\n  target_modules: [q, v]\n\
output:\n  dir: {}\n",
        fixture("tiny-llama").display(),
        notes.display(),
        dir.join("run").display()
    );
    let path = dir.join("ft.yaml");
    std::fs::write(&path, config).unwrap();
    path.to_string_lossy().into_owned()
}

fn lora_b_is_nonzero(adapter: &Path) -> bool {
    let tensors = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let b = tensors
        .iter()
        .find(|(k, _)| k.contains("q_proj.lora_B"))
        .map(|(_, t)| t.clone())
        .unwrap();
    b.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        > 0.0
}

#[test]
fn lora_writes_a_peft_adapter_that_learned() {
    for checkpointing in ["false", "true"] {
        let dir = tempfile::tempdir().unwrap();
        let config = setup(dir.path(), &format!("  grad_checkpoint: {checkpointing}\n"));
        llmtool()
            .args(["finetune", &config, "--lora"])
            .assert()
            .success()
            .stdout(predicate::str::contains("training finished"));
        let adapter = dir.path().join("run/adapter");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["r"], 4);
        assert!(cfg["base_model_name_or_path"]
            .as_str()
            .unwrap()
            .ends_with("tiny-llama"));
        // B starts at zero: a non-zero B means the adapter was trained (checkpointing too).
        assert!(
            lora_b_is_nonzero(&adapter),
            "grad_checkpoint {checkpointing}: adapter did not change"
        );
    }
}

#[test]
fn full_finetune_writes_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "");
    llmtool().args(["finetune", &config]).assert().success();
    let loaded = llmtool::model::load(
        &dir.path().join("run/model"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(loaded.model.config.vocab_size, 320);
}

#[test]
fn finetune_needs_a_pretrained_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "");
    llmtool()
        .args([
            "finetune",
            &config,
            "--lora",
            "--set",
            "model.pretrained=null",
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("model.pretrained"));
}
