//! `llmtool data build|stats` and `tokenizer train` run as a user would, on corpora made in
//! temp folders: counts in the manifest, byte-identical rebuilds, and every kind of bad input
//! listed in the manifest without aborting the build.

mod common;

use common::llmtool_in;
use predicates::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Several distinct markdown files under `dir/notes`.
fn write_corpus(dir: &Path) {
    let notes = dir.join("notes");
    std::fs::create_dir_all(notes.join("sub")).unwrap();
    let topics = [
        "rivers",
        "mountains",
        "compilers",
        "gardens",
        "trains",
        "violins",
    ];
    for (i, topic) in topics.iter().enumerate() {
        let mut text =
            format!("# Notes on {topic}\n\nThese are notes number {i} about {topic}.\n\n");
        for j in 0..20 {
            text.push_str(&format!(
                "## Part {j}\n\nThe {topic} section {j} explains idea {} with `code {j}` and a [link](https://example.org/{topic}/{j}).\n\n",
                i * 31 + j * 7
            ));
        }
        text.push_str("```rust\nfn main() { println!(\"hello\"); }\n```\n");
        let sub = if i % 2 == 0 { "" } else { "sub/" };
        std::fs::write(notes.join(format!("{sub}{topic}.md")), text).unwrap();
    }
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    let text = format!(
        "model:\n  vocab_size: 400\ndata:\n  roots: [notes]\n  val_fraction: 0.2\n  dataset_dir: ds\n{extra}"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A fresh temp folder holding the corpus and its `config.yaml` (with `extra` appended).
fn corpus_with_config(extra: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    write_corpus(tmp.path());
    write_config(tmp.path(), extra);
    tmp
}

fn manifest(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("ds/manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn dataset_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir.join("ds"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn build_counts_then_up_to_date_then_byte_identical() {
    let tmp = corpus_with_config("");
    let dir = tmp.path();
    llmtool_in(dir)
        .args(["data", "build", "config.yaml"])
        .assert()
        .success()
        .stdout(predicate::str::contains("6 read, 0 skipped"));
    let m = manifest(dir);
    assert_eq!(m["counts"]["files"], 6);
    assert_eq!(m["counts"]["documents"], 6);
    assert_eq!(m["token_dtype"], "u16");
    let shard_tokens: u64 = ["train", "val"]
        .iter()
        .flat_map(|s| m[s]["shards"].as_array().unwrap().clone())
        .map(|s| s["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(m["counts"]["tokens"].as_u64().unwrap(), shard_tokens);
    assert!(m["inputs"][0]["sha256"].as_str().unwrap().len() == 64);
    let first = dataset_bytes(dir);
    assert!(first.contains_key("train-00000.bin") && first.contains_key("tokenizer.json"));

    llmtool_in(dir)
        .args(["data", "build", "config.yaml"])
        .assert()
        .success()
        .stdout(predicate::str::contains("up to date"));
    llmtool_in(dir)
        .args(["data", "build", "config.yaml", "--force"])
        .assert()
        .success();
    assert_eq!(first, dataset_bytes(dir), "rebuild is not byte-identical");

    llmtool_in(dir)
        .args([
            "data",
            "build",
            "config.yaml",
            "--set",
            "data.link_urls=true",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("up to date").not());

    llmtool_in(dir)
        .args(["data", "stats", "ds"])
        .assert()
        .success()
        .stdout(predicate::str::contains("documents     6"))
        .stdout(predicate::str::contains("length (tokens per document)"));
}

/// Whether the current user can read a file whose permissions say nobody can (root can).
fn can_read_anyway(path: &Path) -> bool {
    std::fs::read(path).is_ok()
}

#[test]
fn bad_inputs_are_listed_and_none_aborts_the_build() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_corpus(dir);
    let notes = dir.join("notes");
    std::fs::write(
        notes.join("latin1.md"),
        b"# Caf\xe9\n\nNot UTF-8 at all, but long enough to keep.\n",
    )
    .unwrap();
    std::fs::write(notes.join("empty.md"), "").unwrap();
    std::fs::write(notes.join("front.md"), "---\ntitle: Only this\n---\n").unwrap();
    std::fs::write(notes.join("binary.md"), b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
    let words: String = (0..300_000).map(|i| format!("w{} ", i % 97)).collect();
    std::fs::write(notes.join("oneline.md"), &words[..1_000_000]).unwrap();
    let locked = notes.join("locked.md");
    std::fs::write(&locked, "# Secret\n\nYou cannot read this file normally.\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let locked_readable = can_read_anyway(&locked);
    write_config(dir, "");
    llmtool_in(dir)
        .args(["data", "build", "config.yaml"])
        .assert()
        .success();

    let m = manifest(dir);
    let reasons: BTreeMap<String, String> = m["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["path"].as_str().unwrap().to_owned(),
                s["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        reasons["notes/latin1.md"].contains("not valid UTF-8"),
        "{reasons:?}"
    );
    assert_eq!(reasons["notes/empty.md"], "empty file");
    assert_eq!(reasons["notes/front.md"], "front matter only");
    assert!(reasons["notes/binary.md"].contains("binary"));
    if locked_readable {
        eprintln!("running as root: an unreadable file cannot be made, skipping that check");
    } else {
        assert!(
            reasons["notes/locked.md"].contains("unreadable"),
            "{reasons:?}"
        );
    }
    let inputs: Vec<&str> = m["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert!(inputs.contains(&"notes/oneline.md"));

    llmtool_in(dir)
        .args([
            "data",
            "build",
            "config.yaml",
            "--set",
            "data.lossy_utf8=true",
        ])
        .assert()
        .success();
    let m = manifest(dir);
    let inputs: Vec<&str> = m["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert!(inputs.contains(&"notes/latin1.md"));
}

#[test]
fn missing_root_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    write_config(tmp.path(), "");
    llmtool_in(tmp.path())
        .args(["data", "build", "config.yaml"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("notes does not exist"));
}

#[test]
fn stats_without_dataset_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    llmtool_in(tmp.path())
        .args(["data", "stats", "nowhere"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("nowhere/manifest.json"))
        .stderr(predicate::str::contains("llmtool data build"));
}

/// `llmtool data stats DIR | head`: a reader that goes away ends the command as it ends `cat`,
/// not with a panic.
#[cfg(unix)]
#[test]
fn stats_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = corpus_with_config("");
    let config = tmp.path().join("config.yaml");
    llmtool_in(tmp.path())
        .args(["data", "build", config.to_str().unwrap()])
        .assert()
        .success();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("llmtool"))
        .current_dir(tmp.path())
        .args(["data", "stats", "ds"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(13),
        "SIGPIPE: {:?} {stderr}",
        out.status
    );
}

/// A dataset whose tokenizer.json was replaced is not up to date: its token ids belong to the
/// tokenizer it was built with.
#[test]
fn a_replaced_dataset_tokenizer_makes_the_dataset_stale() {
    let tmp = corpus_with_config("");
    let dir = tmp.path();
    let config = dir.join("config.yaml");
    llmtool_in(dir)
        .args(["data", "build", config.to_str().unwrap()])
        .assert()
        .success();
    let original = std::fs::read(dir.join("ds/tokenizer.json")).unwrap();
    llmtool_in(dir)
        .args([
            "tokenizer",
            "train",
            "config.yaml",
            "--set",
            "model.vocab_size=300",
        ])
        .args(["--out", "ds/tokenizer.json", "--force"])
        .assert()
        .success();
    llmtool_in(dir)
        .args(["data", "stats", "ds"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "ds/tokenizer.json: is not the tokenizer this dataset was tokenized with",
        ));
    llmtool_in(dir)
        .args(["data", "build", config.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains("up to date").not());
    assert_eq!(
        std::fs::read(dir.join("ds/tokenizer.json")).unwrap(),
        original
    );
}

#[test]
fn trained_tokenizer_loads_back() {
    let tmp = corpus_with_config("  special_tokens: [\"<|endoftext|>\", \"<|pad|>\"]\n");
    let dir = tmp.path();
    llmtool_in(dir)
        .args([
            "tokenizer",
            "train",
            "config.yaml",
            "--out",
            "tok/tokenizer.json",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("tokens trained on 6 documents"));
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tok/tokenizer.json")).unwrap();
    assert_eq!(tokenizer.token_to_id("<|endoftext|>"), Some(0));
    let ids = tokenizer
        .encode("Notes on rivers", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), "Notes on rivers");

    // An existing file is kept unless --force.
    let train_again = |extra: &[&str]| {
        let mut cmd = llmtool_in(dir);
        cmd.args([
            "tokenizer",
            "train",
            "config.yaml",
            "--out",
            "tok/tokenizer.json",
        ])
        .args(extra);
        cmd.assert()
    };
    train_again(&[]).code(1).stderr(predicate::str::contains(
        "tok/tokenizer.json exists: pass --force",
    ));
    train_again(&["--force"]).success();

    // The dataset then uses it as is.
    write_config(dir, "  tokenizer: tok/tokenizer.json\n");
    llmtool_in(dir)
        .args(["data", "build", "config.yaml"])
        .assert()
        .success();
    assert_eq!(manifest(dir)["tokenizer"]["source"], "tok/tokenizer.json");

    // A tokenizer larger than the model's embedding is refused, naming the file.
    let small = "model:\n  vocab_size: 300\ndata:\n  roots: [notes]\n  tokenizer: tok/tokenizer.json\n  dataset_dir: ds2\n";
    std::fs::write(dir.join("small.yaml"), small).unwrap();
    llmtool_in(dir)
        .args(["data", "build", "small.yaml"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("tok/tokenizer.json"))
        .stderr(predicate::str::contains("model.vocab_size is 300"));
}

#[test]
fn a_corpus_that_cleans_to_nothing_says_how_many_files_were_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("notes")).unwrap();
    for name in ["a", "b", "c"] {
        std::fs::write(
            dir.join(format!("notes/{name}.md")),
            "# Short\n\nToo short.\n",
        )
        .unwrap();
    }
    let config = write_config(dir, "  min_chars: 500\n");
    llmtool_in(dir)
        .args(["data", "build"])
        .arg(&config)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "no documents left after cleaning (3 files read, 3 skipped)",
        ));
    assert!(!dir.join("ds").exists(), "a failed build left a dataset");
}
