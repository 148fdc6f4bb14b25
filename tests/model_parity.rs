//! The Llama model against Hugging Face transformers: logits, loss and gradients on committed
//! fixtures made by `tests/fixtures/make_fixtures.py`, plus a finite-difference check.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::{fixture, ids, json, relative_error, tensors};
use llmtool::model::{self, Llama, Weights};
use llmtool::ops;

fn loss(model: &Llama, input_ids: &Tensor) -> Tensor {
    let (b, t) = input_ids.dims2().unwrap();
    let logits = model
        .forward(&input_ids.narrow(1, 0, t - 1).unwrap(), None)
        .unwrap();
    let logits = logits.reshape((b * (t - 1), ())).unwrap();
    let targets = input_ids
        .narrow(1, 1, t - 1)
        .unwrap()
        .flatten_all()
        .unwrap();
    let weights = Tensor::ones(b * (t - 1), model.dtype(), &Device::Cpu).unwrap();
    ops::masked_mean_nll(&logits, &targets, &weights).unwrap()
}

fn check_logits(name: &str) {
    let loaded = model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
    let expected = tensors(&format!("{name}/expected.safetensors"));
    let input = ids(&expected["input_ids"]);
    let logits = loaded.model.forward(&input, None).unwrap();
    let err = relative_error(&logits, &expected["logits"]);
    assert!(err < 1e-4, "{name}: logits relative error {err}");
}

#[test]
fn llama_logits_match_transformers() {
    check_logits("tiny-llama");
}

#[test]
fn llama3_rope_scaling_and_tied_head_match_transformers() {
    check_logits("tiny-llama3");
}

#[test]
fn qwen2_with_qkv_bias_matches_transformers() {
    check_logits("tiny-qwen2");
}

#[test]
fn llama3_inverse_frequencies_match_transformers() {
    let expected = json("tiny-llama3/expected.json");
    for case in expected["rope_inv_freq_cases"].as_array().unwrap() {
        let scaling: model::config::RopeScaling =
            serde_json::from_value(case["rope_scaling"].clone()).unwrap();
        let got = model::rope::inverse_frequencies(
            case["head_dim"].as_u64().unwrap() as usize,
            case["rope_theta"].as_f64().unwrap(),
            Some(&scaling),
        );
        let want: Vec<f64> = serde_json::from_value(case["inv_freq"].clone()).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1e-6),
                "{}: {g} vs {w}",
                case["name"]
            );
        }
    }
}

#[test]
fn loss_and_gradients_match_transformers() {
    let dir = fixture("tiny-llama");
    let cfg = model::io::read_config(&dir).unwrap();
    let weights = Weights::read(
        &model::io::weight_files(&dir).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (weights, vars) = weights.into_trainable().unwrap();
    let model = Llama::new(&cfg, &weights, DType::F32).unwrap();
    let expected = tensors("tiny-llama/expected.safetensors");
    let loss = loss(&model, &ids(&expected["input_ids"]));
    let want = expected["loss"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(((got - want) / want).abs() < 1e-5, "loss {got} vs {want}");
    let grads = loss.backward().unwrap();
    for (name, want) in expected
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("grad.")?, v)))
    {
        let var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let err = relative_error(got, want);
        assert!(err < 1e-4, "{name}: gradient relative error {err}");
    }
    for (name, var) in &vars {
        assert!(grads.get(var).is_some(), "{name} received no gradient");
    }
}

#[test]
fn gradients_agree_with_finite_differences() {
    let dir = fixture("tiny-llama");
    let cfg = model::io::read_config(&dir).unwrap();
    let weights = Weights::read(
        &model::io::weight_files(&dir).unwrap(),
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let (weights, vars) = weights.into_trainable().unwrap();
    let model = Llama::new(&cfg, &weights, DType::F64).unwrap();
    let input = ids(&tensors("tiny-llama/expected.safetensors")["input_ids"])
        .narrow(0, 0, 1)
        .unwrap();
    let grads = loss(&model, &input).backward().unwrap();
    let eps = 1e-5;
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.embed_tokens.weight",
    ] {
        let var: &Var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
        let analytic = grads.get(var).unwrap().flatten_all().unwrap();
        let original = var.as_tensor().copy().unwrap();
        let flat = original.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // The entry with the largest gradient, so the difference is well above rounding.
        let analytic_values = analytic.to_vec1::<f64>().unwrap();
        let (i, _) = analytic_values
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let at = |delta: f64| {
            let mut v = flat.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, original.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&model, &input).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        var.set(&original).unwrap();
        let rel = (numeric - analytic_values[i]).abs() / analytic_values[i].abs();
        assert!(
            rel < 1e-4,
            "{name}[{i}]: numeric {numeric} vs analytic {}",
            analytic_values[i]
        );
    }
}

#[test]
fn saved_model_reloads_with_identical_logits() {
    let loaded = model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    let tensors_to_save = loaded.model.named_parameters().unwrap();
    let files = model::io::ModelFiles {
        config: &loaded.model.config,
        tensors: &tensors_to_save,
        tokenizer: model::tokenizer_files::TokenizerSource::Base(&fixture("tiny-llama")),
        dtype: DType::F32,
    };
    model::io::save(&dir, &files).unwrap();
    // Saving again replaces the directory whole.
    model::io::save(&dir, &files).unwrap();
    let reloaded = model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let input = ids(&tensors("tiny-llama/expected.safetensors")["input_ids"]);
    let a = loaded.model.forward(&input, None).unwrap();
    let b = reloaded.model.forward(&input, None).unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // The base's tokenizer files are carried over as they are.
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(dir.join(name)).unwrap(),
            std::fs::read(fixture("tiny-llama").join(name)).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn a_model_saved_in_bf16_says_so_and_reloads_with_its_weights_rounded() {
    let loaded = model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    let tensors_to_save = loaded.model.named_parameters().unwrap();
    model::io::save(
        &dir,
        &model::io::ModelFiles {
            config: &loaded.model.config,
            tensors: &tensors_to_save,
            tokenizer: model::tokenizer_files::TokenizerSource::Base(&fixture("tiny-llama")),
            dtype: DType::BF16,
        },
    )
    .unwrap();
    let config = model::io::read_config(&dir).unwrap();
    assert_eq!(config.torch_dtype.as_deref(), Some("bfloat16"));
    assert_eq!(config.stored_dtype(), Some(DType::BF16));
    let stored =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(stored.len(), tensors_to_save.len());
    for (name, tensor) in &tensors_to_save {
        let saved = &stored[name];
        assert_eq!(saved.dtype(), DType::BF16, "{name}");
        let rounded = tensor
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let back = saved.to_dtype(DType::F32).unwrap();
        assert_eq!(
            rounded.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn cached_decoding_matches_full_forward() {
    let loaded = model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let m = &loaded.model;
    let input = ids(&tensors("tiny-llama/expected.safetensors")["input_ids"])
        .narrow(0, 0, 1)
        .unwrap();
    let full = m.forward(&input, None).unwrap();
    let mut cache = model::Cache::new(m, 64);
    let prefix = m
        .forward(&input.narrow(1, 0, 10).unwrap(), Some(&mut cache))
        .unwrap();
    let mut last = prefix.narrow(1, 9, 1).unwrap();
    for t in 10..16 {
        last = m
            .forward(&input.narrow(1, t, 1).unwrap(), Some(&mut cache))
            .unwrap();
    }
    let err = relative_error(&last, &full.narrow(1, 15, 1).unwrap());
    assert!(err < 1e-5, "cached vs full: {err}");
}

/// Greedy cached decoding of `m` from the fixture's first 6 tokens: the logits of each step.
fn decode_steps(m: &model::Llama, input: &Tensor) -> Vec<Tensor> {
    let mut cache = model::Cache::new(m, 32);
    let mut logits = m
        .forward(&input.narrow(1, 0, 6).unwrap(), Some(&mut cache))
        .unwrap();
    let mut steps = vec![logits.narrow(1, 5, 1).unwrap()];
    for _ in 0..8 {
        let next = logits
            .i((0, logits.dim(1).unwrap() - 1))
            .unwrap()
            .argmax(0)
            .unwrap();
        logits = m
            .forward(&next.reshape((1, 1)).unwrap(), Some(&mut cache))
            .unwrap();
        steps.push(logits.clone());
    }
    steps
}

#[test]
fn stacked_projections_decode_like_separate_ones() {
    // tiny-qwen2 has q/k/v biases (stacked too); both fixtures use grouped kv heads.
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixture(name);
        let stacked = model::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let separate = model::io::load_stored(&dir, DType::F32, DType::F32, &Device::Cpu).unwrap();
        let input = ids(&tensors(&format!("{name}/expected.safetensors"))["input_ids"])
            .narrow(0, 0, 1)
            .unwrap();
        let (a, b) = (
            decode_steps(&stacked.model, &input),
            decode_steps(&separate.model, &input),
        );
        for (step, (a, b)) in a.iter().zip(&b).enumerate() {
            let err = relative_error(a, b);
            assert!(err < 1e-5, "{name} step {step}: {err}");
        }
        // The stacked weights are views: the separate projections still read the same values.
        let named = stacked.model.named_parameters().unwrap();
        let (_, q) = named
            .iter()
            .find(|(n, _)| n.ends_with("0.self_attn.k_proj.weight"))
            .unwrap();
        let want = separate.model.named_parameters().unwrap();
        let (_, w) = want
            .iter()
            .find(|(n, _)| n.ends_with("0.self_attn.k_proj.weight"))
            .unwrap();
        assert_eq!(relative_error(q, w), 0.0);
    }
}

#[test]
fn corrupt_and_missing_files_give_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("model.safetensors"), b"not really").unwrap();
    let err = model::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors: not a valid safetensors file"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = model::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors: missing"), "{err}");
    // A tokenizer for a bigger vocabulary than the model's embeddings.
    let mut cfg = json("tiny-llama/config.json");
    cfg["vocab_size"] = 100.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture("tiny-llama/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let err = model::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.json: has 320 tokens but the model has only 100"),
        "{err}"
    );
    // Weights that do not fit the config.
    std::fs::copy(
        fixture("tiny-llama/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    cfg["vocab_size"] = 400.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = model::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("has shape [320, 64], the config needs [400, 64]"),
        "{err}"
    );
}
