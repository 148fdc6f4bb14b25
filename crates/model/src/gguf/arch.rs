//! What llama.cpp calls each family, its hyperparameter keys, its tensor names, and the
//! changes of layout its converter makes (Q/K rows interleaved for `llama`, Gemma's norms + 1).

use super::{GgufError, Quant};
use crate::config::LlamaConfig;
use crate::family::{Family, Kind};
use candle_core::quantized::gguf_file::Value;
use candle_core::{Device, Tensor};

/// A llama.cpp architecture (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama and Mistral (the converter's `LlamaModel` serves both).
    Llama,
    /// `qwen2`.
    Qwen2,
    /// `qwen3`.
    Qwen3,
    /// `gemma2`.
    Gemma2,
    /// `gemma3` (text only).
    Gemma3,
    /// `phi3`.
    Phi3,
}

impl Arch {
    /// The architecture llama.cpp runs a family with.
    pub fn of(family: &Family) -> Result<Arch, GgufError> {
        Ok(match family.kind {
            Kind::Llama | Kind::Mistral => Arch::Llama,
            Kind::Qwen2 => Arch::Qwen2,
            Kind::Qwen3 => Arch::Qwen3,
            Kind::Gemma2 => Arch::Gemma2,
            Kind::Gemma3 => Arch::Gemma3,
            Kind::Phi3 => Arch::Phi3,
        })
    }

    /// The `general.architecture` string, also the prefix of its keys.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }
}

/// The GGUF name of a Hugging Face tensor (`model.layers.3.self_attn.q_proj.weight` ->
/// `blk.3.attn_q.weight`), `None` for one the converter drops (Gemma's tied `lm_head`).
pub fn gguf_tensor_name(hf: &str, family: &Family) -> Result<Option<String>, GgufError> {
    let unknown = || GgufError::Tensor {
        name: hf.to_string(),
        message: "has no GGUF name in llama.cpp's tensor map".into(),
    };
    let gemma = matches!(family.kind, Kind::Gemma2 | Kind::Gemma3);
    match hf {
        "model.embed_tokens.weight" => return Ok(Some("token_embd.weight".into())),
        "model.norm.weight" => return Ok(Some("output_norm.weight".into())),
        "lm_head.weight" if gemma => return Ok(None),
        "lm_head.weight" => return Ok(Some("output.weight".into())),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    let (module, suffix) = rest.rsplit_once('.').ok_or_else(unknown)?;
    let name = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "post_attention_layernorm" if family.sandwich_norms => "post_attention_norm",
        "post_attention_layernorm" | "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return Err(unknown()),
    };
    if suffix != "weight" && suffix != "bias" {
        return Err(unknown());
    }
    Ok(Some(format!("blk.{layer}.{name}.{suffix}")))
}

/// HF's rotate-half layout of Q/K rows to the interleaved pairs llama.cpp's `llama` RoPE
/// rotates: within each head, row `i` of the first half and row `i` of the second half
/// become rows `2i` and `2i + 1` (the converter's `LlamaModel.permute`). Works on weights
/// `[heads · d, in]` and biases `[heads · d]`.
pub fn permute_rotary(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, 2, rows / heads / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The tensor as llama.cpp's architecture wants it: Q/K permuted for `llama`, Gemma's norm
/// weights with the 1 that llama.cpp's plain RMSNorm does not add.
pub fn relayout(
    arch: Arch,
    config: &LlamaConfig,
    hf: &str,
    t: Tensor,
) -> Result<Tensor, GgufError> {
    let family_norm_one_plus = matches!(arch, Arch::Gemma2 | Arch::Gemma3);
    let module = hf.rsplit_once('.').map_or(hf, |(m, _)| m);
    Ok(match module {
        m if arch == Arch::Llama && m.ends_with("self_attn.q_proj") => {
            permute_rotary(&t, config.num_attention_heads)?
        }
        m if arch == Arch::Llama && m.ends_with("self_attn.k_proj") => {
            permute_rotary(&t, config.kv_heads())?
        }
        m if family_norm_one_plus && m.ends_with("norm") => (t + 1.0)?,
        _ => t,
    })
}

/// The RoPE factor tensors the converter adds, each one value per rotated pair: Llama 3.x's
/// `rope_freqs.weight` (`rope_type: llama3`; llama.cpp divides each frequency by its factor),
/// or Phi-3's LongRoPE `rope_factors_long.weight` and `rope_factors_short.weight`.
pub fn rope_tensors(arch: Arch, config: &LlamaConfig) -> Result<Vec<(String, Tensor)>, GgufError> {
    let Some(s) = config.rope_scaling_for(false) else {
        return Ok(Vec::new());
    };
    let vector = |name: &str, values: Vec<f32>| -> Result<(String, Tensor), GgufError> {
        Ok((name.to_string(), Tensor::new(values, &Device::Cpu)?))
    };
    match (arch, s.rope_type.as_str()) {
        (Arch::Llama, "llama3") => Ok(vec![vector(
            "rope_freqs.weight",
            llama3_factors(config, s),
        )?]),
        (Arch::Phi3, "longrope") => {
            let f32s = |f: &Option<Vec<f64>>| f.iter().flatten().map(|&v| v as f32).collect();
            Ok(vec![
                vector("rope_factors_long.weight", f32s(&s.long_factor))?,
                vector("rope_factors_short.weight", f32s(&s.short_factor))?,
            ])
        }
        (_, "longrope") => Err(GgufError::Unsupported(format!(
            "config.json: rope_type longrope: llama.cpp reads LongRoPE factors for phi3 only, \
             not {}",
            arch.name()
        ))),
        _ => Ok(Vec::new()),
    }
}

/// Each Llama 3 factor is the plain frequency over the scaled one that RoPE uses.
fn llama3_factors(config: &LlamaConfig, s: &crate::config::RopeScaling) -> Vec<f32> {
    let (dim, base) = (config.head_size(), config.theta());
    let plain = crate::rope::inverse_frequencies(dim, base, None);
    let scaled = crate::rope::inverse_frequencies(dim, base, Some(s));
    plain
        .iter()
        .zip(&scaled)
        .map(|(p, s)| (p / s) as f32)
        .collect()
}

/// Phi-3 LongRoPE's keys: the context the short factors serve (llama.cpp switches to the long
/// ones past it) and the factor on cos and sin, as the converter's `Phi3MiniModel` writes them.
fn longrope_metadata(c: &LlamaConfig) -> Vec<(&'static str, Value)> {
    let Some(s) = c
        .rope_scaling_for(false)
        .filter(|s| s.rope_type == "longrope")
    else {
        return Vec::new();
    };
    let original = c.longrope_original_context(s);
    let attn_factor = crate::rope::longrope_attention_factor(c, s, original);
    vec![
        (
            "rope.scaling.original_context_length",
            Value::U32(original as u32),
        ),
        ("rope.scaling.attn_factor", Value::F32(attn_factor as f32)),
    ]
}

/// `general.*` and `<arch>.*` keys, as the converter writes them for the family.
pub fn metadata(
    arch: Arch,
    c: &LlamaConfig,
    family: &Family,
    quant: Quant,
    name: &str,
) -> Vec<(String, Value)> {
    let a = arch.name();
    let u32v = |v: usize| Value::U32(v as u32);
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(quant.file_type())),
    ];
    if quant.is_quantized() {
        m.push(("general.quantization_version".into(), Value::U32(2)));
    }
    let mut key = |k: &str, v: Value| m.push((format!("{a}.{k}"), v));
    key("vocab_size", u32v(c.vocab_size));
    key("context_length", u32v(c.max_position_embeddings));
    key("embedding_length", u32v(c.hidden_size));
    key("block_count", u32v(c.num_hidden_layers));
    key("feed_forward_length", u32v(c.intermediate_size));
    key("attention.head_count", u32v(c.num_attention_heads));
    key("attention.head_count_kv", u32v(c.kv_heads()));
    key("attention.key_length", u32v(c.head_size()));
    key("attention.value_length", u32v(c.head_size()));
    key(
        "attention.layer_norm_rms_epsilon",
        Value::F32(c.rms_norm_eps as f32),
    );
    key("rope.freq_base", Value::F32(c.theta() as f32));
    key("rope.dimension_count", u32v(c.rotary_dim()));
    if let Some(s) = c
        .rope_scaling_for(false)
        .filter(|s| s.rope_type == "linear")
    {
        key("rope.scaling.type", Value::String("linear".into()));
        key("rope.scaling.factor", Value::F32(s.factor() as f32));
    }
    let window = family.layers.iter().find_map(|l| l.window);
    match arch {
        Arch::Gemma2 | Arch::Gemma3 => {
            if let Some(w) = window {
                key("attention.sliding_window", u32v(w));
            }
            if let Some(cap) = family.attn_softcap {
                key("attn_logit_softcapping", Value::F32(cap as f32));
            }
            if let Some(cap) = family.final_softcap {
                key("final_logit_softcapping", Value::F32(cap as f32));
            }
        }
        // The converter writes 0 for "no window" (Phi-4) so that llama.cpp does not assume
        // Phi-3's 2047.
        Arch::Phi3 => {
            key("attention.sliding_window", u32v(window.unwrap_or(0)));
            for (k, v) in longrope_metadata(c) {
                key(k, v);
            }
        }
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => {}
    }
    m
}

/// Where llama.cpp's graph for `arch` computes something other than llmtool's model of
/// `config`, each as one sentence.
pub fn warnings(arch: Arch, c: &LlamaConfig, family: &Family) -> Vec<String> {
    let mut w = Vec::new();
    let head = c.head_size();
    let default_scale = 1.0 / (head as f64).sqrt();
    if matches!(arch, Arch::Gemma2 | Arch::Gemma3)
        && (family.attention_scale - default_scale).abs() > 1e-9 * default_scale
    {
        w.push(format!(
            "query_pre_attn_scalar differs from head_dim {head}: llama.cpp scales {} attention \
             by 1/sqrt(head_dim), so its outputs will differ",
            arch.name()
        ));
    }
    let slides = family.layers.iter().any(|l| l.window.is_some());
    if slides && matches!(arch, Arch::Llama | Arch::Qwen2 | Arch::Qwen3) {
        w.push(format!(
            "llama.cpp's {} attends to every position: the sliding window of config.json is \
             not carried, so outputs differ past it",
            arch.name()
        ));
    }
    if slides && arch == Arch::Phi3 {
        w.push(
            "llama.cpp's phi3 reads attention.sliding_window but currently attends to every \
             position, so outputs differ past the window"
                .into(),
        );
    }
    if arch == Arch::Phi3 && c.num_attention_heads * head != c.hidden_size {
        w.push(format!(
            "llama.cpp's phi3 expects heads x head_dim = hidden_size ({} x {head} != {}); it \
             may refuse the fused attn_qkv",
            c.num_attention_heads, c.hidden_size
        ));
    }
    if let Some(original) = c.longrope_context().filter(|_| arch == Arch::Phi3) {
        w.push(format!(
            "llama.cpp's phi3 picks LongRoPE's long factors for every sequence once its context \
             (-c) exceeds {original} (original_max_position_embeddings), llmtool by each \
             sequence's length: outputs differ for sequences of at most {original} tokens run \
             with a larger -c"
        ));
    }
    // Which layers slide is fixed in llama.cpp's Gemma architectures.
    let slides_as = |sliding: fn(usize) -> bool| {
        let mut layers = family.layers.iter().enumerate();
        layers.all(|(i, l)| l.window.is_some() == sliding(i))
    };
    if arch == Arch::Gemma2 && slides && !slides_as(|i| i % 2 == 0) {
        w.push("llama.cpp's gemma2 slides every other layer (from the first); this model's layer_types differ".into());
    }
    if arch == Arch::Gemma3 {
        if slides && !slides_as(|i| (i + 1) % 6 != 0) {
            w.push("llama.cpp's gemma3 slides five layers of every six; this model's layer_types differ".into());
        }
        if (c.rope_theta_for(true) - 10000.0).abs() > 1e-6 {
            w.push("llama.cpp's gemma3 uses a RoPE base of 10000 on sliding layers; this model's differs".into());
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family(json: serde_json::Value) -> (LlamaConfig, Family) {
        let c: LlamaConfig = serde_json::from_value(json).unwrap();
        let f = Family::of(&c);
        (c, f)
    }

    fn llama() -> (LlamaConfig, Family) {
        family(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32
        }))
    }

    #[test]
    fn names_follow_llama_cpp() {
        let (_, f) = llama();
        let n = |hf: &str| gguf_tensor_name(hf, &f).unwrap();
        assert_eq!(n("model.embed_tokens.weight").unwrap(), "token_embd.weight");
        assert_eq!(n("lm_head.weight").unwrap(), "output.weight");
        assert_eq!(n("model.norm.weight").unwrap(), "output_norm.weight");
        assert_eq!(
            n("model.layers.3.self_attn.q_proj.weight").unwrap(),
            "blk.3.attn_q.weight"
        );
        assert_eq!(
            n("model.layers.0.self_attn.k_proj.bias").unwrap(),
            "blk.0.attn_k.bias"
        );
        assert_eq!(
            n("model.layers.1.self_attn.o_proj.weight").unwrap(),
            "blk.1.attn_output.weight"
        );
        assert_eq!(
            n("model.layers.1.input_layernorm.weight").unwrap(),
            "blk.1.attn_norm.weight"
        );
        assert_eq!(
            n("model.layers.1.post_attention_layernorm.weight").unwrap(),
            "blk.1.ffn_norm.weight"
        );
        assert_eq!(
            n("model.layers.2.mlp.down_proj.weight").unwrap(),
            "blk.2.ffn_down.weight"
        );
        assert!(gguf_tensor_name("model.layers.0.mlp.fc1.weight", &f).is_err());
        assert!(gguf_tensor_name("vision.encoder.weight", &f).is_err());
    }

    #[test]
    fn gemma_names_have_sandwich_norms_and_no_output() {
        let (_, f) = family(serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 32
        }));
        let n = |hf: &str| gguf_tensor_name(hf, &f).unwrap();
        assert_eq!(n("lm_head.weight"), None);
        let layer = |m: &str| n(&format!("model.layers.0.{m}.weight")).unwrap();
        assert_eq!(
            layer("post_attention_layernorm"),
            "blk.0.post_attention_norm.weight"
        );
        assert_eq!(layer("pre_feedforward_layernorm"), "blk.0.ffn_norm.weight");
        assert_eq!(
            layer("post_feedforward_layernorm"),
            "blk.0.post_ffw_norm.weight"
        );
        assert_eq!(layer("self_attn.q_norm"), "blk.0.attn_q_norm.weight");
        assert_eq!(layer("self_attn.k_norm"), "blk.0.attn_k_norm.weight");
    }

    #[test]
    fn phi3_keeps_fused_projections() {
        let (_, f) = family(serde_json::json!({
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 32
        }));
        let n = |hf: &str| gguf_tensor_name(hf, &f).unwrap().unwrap();
        assert_eq!(
            n("model.layers.0.self_attn.qkv_proj.weight"),
            "blk.0.attn_qkv.weight"
        );
        assert_eq!(
            n("model.layers.0.mlp.gate_up_proj.weight"),
            "blk.0.ffn_up.weight"
        );
    }

    /// Row `r` of head `h` in HF order holds dimension `r` of the rotate-half layout, whose
    /// pairs are (i, i + d/2); llama.cpp's layout puts each pair on adjacent rows.
    #[test]
    fn permutation_interleaves_each_heads_halves() {
        let heads = 2;
        let d = 4;
        let rows: Vec<f32> = (0..heads * d).map(|r| r as f32).collect();
        let w = Tensor::new(rows, &Device::Cpu)
            .unwrap()
            .reshape((heads * d, 1))
            .unwrap();
        let p = permute_rotary(&w, heads).unwrap().flatten_all().unwrap();
        assert_eq!(
            p.to_vec1::<f32>().unwrap(),
            [0., 2., 1., 3., 4., 6., 5., 7.]
        );
        let bias = Tensor::new(&[0f32, 1., 2., 3., 4., 5., 6., 7.], &Device::Cpu).unwrap();
        let p = permute_rotary(&bias, heads).unwrap();
        assert_eq!(
            p.to_vec1::<f32>().unwrap(),
            [0., 2., 1., 3., 4., 6., 5., 7.]
        );
    }

    #[test]
    fn llama3_rope_factors_match_the_converter() {
        let (c, _) = family(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 32,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        }));
        let tensors = rope_tensors(Arch::Llama, &c).unwrap();
        assert_eq!(tensors[0].0, "rope_freqs.weight");
        let f = tensors[0].1.to_vec1::<f32>().unwrap();
        assert_eq!(f.len(), 8);
        // The highest frequencies (short wavelengths) are kept, the lowest divided by 8.
        assert_eq!(f[0], 1.0);
        assert_eq!(f[7], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn longrope_writes_both_factor_lists_and_the_attention_factor() {
        let config = |arch: &str| {
            family(serde_json::json!({
                "architectures": [arch], "hidden_size": 32, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32,
                "max_position_embeddings": 64, "original_max_position_embeddings": 16,
                "partial_rotary_factor": 0.5,
                "rope_scaling": {"type": "longrope", "short_factor": [1.0, 2.0, 3.0, 4.0],
                                 "long_factor": [5.0, 6.0, 7.0, 8.0]}
            }))
        };
        let (c, f) = config("Phi3ForCausalLM");
        let tensors = rope_tensors(Arch::Phi3, &c).unwrap();
        let named = |i: usize| {
            (
                tensors[i].0.as_str(),
                tensors[i].1.to_vec1::<f32>().unwrap(),
            )
        };
        assert_eq!(named(0), ("rope_factors_long.weight", vec![5., 6., 7., 8.]));
        assert_eq!(
            named(1),
            ("rope_factors_short.weight", vec![1., 2., 3., 4.])
        );
        let m = metadata(Arch::Phi3, &c, &f, Quant::F16, "m");
        let get = |k: &str| m.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let original = get("phi3.rope.scaling.original_context_length").unwrap();
        assert_eq!(original.to_u32().unwrap(), 16);
        let factor = get("phi3.rope.scaling.attn_factor")
            .unwrap()
            .to_f32()
            .unwrap();
        // sqrt(1 + ln(64 / 16) / ln 16)
        assert!((factor - 1.5f32.sqrt()).abs() < 1e-6, "{factor}");
        assert!(warnings(Arch::Phi3, &c, &f)
            .iter()
            .any(|w| w.contains("long factors")));
        let (c, _) = config("LlamaForCausalLM");
        let err = rope_tensors(Arch::Llama, &c).unwrap_err().to_string();
        assert!(err.contains("longrope") && err.contains("phi3"), "{err}");
    }

    #[test]
    fn gemma_sliding_layers_other_than_llama_cpps_are_warned_about() {
        let gemma = |arch: &str, model_type: &str, types: &[&str]| {
            family(serde_json::json!({
                "architectures": [arch], "model_type": model_type, "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": types.len(),
                "num_attention_heads": 2, "vocab_size": 32, "sliding_window": 4,
                "layer_types": types
            }))
        };
        let (s, f) = ("sliding_attention", "full_attention");
        let warned = |arch: Arch, (c, fam): (LlamaConfig, Family)| {
            warnings(arch, &c, &fam)
                .iter()
                .any(|w| w.contains("layer_types differ"))
        };
        let gemma2 = |types: &[&str]| gemma("Gemma2ForCausalLM", "gemma2", types);
        assert!(!warned(Arch::Gemma2, gemma2(&[s, f, s, f])));
        assert!(warned(Arch::Gemma2, gemma2(&[f, s, f, s])));
        let gemma3 = |types: &[&str]| gemma("Gemma3ForCausalLM", "gemma3_text", types);
        assert!(!warned(Arch::Gemma3, gemma3(&[s, s, s, s, s, f, s])));
        assert!(warned(Arch::Gemma3, gemma3(&[s, s, s, s, f, s, s])));
        // A model whose layers never slide is not a pattern llama.cpp would change.
        assert!(!warned(Arch::Gemma3, gemma3(&[f, f, f, f, f, f, f])));
    }
}
