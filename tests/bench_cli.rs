//! `llmtool bench` run as a binary: `--lora-base` and `--lora-dropout` rows and their
//! validation, `--ops` checks, the generate rows, greedy and sampled.

mod common;

use common::llmtool;
use predicates::prelude::*;
use std::process::Output;

/// Runs `llmtool bench ARGS --out FILE` and returns the process output and the JSON rows.
fn bench_rows(args: &[&str]) -> (Output, Vec<serde_json::Value>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rows.jsonl");
    let run = llmtool()
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let rows = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (run, rows)
}

/// A tiny preset's lora rows on the CPU; each test adds its own flags.
const TINY_LORA: [&str; 6] = ["--device", "cpu", "--sizes", "tiny", "--tasks", "lora"];

#[test]
fn each_lora_base_is_its_own_row() {
    let flags = ["--lora-base", "frozen,plain", "--batch", "1", "--seq", "4"];
    let (run, rows) =
        bench_rows(&[&TINY_LORA[..], &flags, &["--steps", "1", "--warmup", "0"]].concat());
    let bases: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["lora_base"].as_str())
        .collect();
    assert_eq!(bases, ["frozen", "plain"], "{rows:?}");
    assert!(rows
        .iter()
        .all(|r| r["task"] == "lora" && r.get("error").is_none()));
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(table.contains("lora/plain"), "{table}");
}

#[test]
fn a_lora_row_with_dropout_draws_masks_and_names_its_dropout() {
    // Two steps: the first update makes B nonzero, so the second step's loss sees the masks.
    let row = |dropout: &str| {
        let flags = [
            "--batch", "1", "--seq", "8", "--steps", "2", "--warmup", "0",
        ];
        bench_rows(&[&TINY_LORA[..], &flags, &["--lora-dropout", dropout]].concat())
            .1
            .remove(0)
    };
    let (plain, dropped) = (row("0"), row("0.5"));
    assert!(plain.get("lora_dropout").is_none(), "{plain}");
    assert_eq!(dropped["lora_dropout"], 0.5, "{dropped}");
    assert_ne!(plain["loss"], dropped["loss"], "no mask was drawn");
    let run = llmtool()
        .arg("bench")
        .args(TINY_LORA)
        .args(["--lora-dropout", "1"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("--lora-dropout 1"), "{stderr}");
}

#[test]
fn an_unknown_lora_base_fails_before_any_row() {
    let run = llmtool()
        .args([
            "bench", "--device", "cpu", "--sizes", "tiny", "--tasks", "eval",
        ])
        .args(["--lora-base", "frozen,dense", "--steps", "1"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("invalid value 'dense' for '--lora-base"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(!stdout.contains("\"task\""), "a row ran: {stdout}");
}

#[test]
fn op_checks_cover_every_op_and_pass_on_the_cpu() {
    let (_, rows) = bench_rows(&[
        "--ops", "--device", "cpu", "--sizes", "tiny", "--batch", "1", "--seq", "8", "--steps", "1",
    ]);
    let mut ops: Vec<&str> = rows.iter().filter_map(|r| r["op"].as_str()).collect();
    ops.sort_unstable();
    ops.dedup();
    let expected = [
        "adamw",
        "add",
        "add_rms_norm",
        "add_rms_norm_master",
        "add_rms_norm_offset",
        "add_rms_norm_train",
        "add_rms_norm_train_offset",
        "argmax",
        "cached_attention",
        "cached_attention_at",
        "cached_attention_at_partial",
        "cached_attention_partial",
        "cast",
        "causal_attention",
        "causal_attention_segments",
        "causal_attention_segments_window",
        "causal_attention_softcap_window",
        "causal_attention_softcap_window_chunk",
        "causal_attention_softcap_window_d96",
        "decode_attention",
        "decode_attention_at",
        "decode_window",
        "dropout",
        "embedding",
        "embedding_from_host",
        "embedding_tied",
        "flash_attention",
        "geglu",
        "geglu_master_projection",
        "geglu_packed",
        "geglu_projection",
        "greedy_step",
        "head_mean_nll",
        "linear_residual",
        "linear_rows",
        "lora_linear",
        "lora_linear_dropout",
        "masked_lora_bottleneck",
        "masked_lora_factor_grad",
        "masked_lora_shares",
        "master_linear",
        "nf4_linear",
        "nf4_linear_rows",
        "packed_self_attention",
        "qk_norm",
        "residual_rms_norm",
        "residual_rms_norm_frozen",
        "rms_norm",
        "rms_norm_geglu_projection",
        "rms_norm_head_greedy_step",
        "rms_norm_linear",
        "rms_norm_linear_offset",
        "rms_norm_master",
        "rms_norm_offset",
        "rms_norm_swiglu_projection",
        "rope",
        "rope_partial",
        "self_attention",
        "self_attention_segments",
        "self_attention_segments_window",
        "self_attention_softcap_window",
        "stacked_lora_linear",
        "stacked_lora_linear_dropout",
        "swap_middle",
        "swiglu",
        "swiglu_master_projection",
        "swiglu_packed",
        "swiglu_projection",
        "token_nll",
        "token_nll_with_grad",
        "write_kv",
        "write_kv_at",
        "write_kv_at_partial",
        "write_kv_partial",
    ];
    assert_eq!(ops, expected);
    for row in &rows {
        assert_eq!(row["ok"], true, "{row}");
        let error = row["max_rel_error"].as_f64().unwrap();
        assert!(error < row["tolerance"].as_f64().unwrap(), "{row}");
    }
}

/// The tiny preset's generate row of 3 tokens on the CPU with `flags` added.
fn tiny_generate_row(flags: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--device",
        "cpu",
        "--sizes",
        "tiny",
        "--tasks",
        "generate",
        "--gen-tokens",
        "3",
        "--steps",
        "1",
    ];
    args.extend(flags);
    let (_, mut rows) = bench_rows(&args);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = rows.remove(0);
    assert_eq!(row["new_tokens"], 3, "{row}");
    assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0, "{row}");
    row
}

#[test]
fn a_generate_row_says_how_its_steps_ran() {
    let row = tiny_generate_row(&[]);
    // No CUDA graph on the CPU: the row says so, and has no replay comparison.
    assert_eq!(row["steps"], "the device has no CUDA graphs", "{row}");
    assert!(row.get("same_tokens_as_op_by_op").is_none(), "{row}");
}

#[test]
fn a_sampled_generate_row_names_its_sampling_and_bad_sampling_is_refused() {
    let row = tiny_generate_row(&["--temperature", "0.8", "--top-p", "0.95"]);
    let sampling = (row["temperature"].as_f64(), row["top_p"].as_f64());
    assert_eq!(sampling, (Some(0.8), Some(0.95)), "{row}");
    assert!(row.get("same_tokens_as_op_by_op").is_none(), "{row}");
    assert!(row.get("samples").is_none(), "a single sample's row: {row}");
    // A batch of samples names its count.
    let batch = tiny_generate_row(&["--temperature", "0.8", "--samples", "3"]);
    assert_eq!(batch["samples"], 3, "{batch}");
    let refused = |flags: &[&str], message: &str| {
        let mut args = vec!["bench", "--device", "cpu", "--tasks", "generate"];
        args.extend(flags);
        let assert = llmtool().args(args).assert().failure();
        assert.stderr(predicate::str::contains(message.to_owned()));
    };
    refused(&["--top-p", "0.9"], "--temperature");
    refused(&["--temperature", "0.8", "--top-p", "1.5"], "top-p");
    refused(&["--samples", "2"], "--temperature");
    refused(&["--temperature", "0.8", "--samples", "0"], "--samples");
}

#[test]
fn a_prefill_row_is_one_prompt_and_skips_checkpointed_modes() {
    let (_, rows) = bench_rows(&[
        "--device",
        "cpu",
        "--sizes",
        "tiny",
        "--tasks",
        "prefill",
        "--modes",
        "fp32,fp32+ckpt",
        "--seq",
        "32",
        "--steps",
        "1",
    ]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(
        (&row["task"], &row["mode"]),
        (&"prefill".into(), &"fp32".into())
    );
    assert_eq!(row["prompt_tokens"], 32, "{row}");
    let step_s = row["step_ms"].as_f64().unwrap() / 1e3;
    let tokens_per_s = row["tokens_per_s"].as_f64().unwrap();
    assert!((tokens_per_s * step_s - 32.0).abs() < 1e-6, "{row}");
    assert!(row["model_tflops"].as_f64().unwrap() > 0.0, "{row}");
}

/// `--gpus 2` times the train and lora rows on two processes: one row each, written once (by
/// rank 0), counting both ranks' tokens. Inference rows are refused.
#[test]
fn two_ranks_time_the_training_rows_and_report_once() {
    let tiny = [
        "--device", "cpu", "--sizes", "tiny", "--batch", "1", "--seq", "4", "--steps", "1",
        "--warmup", "0", "--gpus", "2",
    ];
    let (run, rows) = bench_rows(&[&tiny[..], &["--tasks", "train,lora"]].concat());
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in &rows {
        assert_eq!(row["ranks"], 2, "{row}");
        assert!(row.get("error").is_none(), "{row}");
        let tokens = row["tokens_per_s"].as_f64().unwrap() * row["step_ms"].as_f64().unwrap();
        assert!(
            (tokens / 1e3 - 8.0).abs() < 1e-6,
            "2 ranks x 1 x 4 tokens a step: {row}"
        );
    }
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(stdout.matches("\"task\":\"train\"").count(), 1, "{stdout}");
    llmtool()
        .args(["bench"])
        .args(tiny)
        .args(["--tasks", "eval"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("--tasks train,lora"));
}
