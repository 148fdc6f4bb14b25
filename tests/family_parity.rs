//! The newer families (Qwen3, Gemma 2, Gemma 3 text, Phi-3) against transformers and PEFT on the
//! committed fixtures of `tests/fixtures/make_family_fixtures.py`: logits, mean NLL, greedy
//! generation with the KV cache past the sliding window, PEFT adapters' NLL, merging, training
//! gradients, and bad family configs and checkpoints refused naming the file and key.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{copy_fixture, eval_error, fixture, hf_mean_nll, ids, json, relative_error, tensors};
use llmtool::eval::{tokenize, Document, Evaluator, Tally, WindowSpec};
use llmtool::generate::{GenerationSettings, SamplingParams, Session};
use llmtool::model::{self, io, Llama, LoadedModel, Weights};
use llmtool::train::{lora, Adapter};
use std::path::Path;

const FAMILIES: [&str; 4] = ["qwen3", "gemma2", "gemma3", "phi3"];

fn load(dir: &Path) -> LoadedModel {
    model::load(dir, DType::F32, &Device::Cpu).unwrap()
}

fn with_adapter(family: &str) -> LoadedModel {
    let mut loaded = load(&fixture(&format!("tiny-{family}")));
    let dir = fixture(&format!("tiny-{family}-lora"));
    let adapter = Adapter::load(&dir, &loaded.model.config, DType::F32, &Device::Cpu).unwrap();
    adapter.attach(&mut loaded.model).unwrap();
    loaded
}

fn input_ids(family: &str) -> Tensor {
    ids(&tensors(&format!("tiny-{family}/expected.safetensors"))["input_ids"])
}

/// Mean next-token NLL over every position, as HF computes with `labels=input_ids`.
fn loss(model: &Llama, input_ids: &Tensor) -> f64 {
    hf_mean_nll(model, input_ids).to_scalar::<f32>().unwrap() as f64
}

/// Mean NLL and tokens scored of `eval.txt` in one window, as `llmtool eval` scores it.
fn eval_nll(loaded: &LoadedModel) -> (f64, u64) {
    let text = std::fs::read_to_string(fixture("tiny-llama/eval.txt")).unwrap();
    let docs = vec![Document {
        name: "eval.txt".into(),
        text,
    }];
    let evaluator = Evaluator {
        model: &loaded.model,
        spec: WindowSpec::new(128, 64, 128).unwrap(),
        batch_size: 2,
    };
    let mut total = Tally::default();
    let tokens = tokenize(&loaded.tokenizer, &docs).unwrap();
    for score in evaluator.evaluate(&tokens, |_| {}).unwrap() {
        total.merge(&score.tally);
    }
    let m = total.metrics().unwrap();
    (m.nll_mean, m.tokens)
}

fn assert_close(what: &str, got: f64, want: f64) {
    assert!(
        ((got - want) / want).abs() < 1e-5,
        "{what}: got {got}, transformers {want}"
    );
}

fn check_eval(what: &str, loaded: &LoadedModel, expected: &serde_json::Value) {
    let single = &expected["eval"]["single_window"];
    let (mean, tokens) = eval_nll(loaded);
    assert_eq!(tokens, single["tokens_scored"].as_u64().unwrap(), "{what}");
    assert_close(what, mean, single["nll_mean"].as_f64().unwrap());
}

/// Greedy decoding of `max_tokens` tokens, not stopping at an end of sequence.
fn greedy(max_tokens: usize) -> GenerationSettings {
    GenerationSettings {
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        },
        stop: vec![],
        eos: vec![],
    }
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    let values = v.as_array().unwrap().iter();
    values.map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn logits_loss_and_eval_nll_match_transformers() {
    for family in FAMILIES {
        let name = format!("tiny-{family}");
        let loaded = load(&fixture(&name));
        let expected = json(&format!("{name}/expected.json"));
        let input = input_ids(family);
        let logits = loaded.model.forward(&input, None).unwrap();
        let want = &tensors(&format!("{name}/expected.safetensors"))["logits"];
        let err = relative_error(&logits, want);
        assert!(err < 1e-4, "{name}: logits relative error {err}");
        let want_loss = expected["loss"].as_f64().unwrap();
        assert_close(&name, loss(&loaded.model, &input), want_loss);
        check_eval(&name, &loaded, &expected);
    }
}

#[test]
fn greedy_generation_with_the_kv_cache_matches_transformers_past_the_window() {
    for family in FAMILIES {
        let name = format!("tiny-{family}");
        let expected = &json(&format!("{name}/expected.json"))["greedy"];
        let loaded = load(&fixture(&name));
        let mut session = Session::new(&loaded.model, &loaded.tokenizer, 64).unwrap();
        let prompt = u32s(&expected["prompt_ids"]);
        let settings = greedy(32);
        let out = session.generate(&prompt, &settings, |_| Ok(())).unwrap();
        assert_eq!(out.tokens, u32s(&expected["new_ids"]), "{name}");
    }
}

#[test]
fn peft_adapters_give_peft_nll_and_merge_into_the_same_model() {
    for family in FAMILIES {
        let name = format!("tiny-{family}-lora");
        let expected = json(&format!("{name}/expected.json"));
        let loaded = with_adapter(family);
        let input = input_ids(family);
        assert_close(
            &name,
            loss(&loaded.model, &input),
            expected["loss"].as_f64().unwrap(),
        );
        check_eval(&name, &loaded, &expected);

        let base = load(&fixture(&format!("tiny-{family}"))).model;
        let dir = fixture(&name);
        let adapter = Adapter::load(&dir, &base.config, DType::F32, &Device::Cpu).unwrap();
        let merged = lora::merge(&base.named_parameters().unwrap(), &adapter).unwrap();
        let out = tempfile::tempdir().unwrap();
        let merged_dir = out.path().join("merged");
        let base_dir = fixture(&format!("tiny-{family}"));
        let files = io::ModelFiles {
            config: &base.config,
            tensors: &merged,
            tokenizer: llmtool::model::tokenizer_files::TokenizerSource::Base(&base_dir),
            dtype: DType::F32,
        };
        io::save(&merged_dir, &files).unwrap();
        let reloaded = load(&merged_dir).model;
        let err = relative_error(
            &reloaded.forward(&input, None).unwrap(),
            &loaded.model.forward(&input, None).unwrap(),
        );
        assert!(err < 1e-5, "{name}: merged logits relative error {err}");
    }
}

#[test]
fn training_loss_and_gradients_match_transformers() {
    for family in FAMILIES {
        let dir = fixture(&format!("tiny-{family}"));
        let cfg = io::read_config(&dir).unwrap();
        let files = io::weight_files(&dir).unwrap();
        let weights = Weights::read(&files, DType::F32, &Device::Cpu).unwrap();
        let (weights, vars) = weights.into_trainable().unwrap();
        let model = Llama::new(&cfg, &weights, DType::F32).unwrap();
        let input = input_ids(family);
        let t = input.dim(1).unwrap();
        let x = model.embed(&input.narrow(1, 0, t - 1).unwrap()).unwrap();
        let x = (0..model.layers.len()).fold(x, |x, i| model.block(i, &x, 0, None).unwrap());
        let targets = input.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
        let weights = Tensor::ones(t - 1, DType::F32, &Device::Cpu).unwrap();
        let mean = model.mean_nll(&x, &targets, &weights).unwrap();
        let want = json(&format!("tiny-{family}/expected.json"))["loss"]
            .as_f64()
            .unwrap();
        assert_close(family, mean.to_scalar::<f32>().unwrap() as f64, want);
        let grads = mean.backward().unwrap();
        for (name, var) in &vars {
            assert!(grads.get(var).is_some(), "{family}: {name} got no gradient");
        }
        let expected = tensors(&format!("tiny-{family}/expected.safetensors"));
        let mut compared = 0;
        for (name, want) in expected
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("grad.")?, v)))
        {
            let var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
            let err = relative_error(grads.get(var).unwrap(), want);
            assert!(err < 1e-4, "{family}: {name} gradient relative error {err}");
            compared += 1;
        }
        assert!(compared >= 5, "{family}: {compared} gradients compared");
    }
}

#[test]
fn phi3_saves_its_stacked_weights_under_their_names_and_adapts_them_whole() {
    let dir = fixture("tiny-phi3");
    let model = load(&dir).model;
    let stored = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu);
    let stored = stored.unwrap();
    let saved = model.named_parameters().unwrap();
    assert_eq!(saved.len(), stored.len());
    for (name, tensor) in &saved {
        let err = relative_error(tensor, &stored[name]);
        assert!(err == 0.0, "{name}: {err}");
    }
    // A new adapter targets PEFT's names for Phi-3; the seven separate names are refused.
    let lora = |targets: &[&str]| llmtool::config::LoraSection {
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    let adapter = Adapter::init(&lora(&["all-linear"]), &model.config, 0, &Device::Cpu).unwrap();
    let modules: Vec<&String> = adapter.modules().map(|(path, _)| path).collect();
    assert_eq!(
        modules[..4],
        [
            "model.layers.0.mlp.down_proj",
            "model.layers.0.mlp.gate_up_proj",
            "model.layers.0.self_attn.o_proj",
            "model.layers.0.self_attn.qkv_proj"
        ]
    );
    let error = Adapter::init(&lora(&["q_proj"]), &model.config, 0, &Device::Cpu).unwrap_err();
    assert!(error
        .to_string()
        .contains("it has qkv_proj, o_proj, gate_up_proj, down_proj"));
    // An adapter of the separate projections does not fit Phi-3's modules.
    let adapted = tempfile::tempdir().unwrap();
    let llama_adapter = fixture("tiny-llama-lora");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(llama_adapter.join(file), adapted.path().join(file)).unwrap();
    }
    let error = Adapter::load(adapted.path(), &model.config, DType::F32, &Device::Cpu);
    let error = error.unwrap_err().to_string();
    assert!(
        error.contains("the adapter was made for another model"),
        "{error}"
    );
}

/// A copy of the fixture `name` whose config.json is its `config.legacy.json`: the
/// transformers-4 spelling of the same config.
fn legacy_spelling(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(name, dir.path());
    std::fs::copy(
        fixture(&format!("{name}/config.legacy.json")),
        dir.path().join("config.json"),
    )
    .unwrap();
    dir
}

#[test]
fn gemma3_legacy_config_spelling_gives_the_same_logits() {
    let dir = legacy_spelling("tiny-gemma3");
    let input = input_ids("gemma3");
    let legacy = load(dir.path()).model.forward(&input, None).unwrap();
    let want = &tensors("tiny-gemma3/expected.safetensors")["logits"];
    let err = relative_error(&legacy, want);
    assert!(err < 1e-4, "legacy config logits relative error {err}");
}

/// tests/fixtures/make_longrope_fixture.py: a Phi-3 with LongRoPE, its original context 16.
#[test]
fn longrope_switches_factors_past_the_original_context_as_transformers_does() {
    let dir = legacy_spelling("tiny-phi3-longrope");
    let expected = tensors("tiny-phi3-longrope/expected.safetensors");
    for model_dir in [fixture("tiny-phi3-longrope"), dir.path().to_path_buf()] {
        let loaded = load(&model_dir);
        // 12 positions: the short factors; 24: the long ones on every position.
        for length in ["short", "long"] {
            let input = ids(&expected[&format!("{length}_ids")]);
            let logits = loaded.model.forward(&input, None).unwrap();
            let err = relative_error(&logits, &expected[&format!("{length}_logits")]);
            assert!(
                err < 1e-4,
                "{}: {length} logits relative error {err}",
                model_dir.display()
            );
        }
        // Decoding crosses position 16: later tokens take the long factors.
        let greedy_case = &json("tiny-phi3-longrope/expected.json")["greedy"];
        let mut session = Session::new(&loaded.model, &loaded.tokenizer, 64).unwrap();
        let prompt = u32s(&greedy_case["prompt_ids"]);
        let out = session.generate(&prompt, &greedy(24), |_| Ok(())).unwrap();
        assert_eq!(
            out.tokens,
            u32s(&greedy_case["new_ids"]),
            "{}",
            model_dir.display()
        );
    }
}

#[test]
fn longrope_factors_that_do_not_fit_the_head_are_one_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("tiny-phi3-longrope", dir.path());
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["rope_parameters"]["long_factor"] = serde_json::json!([1.0, 2.0]);
    std::fs::write(&path, config.to_string()).unwrap();
    let err = eval_error(dir.path());
    assert!(
        err.contains("config.json") && err.contains("rope_parameters.long_factor: has 2 factors"),
        "{err}"
    );
}

/// A copy of the `tiny-qwen3` fixture with `edit` applied to its config.json and the
/// tensors `keep` accepts.
fn edited_qwen3(
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    keep: impl Fn(&str) -> bool,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("tiny-qwen3");
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let text = std::fs::read_to_string(source.join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(config.as_object_mut().unwrap());
    let text = serde_json::to_string_pretty(&config).unwrap();
    std::fs::write(dir.path().join("config.json"), text).unwrap();
    let tensors = candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu);
    let kept: Vec<(String, Tensor)> = tensors
        .unwrap()
        .into_iter()
        .filter(|(name, _)| keep(name))
        .collect();
    let path = dir.path().join("model.safetensors");
    model::weights::save_safetensors(&kept, &path).unwrap();
    dir
}

#[test]
fn a_family_option_llmtool_lacks_is_one_error_naming_file_and_key() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        (
            "use_bidirectional_attention",
            serde_json::json!(true),
            "use_bidirectional_attention: bidirectional attention is not supported",
        ),
        (
            "layer_types",
            serde_json::json!(["full_attention", "chunked_attention"]),
            "layer_types: chunked_attention is not supported",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
            "rope_parameters.rope_type: yarn is not supported",
        ),
        (
            "attention_bias",
            serde_json::json!(true),
            "attention_bias: biases in Qwen3 attention are not supported",
        ),
    ];
    for (key, value, message) in cases {
        let dir = edited_qwen3(|c| drop(c.insert(key.into(), value)), |_| true);
        let error = eval_error(dir.path());
        let file = dir.path().join("config.json").display().to_string();
        assert!(error.contains(&format!("{file}: {message}")), "{error}");
    }
}

#[test]
fn a_checkpoint_missing_a_family_tensor_is_one_error_naming_file_and_tensor() {
    let name = "model.layers.1.self_attn.q_norm.weight";
    let dir = edited_qwen3(|_| {}, |n| n != name);
    let error = eval_error(dir.path());
    let file = dir.path().join("model.safetensors").display().to_string();
    assert!(
        error.contains(&format!("{file}: tensor {name} is missing")),
        "{error}"
    );
}

#[test]
fn qwen3_without_a_window_or_with_one_covering_the_context_computes_the_same() {
    // No window: q/k norms, then the fused attention and KV-cache kernels in every layer. A
    // window wider than the context masks nothing, so its layer takes the same fused path
    // (tiny-qwen3's own window of 8 mixes both paths, checked against transformers above).
    let fused = edited_qwen3(
        |c| drop(c.insert("use_sliding_window".into(), false.into())),
        |_| true,
    );
    let wide = edited_qwen3(
        |c| drop(c.insert("sliding_window".into(), 4096.into())),
        |_| true,
    );
    let (fused, wide) = (load(fused.path()), load(wide.path()));
    let input = input_ids("qwen3");
    let err = relative_error(
        &fused.model.forward(&input, None).unwrap(),
        &wide.model.forward(&input, None).unwrap(),
    );
    assert!(
        err < 1e-5,
        "no window against a wide one: relative error {err}"
    );
    let prompt = u32s(&json("tiny-qwen3/expected.json")["greedy"]["prompt_ids"]);
    let settings = greedy(40);
    let generate = |loaded: &LoadedModel| {
        let mut session = Session::new(&loaded.model, &loaded.tokenizer, 64).unwrap();
        session
            .generate(&prompt, &settings, |_| Ok(()))
            .unwrap()
            .tokens
    };
    assert_eq!(generate(&fused), generate(&wide));
}
