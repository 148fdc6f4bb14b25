//! The tokenizer as GGUF carries it, with its tokens, token types, special ids and chat
//! template: byte-level BPE as llama.cpp's `gpt2` model (merges and `tokenizer.ggml.pre`, the
//! pre-tokenizer llama.cpp recognises), as the converter's `_set_vocab_gpt2` writes it, and
//! SentencePiece-style BPE (byte fallback, `▁` for spaces: Llama 2, Mistral, Gemma) as its
//! `llama` model (scores and `add_space_prefix`), as `_set_vocab_sentencepiece` writes it.
//!
//! The file is long because both tokenizer models and their tests stay beside the one
//! `Vocab` they fill; the tests are its last fifth.

use super::GgufError;
use crate::config::{LlamaConfig, TokenIds};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// SentencePiece's space.
const SPACE: &str = "\u{2581}";
/// The converter's scores of added tokens and of holes in the vocabulary.
const ADDED_SCORE: f32 = -1000.0;
const HOLE_SCORE: f32 = -10000.0;

/// Llama 3's pre-tokenizer split (llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2/Qwen3's pre-tokenizer split (llama.cpp `qwen2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp splits text into tokens (`tokenizer.ggml.model`), with what it needs.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerModel {
    /// `gpt2`: byte-level BPE.
    Gpt2 {
        /// `tokenizer.ggml.merges`, `"left right"` by rank.
        merges: Vec<String>,
        /// `tokenizer.ggml.pre`: the pre-tokenizer llama.cpp applies.
        pre: String,
    },
    /// `llama`: SentencePiece-style. llama.cpp escapes spaces as `▁`, merges the adjacent pair
    /// whose concatenation scores highest until none is a token, and spells what is left
    /// outside the vocabulary as `<0xXX>` byte tokens.
    Llama {
        /// `tokenizer.ggml.scores`, one per token.
        scores: Vec<f32>,
        /// Where the tokenizer puts a `▁` in front of text (`tokenizer.ggml.add_space_prefix`
        /// unless [`SpacePrefix::None`]).
        space_prefix: SpacePrefix,
    },
}

/// Where a SentencePiece-style tokenizer puts a `▁` in front of text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpacePrefix {
    /// Nowhere (Gemma).
    None,
    /// Before each piece of text between special tokens (Llama 2's `Prepend` normalizer,
    /// `Metaspace` with `prepend_scheme: always`): llama.cpp's `add_space_prefix`.
    EachText,
    /// Before the start of the input only, and not when it begins with a space (`Metaspace`
    /// with `prepend_scheme: first`, Mistral v0.3): llama.cpp has no such mode.
    FirstOnly,
}

/// A model directory's tokenizer, ready for GGUF.
#[derive(Debug, Clone)]
pub struct Vocab {
    /// `vocab_size` entries: holes are `[PAD{i}]` (unused), as the converter fills them.
    pub tokens: Vec<String>,
    /// llama.cpp's type of each token (normal 1, unknown 2, control 3, user-defined 4,
    /// unused 5, byte 6).
    pub token_types: Vec<i32>,
    /// The tokenizer model and its own keys.
    pub model: TokenizerModel,
    /// Id of the beginning-of-sequence token (`tokenizer.ggml.bos_token_id`), if any.
    pub bos: Option<u32>,
    /// Id of the end-of-sequence token (`tokenizer.ggml.eos_token_id`), if any.
    pub eos: Option<u32>,
    /// Id of the padding token (`tokenizer.ggml.padding_token_id`), if any.
    pub pad: Option<u32>,
    /// Id of the unknown token (`tokenizer.ggml.unknown_token_id`), if any.
    pub unk: Option<u32>,
    /// Whether encoding prepends `bos` (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// Whether encoding appends `eos` (`tokenizer.ggml.add_eos_token`).
    pub add_eos: bool,
    /// The Jinja chat template (`tokenizer.chat_template`), if the model has one.
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
        let (tokens, token_types, model) = tokenizer_model(&path, &tok, config.vocab_size)?;
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
            model,
            bos,
            eos,
            pad: special("pad_token"),
            unk: special("unk_token").or_else(|| {
                let text = tok["model"]["unk_token"].as_str()?;
                id_of.get(text).copied()
            }),
            add_bos,
            add_eos,
            chat_template: chat_template(dir, &tc_path, &tc)?,
            tokens,
            token_types,
        })
    }

    /// The `tokenizer.*` keys.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let mut m = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::String(self.model.name().into()),
            ),
            (
                "tokenizer.ggml.pre".into(),
                Value::String(self.model.pre().into()),
            ),
            ("tokenizer.ggml.tokens".into(), strings(&self.tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(self.token_types.iter().map(|&t| Value::I32(t)).collect()),
            ),
        ];
        match &self.model {
            TokenizerModel::Gpt2 { merges, .. } => {
                m.push(("tokenizer.ggml.merges".into(), strings(merges)));
            }
            TokenizerModel::Llama {
                scores,
                space_prefix,
            } => {
                let scores = scores.iter().map(|&s| Value::F32(s)).collect();
                m.push(("tokenizer.ggml.scores".into(), Value::Array(scores)));
                m.push((
                    "tokenizer.ggml.add_space_prefix".into(),
                    Value::Bool(*space_prefix != SpacePrefix::None),
                ));
            }
        }
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

    /// Where llama.cpp will tokenize differently from the tokenizer, each as one sentence.
    pub fn warnings(&self) -> Vec<String> {
        match self.model {
            TokenizerModel::Llama {
                space_prefix: SpacePrefix::FirstOnly,
                ..
            } => vec![
                "tokenizer.json's Metaspace puts \u{2581} before the start of the input \
                 only, unless it begins with a space; llama.cpp puts one before the text and \
                 after each special token whatever follows, so text that begins with a space \
                 or follows a special token can tokenize differently there"
                    .into(),
            ],
            _ => Vec::new(),
        }
    }

    /// The text of token `id`.
    pub fn text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }
}

impl TokenizerModel {
    /// `tokenizer.ggml.model`.
    pub fn name(&self) -> &'static str {
        match self {
            TokenizerModel::Gpt2 { .. } => "gpt2",
            TokenizerModel::Llama { .. } => "llama",
        }
    }

    /// `tokenizer.ggml.pre` (`default` for `llama`, as the converter writes it).
    pub fn pre(&self) -> &str {
        match self {
            TokenizerModel::Gpt2 { pre, .. } => pre,
            TokenizerModel::Llama { .. } => "default",
        }
    }
}

/// How a tokenizer spells its tokens, which decides their types.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Spelling {
    /// GPT-2's bytes-as-characters.
    ByteLevel,
    /// SentencePiece's `▁` for spaces and `<0xXX>` byte tokens.
    SentencePiece,
}

/// The tokens, their types and the tokenizer model of a `tokenizer.json`.
type Tokens = (Vec<String>, Vec<i32>, TokenizerModel);

/// The llama.cpp tokenizer model for `model.type` of `tokenizer.json`: BPE with byte fallback
/// as `llama`, other BPE as `gpt2`; other kinds are an error.
fn tokenizer_model(path: &Path, tok: &Json, size: usize) -> Result<Tokens, GgufError> {
    match tok["model"]["type"].as_str() {
        Some("BPE") if tok["model"]["byte_fallback"] == true => sentencepiece_bpe(path, tok, size),
        Some("BPE") => byte_level_bpe(path, tok, size),
        kind => Err(error(
            path,
            format!(
                "model.type: a {} tokenizer cannot be written to GGUF by llmtool (BPE only: \
                 byte-level as llama.cpp's gpt2, with byte_fallback as its llama)",
                kind.unwrap_or("unknown")
            ),
        )),
    }
}

/// A byte-level BPE as llama.cpp's `gpt2` model.
fn byte_level_bpe(path: &Path, tok: &Json, size: usize) -> Result<Tokens, GgufError> {
    let pre = pre_tokenizer(path, &tok["pre_tokenizer"])?;
    let (tokens, types) = tokens(path, tok, size, Spelling::ByteLevel)?;
    let merges = merges(path, &tok["model"]["merges"])?
        .into_iter()
        .map(|(a, b)| format!("{a} {b}"))
        .collect();
    Ok((tokens, types, TokenizerModel::Gpt2 { merges, pre }))
}

/// A BPE with byte fallback over `▁`-spaced text as llama.cpp's `llama` model.
fn sentencepiece_bpe(path: &Path, tok: &Json, size: usize) -> Result<Tokens, GgufError> {
    let space_prefix = space_prefix(path, tok)?;
    let (tokens, types) = tokens(path, tok, size, Spelling::SentencePiece)?;
    let bytes = types.iter().filter(|&&t| t == BYTE).count();
    if bytes != 256 {
        return Err(error(
            path,
            format!(
                "model.vocab: byte_fallback with {bytes} of the 256 <0xXX> byte tokens; \
                 llama.cpp spells unknown characters with all of them"
            ),
        ));
    }
    let merges = merges(path, &tok["model"]["merges"])?;
    let scores = merge_scores(&tokens, &types, &merges);
    Ok((
        tokens,
        types,
        TokenizerModel::Llama {
            scores,
            space_prefix,
        },
    ))
}

/// Scores under which llama.cpp's highest-score-first merging makes the merges of the BPE:
/// a token the merge of rank `r` makes scores `-(r + 1)` (its first merge, when several make
/// it). A SentencePiece BPE's `tokenizer.json` lists every pair whose concatenation is a token,
/// ranked by the token's SentencePiece score, so the order is SentencePiece's own. Tokens no
/// merge makes (characters, bytes) score 0, added ones -1000 and holes -10000, as the
/// converter writes them; llama.cpp merges by the score of the result only.
fn merge_scores(tokens: &[String], types: &[i32], merges: &[(String, String)]) -> Vec<f32> {
    let mut scores: Vec<Option<f32>> = types
        .iter()
        .map(|&t| match t {
            UNUSED => Some(HOLE_SCORE),
            CONTROL | USER_DEFINED => Some(ADDED_SCORE),
            _ => None,
        })
        .collect();
    let id_of: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    for (rank, (a, b)) in merges.iter().enumerate() {
        if let Some(&id) = id_of.get(format!("{a}{b}").as_str()) {
            scores[id].get_or_insert(-(rank as f32 + 1.0));
        }
    }
    scores.into_iter().map(|s| s.unwrap_or(0.0)).collect()
}

/// Where the tokenizer prepends `▁`, once its normalizer and pre-tokenizer are checked to do
/// no more than llama.cpp's `llama` model: write spaces as `▁` (Llama 2's and Gemma's
/// `Replace`, or `Metaspace` without splitting) and maybe prepend one (`Prepend`, or
/// Metaspace's `prepend_scheme`).
fn space_prefix(path: &Path, tok: &Json) -> Result<SpacePrefix, GgufError> {
    let (mut prefix, mut escaped) = (SpacePrefix::None, false);
    for n in steps(&tok["normalizer"], "normalizers") {
        match n["type"].as_str() {
            Some("Prepend") if n["prepend"] == SPACE => prefix = SpacePrefix::EachText,
            Some("Replace") if n["pattern"]["String"] == " " && n["content"] == SPACE => {
                escaped = true
            }
            _ => return Err(not_sentencepiece(path, "normalizer", n)),
        }
    }
    for p in steps(&tok["pre_tokenizer"], "pretokenizers") {
        match p["type"].as_str() {
            // Gemma's split at spaces that the normalizer has already replaced: a no-op.
            Some("Split") if escaped && p["pattern"]["String"] == " " => {}
            Some("Metaspace") if p["replacement"] == SPACE && p["split"] == false => {
                escaped = true;
                let scheme = p["prepend_scheme"].as_str();
                let legacy_prepends = p["add_prefix_space"].as_bool().unwrap_or(true);
                prefix = match scheme {
                    Some("first") => SpacePrefix::FirstOnly,
                    Some("never") => prefix,
                    None if !legacy_prepends => prefix,
                    _ => SpacePrefix::EachText,
                };
            }
            _ => return Err(not_sentencepiece(path, "pre_tokenizer", p)),
        }
    }
    if !escaped {
        return Err(error(
            path,
            "normalizer, pre_tokenizer: neither writes spaces as \u{2581}, which llama.cpp's \
             llama tokenizer does",
        ));
    }
    Ok(prefix)
}

/// The steps of a normalizer or pre-tokenizer: none, the `key` list of a `Sequence`, or itself.
fn steps<'a>(v: &'a Json, key: &str) -> &'a [Json] {
    match v {
        Json::Null => &[],
        _ => v[key]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(std::slice::from_ref(v)),
    }
}

fn not_sentencepiece(path: &Path, key: &str, step: &Json) -> GgufError {
    error(
        path,
        format!(
            "{key}: {} is not a step llama.cpp's llama tokenizer reproduces (Prepend or \
             Replace of \u{2581}, Metaspace without split)",
            short_json(step)
        ),
    )
}

/// `v` as JSON, cut to 120 characters for an error line.
fn short_json(v: &Json) -> String {
    let described = serde_json::to_string(v).unwrap_or_default();
    described.chars().take(120).collect()
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
    Err(error(
        path,
        format!(
            "pre_tokenizer: {} is not one llmtool can name for llama.cpp (gpt-2, \
             llama-bpe, qwen2, smollm); a byte-level BPE without a known pre-tokenizer \
             would tokenize differently there",
            short_json(pre)
        ),
    ))
}

/// The `vocab_size` tokens of `tokenizer.json` and their types: the model's vocabulary
/// (SentencePiece's `<0xXX>` bytes and its unknown token typed as such), then the added tokens
/// (special ones control, others user-defined, their `▁` pre-normalized to spaces as the
/// converter writes them for `llama`).
fn tokens(
    path: &Path,
    tok: &Json,
    size: usize,
    spelling: Spelling,
) -> Result<(Vec<String>, Vec<i32>), GgufError> {
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; size];
    let mut put = |text: String, id: u64, ty: i32| {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            error(
                path,
                format!("token {text:?} has id {id}, past the model's vocab_size {size}"),
            )
        })?;
        *slot = Some((text, ty));
        Ok::<_, GgufError>(())
    };
    let vocab = tok["model"]["vocab"]
        .as_object()
        .ok_or_else(|| error(path, "model.vocab: missing or not an object"))?;
    let unk = tok["model"]["unk_token"].as_str();
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| error(path, format!("model.vocab.{text}: not an id")))?;
        let ty = match spelling {
            Spelling::SentencePiece if is_byte_token(text) => BYTE,
            Spelling::SentencePiece if Some(text.as_str()) == unk => UNKNOWN,
            _ => NORMAL,
        };
        put(text.clone(), id, ty)?;
    }
    for added in tok["added_tokens"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let (Some(text), Some(id)) = (added["content"].as_str(), added["id"].as_u64()) else {
            return Err(error(path, "added_tokens: an entry lacks content or id"));
        };
        match (added["special"].as_bool().unwrap_or(false), spelling) {
            (true, _) => put(text.to_string(), id, CONTROL)?,
            (false, Spelling::SentencePiece) => put(text.replace(SPACE, " "), id, USER_DEFINED)?,
            (false, Spelling::ByteLevel) => put(text.to_string(), id, USER_DEFINED)?,
        }
    }
    Ok(tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED)))
        .unzip())
}

/// SentencePiece's byte tokens: `<0x00>` to `<0xFF>`.
fn is_byte_token(text: &str) -> bool {
    let hex = text.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'));
    hex.is_some_and(|h| h.len() == 2 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `model.merges`, as `"left right"` strings or `["left", "right"]` pairs.
fn merges(path: &Path, merges: &Json) -> Result<Vec<(String, String)>, GgufError> {
    let list = merges.as_array().map(Vec::as_slice).unwrap_or(&[]);
    list.iter()
        .map(|m| match m {
            Json::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| error(path, format!("model.merges: {s:?} is not two tokens"))),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Ok((a.clone(), b.clone())),
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

    fn spm_tokenizer(normalizer: Json, pre_tokenizer: Json) -> Json {
        json!({"normalizer": normalizer, "pre_tokenizer": pre_tokenizer})
    }

    #[test]
    fn sentencepiece_layouts_give_the_space_prefix() {
        let p = Path::new("tokenizer.json");
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE});
        let prepend = json!({"type": "Prepend", "prepend": SPACE});
        let llama2 = json!({"type": "Sequence", "normalizers": [prepend, replace]});
        let prefix = |tok: &Json| space_prefix(p, tok).unwrap();
        assert_eq!(
            prefix(&spm_tokenizer(llama2, Json::Null)),
            SpacePrefix::EachText
        );
        let gemma_split = json!({"type": "Split", "pattern": {"String": " "},
            "behavior": "MergedWithPrevious", "invert": false});
        let gemma = spm_tokenizer(replace.clone(), gemma_split);
        assert_eq!(prefix(&gemma), SpacePrefix::None);
        let metaspace = |scheme: &str, split: bool| {
            json!({"type": "Metaspace", "replacement": SPACE, "prepend_scheme": scheme,
                   "split": split})
        };
        let tok = |m: Json| spm_tokenizer(Json::Null, m);
        assert_eq!(
            prefix(&tok(metaspace("first", false))),
            SpacePrefix::FirstOnly
        );
        assert_eq!(
            prefix(&tok(metaspace("always", false))),
            SpacePrefix::EachText
        );
        assert_eq!(prefix(&tok(metaspace("never", false))), SpacePrefix::None);
        let err = space_prefix(p, &tok(metaspace("first", true))).unwrap_err();
        assert!(err.to_string().contains("pre_tokenizer: "), "{err}");
        let nfkc = json!({"type": "Sequence", "normalizers": [{"type": "NFKC"}, replace]});
        let err = space_prefix(p, &spm_tokenizer(nfkc, Json::Null)).unwrap_err();
        assert!(
            err.to_string().starts_with("tokenizer.json: normalizer: "),
            "{err}"
        );
        let err = space_prefix(p, &spm_tokenizer(Json::Null, Json::Null)).unwrap_err();
        assert!(err.to_string().contains("\u{2581}"), "{err}");
    }

    #[test]
    fn merges_rank_the_scores_of_what_they_make() {
        let tokens: Vec<String> = ["<unk>", "<0x41>", "a", "b", "ab", "abb", "ba", "[PAD7]"]
            .map(String::from)
            .into();
        let types = [
            CONTROL, BYTE, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, UNUSED,
        ];
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        // "abb" is made by its first merge (rank 1); the later "a"+"bb" pair would not count.
        let merges = [
            pair("a", "b"),
            pair("ab", "b"),
            pair("b", "a"),
            pair("a", "bb"),
        ];
        let scores = merge_scores(&tokens, &types, &merges);
        assert_eq!(scores, [-1000.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -10000.0]);
    }

    #[test]
    fn byte_tokens_are_two_hex_digits() {
        assert!(is_byte_token("<0x0A>") && is_byte_token("<0xff>"));
        assert!(!is_byte_token("<0x0>") && !is_byte_token("<0xGG>") && !is_byte_token("0x0A"));
    }

    #[test]
    fn merges_read_both_spellings() {
        let p = Path::new("tokenizer.json");
        let m = merges(p, &json!(["a b", ["c", "d"]])).unwrap();
        assert_eq!(m, [("a".into(), "b".into()), ("c".into(), "d".into())]);
        let err = merges(p, &json!(["ab"])).unwrap_err();
        assert!(err.to_string().contains("model.merges"), "{err}");
    }

    #[test]
    fn other_tokenizer_kinds_are_one_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let config: LlamaConfig = serde_json::from_value(json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32
        }))
        .unwrap();
        for kind in ["WordPiece", "Unigram"] {
            let tok = json!({"model": {"type": kind, "vocab": {}}});
            std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
            let err = Vocab::read(dir.path(), &config).unwrap_err().to_string();
            assert!(
                err.contains(&format!("tokenizer.json: model.type: a {kind}")),
                "{err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }
}
