//! `llmtool generate` run as a binary on the committed fixtures.

mod common;

use common::{copy_fixture, fixture, json, llmtool};
use std::path::Path;

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn tokenizer() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(fixture("tokenizer.json")).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Runs `generate` on tiny-llama with `args`; returns (stdout, stderr).
fn generate(args: &[&str], stdin: &str) -> (String, String) {
    generate_with("tiny-llama", args, stdin)
}

/// Runs `generate` on the fixture model `name` with `args`; returns (stdout, stderr).
fn generate_with(name: &str, args: &[&str], stdin: &str) -> (String, String) {
    let out = llmtool()
        .args(["generate", "--model", &path(&fixture(name))])
        .args(args)
        .write_stdin(stdin)
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

/// The fixture's greedy prompt as text, and transformers' continuation decoded.
fn greedy_case(expected: &str) -> (String, String) {
    let tok = tokenizer();
    let prompt = ids(&json("tiny-llama/expected.json")["greedy"]["prompt_ids"]);
    let text = tok.decode(&prompt, false).unwrap();
    assert_eq!(tok.encode(text.as_str(), false).unwrap().get_ids(), prompt);
    let new = ids(&json(expected)["greedy"]["new_ids"]);
    (text, tok.decode(&new, true).unwrap())
}

#[test]
fn greedy_text_matches_transformers_with_and_without_adapter() {
    let (prompt, want) = greedy_case("tiny-llama/expected.json");
    let greedy = [
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--prompt",
        &prompt,
    ];
    let (out, err) = generate(&greedy, "");
    assert_eq!(out, want + "\n");
    assert!(
        err.contains("generation: 24 tokens") && err.contains("tokens/s"),
        "{err}"
    );
    let (_, want) = greedy_case("tiny-llama-lora/expected.json");
    let adapter = path(&fixture("tiny-llama-lora"));
    let (out, _) = generate(&[&greedy[..], &["--adapter", &adapter]].concat(), "");
    assert_eq!(out, format!("{want}\n"));
    // mlx-lm's spellings of the flags.
    let mlx_spelling = [
        "--temp",
        "0",
        "--max-tokens",
        "24",
        "--prompt",
        &prompt,
        "--adapter-path",
        &adapter,
    ];
    let (out, _) = generate(&mlx_spelling, "");
    assert_eq!(out, want + "\n");
}

#[test]
fn same_seed_same_text_and_stdin_prompts() {
    let run = |seed: &str| {
        generate(
            &[
                "--prompt",
                "The model",
                "--seed",
                seed,
                "--max-tokens",
                "16",
            ],
            "",
        )
        .0
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(run("1"), run("2"));
    let from_stdin = generate(&["--seed", "1", "--max-tokens", "16"], "The model").0;
    assert_eq!(from_stdin, run("1"));
    let (two, _) = generate(
        &["--prompt", "The", "--num-samples", "2", "--max-tokens", "4"],
        "",
    );
    assert!(two.contains("--- sample 2 of 2 ---"), "{two}");
}

#[test]
fn a_batch_of_samples_prints_the_single_samples_seeded_seed_plus_i() {
    let settings: [&[&str]; 4] = [
        &[
            "--temperature",
            "1",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--min-p",
            "0.02",
        ],
        &["--temperature", "0.9", "--repetition-penalty", "1.3"],
        &["--temperature", "1", "--stop", "e"],
        &["--temperature", "0"],
    ];
    // Gemma 2 slides a window shorter than the sequence; Phi-3 rotates part of each head.
    for name in ["tiny-llama", "tiny-gemma2", "tiny-phi3"] {
        for sampling in settings {
            let run = |extra: &[&str]| {
                let common = ["--prompt", "The river", "--max-tokens", "12"];
                generate_with(name, &[&common[..], sampling, extra].concat(), "")
            };
            let (batch, err) = run(&["--num-samples", "3", "--seed", "7"]);
            let singles: String = (0..3)
                .map(|i| {
                    let seed = (7 + i).to_string();
                    let (text, _) = run(&["--num-samples", "1", "--seed", &seed]);
                    format!("--- sample {} of 3 ---\n{text}", i + 1)
                })
                .collect();
            assert_eq!(batch, singles, "{name} {sampling:?}");
            assert!(
                err.contains("sample 3: ") && err.contains("generation: 3 samples, "),
                "{err}"
            );
            if sampling[1] == "0" {
                let blocks: Vec<&str> = batch.split("--- sample").skip(1).collect();
                let texts: Vec<&str> = blocks.iter().map(|b| &b[b.find('\n').unwrap()..]).collect();
                assert!(texts.iter().all(|t| *t == texts[0]), "{batch}");
            }
        }
    }
}

#[test]
fn stop_strings_cut_the_output() {
    let (prompt, full) = greedy_case("tiny-llama/expected.json");
    let stop: String = full.chars().skip(6).take(3).collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let args = [
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--prompt",
        &prompt,
    ];
    let (out, err) = generate(&[&args[..], &["--stop", &stop]].concat(), "");
    assert_eq!(out, format!("{cut}\n"));
    assert!(err.contains("stopped: stop string"), "{err}");
}

#[test]
fn chat_and_interactive_reuse_the_cache() {
    let (out, _) = generate(
        &[
            "--chat",
            "--prompt",
            "Where is the sun?",
            "--max-tokens",
            "8",
        ],
        "",
    );
    assert!(!out.is_empty());
    let args = ["--interactive", "--max-tokens", "6", "--temperature", "0"];
    let (_, err) = generate(&args, "Where is the sun?\nAnd the water?\n");
    let prompts: Vec<usize> = err
        .lines()
        .filter_map(|l| l.split("prompt: ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(prompts.len(), 2, "{err}");
    // The second turn runs only what follows the cached conversation.
    let second_turn_alone = tokenizer()
        .encode(
            "<|endoftext|>\n<|im_start|>user\nAnd the water?<|endoftext|>\n<|im_start|>assistant\n",
            false,
        )
        .unwrap()
        .len();
    assert!(prompts[1] <= second_turn_alone + 6, "{err}");
}

#[test]
fn chat_args_reach_the_template_and_a_failing_template_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("tiny-llama", dir.path());
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}{{ m['content'] }}{% endfor %}\
         {% if enable_thinking is defined and not enable_thinking %}\
         {{ raise_exception('thinking is off') }}{% endif %}",
    )
    .unwrap();
    let model = path(dir.path());
    let chat = [
        "generate",
        "--model",
        &model,
        "--chat",
        "--prompt",
        "Hi",
        "--max-tokens",
        "2",
    ];
    llmtool().args(chat).assert().success();
    let out = llmtool()
        .args(chat)
        .args(["--chat-arg", "enable_thinking=false"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("chat_template.jinja") && err.contains("thinking is off"),
        "{err}"
    );
    llmtool()
        .args(chat)
        .args(["--chat-arg", "enable_thinking"])
        .assert()
        .code(2);
}

fn one_error_line(args: &[&str]) -> String {
    let out = llmtool().arg("generate").args(args).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn bad_input_is_one_clear_line() {
    let model = path(&fixture("tiny-llama"));
    let err = one_error_line(&["--model", &model, "--prompt", "x", "--top-p", "1.5"]);
    assert_eq!(err.trim(), "error: top-p must be in (0, 1], got 1.5");
    // A negative value is a value, not a flag.
    let err = one_error_line(&["--model", &model, "--prompt", "x", "--temperature", "-1"]);
    assert_eq!(
        err.trim(),
        "error: temperature must be a number >= 0, got -1"
    );

    let long = "the river and the hill ".repeat(40);
    let err = one_error_line(&["--model", &model, "--prompt", &long]);
    assert!(
        err.contains("--truncate") && err.contains("context is 128"),
        "{err}"
    );
    let (_, err) = generate(&["--prompt", &long, "--truncate", "--max-tokens", "4"], "");
    assert!(err.contains("keeping its last"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.path().join(f)).unwrap();
    }
    let err = one_error_line(&["--model", &path(dir.path()), "--prompt", "x"]);
    assert!(err.contains("tokenizer.json"), "{err}");

    let adapter = dir.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    let lora = fixture("tiny-llama-lora");
    std::fs::copy(
        lora.join("adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config = json("tiny-llama-lora/adapter_config.json");
    config["base_model_name_or_path"] = path(&fixture("tiny-llama3")).into();
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    let err = one_error_line(&[
        "--model",
        &model,
        "--adapter",
        &path(&adapter),
        "--prompt",
        "x",
    ]);
    assert!(err.contains("different model"), "{err}");
}
