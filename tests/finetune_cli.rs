//! `llmtool finetune` on the committed tiny HF model: LoRA writes a PEFT adapter whose weights
//! moved (also with gradient checkpointing), full fine-tuning writes an HF model, JSONL
//! examples of each format train, and their loss is the weighted mean over scored tokens.

mod common;

use common::{
    assert_fails_naming, assert_two_ranks_train_as_one_process, copy_fixture, fixture, llmtool,
};
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
    write_config(dir, &notes, extra)
}

/// `dir/ft.yaml`: fine-tune the tiny model on `root` for 3 steps.
fn write_config(dir: &Path, root: &Path, extra: &str) -> String {
    let config = format!(
        "model:\n  pretrained: {}\ndata:\n  roots: [{}]\n  dedup: none\n  val_fraction: 0.3\n\
training:\n  seq_len: 16\n  batch_size: 2\n  max_steps: 3\n  warmup_steps: 1\n  lr: 0.01\n  eval_every: 3\n  save_every: 3\n{extra}\
lora:\n  r: 4\n  alpha: 8\n  dropout: 0.1\n  target_modules: [q, v]\n\
output:\n  dir: {}\n",
        fixture("tiny-llama").display(),
        root.display(),
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
fn adapter_format_mlx_writes_an_mlx_lm_adapter_the_same_run_reads() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "");
    llmtool()
        .args(["finetune", &config, "--lora", "--adapter-format", "mlx"])
        .assert()
        .success();
    let adapter = dir.path().join("run/adapter");
    assert!(adapter.join("adapters.safetensors").is_file());
    assert!(!adapter.join("adapter_model.safetensors").exists());
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["lora_parameters"]["rank"], 4);
    assert_eq!(cfg["lora_parameters"]["scale"], 2.0, "alpha 8 / r 4");
    llmtool()
        .args(["eval", "--model"])
        .arg(fixture("tiny-llama"))
        .arg("--adapter-path")
        .arg(&adapter)
        .arg("--data")
        .arg(dir.path().join("notes"))
        .assert()
        .success();
    llmtool()
        .args(["finetune", &config, "--adapter-format", "mlx"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--lora"));
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

/// A copy of the tiny model whose config.json says its weights are bf16, with a chat template
/// file.
fn bf16_base(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base");
    copy_fixture("tiny-llama", &base);
    let config_path = base.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["dtype"] = "bfloat16".into(); // transformers 5 spelling; 4.x wrote torch_dtype
    std::fs::write(&config_path, config.to_string()).unwrap();
    std::fs::write(
        base.join("chat_template.jinja"),
        "{{ messages[0]['content'] }}",
    )
    .unwrap();
    base
}

#[test]
fn full_finetune_keeps_the_bases_dtype_and_tokenizer_files() {
    let dir = tempfile::tempdir().unwrap();
    let base = bf16_base(dir.path());
    let config = setup(dir.path(), "");
    let base_arg = format!("model.pretrained={}", base.display());
    llmtool()
        .args(["finetune", &config, "--set", &base_arg])
        .assert()
        .success();
    let model = dir.path().join("run/model");
    let saved = llmtool::model::io::read_config(&model).unwrap();
    assert_eq!(saved.torch_dtype.as_deref(), Some("bfloat16"));
    let tensors =
        candle_core::safetensors::load(model.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(tensors
        .values()
        .all(|t| t.dtype() == candle_core::DType::BF16));
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        assert_eq!(
            std::fs::read(model.join(name)).unwrap(),
            std::fs::read(base.join(name)).unwrap(),
            "{name}"
        );
    }

    // output.dtype overrides the base's.
    llmtool()
        .args(["finetune", &config, "--force", "--set", &base_arg])
        .args(["--set", "output.dtype=f16"])
        .assert()
        .success();
    let saved = llmtool::model::io::read_config(&model).unwrap();
    assert_eq!(saved.torch_dtype.as_deref(), Some("float16"));
}

#[test]
fn finetune_needs_a_pretrained_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "");
    assert_fails_naming(
        &[
            "finetune",
            &config,
            "--lora",
            "--set",
            "model.pretrained=null",
        ],
        "model.pretrained",
    );
}

#[test]
fn a_finetune_that_fails_on_its_base_leaves_no_run_behind() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "");
    let broken = dir.path().join("broken-base");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(
        fixture("tiny-llama/config.json"),
        broken.join("config.json"),
    )
    .unwrap();
    std::fs::copy(
        fixture("tiny-llama/tokenizer.json"),
        broken.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(broken.join("model.safetensors"), b"not safetensors").unwrap();
    let base = format!("model.pretrained={}", broken.display());
    assert_fails_naming(
        &["finetune", &config, "--lora", "--set", &base],
        "model.safetensors",
    );
    assert!(
        !dir.path().join("run").exists(),
        "the failed run left its directory"
    );
    // A run stopped by the user names the command that continues it.
    llmtool()
        .args(["finetune", &config, "--lora", "--stop-after-steps", "1"])
        .assert()
        .success()
        .stdout(predicate::str::contains("llmtool finetune --lora --resume"));
    assert_fails_naming(
        &["finetune", &config, "--lora"],
        "continue it with `llmtool finetune --lora --resume",
    );
}

/// Ten JSONL examples of one format, in `dir/data/train.jsonl`.
fn jsonl_setup(dir: &Path, line: impl Fn(usize) -> String, extra: &str) -> String {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let lines: Vec<String> = (0..10).map(line).collect();
    std::fs::write(data.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
    write_config(dir, &data, extra)
}

#[test]
fn an_mlx_data_folder_holds_out_its_test_set() {
    let dir = tempfile::tempdir().unwrap();
    let config = jsonl_setup(dir.path(), text_line, "");
    let data = dir.path().join("data");
    let valid: Vec<String> = (10..13).map(text_line).collect();
    std::fs::write(data.join("valid.jsonl"), valid.join("\n")).unwrap();
    std::fs::write(data.join("test.jsonl"), text_line(99)).unwrap();
    llmtool()
        .args(["finetune", &config, "--lora"])
        .assert()
        .success()
        .stderr(predicate::str::contains("10 train / 3 val examples"))
        .stderr(predicate::str::contains("test.jsonl held out"));
}

#[test]
fn chat_template_args_reach_the_template_of_jsonl_messages() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    copy_fixture("tiny-llama", &base);
    // The fixture's template, failing when thinking is turned off.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let template = config["chat_template"].as_str().unwrap().to_string()
        + "{% if enable_thinking is defined and not enable_thinking %}\
           {{ raise_exception('thinking is off') }}{% endif %}";
    std::fs::write(base.join("chat_template.jinja"), template).unwrap();
    let config = jsonl_setup(dir.path(), chat_line, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &fixture("tiny-llama").display().to_string(),
        &base.display().to_string(),
    );
    std::fs::write(&config, &text).unwrap();
    let long_enough = ["--set", "training.seq_len=64"];
    llmtool()
        .args(["finetune", &config, "--lora"])
        .args(long_enough)
        .assert()
        .success();
    let off = text.replace(
        "data:\n",
        "data:\n  chat_template_args: {enable_thinking: false}\n",
    );
    std::fs::write(&config, off).unwrap();
    llmtool()
        .args(["finetune", &config, "--lora", "--force"])
        .args(long_enough)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("thinking is off"));
}

fn text_line(i: usize) -> String {
    serde_json::json!({ "text": format!("The fox jumps {i} times.") }).to_string()
}

fn completion_line(i: usize) -> String {
    serde_json::json!({ "prompt": format!("Q{i}: what jumps?\nA:"), "completion": " the fox" })
        .to_string()
}

fn chat_line(i: usize) -> String {
    serde_json::json!({ "messages": [
        { "role": "user", "content": format!("What jumps {i}?") },
        { "role": "assistant", "content": "The fox." },
    ] })
    .to_string()
}

#[test]
fn lora_trains_on_each_jsonl_format() {
    type Line = fn(usize) -> String;
    let formats: [(&str, Line); 3] = [
        ("text", text_line),
        ("prompt/completion", completion_line),
        ("messages", chat_line),
    ];
    for (name, line) in formats {
        let dir = tempfile::tempdir().unwrap();
        let config = jsonl_setup(dir.path(), line, "");
        llmtool()
            .args([
                "finetune",
                &config,
                "--lora",
                "--set",
                "training.seq_len=64",
            ])
            .assert()
            .success()
            .stderr(predicate::str::contains("examples: 1 JSONL files"))
            .stdout(predicate::str::contains("training finished"));
        assert!(
            lora_b_is_nonzero(&dir.path().join("run/adapter")),
            "{name}: adapter did not change"
        );
    }
}

#[test]
fn a_bad_jsonl_line_fails_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let line = |i: usize| match i {
        3 => r#"{"input": "x"}"#.to_string(),
        _ => text_line(i),
    };
    let config = jsonl_setup(dir.path(), line, "");
    assert_fails_naming(
        &["finetune", &config, "--lora"],
        "train.jsonl:4: expected \"text\", \"prompt\"/\"completion\" or \"messages\"",
    );
    assert!(!dir.path().join("run/config.yaml").exists());
}

/// The loss of a prompt/completion batch is the mean NLL of the completion tokens (and EOS)
/// alone, computed here from the logits by hand.
#[test]
fn prompt_completion_loss_and_eval_are_the_mean_over_completion_tokens() {
    use candle_core::{DType, Device, IndexOp};
    use llmtool::config::Sampling;
    use llmtool::data::jsonl::{self, ExampleOptions};
    use llmtool::train::example_source::ExampleBatches;
    use llmtool::train::BatchSource;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.jsonl");
    let lines = [completion_line(1), completion_line(22)];
    std::fs::write(&path, lines.join("\n")).unwrap();
    let model = llmtool::model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let tokenizer =
        llmtool::data::Tokenizer::from_file(fixture("tiny-llama").join("tokenizer.json")).unwrap();
    let examples = jsonl::load(
        &jsonl::JsonlFiles {
            train: vec![path],
            ..Default::default()
        },
        &ExampleOptions {
            tokenizer: &tokenizer,
            eos_id: 0,
            chat_template: Err("none".into()),
            seq_len: 32,
            val_fraction: 0.0,
        },
    )
    .unwrap();
    let batch = ExampleBatches::new(&examples, 32, Sampling::Sequential, 0, false)
        .train_batch(0, 2)
        .unwrap();
    let loss = llmtool::train::gradients::accumulate(
        &model,
        &[],
        &batch,
        1.0,
        false,
        None,
        &mut Default::default(),
    )
    .and_then(|loss| loss.read())
    .unwrap();

    let inputs = candle_core::Tensor::from_slice(&batch.inputs, (2, 32), &Device::Cpu).unwrap();
    let logits = model.forward(&inputs, None).unwrap();
    let weights = batch.weights.as_ref().unwrap();
    let (mut sum, mut count) = (0.0f64, 0usize);
    for row in 0..2 {
        for pos in 0..32 {
            let i = row * 32 + pos;
            if weights[i] == 0.0 {
                continue;
            }
            let row_logits: Vec<f32> = logits.i((row, pos)).unwrap().to_vec1().unwrap();
            let max = row_logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let log_z = max
                + row_logits
                    .iter()
                    .map(|&l| (l as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            sum += log_z - row_logits[batch.targets[i] as usize] as f64;
            count += 1;
        }
    }
    // " the fox" and EOS in each row; the prompt and padding are not scored.
    let completion = tokenizer.encode(" the fox", false).unwrap().get_ids().len() + 1;
    assert_eq!(count, 2 * completion);
    let expected = sum / count as f64;
    assert!(
        (loss - expected).abs() < 1e-4 * expected.abs(),
        "trainer loss {loss} vs completion-only NLL {expected}"
    );

    // `eval --data` on the file scores the same tokens, not the JSON text.
    let out = llmtool()
        .args(["eval", "--json", "--model"])
        .arg(fixture("tiny-llama"))
        .arg("--data")
        .arg(dir.path().join("train.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let metrics = &report[0]["metrics"];
    assert_eq!(metrics["tokens"].as_u64().unwrap() as usize, count);
    let eval_nll = metrics["nll_mean"].as_f64().unwrap();
    assert!(
        (eval_nll - expected).abs() < 1e-4 * expected.abs(),
        "eval NLL {eval_nll} vs completion-only NLL {expected}"
    );
}

/// A JSONL run paused after one step and resumed ends with the same adapter as a run that was
/// never paused: example batches depend only on the seed and step.
#[test]
fn a_paused_jsonl_run_resumes_exactly() {
    let adapter = |pause: bool| {
        let dir = tempfile::tempdir().unwrap();
        let config = jsonl_setup(dir.path(), completion_line, "");
        let run = dir.path().join("run");
        let first: &[&str] = if pause {
            &["--stop-after-steps", "1"]
        } else {
            &[]
        };
        llmtool()
            .args([
                "finetune",
                &config,
                "--lora",
                "--set",
                "training.seq_len=32",
            ])
            .args(first)
            .assert()
            .success();
        if pause {
            llmtool()
                .args(["finetune", "--lora", "--resume", run.to_str().unwrap()])
                .assert()
                .success()
                .stdout(predicate::str::contains("training finished"));
        }
        std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap()
    };
    assert!(
        adapter(false) == adapter(true),
        "the resumed adapter differs"
    );
}

/// The tokens `metrics.jsonl` counts by the last step of the run in `dir`.
fn tokens_trained(dir: &Path) -> u64 {
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let records = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    records.filter_map(|r| r["tokens"].as_u64()).max().unwrap()
}

#[test]
fn packing_fits_more_real_tokens_in_a_step_and_can_be_turned_off() {
    let run = |packing: bool| {
        let dir = tempfile::tempdir().unwrap();
        let config = jsonl_setup(dir.path(), text_line, "");
        let packing = format!("data.packing={packing}");
        let args = [
            "finetune",
            &config,
            "--lora",
            "--set",
            "training.seq_len=64",
        ];
        llmtool()
            .args(args)
            .args(["--set", &packing])
            .assert()
            .success()
            .stdout(predicate::str::contains("training finished"));
        assert!(lora_b_is_nonzero(&dir.path().join("run/adapter")));
        tokens_trained(dir.path())
    };
    let (packed, padded) = (run(true), run(false));
    // Unpacked, a row holds one example of a few tokens; packed, all of them.
    assert!(
        packed > 2 * padded,
        "packed {packed} vs padded {padded} real tokens"
    );
}

/// LoRA with dropout on packed prompt/completion examples, on two processes, trains the run one
/// process trains with twice the accumulation: the same windows, the same dropout masks, only
/// the adapters' gradients summed; the adapter rank 0 writes loads like any other.
#[test]
fn lora_on_two_processes_trains_the_run_of_one_with_twice_the_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let config = jsonl_setup(dir.path(), completion_line, "");
    let common = ["--lora", "--device", "cpu", "--set", "training.seq_len=32"];
    llmtool()
        .args(["finetune", &config, "--gpus", "2"])
        .args(common)
        .assert()
        .success()
        .stdout(predicate::str::contains("training finished"));
    assert_two_ranks_train_as_one_process(
        dir.path(),
        &[&["finetune", &config][..], &common].concat(),
    );
    assert!(lora_b_is_nonzero(&dir.path().join("run/adapter")));
}
