//! `llmtool bench` run as a binary: `--lora-base` rows and its validation.

mod common;

use common::llmtool;

#[test]
fn each_lora_base_is_its_own_row() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rows.jsonl");
    let run = llmtool()
        .args([
            "bench", "--device", "cpu", "--sizes", "tiny", "--tasks", "lora",
        ])
        .args(["--lora-base", "frozen,plain", "--batch", "1", "--seq", "4"])
        .args(["--steps", "1", "--warmup", "0", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
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
    assert!(stderr.contains("unknown lora base \"dense\""), "{stderr}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(!stdout.contains("\"task\""), "a row ran: {stdout}");
}
