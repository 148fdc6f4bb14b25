//! LoRA adapters against PEFT: adapters made by PEFT give PEFT's logits, adapters saved by
//! llmtool have PEFT's names and shapes, one training step matches PEFT + torch AdamW, merging
//! preserves the logits, and bad adapters fail with one clear error. Base models named by a hub
//! id come from the Hugging Face cache, or from a hub (a fake one on localhost) into it.
//!
//! The file is long because it is a list of tests, one per PEFT behaviour.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, hf_mean_nll, ids, json, llmtool, relative_error, tensors};
use llmtool::config::LoraSection;
use llmtool::model::{self, io, Llama, LlamaConfig, ModelError};
use llmtool::train::{lora, Adapter};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

fn base() -> Llama {
    model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu)
        .unwrap()
        .model
}

fn with_adapter(dir: &Path) -> Llama {
    let mut model = base();
    let adapter = Adapter::load(dir, &model.config, DType::F32, &Device::Cpu).unwrap();
    adapter.attach(&mut model).unwrap();
    model
}

/// The PEFT fixture adapter `tiny-llama-lora` loaded and saved again in `format` into a
/// fresh directory, with the base's config.
fn fixture_adapter_saved_as(
    format: lora::AdapterFormat,
) -> (LlamaConfig, Adapter, tempfile::TempDir) {
    let cfg = base().config;
    let adapter =
        Adapter::load(&fixture("tiny-llama-lora"), &cfg, DType::F32, &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    adapter
        .save(out.path(), format, cfg.num_hidden_layers)
        .unwrap();
    (cfg, adapter, out)
}

/// The base with the adapter in `a` and with the one in `b` give bit-equal logits.
fn assert_same_logits(a: &Path, b: &Path) {
    let a = with_adapter(a).forward(&batch(), None).unwrap();
    let b = with_adapter(b).forward(&batch(), None).unwrap();
    assert_eq!(relative_error(&a, &b), 0.0);
}

fn batch() -> Tensor {
    ids(&tensors("tiny-llama/expected.safetensors")["input_ids"])
}

fn check_peft_logits(name: &str) {
    let model = with_adapter(&fixture(name));
    let expected = tensors(&format!("{name}/expected.safetensors"));
    let logits = model.forward(&ids(&expected["input_ids"]), None).unwrap();
    let err = relative_error(&logits, &expected["logits"]);
    assert!(err < 1e-4, "{name}: logits relative error {err}");
}

#[test]
fn peft_lora_adapter_gives_peft_logits() {
    check_peft_logits("tiny-llama-lora");
}

#[test]
fn peft_rslora_adapter_gives_peft_logits() {
    check_peft_logits("tiny-llama-rslora");
}

/// tests/fixtures/tiny-llama-mlx was made and run by mlx-lm (make_mlx_fixtures.py).
#[test]
fn mlx_lm_adapter_gives_mlx_lms_logits() {
    check_peft_logits("tiny-llama-mlx");
    let adapter = Adapter::load(
        &fixture("tiny-llama-mlx"),
        &base().config,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    // mlx-lm's scale 10 at rank 4 is PEFT's alpha 40.
    assert_eq!((adapter.config.r, adapter.config.lora_alpha), (4, 40.0));
    assert_eq!(adapter.modules().count(), 3, "the last layer only");
}

#[test]
fn an_adapter_saved_for_mlx_lm_has_its_names_and_config_and_reads_back_the_same() {
    let (cfg, adapter, out) = fixture_adapter_saved_as(lora::AdapterFormat::Mlx);
    assert!(!out.path().join("adapter_model.safetensors").exists());
    let ours =
        candle_core::safetensors::load(out.path().join("adapters.safetensors"), &Device::Cpu)
            .unwrap();
    for (path, (a, b)) in adapter.modules() {
        let mlx_a = &ours[&format!("{path}.lora_a")];
        let mlx_b = &ours[&format!("{path}.lora_b")];
        assert_eq!(
            mlx_a.dims(),
            [a.dim(1).unwrap(), a.dim(0).unwrap()],
            "{path}"
        );
        assert_eq!(relative_error(&mlx_a.t().unwrap(), a), 0.0, "{path}");
        assert_eq!(relative_error(&mlx_b.t().unwrap(), b), 0.0, "{path}");
    }
    assert_eq!(ours.len(), 2 * adapter.modules().count());
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let parameters = &config["lora_parameters"];
    assert_eq!(config["fine_tune_type"], "lora");
    assert_eq!(config["num_layers"], cfg.num_hidden_layers);
    assert_eq!(parameters["rank"], adapter.config.r);
    assert_eq!(parameters["scale"].as_f64().unwrap(), adapter.scale());
    assert!(parameters["keys"].as_array().unwrap().iter().all(|k| k
        .as_str()
        .unwrap()
        .starts_with("self_attn.")
        || k.as_str().unwrap().starts_with("mlp.")));

    assert_same_logits(&fixture("tiny-llama-lora"), out.path());
}

#[test]
fn an_mlx_adapter_that_does_not_fit_the_base_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["adapter_config.json", "adapters.safetensors"] {
        std::fs::copy(fixture("tiny-llama-mlx").join(name), dir.path().join(name)).unwrap();
    }
    let config_path = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, text.replace("\"rank\": 4", "\"rank\": 8")).unwrap();
    let err = Adapter::load(dir.path(), &base().config, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapters.safetensors") && err.contains(".lora_a has shape"),
        "{err}"
    );
    std::fs::write(&config_path, text.replace("\"lora\"", "\"dora\"")).unwrap();
    let err = Adapter::load(dir.path(), &base().config, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("dora"),
        "{err}"
    );
}

#[test]
fn saved_adapter_has_peft_names_shapes_and_config_and_same_logits() {
    let (_, _, out) = fixture_adapter_saved_as(lora::AdapterFormat::Peft);

    let theirs = tensors("tiny-llama-lora/adapter_model.safetensors");
    let ours =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut names: Vec<_> = ours.keys().collect();
    names.sort();
    let mut want: Vec<_> = theirs.keys().collect();
    want.sort();
    assert_eq!(names, want);
    for (name, t) in &ours {
        assert_eq!(t.dims(), theirs[name].dims(), "{name}");
        assert_eq!(t.dtype(), DType::F32);
    }

    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let peft = json("tiny-llama-lora/adapter_config.json");
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "use_rslora",
        "use_dora",
        "bias",
        "fan_in_fan_out",
        "base_model_name_or_path",
    ] {
        assert_eq!(config[key], peft[key], "adapter_config.json {key}");
    }

    assert_same_logits(&fixture("tiny-llama-lora"), out.path());
}

#[test]
fn new_adapter_starts_as_the_base_model_with_peft_keys() {
    let mut model = base();
    let lora = LoraSection {
        target_modules: vec!["q".into(), "v_proj".into()],
        ..LoraSection::default()
    };
    let adapter = Adapter::init(&lora, &model.config, 1, &Device::Cpu).unwrap();
    let vars = adapter.vars();
    assert_eq!(vars.len(), 2 * 2 * 2);
    assert_eq!(
        vars[0].0,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    let bound = 1.0 / 64f32.sqrt();
    for (name, var) in &vars {
        let max = var
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if name.contains("lora_B") {
            assert_eq!(max, 0.0, "{name} starts at zero");
        } else {
            assert!(max > 0.0 && max <= bound, "{name}: |A| max {max}");
        }
    }
    let before = model.forward(&batch(), None).unwrap();
    adapter.attach(&mut model).unwrap();
    let after = model.forward(&batch(), None).unwrap();
    assert_eq!(relative_error(&after, &before), 0.0);
    assert_eq!(
        adapter.config.target_modules,
        lora::TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
    );
}

/// torch.optim.AdamW's first step on `p` with gradient `g`.
fn adamw_step(p: &Tensor, g: &Tensor, step: &serde_json::Value) -> Tensor {
    let f = |k: &str| step[k].as_f64().unwrap();
    let (lr, eps, wd) = (f("lr"), f("eps"), f("weight_decay"));
    let b1 = step["betas"][0].as_f64().unwrap();
    let b2 = step["betas"][1].as_f64().unwrap();
    let m = (g * (1.0 - b1)).unwrap();
    let v = (g.sqr().unwrap() * (1.0 - b2)).unwrap();
    let m_hat = (m / (1.0 - b1)).unwrap();
    let v_hat = (v / (1.0 - b2)).unwrap();
    let update = (m_hat / (v_hat.sqrt().unwrap() + eps).unwrap()).unwrap();
    ((p * (1.0 - lr * wd)).unwrap() - (update * lr).unwrap()).unwrap()
}

#[test]
fn one_lora_training_step_matches_peft_and_torch_adamw() {
    let step = json("lora-step/step.json");
    let mut model = base();
    let adapter = Adapter::load(
        &fixture("lora-step/init"),
        &model.config,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .into_trainable()
    .unwrap();
    adapter.attach(&mut model).unwrap();
    model.set_adapter_dropout_seed(Some(0)); // lora_dropout is 0: masks must change nothing

    let loss = hf_mean_nll(&model, &batch());
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    let want = step["loss_before"].as_f64().unwrap();
    assert!(((got - want) / want).abs() < 1e-5, "loss {got} vs {want}");
    let grads = loss.backward().unwrap();

    for (name, weight) in model.named_parameters().unwrap() {
        assert!(grads.get(&weight).is_none(), "frozen {name} got a gradient");
    }
    let want_grads = tensors("lora-step/grads.safetensors");
    let after = tensors("lora-step/after.safetensors");
    let vars = adapter.vars();
    assert_eq!(vars.len(), after.len());
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let err = relative_error(g, &want_grads[&format!("grad.{name}")]);
        assert!(err < 1e-4, "{name}: gradient relative error {err}");
        var.set(&adamw_step(var.as_tensor(), g, &step)).unwrap();
        let diff = (var.as_tensor() - &after[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{name}: updated value off by {diff}");
    }
    model.set_adapter_dropout_seed(None);
    let got = loss_value(&model);
    let want = step["loss_after"].as_f64().unwrap();
    assert!(
        ((got - want) / want).abs() < 1e-4,
        "loss after {got} vs {want}"
    );
}

fn loss_value(model: &Llama) -> f64 {
    hf_mean_nll(model, &batch()).to_scalar::<f32>().unwrap() as f64
}

#[test]
fn dropout_masks_are_seeded_and_off_in_eval() {
    let mut model = base();
    let lora = LoraSection {
        dropout: 0.5,
        ..LoraSection::default()
    };
    let adapter = Adapter::init(&lora, &model.config, 3, &Device::Cpu).unwrap();
    for (_, var) in adapter.vars() {
        var.set(&(var.ones_like().unwrap() * 0.1).unwrap()).unwrap();
    }
    adapter.attach(&mut model).unwrap();
    let eval = loss_value(&model);
    model.set_adapter_dropout_seed(Some(11));
    let first = loss_value(&model);
    assert_eq!(first, loss_value(&model), "same seed, same masks");
    model.set_adapter_dropout_seed(Some(12));
    assert_ne!(first, loss_value(&model), "new seed, new masks");
    assert_ne!(first, eval);
    model.set_adapter_dropout_seed(None);
    assert_eq!(eval, loss_value(&model));
}

#[test]
fn merged_weights_give_the_adapter_logits() {
    let with = with_adapter(&fixture("tiny-llama-lora"));
    let base = base();
    let adapter = Adapter::load(
        &fixture("tiny-llama-lora"),
        &base.config,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let merged = lora::merge(&base.named_parameters().unwrap(), &adapter).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("merged");
    io::save(
        &dir,
        &io::ModelFiles {
            config: &base.config,
            tensors: &merged,
            tokenizer: model::tokenizer_files::TokenizerSource::Base(&fixture("tiny-llama")),
            dtype: DType::F32,
        },
    )
    .unwrap();
    let reloaded = model::load(&dir, DType::F32, &Device::Cpu).unwrap().model;
    let err = relative_error(
        &reloaded.forward(&batch(), None).unwrap(),
        &with.forward(&batch(), None).unwrap(),
    );
    assert!(err < 1e-5, "merged logits relative error {err}");
}

/// A copy of the `tiny-llama-lora` adapter with `edit` applied to its config.
fn edited_adapter(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut config = json("tiny-llama-lora/adapter_config.json");
    edit(&mut config);
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::copy(
        fixture("tiny-llama-lora/adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    dir
}

fn load_error(dir: &Path, cfg: &LlamaConfig) -> String {
    let err: ModelError = Adapter::load(dir, cfg, DType::F32, &Device::Cpu).unwrap_err();
    let message = err.to_string();
    assert_eq!(message.lines().count(), 1, "one line: {message}");
    message
}

#[test]
fn adapter_for_another_shape_is_refused_naming_file_and_key() {
    let mut cfg = base().config;
    cfg.intermediate_size = 96;
    // Without a base name to compare, the tensor shapes are what catches it.
    let dir = edited_adapter(|c| c["base_model_name_or_path"] = serde_json::Value::Null);
    let message = load_error(dir.path(), &cfg);
    assert!(message.contains("adapter_model.safetensors"), "{message}");
    assert!(message.contains("mlp."), "{message}");
    assert!(message.contains("another model"), "{message}");
}

#[test]
fn adapter_naming_a_different_local_base_is_refused() {
    let other = fixture("tiny-llama3").canonicalize().unwrap();
    let dir = edited_adapter(|c| {
        c["base_model_name_or_path"] = other.display().to_string().into();
    });
    let message = load_error(dir.path(), &base().config);
    assert!(message.contains("adapter_config.json"), "{message}");
    assert!(message.contains("base_model_name_or_path"), "{message}");
    // A bare hub name that is not a local directory is accepted.
    let dir = edited_adapter(|c| c["base_model_name_or_path"] = "someone/llama".into());
    Adapter::load(dir.path(), &base().config, DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn adapter_targeting_a_module_the_model_lacks_is_refused() {
    let dir = edited_adapter(|c| c["target_modules"] = serde_json::json!(["c_attn"]));
    let message = load_error(dir.path(), &base().config);
    assert!(message.contains("\"c_attn\""), "{message}");
    let lora = LoraSection {
        target_modules: vec!["qkv_proj".into()],
        ..LoraSection::default()
    };
    let err = Adapter::init(&lora, &base().config, 0, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("\"qkv_proj\""), "{err}");
}

#[test]
fn rank_zero_or_larger_than_the_layer_is_refused() {
    let dir = edited_adapter(|c| c["r"] = 0.into());
    assert!(load_error(dir.path(), &base().config).contains("r is 0"));
    let cfg = base().config;
    for (r, needle) in [(0, "r is 0"), (33, "k_proj (32x64)")] {
        let lora = LoraSection {
            r,
            ..LoraSection::default()
        };
        let err = Adapter::init(&lora, &cfg, 0, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
    // An adapter file whose rank disagrees with its config is a shape error.
    let dir = edited_adapter(|c| c["r"] = 8.into());
    assert!(load_error(dir.path(), &cfg).contains("r = 8"));
}

/// A fake Hugging Face cache under `home/hub` holding `tiny-llama` as `test/tiny-llama`,
/// optionally with its weights split into two shards and an index.
fn fake_hub(home: &Path, sharded: bool) {
    let repo = home.join("hub/models--test--tiny-llama");
    let snapshot = repo.join("snapshots/abc");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc").unwrap();
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-llama").join(file), snapshot.join(file)).unwrap();
    }
    if !sharded {
        std::fs::copy(
            fixture("tiny-llama/model.safetensors"),
            snapshot.join("model.safetensors"),
        )
        .unwrap();
        return;
    }
    let mut all: Vec<_> = tensors("tiny-llama/model.safetensors")
        .into_iter()
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let half = all.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&all[..half], &all[half..]].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let part: Vec<(String, Tensor)> = part.to_vec();
        candle_core::safetensors::save(&part.iter().cloned().collect(), snapshot.join(&file))
            .unwrap();
        for (name, _) in part {
            map.insert(name, file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        snapshot.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
}

fn merge_from_hub(sharded: bool) {
    let home = tempfile::tempdir().unwrap();
    fake_hub(home.path(), sharded);
    let out = home.path().join("merged");
    let run = |extra: &[&str]| {
        let mut cmd = llmtool();
        cmd.env("HF_HOME", home.path())
            .env_remove("HF_HUB_CACHE")
            .env("HF_HUB_OFFLINE", "1")
            .args(["merge", "--model", "test/tiny-llama", "--adapter"])
            .arg(fixture("tiny-llama-lora"))
            .arg("--out")
            .arg(&out)
            .args(extra);
        cmd.assert()
    };
    run(&[]).success();
    let merged = model::load(&out, DType::F32, &Device::Cpu).unwrap().model;
    let expected = tensors("tiny-llama-lora/expected.safetensors");
    let logits = merged.forward(&ids(&expected["input_ids"]), None).unwrap();
    let err = relative_error(&logits, &expected["logits"]);
    assert!(err < 1e-4, "merged logits vs PEFT: relative error {err}");
    assert!(out.join("tokenizer_config.json").is_file());
    run(&[])
        .failure()
        .stderr(predicates::str::contains("--force"));
    run(&["--force", "--dtype", "bf16"]).success();
    let config = io::read_config(&out).unwrap();
    assert_eq!(config.stored_dtype(), Some(DType::BF16));
    let merged16 = model::load(&out, DType::F32, &Device::Cpu).unwrap().model;
    let logits16 = merged16
        .forward(&ids(&expected["input_ids"]), None)
        .unwrap();
    let err = relative_error(&logits16, &expected["logits"]);
    assert!(
        err < 2e-2,
        "bf16 merged logits vs PEFT: relative error {err}"
    );
}

#[test]
fn merge_command_resolves_a_hub_id_from_the_cache() {
    merge_from_hub(false);
}

#[test]
fn merge_command_reads_a_sharded_hub_checkpoint() {
    merge_from_hub(true);
}

#[test]
fn estimate_resolves_a_hub_id_as_generate_does() {
    let home = tempfile::tempdir().unwrap();
    fake_hub(home.path(), false);
    let config = home.path().join("ft.yaml");
    std::fs::create_dir(home.path().join("notes")).unwrap();
    let text = "model:\n  pretrained: test/tiny-llama\ndata:\n  roots: [notes]\n";
    std::fs::write(&config, text).unwrap();
    let estimate = |cwd: &Path| {
        let mut cmd = llmtool();
        cmd.env("HF_HOME", home.path())
            .env_remove("HF_HUB_CACHE")
            .env("HF_HUB_OFFLINE", "1")
            .current_dir(cwd)
            .arg("estimate")
            .arg(&config);
        cmd.assert()
    };
    estimate(home.path())
        .success()
        .stdout(predicates::str::contains("parameters"));
    // Where `test/` is a local folder, `test/tiny-llama` is a mistyped path, not a hub id.
    std::fs::create_dir(home.path().join("test")).unwrap();
    estimate(home.path())
        .code(1)
        .stderr(predicates::str::contains(
            "test/tiny-llama: no such model directory (read as a local path",
        ));
}

#[test]
fn offline_and_not_cached_says_what_to_download() {
    let home = tempfile::tempdir().unwrap();
    llmtool()
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .args(["merge", "--model", "test/absent", "--adapter"])
        .arg(fixture("tiny-llama-lora"))
        .arg("--out")
        .arg(home.path().join("out"))
        .assert()
        .failure()
        .stderr(predicates::str::contains(
            "huggingface-cli download test/absent",
        ))
        .stderr(predicates::str::contains("HF_HUB_OFFLINE"));
}

/// The commit the fake hub of [`serve_hub`] serves.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A Hugging Face Hub on localhost holding the model `test/tiny-llama` at [`COMMIT`] with
/// `files`, answering as huggingface.co does: the repository's info with its file list, and HEAD
/// (ETag, X-Repo-Commit) and GET of each file. Returns its endpoint and the requests it
/// answered, one `METHOD path authorization` line each.
fn serve_hub(files: Vec<(&'static str, Vec<u8>)>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&log);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            answer(stream, &files, &seen);
        }
    });
    (endpoint, log)
}

/// One request of [`serve_hub`]'s, answered with `Connection: close`.
fn answer(mut stream: TcpStream, files: &[(&str, Vec<u8>)], log: &Mutex<Vec<String>>) {
    let Ok(read) = stream.try_clone() else {
        return;
    };
    let mut lines = BufReader::new(read).lines().map_while(Result::ok);
    let request = lines.next().unwrap_or_default();
    let auth = lines
        .take_while(|line| !line.is_empty())
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("authorization")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    let mut words = request.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    log.lock().unwrap().push(format!("{method} {path} {auth}"));
    let file = path
        .strip_prefix("/test/tiny-llama/resolve/main/")
        .and_then(|name| files.iter().find(|(f, _)| *f == name));
    let (status, headers, body) = if path == "/api/models/test/tiny-llama" {
        let siblings: Vec<_> = files
            .iter()
            .map(|(f, _)| serde_json::json!({ "rfilename": f }))
            .collect();
        let info =
            serde_json::json!({"id": "test/tiny-llama", "sha": COMMIT, "siblings": siblings});
        ("200 OK", String::new(), info.to_string().into_bytes())
    } else if let Some((name, bytes)) = file {
        let headers = format!("ETag: \"etag-{name}\"\r\nX-Repo-Commit: {COMMIT}\r\n");
        ("200 OK", headers, bytes.clone())
    } else {
        let headers = "X-Error-Code: EntryNotFound\r\n".to_string();
        ("404 Not Found", headers, Vec::new())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let _ = stream.write_all(&body);
    }
}

/// `llmtool estimate` of a fine-tuning config whose base is `test/tiny-llama`, run in `dir`
/// with the hub's environment variables cleared.
fn estimate_hub_model(dir: &Path) -> assert_cmd::Command {
    let config = dir.join("ft.yaml");
    std::fs::create_dir_all(dir.join("notes")).unwrap();
    let text = "model:\n  pretrained: test/tiny-llama\ndata:\n  roots: [notes]\n";
    std::fs::write(&config, text).unwrap();
    let mut cmd = llmtool();
    for var in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "XDG_CACHE_HOME",
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
    ] {
        cmd.env_remove(var);
    }
    // The fake hub is on localhost: no proxy in between.
    for var in ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(var);
    }
    cmd.current_dir(dir).arg("estimate").arg(&config);
    cmd
}

#[test]
fn a_hub_model_missing_from_the_cache_is_downloaded_in_huggingface_hubs_layout() {
    let model = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ];
    let files = model
        .into_iter()
        .map(|f| (f, std::fs::read(fixture("tiny-llama").join(f)).unwrap()))
        .chain([("consolidated.safetensors", b"the weights again".to_vec())])
        .collect();
    let (endpoint, log) = serve_hub(files);
    let home = tempfile::tempdir().unwrap();
    let estimate = |offline: &str| {
        let mut cmd = estimate_hub_model(home.path());
        cmd.env("HF_HOME", home.path())
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_TOKEN", "hf_test")
            .env("HF_HUB_OFFLINE", offline);
        cmd.assert()
            .success()
            .stdout(predicates::str::contains("parameters"));
    };
    estimate("0");
    let repo = home.path().join("hub/models--test--tiny-llama");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    let blobs = repo.join("blobs").canonicalize().unwrap();
    for file in model {
        let cached = repo.join("snapshots").join(COMMIT).join(file);
        assert!(cached.is_symlink(), "{file}: not a link into blobs/");
        assert!(cached.canonicalize().unwrap().starts_with(&blobs), "{file}");
        let want = std::fs::read(fixture("tiny-llama").join(file)).unwrap();
        assert_eq!(std::fs::read(&cached).unwrap(), want, "{file}");
    }
    let requests = log.lock().unwrap().clone();
    assert!(
        requests.iter().all(|r| r.ends_with(" Bearer hf_test")),
        "{requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.contains("consolidated")),
        "a file the model does not need was fetched: {requests:?}"
    );
    // A complete snapshot is used as it is, offline or not: the hub is not asked again.
    estimate("1");
    estimate("0");
    assert_eq!(log.lock().unwrap().len(), requests.len());
}

#[test]
fn the_hub_cache_is_found_where_huggingface_hub_looks_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let xdg = dir.path().join("xdg");
    fake_hub(&xdg.join("huggingface"), false);
    // A ref written by hand (`echo abc > refs/main`) ends in a newline.
    let refs = xdg.join("huggingface/hub/models--test--tiny-llama/refs/main");
    std::fs::write(refs, "abc\n").unwrap();
    let run = |vars: &[(&str, &Path)]| {
        let mut cmd = estimate_hub_model(dir.path());
        cmd.env("HF_HUB_OFFLINE", "1");
        for (var, value) in vars {
            cmd.env(var, value);
        }
        cmd.assert()
    };
    let hf_home = xdg.join("huggingface");
    run(&[("XDG_CACHE_HOME", &xdg)]).success();
    run(&[("HF_HOME", &hf_home)]).success();
    // HF_HUB_CACHE wins over HF_HOME, and HF_HOME over XDG_CACHE_HOME.
    run(&[
        ("HF_HOME", dir.path()),
        ("HF_HUB_CACHE", &hf_home.join("hub")),
    ])
    .success();
    let empty = dir.path().join("hub");
    run(&[("XDG_CACHE_HOME", &xdg), ("HF_HOME", dir.path())])
        .code(1)
        .stderr(predicates::str::contains(format!(
            "the Hugging Face cache at {} lacks its config.json",
            empty.display()
        )));
}

#[test]
fn bf16_base_stays_frozen_and_adapter_still_trains() {
    let dir = fixture("tiny-llama");
    let mut model = io::load_stored(&dir, DType::BF16, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let lora = LoraSection {
        target_modules: vec!["all-linear".into()],
        ..LoraSection::default()
    };
    let adapter = Adapter::init(&lora, &model.config, 2, &Device::Cpu).unwrap();
    adapter.attach(&mut model).unwrap();
    model.set_adapter_dropout_seed(Some(1));
    let loss = hf_mean_nll(&model, &batch());
    let want = json("tiny-llama/expected.json")["loss"].as_f64().unwrap();
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        ((got - want) / want).abs() < 1e-2,
        "bf16 base loss {got} vs {want}"
    );
    let grads = loss.backward().unwrap();
    for (name, weight) in model.named_parameters().unwrap() {
        assert_eq!(weight.dtype(), DType::BF16, "{name}");
        assert!(grads.get(&weight).is_none(), "frozen {name} got a gradient");
    }
    for (name, var) in adapter.vars() {
        assert!(grads.get(&var).is_some(), "{name} got no gradient");
    }
}

#[test]
fn adapter_with_a_missing_or_foreign_tensor_is_refused() {
    let cfg = base().config;
    let all = tensors("tiny-llama-lora/adapter_model.safetensors");
    let write = |keep: &dyn Fn(&str) -> bool, extra: Option<(&str, Tensor)>| {
        let dir = edited_adapter(|_| {});
        let mut picked: std::collections::HashMap<String, Tensor> = all
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some((name, t)) = extra {
            picked.insert(name.into(), t);
        }
        candle_core::safetensors::save(&picked, dir.path().join("adapter_model.safetensors"))
            .unwrap();
        load_error(dir.path(), &cfg)
    };
    let message = write(
        &|k| !k.ends_with("layers.1.mlp.up_proj.lora_B.weight"),
        None,
    );
    assert!(
        message.contains("layers.1.mlp.up_proj.lora_B.weight is missing"),
        "{message}"
    );
    let embedding = Tensor::zeros((4, 320), DType::F32, &Device::Cpu).unwrap();
    let foreign = "base_model.model.model.embed_tokens.lora_embedding_A";
    let message = write(&|_| true, Some((foreign, embedding)));
    assert!(message.contains(foreign), "{message}");
}
