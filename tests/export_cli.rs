//! `llmtool export --gguf` run as the real binary on the committed tiny fixtures of every
//! family, read back with candle's GGUF reader: llama.cpp's keys, tensor names, shapes and
//! types, and the values (un-permuted, Gemma's norms less the 1 the converter adds) against
//! the source weights; q8_0 within its rounding; bad inputs as one error line.

mod common;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::{copy_fixture, fixture, llmtool};
use model::family::Family;
use model::gguf::{gguf_tensor_name, permute_rotary};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exports `model` (a fixture name or a path) to `out` with extra `args`; asserts success and
/// returns what it printed on stderr (its warnings).
fn export(model: &Path, out: &Path, args: &[&str]) -> String {
    let run = llmtool()
        .args(["export", "--gguf", "--model", s(model), "--out", s(out)])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stderr}");
    stderr
}

struct Read {
    content: Content,
    tensors: HashMap<String, (GgmlDType, Tensor)>,
}

fn read(path: &Path) -> Read {
    let mut file = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let t = q.dequantize(&Device::Cpu).unwrap();
        tensors.insert(name.clone(), (q.dtype(), t));
    }
    Read { content, tensors }
}

impl Read {
    fn meta(&self, key: &str) -> &Value {
        self.content
            .metadata
            .get(key)
            .unwrap_or_else(|| panic!("missing key {key}"))
    }
    fn u32(&self, key: &str) -> u32 {
        self.meta(key).to_u32().unwrap()
    }
    fn f32(&self, key: &str) -> f32 {
        self.meta(key).to_f32().unwrap()
    }
    fn str(&self, key: &str) -> &str {
        self.meta(key).to_string().unwrap()
    }
    fn bool(&self, key: &str) -> bool {
        self.meta(key).to_bool().unwrap()
    }
    fn array<T>(&self, key: &str, of: impl Fn(&Value) -> T) -> Vec<T> {
        self.meta(key).to_vec().unwrap().iter().map(of).collect()
    }
}

fn config(dir: &Path) -> model::LlamaConfig {
    model::io::read_config(dir).unwrap()
}

/// The inverse of the converter's Q/K permutation.
fn unpermute(t: &Tensor, heads: usize) -> Tensor {
    let dims = t.dims().to_vec();
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, dims[0] / heads / 2, 2, rest))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Checks every source tensor of `dir` against the GGUF's, as f16 (matrices) or f32 (vectors).
fn check_values(dir: &Path, gguf: &Read, arch: &str) {
    let cfg = config(dir);
    let family = Family::of(&cfg);
    let source =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    for (hf, src) in &source {
        let Some(name) = gguf_tensor_name(hf, &family).unwrap() else {
            continue;
        };
        let (dtype, t) = gguf.tensors.get(&name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(t.dims(), src.dims(), "{name}");
        let want_type = if src.rank() == 1 {
            GgmlDType::F32
        } else {
            GgmlDType::F16
        };
        assert_eq!(*dtype, want_type, "{name}");
        let mut t = t.to_dtype(DType::F32).unwrap();
        if arch == "llama" && hf.contains("self_attn.q_proj") {
            t = unpermute(&t, cfg.num_attention_heads);
        }
        if arch == "llama" && hf.contains("self_attn.k_proj") {
            t = unpermute(&t, cfg.kv_heads());
        }
        if arch.starts_with("gemma") && hf.ends_with("norm.weight") {
            t = (t - 1.0).unwrap();
        }
        let src = src.to_dtype(DType::F32).unwrap();
        let rounded = match src.rank() {
            1 => src.clone(),
            _ => src
                .to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        };
        let diff = max_abs_diff(&t, &rounded);
        assert!(diff <= 1e-6, "{name}: {diff}");
    }
}

const FAMILIES: [(&str, &str); 7] = [
    ("tiny-llama", "llama"),
    ("tiny-llama3", "llama"),
    ("tiny-qwen2", "qwen2"),
    ("tiny-qwen3", "qwen3"),
    ("tiny-gemma2", "gemma2"),
    ("tiny-gemma3", "gemma3"),
    ("tiny-phi3", "phi3"),
];

#[test]
fn every_family_exports_as_llama_cpp_names_and_lays_it_out() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, arch) in FAMILIES {
        let dir = fixture(name);
        let out = tmp.path().join(name).join("model.gguf");
        export(&dir, &out, &[]);
        let g = read(&out);
        let cfg = config(&dir);
        assert_eq!(g.str("general.architecture"), arch, "{name}");
        assert_eq!(g.u32("general.file_type"), 1);
        let key = |k: &str| format!("{arch}.{k}");
        assert_eq!(g.u32(&key("block_count")), 2);
        assert_eq!(g.u32(&key("context_length")), 128);
        assert_eq!(g.u32(&key("embedding_length")) as usize, cfg.hidden_size);
        assert_eq!(
            g.u32(&key("feed_forward_length")) as usize,
            cfg.intermediate_size
        );
        assert_eq!(g.u32(&key("attention.head_count")), 4);
        assert_eq!(
            g.u32(&key("attention.head_count_kv")) as usize,
            cfg.kv_heads()
        );
        assert_eq!(
            g.u32(&key("attention.key_length")) as usize,
            cfg.head_size()
        );
        assert_eq!(
            g.u32(&key("rope.dimension_count")) as usize,
            cfg.rotary_dim()
        );
        let eps = g.f32(&key("attention.layer_norm_rms_epsilon"));
        assert_eq!(eps, cfg.rms_norm_eps as f32);
        assert_eq!(g.str("tokenizer.ggml.model"), "gpt2");
        assert_eq!(g.str("tokenizer.ggml.pre"), "gpt-2");
        let tokens = g.meta("tokenizer.ggml.tokens").to_vec().unwrap();
        assert_eq!(tokens.len(), 320);
        assert_eq!(tokens[0].to_string().unwrap(), "<|endoftext|>");
        let types = g.meta("tokenizer.ggml.token_type").to_vec().unwrap();
        assert_eq!(
            types[0].to_i32().unwrap(),
            3,
            "<|endoftext|> is a control token"
        );
        assert!(!g.meta("tokenizer.ggml.merges").to_vec().unwrap().is_empty());
        assert_eq!(g.u32("tokenizer.ggml.eos_token_id"), 0);
        assert_eq!(g.u32("tokenizer.ggml.bos_token_id"), 0);
        assert_eq!(g.u32("tokenizer.ggml.padding_token_id"), 1);
        assert!(!g.meta("tokenizer.ggml.add_bos_token").to_bool().unwrap());
        assert!(g.str("tokenizer.chat_template").contains("<|im_start|>"));
        check_values(&dir, &g, arch);
        let modelfile = std::fs::read_to_string(out.with_file_name("Modelfile")).unwrap();
        assert!(modelfile.starts_with("FROM ./model.gguf\n"), "{modelfile}");
        // The fixtures' template (ChatML turns ended by <|endoftext|>) is no family's: no
        // TEMPLATE, Ollama reads the GGUF's; the eos still stops generation.
        assert!(!modelfile.contains("TEMPLATE \"\"\""), "{modelfile}");
        assert!(
            modelfile.contains("PARAMETER stop \"<|endoftext|>\""),
            "{modelfile}"
        );
        // Per family: the tensors the converter adds or drops, and the keys only it has.
        let has = |t: &str| g.tensors.contains_key(t);
        match name {
            "tiny-llama" => assert!(has("output.weight") && !has("rope_freqs.weight")),
            "tiny-llama3" => {
                assert!(has("rope_freqs.weight") && !has("output.weight"));
                let f = g.tensors["rope_freqs.weight"].1.to_vec1::<f32>().unwrap();
                assert_eq!(f.len(), 8);
                assert_eq!(g.f32("llama.rope.freq_base"), 500000.0);
            }
            "tiny-gemma2" => {
                assert!(!has("output.weight"));
                assert!(
                    has("blk.0.post_attention_norm.weight") && has("blk.1.post_ffw_norm.weight")
                );
                assert_eq!(g.f32("gemma2.attn_logit_softcapping"), 1.0);
                assert_eq!(g.f32("gemma2.final_logit_softcapping"), 3.0);
                assert_eq!(g.u32("gemma2.attention.sliding_window"), 8);
            }
            "tiny-gemma3" => {
                assert!(has("blk.0.attn_q_norm.weight") && !has("output.weight"));
                assert_eq!(g.str("gemma3.rope.scaling.type"), "linear");
                assert_eq!(g.f32("gemma3.rope.scaling.factor"), 2.0);
                assert_eq!(g.f32("gemma3.rope.freq_base"), 100000.0);
                assert_eq!(g.u32("gemma3.attention.sliding_window"), 8);
            }
            "tiny-phi3" => {
                assert!(has("blk.0.attn_qkv.weight") && has("blk.0.ffn_up.weight"));
                assert!(!has("blk.0.ffn_gate.weight"));
                // Tied: llama.cpp's phi3 reads output.weight, a copy of the table.
                assert!(has("output.weight"));
                assert_eq!(g.u32("phi3.attention.sliding_window"), 8);
            }
            "tiny-qwen2" => assert!(has("blk.0.attn_q.bias")),
            "tiny-qwen3" => assert!(has("blk.0.attn_k_norm.weight")),
            _ => {}
        }
    }
}

#[test]
fn q8_0_and_q4_k_m_round_trip_within_their_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-llama");
    let source =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let q8 = tmp.path().join("q8/model.gguf");
    export(&dir, &q8, &["--quant", "q8_0"]);
    let g = read(&q8);
    assert_eq!(g.u32("general.file_type"), 7);
    assert_eq!(g.u32("general.quantization_version"), 2);
    let (ty, down) = &g.tensors["blk.0.ffn_down.weight"];
    assert_eq!(*ty, GgmlDType::Q8_0);
    let src = &source["model.layers.0.mlp.down_proj.weight"];
    let err = common::relative_error(down, src);
    assert!(err < 0.01, "q8_0 relative error {err}");
    assert_eq!(g.tensors["blk.0.attn_norm.weight"].0, GgmlDType::F32);

    let q4 = tmp.path().join("q4/model.gguf");
    export(&dir, &q4, &["--quant", "q4_k_m"]);
    let g = read(&q4);
    assert_eq!(g.u32("general.file_type"), 15);
    // Rows of 64 and 128 are not whole 256-blocks: Q4_K falls back to Q5_0, Q6_K to Q8_0.
    assert_eq!(g.tensors["blk.0.attn_q.weight"].0, GgmlDType::Q5_0);
    assert_eq!(g.tensors["output.weight"].0, GgmlDType::Q8_0);
    let err = common::relative_error(&g.tensors["blk.0.attn_q.weight"].1, &{
        let q = &source["model.layers.0.self_attn.q_proj.weight"];
        permute_rotary(q, 4).unwrap()
    });
    assert!(err < 0.1, "q5_0 relative error {err}");

    // Rows of 16 (tiny-qwen3) fit no block: f16.
    let q8 = tmp.path().join("qwen3/model.gguf");
    export(&fixture("tiny-qwen3"), &q8, &["--quant", "q8_0"]);
    assert_eq!(read(&q8).tensors["blk.0.attn_q.weight"].0, GgmlDType::F16);
}

#[test]
fn an_adapter_is_merged_as_merge_merges_it() {
    let tmp = tempfile::tempdir().unwrap();
    let merged_dir = tmp.path().join("merged");
    let run = llmtool()
        .args(["merge", "--model", s(&fixture("tiny-llama"))])
        .args([
            "--adapter",
            s(&fixture("tiny-llama-lora")),
            "--out",
            s(&merged_dir),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let a = tmp.path().join("a/model.gguf");
    let b = tmp.path().join("b/model.gguf");
    export(
        &fixture("tiny-llama"),
        &a,
        &["--adapter", s(&fixture("tiny-llama-lora"))],
    );
    export(&merged_dir, &b, &[]);
    let (a, b) = (read(&a), read(&b));
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, (_, t)) in &a.tensors {
        assert_eq!(max_abs_diff(t, &b.tensors[name].1), 0.0, "{name}");
    }
    let base = read(&{
        let p = tmp.path().join("c/model.gguf");
        export(&fixture("tiny-llama"), &p, &[]);
        p
    });
    let q = "blk.0.attn_q.weight";
    assert!(max_abs_diff(&a.tensors[q].1, &base.tensors[q].1) > 0.0);
}

/// Runs llmtool with `args`; asserts exit 1 and one line on stderr, and returns that line.
fn one_error_line(args: &[&str]) -> String {
    let out = llmtool().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    stderr.trim_end().to_string()
}

/// A copy of the fixture `name` in `parent/NAME` with `edit` applied to the file `file`.
fn edited(
    parent: &Path,
    name: &str,
    file: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let dir = parent.join(file.replace('.', "-"));
    copy_fixture(name, &dir);
    let path = dir.join(file);
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&path, serde_json::to_string(&value).unwrap()).unwrap();
    dir
}

#[test]
fn bad_inputs_are_one_line_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out/model.gguf");
    let export_args = |model: &Path| {
        vec![
            "export".to_string(),
            "--gguf".into(),
            "--model".into(),
            s(model).into(),
            "--out".into(),
            s(&out).into(),
        ]
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        one_error_line(&refs)
    };

    let neox = edited(tmp.path(), "tiny-llama", "config.json", |c| {
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
        c["model_type"] = "gpt_neox".into();
    });
    let line = run(export_args(&neox));
    assert!(
        line.contains("config.json") && line.contains("GPTNeoXForCausalLM"),
        "{line}"
    );

    let metaspace = edited(tmp.path(), "tiny-llama", "tokenizer.json", |t| {
        t["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "▁",
            "prepend_scheme": "always", "split": true});
    });
    let line = run(export_args(&metaspace));
    assert!(
        line.contains("tokenizer.json") && line.contains("pre_tokenizer"),
        "{line}"
    );

    let mut args = export_args(&fixture("tiny-llama"));
    args.extend(["--adapter".into(), s(&fixture("tiny-qwen3-lora")).into()]);
    let line = run(args);
    assert!(line.contains("tiny-qwen3-lora"), "{line}");
    assert!(
        !out.parent().unwrap().exists()
            || std::fs::read_dir(out.parent().unwrap()).unwrap().count() == 0
    );

    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, b"keep me").unwrap();
    let line = run(export_args(&fixture("tiny-llama")));
    assert!(
        line.contains("already exists") && line.contains("--force"),
        "{line}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let mut args = export_args(&fixture("tiny-llama"));
    args.push("--force".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(llmtool().args(&refs).output().unwrap().status.success());
    assert!(read(&out).tensors.contains_key("token_embd.weight"));
}

#[test]
fn a_known_chat_template_becomes_the_modelfile_template() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen3-chat");
    copy_fixture("tiny-qwen3", &dir);
    let jinja = std::fs::read_to_string(fixture("chat/qwen3.jinja")).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), &jinja).unwrap();
    let out = tmp.path().join("out/qwen3.gguf");
    export(&dir, &out, &["--quant", "bf16"]);
    let g = read(&out);
    assert_eq!(g.str("tokenizer.chat_template"), jinja);
    assert_eq!(g.u32("general.file_type"), 32);
    assert_eq!(g.tensors["blk.0.attn_q.weight"].0, GgmlDType::BF16);
    let modelfile = std::fs::read_to_string(tmp.path().join("out/Modelfile")).unwrap();
    assert!(
        modelfile.starts_with("FROM ./qwen3.gguf\nTEMPLATE \"\"\""),
        "{modelfile}"
    );
    assert!(modelfile.contains("<|im_start|>assistant"), "{modelfile}");
    assert!(
        modelfile.contains("PARAMETER stop \"<|im_end|>\""),
        "{modelfile}"
    );
    assert!(
        modelfile.contains("PARAMETER stop \"<|endoftext|>\""),
        "{modelfile}"
    );
}

/// The SentencePiece-style fixtures (make_spm_fixtures.py): llama.cpp architecture and a turn
/// marker of the Modelfile template their chat template is recognised as.
const SENTENCEPIECE: [(&str, &str, &str); 2] = [
    ("tiny-llama2", "llama", "[INST]"),
    ("tiny-gemma2-spm", "gemma2", "<start_of_turn>model"),
];

/// Against what llama.cpp's converter writes from the SentencePiece model itself
/// (gguf_expected.json): the tokens, their types, the special ids and flags exactly; the
/// scores exactly where the converter's are fixed (control -1000, bytes 0) and, for the
/// pieces merges make, in SentencePiece's order, which is all llama.cpp's merging reads.
#[test]
fn sentencepiece_tokenizers_export_as_llama_cpps_llama_model() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, arch, marker) in SENTENCEPIECE {
        let dir = fixture(name);
        let out = tmp.path().join(name).join("model.gguf");
        export(&dir, &out, &[]);
        let g = read(&out);
        let want = common::json(&format!("{name}/gguf_expected.json"));
        assert_eq!(g.str("general.architecture"), arch);
        assert_eq!(g.str("tokenizer.ggml.model"), "llama");
        assert_eq!(g.str("tokenizer.ggml.pre"), "default");
        assert!(!g.content.metadata.contains_key("tokenizer.ggml.merges"));
        let tokens = g.array("tokenizer.ggml.tokens", |v| v.to_string().unwrap().clone());
        assert_eq!(serde_json::json!(tokens), want["tokens"], "{name}");
        let types = g.array("tokenizer.ggml.token_type", |v| v.to_i32().unwrap());
        assert_eq!(serde_json::json!(types), want["token_type"], "{name}");
        for key in ["add_space_prefix", "add_bos_token", "add_eos_token"] {
            let key = format!("tokenizer.ggml.{key}");
            assert_eq!(serde_json::json!(g.bool(&key)), want[&key], "{name} {key}");
        }
        for (id, key) in [("bos", "bos"), ("eos", "eos"), ("unk", "unknown")] {
            let got = g.u32(&format!("tokenizer.ggml.{key}_token_id"));
            assert_eq!(serde_json::json!(got), want["ids"][id], "{name} {id}");
        }
        let scores = g.array("tokenizer.ggml.scores", |v| v.to_f32().unwrap());
        check_scores(name, &tokens, &types, &scores, &want["scores"]);
        check_values(&dir, &g, arch);
        let modelfile = std::fs::read_to_string(out.with_file_name("Modelfile")).unwrap();
        assert!(modelfile.contains("TEMPLATE \"\"\""), "{modelfile}");
        assert!(modelfile.contains(marker), "{modelfile}");
    }
}

/// Mistral v0.3's layout (no normalizer, a `Metaspace` that prepends `▁` to the first text
/// only) is written with `add_space_prefix`, and a warning that llama.cpp prepends one after
/// each special token and before text that begins with a space too.
#[test]
fn a_first_only_space_prefix_is_written_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited(tmp.path(), "tiny-llama2", "tokenizer.json", |t| {
        t["normalizer"] = serde_json::Value::Null;
        t["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}",
            "prepend_scheme": "first", "split": false});
    });
    let out = tmp.path().join("out/model.gguf");
    let stderr = export(&dir, &out, &[]);
    assert!(
        stderr.contains("warning: ") && stderr.contains("after each special token"),
        "{stderr}"
    );
    assert!(read(&out).bool("tokenizer.ggml.add_space_prefix"));
}

/// Fixed scores equal, and the merged pieces (normal, of two characters or more) in the same
/// order as `want`'s.
fn check_scores(
    name: &str,
    tokens: &[String],
    types: &[i32],
    got: &[f32],
    want: &serde_json::Value,
) {
    let want: Vec<f32> = serde_json::from_value(want.clone()).unwrap();
    assert_eq!(got.len(), want.len(), "{name}");
    let mut merged = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        if types[i] == 1 && token.chars().count() > 1 {
            merged.push((want[i], got[i]));
        } else if types[i] != 1 {
            assert_eq!(got[i], want[i], "{name}: score of {token:?}");
        }
    }
    assert!(merged.len() > 50, "{name}: {} merged pieces", merged.len());
    merged.sort_by(|a, b| b.0.total_cmp(&a.0));
    assert!(
        merged.windows(2).all(|w| w[0].1 > w[1].1),
        "{name}: scores not in SentencePiece's order"
    );
}

#[test]
fn longrope_writes_phi3s_factors_and_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-phi3-longrope");
    let out = tmp.path().join("model.gguf");
    let stderr = export(&dir, &out, &[]);
    assert!(
        stderr.contains("warning: ") && stderr.contains("long factors"),
        "{stderr}"
    );
    let g = read(&out);
    let cfg = config(&dir);
    let scaling = cfg.rope_scaling_for(false).unwrap();
    for (tensor, factors) in [
        ("rope_factors_long.weight", &scaling.long_factor),
        ("rope_factors_short.weight", &scaling.short_factor),
    ] {
        let (ty, t) = &g.tensors[tensor];
        assert_eq!(*ty, GgmlDType::F32);
        let want: Vec<f32> = factors.iter().flatten().map(|&f| f as f32).collect();
        assert_eq!(t.to_vec1::<f32>().unwrap(), want, "{tensor}");
    }
    assert_eq!(g.u32("phi3.context_length"), 64);
    assert_eq!(g.u32("phi3.rope.scaling.original_context_length"), 16);
    assert_eq!(g.u32("phi3.rope.dimension_count"), 12);
    // sqrt(1 + ln(64 / 16) / ln 16)
    let factor = g.f32("phi3.rope.scaling.attn_factor");
    assert!((factor - 1.5f32.sqrt()).abs() < 1e-6, "{factor}");
    check_values(&dir, &g, "phi3");
}
