//! Bad model inputs are refused with one line that names the file and the key or tensor, before
//! anything divides by a head count or allocates (issue 18, items 8 and 9): `config.json`
//! values that would panic or make no model, weights for more layers than the config has, and
//! NaN or infinite weights.

use candle_core::{DType, Device, Tensor};
use llmtool_model as model;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

/// A copy of the tiny-llama fixture with `edit` applied to its config.json.
fn model_dir(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    dir
}

/// The error of reading the config of the fixture with `key` set to `value`.
fn config_error(key: &str, value: Value) -> String {
    let dir = model_dir(|c| {
        c.insert(key.into(), value.clone());
    });
    match model::io::read_config(dir.path()) {
        Ok(_) => panic!("{key}: {value} was accepted"),
        Err(e) => {
            let message = e.to_string();
            let file = format!("{}: ", dir.path().join("config.json").display());
            assert_eq!(message.lines().count(), 1, "{message}");
            message
                .strip_prefix(&file)
                .unwrap_or_else(|| panic!("{message:?} does not start with {file:?}"))
                .to_string()
        }
    }
}

/// The error of loading the model in `dir`.
fn load_error(dir: &Path) -> String {
    match model::io::load_stored(dir, DType::F32, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn zero_heads_positions_sizes_and_layers_are_refused_naming_the_key() {
    for key in [
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "head_dim",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
    ] {
        assert_eq!(
            config_error(key, json!(0)),
            format!("{key}: must be at least 1, got 0")
        );
    }
}

/// Crashes of the `model_config` fuzz target: sizes that overflowed counting the parameters
/// (a panic), and a layer count whose tensor list exhausted memory, both accepted by `check`.
#[test]
fn sizes_layers_and_parameter_counts_beyond_any_model_are_refused_naming_the_key() {
    assert_eq!(
        config_error("num_hidden_layers", json!(1_000_000_000_000u64)),
        "num_hidden_layers: 1000000000000 is more than llmtool supports (at most 65536)"
    );
    assert_eq!(
        config_error("vocab_size", json!(1u64 << 40)),
        "vocab_size: 1099511627776 is more than llmtool supports (at most 16777216)"
    );
    let dir = model_dir(|c| {
        c.insert("vocab_size".into(), json!(1 << 24));
        c.insert("hidden_size".into(), json!(1 << 24));
        c.insert("num_attention_heads".into(), json!(1));
        c.insert("num_key_value_heads".into(), json!(1));
        c.insert("head_dim".into(), json!(64));
    });
    let message = model::io::read_config(dir.path()).unwrap_err().to_string();
    assert!(
        message.contains("parameters, more than llmtool can hold"),
        "{message}"
    );
}

#[test]
fn a_vocabulary_of_a_handful_of_tokens_is_refused() {
    for size in [0, 3] {
        assert_eq!(
            config_error("vocab_size", json!(size)),
            format!("vocab_size: must be at least 16, got {size}")
        );
    }
}

#[test]
fn heads_must_divide_the_hidden_size_and_each_other() {
    let dir = model_dir(|c| {
        c.remove("head_dim");
        c.insert("num_attention_heads".into(), json!(3));
        c.insert("num_key_value_heads".into(), json!(3));
    });
    let message = model::io::read_config(dir.path()).unwrap_err().to_string();
    assert!(
        message
            .contains("config.json: hidden_size (64) is not divisible by num_attention_heads (3)"),
        "{message}"
    );
    assert_eq!(
        config_error("num_key_value_heads", json!(3)),
        "num_attention_heads (4) is not divisible by num_key_value_heads (3)"
    );
}

#[test]
fn norm_epsilon_and_rope_theta_must_be_positive_and_finite() {
    for eps in [json!(0.0), json!(-1e-5)] {
        let message = config_error("rms_norm_eps", eps);
        assert!(
            message.starts_with("rms_norm_eps: must be a positive finite number"),
            "{message}"
        );
    }
    // The fixture's theta is in rope_parameters, which wins over the legacy key.
    assert_eq!(
        config_error(
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": 0.0})
        ),
        "rope_parameters.rope_theta: must be a positive finite number, got 0"
    );
    let dir = model_dir(|c| {
        c.remove("rope_parameters");
        c.insert("rope_theta".into(), json!(-10000.0));
    });
    let message = model::io::read_config(dir.path()).unwrap_err().to_string();
    assert!(
        message.ends_with("config.json: rope_theta: must be a positive finite number, got -10000"),
        "{message}"
    );
}

#[test]
fn positions_past_32_bits_are_refused_with_the_number_and_the_key() {
    assert!(config_error("max_position_embeddings", json!(1_000_000_000_000u64)).starts_with(
        "max_position_embeddings: 1000000000000 is more than llmtool can address (at most 4294967295"
    ));
}

#[test]
fn fewer_layers_than_the_weights_hold_names_the_first_unexpected_tensor() {
    let dir = model_dir(|c| {
        c.insert("num_hidden_layers".into(), json!(1));
    });
    assert_eq!(
        load_error(dir.path()),
        format!(
            "{}: tensor model.layers.1.input_layernorm.weight is not part of the model \
             config.json describes (num_hidden_layers is 1, the weights have a layer 1)",
            dir.path().join("model.safetensors").display()
        )
    );
}

#[test]
fn nan_and_infinite_weights_are_refused_naming_the_tensor() {
    let name = "model.layers.0.mlp.down_proj.weight";
    for (bad, dtype) in [(f32::NAN, DType::F32), (f32::INFINITY, DType::BF16)] {
        let dir = model_dir(|_| {});
        let file = dir.path().join("model.safetensors");
        let mut tensors: Vec<(String, Tensor)> =
            candle_core::safetensors::load(&file, &Device::Cpu)
                .unwrap()
                .into_iter()
                .collect();
        for (n, t) in &mut tensors {
            if n == name {
                let mut values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                values[7] = bad;
                values[100] = -bad;
                *t = Tensor::from_vec(values, t.dims(), &Device::Cpu).unwrap();
            }
            *t = t.to_dtype(dtype).unwrap();
        }
        model::weights::save_safetensors(&tensors, &file).unwrap();
        assert_eq!(
            load_error(dir.path()),
            format!(
                "{}: tensor {name} holds 2 NaN or infinite values",
                file.display()
            )
        );
    }
}

#[test]
fn the_fixture_and_a_long_context_still_load() {
    model::io::load_stored(&fixture(), DType::F32, DType::F32, &Device::Cpu).unwrap();
    let dir = model_dir(|c| {
        c.insert("max_position_embeddings".into(), json!(131_072));
    });
    let loaded = model::io::load_stored(dir.path(), DType::F32, DType::F32, &Device::Cpu);
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let logits = loaded.ok().unwrap().model.forward(&ids, None).unwrap();
    assert_eq!(logits.dims(), [1, 3, 320]);
}
