//! The tokenizer as GGUF carries it: llama.cpp's `gpt2` model (byte-level BPE) with its
//! tokens, token types, merges, special ids, `tokenizer.ggml.pre` (the pre-tokenizer llama.cpp
//! recognises) and the chat template, as the converter's `_set_vocab_gpt2` writes them.

use super::GgufError;
use crate::config::{LlamaConfig, TokenIds};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Llama 3's pre-tokenizer split (llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2/Qwen3's pre-tokenizer split (llama.cpp `qwen2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model directory's tokenizer, ready for GGUF.
#[derive(Debug, Clone)]
pub struct Vocab {
    /// `vocab_size` entries: holes are `[PAD{i}]` (unused), as the converter fills them.
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
}

fn error(path: &Path, message: impl Into<String>) -> GgufError {
    GgufError::Tokenizer {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_json(path: &Path) -> Result<Option<Json>, GgufError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| error(path, format!("not valid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(GgufError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Vocab {
    /// Reads `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` of `dir`.
    pub fn read(dir: &Path, config: &LlamaConfig) -> Result<Vocab, GgufError> {
        let path = dir.join("tokenizer.json");
        let tok =
            read_json(&path)?.ok_or_else(|| error(&path, "missing; GGUF embeds the tokenizer"))?;
        let model = &tok["model"];
        let kind = model["type"].as_str().unwrap_or("unknown");
        if kind != "BPE" {
            return Err(error(
                &path,
                format!(
                    "model.type: a {kind} tokenizer cannot be written to GGUF by llmtool \
                     (byte-level BPE only: tokenizer.ggml.model gpt2)"
                ),
            ));
        }
        let pre = pre_tokenizer(&path, &tok["pre_tokenizer"])?;
        let (tokens, token_types) = tokens(&path, &tok, config.vocab_size)?;
        let merges = merges(&path, &model["merges"])?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_json(&tc_path)?.unwrap_or(Json::Null);
        let id_of: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i as u32))
            .collect();
        let special = |key: &str| {
            let v = &tc[key];
            let text = v.as_str().or_else(|| v["content"].as_str())?;
            id_of.get(text).copied()
        };
        let first = |ids: &Option<TokenIds>| ids.as_ref().and_then(TokenIds::first);
        let bos = special("bos_token").or_else(|| first(&config.bos_token_id));
        let eos = special("eos_token").or_else(|| first(&config.eos_token_id));
        let processor_adds = |id: Option<u32>, at_start: bool| {
            let single = tok["post_processor"]["single"].as_array();
            let ends = single.and_then(|s| if at_start { s.first() } else { s.last() });
            let special = ends.and_then(|e| e["SpecialToken"]["id"].as_str());
            id.zip(special)
                .is_some_and(|(id, text)| id_of.get(text) == Some(&id))
        };
        let add_bos = tc["add_bos_token"]
            .as_bool()
            .unwrap_or_else(|| processor_adds(bos, true));
        let add_eos = tc["add_eos_token"]
            .as_bool()
            .unwrap_or_else(|| processor_adds(eos, false));
        Ok(Vocab {
            pre,
            bos,
            eos,
            pad: special("pad_token"),
            unk: special("unk_token"),
            add_bos,
            add_eos,
            chat_template: chat_template(dir, &tc_path, &tc)?,
            tokens,
            token_types,
            merges,
        })
    }

    /// The `tokenizer.*` keys.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let mut m = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            ("tokenizer.ggml.pre".into(), Value::String(self.pre.clone())),
            ("tokenizer.ggml.tokens".into(), strings(&self.tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(self.token_types.iter().map(|&t| Value::I32(t)).collect()),
            ),
            ("tokenizer.ggml.merges".into(), strings(&self.merges)),
        ];
        for (key, id) in [
            ("bos_token_id", self.bos),
            ("eos_token_id", self.eos),
            ("unknown_token_id", self.unk),
            ("padding_token_id", self.pad),
        ] {
            if let Some(id) = id {
                m.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
            }
        }
        m.push((
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(self.add_bos),
        ));
        m.push((
            "tokenizer.ggml.add_eos_token".into(),
            Value::Bool(self.add_eos),
        ));
        if let Some(t) = &self.chat_template {
            m.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
        }
        m
    }

    /// The text of token `id`.
    pub fn text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }
}

/// llama.cpp's name for the pre-tokenizer of `tokenizer.json` (the converter recognises it by
/// hashing an encoding; llmtool by its definition): plain GPT-2 `ByteLevel` is `gpt-2`,
/// Llama 3's split is `llama-bpe`, Qwen2's `qwen2`, SmolLM's single digits `smollm`.
fn pre_tokenizer(path: &Path, pre: &Json) -> Result<String, GgufError> {
    let byte_level = |p: &Json, regex: bool| {
        p["type"] == "ByteLevel" && p["use_regex"].as_bool().unwrap_or(true) == regex
    };
    if byte_level(pre, true) {
        return Ok("gpt-2".into());
    }
    let steps = pre["pretokenizers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    match steps {
        [split, last] if split["type"] == "Split" && byte_level(last, false) => {
            match split["pattern"]["Regex"].as_str() {
                Some(LLAMA3_SPLIT) => return Ok("llama-bpe".into()),
                Some(QWEN2_SPLIT) => return Ok("qwen2".into()),
                _ => {}
            }
        }
        [digits, last]
            if digits["type"] == "Digits"
                && digits["individual_digits"] == true
                && byte_level(last, true) =>
        {
            return Ok("smollm".into())
        }
        _ => {}
    }
    let described = serde_json::to_string(pre).unwrap_or_default();
    let short: String = described.chars().take(120).collect();
    Err(error(
        path,
        format!(
            "pre_tokenizer: {short} is not one llmtool can name for llama.cpp (gpt-2, \
             llama-bpe, qwen2, smollm); a byte-level BPE without a known pre-tokenizer \
             would tokenize differently there"
        ),
    ))
}

fn tokens(path: &Path, tok: &Json, size: usize) -> Result<(Vec<String>, Vec<i32>), GgufError> {
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; size];
    let mut put = |text: &str, id: u64, ty: i32| {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            error(
                path,
                format!("token {text:?} has id {id}, past the model's vocab_size {size}"),
            )
        })?;
        *slot = Some((text.to_string(), ty));
        Ok::<_, GgufError>(())
    };
    let vocab = tok["model"]["vocab"]
        .as_object()
        .ok_or_else(|| error(path, "model.vocab: missing or not an object"))?;
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| error(path, format!("model.vocab.{text}: not an id")))?;
        put(text, id, NORMAL)?;
    }
    for added in tok["added_tokens"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let (Some(text), Some(id)) = (added["content"].as_str(), added["id"].as_u64()) else {
            return Err(error(path, "added_tokens: an entry lacks content or id"));
        };
        let ty = match added["special"].as_bool().unwrap_or(false) {
            true => CONTROL,
            false => USER_DEFINED,
        };
        put(text, id, ty)?;
    }
    Ok(tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED)))
        .unzip())
}

fn merges(path: &Path, merges: &Json) -> Result<Vec<String>, GgufError> {
    let list = merges.as_array().map(Vec::as_slice).unwrap_or(&[]);
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Ok(format!("{a} {b}")),
                _ => Err(error(
                    path,
                    "model.merges: an entry is not a pair of strings",
                )),
            },
            _ => Err(error(
                path,
                "model.merges: an entry is not a string or a pair",
            )),
        })
        .collect()
}

/// `chat_template.jinja` when present, else `tokenizer_config.json`'s `chat_template` (the
/// `default` one of a list of named templates), as transformers reads it.
fn chat_template(dir: &Path, tc_path: &Path, tc: &Json) -> Result<Option<String>, GgufError> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(text) => return Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(GgufError::Io {
                path: jinja,
                source,
            })
        }
    }
    Ok(match &tc["chat_template"] {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => {
            let default = list.iter().find(|t| t["name"] == "default");
            let template = default.and_then(|t| t["template"].as_str());
            Some(
                template
                    .ok_or_else(|| error(tc_path, "chat_template: a list without \"default\""))?
                    .to_string(),
            )
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pre_tokenizers_get_llama_cpp_names() {
        let p = Path::new("tokenizer.json");
        let bl = |regex: bool| json!({"type": "ByteLevel", "use_regex": regex});
        assert_eq!(pre_tokenizer(p, &bl(true)).unwrap(), "gpt-2");
        let split = |re: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": re}}, bl(false)]})
        };
        assert_eq!(pre_tokenizer(p, &split(LLAMA3_SPLIT)).unwrap(), "llama-bpe");
        assert_eq!(pre_tokenizer(p, &split(QWEN2_SPLIT)).unwrap(), "qwen2");
        let err = pre_tokenizer(p, &json!({"type": "Metaspace"})).unwrap_err();
        assert!(err.to_string().contains("pre_tokenizer"), "{err}");
    }
}
