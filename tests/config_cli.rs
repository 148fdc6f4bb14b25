//! `llmtool config show|validate` run as a user would: presets validate, every error class
//! is reported with its file, line and key, and `show` round-trips through `validate`.

mod common;

use assert_cmd::assert::Assert;
use common::{assert_fails_naming, llmtool};
use predicates::prelude::*;
use std::path::Path;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp config");
    path.to_string_lossy().into_owned()
}

/// `config validate` of `text` written as `name` in a fresh directory.
fn validate(name: &str, text: &str) -> Assert {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), name, text);
    llmtool().args(["config", "validate", &path]).assert()
}

/// `config validate` of `text` (as `c.yaml`) exits with 1 and names each of `messages`.
fn rejected(text: &str, messages: &[&str]) -> Assert {
    messages
        .iter()
        .fold(validate("c.yaml", text).code(1), |run, message| {
            run.stderr(predicate::str::contains(*message))
        })
}

#[test]
fn presets_validate() {
    for preset in ["tiny", "small", "base", "lora"] {
        llmtool()
            .args(["config", "validate", &format!("configs/{preset}.yaml")])
            .assert()
            .success()
            .stdout(predicate::str::contains("ok"));
    }
}

#[test]
fn unknown_key_names_line_and_suggests() {
    rejected(
        "model:\n  hidden_size: 64\ntrainig:\n  lr: 1\n",
        &[
            "c.yaml:3:1: trainig: unknown key",
            "did you mean `training`?",
        ],
    );
}

#[test]
fn nested_unknown_key_suggests_sibling() {
    rejected(
        "training:\n  learning_rate: 1\n  bach_size: 4\n",
        &[
            "c.yaml:3:3: training.bach_size",
            "did you mean `batch_size`?",
            "c.yaml:2:3: training.learning_rate",
        ],
    );
}

#[test]
fn type_and_range_errors_name_key_and_line_all_at_once() {
    rejected(
        "training:\n  lr: fast\n  batch_size: -2\n  beta2: 1.5\nmodel:\n  tie_word_embeddings: maybe\n",
        &[
            "c.yaml:2:3: training.lr: expected a positive number, got \"fast\"",
            "c.yaml:3:3: training.batch_size: expected a whole number >= 1, got -2",
            "c.yaml:4:3: training.beta2",
            "c.yaml:6:3: model.tie_word_embeddings",
        ],
    );
}

#[test]
fn cross_field_errors_all_reported() {
    rejected(
        "model:\n  hidden_size: 100\n  num_attention_heads: 8\n  num_key_value_heads: 3\n  max_position_embeddings: 64\ntraining:\n  seq_len: 128\n  max_steps: 10\n  warmup_steps: 10\ndata:\n  roots: [does/not/exist]\n",
        &[
            "c.yaml:2:3: model.hidden_size: 100 is not divisible by model.num_attention_heads (8)",
            "c.yaml:4:3: model.num_key_value_heads",
            "c.yaml:7:3: training.seq_len: 128 exceeds model.max_position_embeddings (64)",
            "c.yaml:9:3: training.warmup_steps: 10 must be below training.max_steps (10)",
            "c.yaml:11:11: data.roots.0: does/not/exist does not exist",
        ],
    );
}

/// A misspelt section and a type error do not hide the cross-field problems of other sections:
/// everything is reported in one run, not in rounds.
#[test]
fn unknown_keys_type_errors_and_cross_field_errors_in_one_report() {
    rejected(
        "modell:\n  hidden_size: 64\nmodel:\n  max_position_embeddings: 64\ntraining:\n  seq_len: 128\ndata:\n  val_fraction: lots\n  roots: [does/not/exist]\n",
        &[
            "c.yaml:1:1: modell: unknown",
            "c.yaml:6:3: training.seq_len: 128 exceeds model.max_position_embeddings (64)",
            "c.yaml:8:3: data.val_fraction",
        ],
    )
    // The data section's cross-field checks wait for its unreadable value.
    .stderr(predicate::str::contains("does/not/exist").not());
}

#[test]
fn a_home_relative_path_is_expanded_as_the_shell_would() {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join("notes")).unwrap();
    llmtool()
        .env("HOME", home.path())
        .args([
            "config",
            "show",
            "configs/small.yaml",
            "--set",
            "data.roots=[~/notes]",
        ])
        .args(["--set", "output.dir=~/runs/notes"])
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "- {}",
            home.path().join("notes").display()
        )))
        .stdout(predicate::str::contains(format!(
            "dir: {}",
            home.path().join("runs/notes").display()
        )));
}

#[test]
fn a_byte_order_mark_is_read_past() {
    validate(
        "bom.yaml",
        "\u{feff}training:\n  max_steps: 500\ndata:\n  roots: [docs]\n",
    )
    .success();
}

#[test]
fn a_deeply_nested_document_is_refused_at_once() {
    let deep = format!("training: {}{}\n", "[".repeat(200_000), "]".repeat(200_000));
    validate("deep.yaml", &deep)
        .code(1)
        .stderr(predicate::str::contains(
            "deep.yaml:1:43: invalid YAML: nested more than 32 levels deep",
        ));
}

#[test]
fn yaml_syntax_error_names_line() {
    rejected("training:\n  lr: [1,\n", &["c.yaml:", "invalid YAML"]);
}

#[test]
fn missing_file_is_one_clear_line() {
    assert_fails_naming(
        &["config", "validate", "configs/nope.yaml"],
        "configs/nope.yaml: cannot read config",
    );
}

#[test]
fn set_overrides_and_type_checks() {
    llmtool()
        .args([
            "config",
            "show",
            "configs/small.yaml",
            "--set",
            "training.lr=3e-4",
            "--set",
            "lora.r=4",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("lr: 0.0003"))
        .stdout(predicate::str::contains("r: 4"));
    assert_fails_naming(
        &[
            "config",
            "validate",
            "configs/small.yaml",
            "--set",
            "training.lr=fast",
        ],
        "--set training.lr: expected a positive number, got \"fast\"",
    );
}

#[test]
fn set_unknown_key_fails_with_suggestion() {
    llmtool()
        .args([
            "config",
            "validate",
            "configs/small.yaml",
            "--set",
            "training.lrr=1",
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--set training.lrr: unknown key"))
        .stderr(predicate::str::contains("did you mean `lr`?"));
    llmtool()
        .args([
            "config",
            "validate",
            "configs/small.yaml",
            "--set",
            "training",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("expected KEY=VALUE"));
}

#[test]
fn show_round_trips_through_validate() {
    let dir = tempfile::tempdir().unwrap();
    for preset in ["tiny", "small", "base", "lora"] {
        let shown = llmtool()
            .args(["config", "show", &format!("configs/{preset}.yaml")])
            .output()
            .unwrap();
        assert!(shown.status.success());
        let path = write(
            dir.path(),
            "resolved.yaml",
            &String::from_utf8_lossy(&shown.stdout),
        );
        llmtool()
            .args(["config", "validate", &path])
            .assert()
            .success();
        let again = llmtool().args(["config", "show", &path]).output().unwrap();
        assert_eq!(
            shown.stdout, again.stdout,
            "{preset}: show is not a fixed point"
        );
    }
}
