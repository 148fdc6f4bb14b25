//! The files transformers reads beside the weights of a model directory: `tokenizer.json`,
//! `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json` and a chat
//! template. A saved model either carries them over from its base model or, for a tokenizer
//! llmtool trained, gets them written, so that `AutoTokenizer.from_pretrained` loads the
//! tokenizer as llmtool uses it (no token added that llmtool does not add, the right special
//! tokens) and `generate --chat` finds the base's template.

use super::config::{LlamaConfig, TokenIds};
use super::weights::{write_atomic, ModelError};
use serde_json::{json, Map, Value};
use std::path::Path;

/// Where a saved model's tokenizer and the files beside it come from.
#[derive(Debug, Clone, Copy)]
pub enum TokenizerSource<'a> {
    /// A base model directory: its `tokenizer.json` and each of [`CARRIED_FILES`] it has are
    /// copied as they are; a `generation_config.json` is written when the base has none.
    Base(&'a Path),
    /// A `tokenizer.json` llmtool trained: `tokenizer_config.json`,
    /// `special_tokens_map.json` and `generation_config.json` are written for it.
    Trained(&'a Path),
}

/// The files of a base model directory carried into a model saved from it, besides
/// `tokenizer.json`: the tokenizer's settings and special tokens, a chat template in its own
/// file, the files of transformers' slow tokenizers, and the generation defaults.
pub const CARRIED_FILES: [&str; 9] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
];

impl TokenizerSource<'_> {
    /// The `tokenizer.json` the model is saved with.
    pub fn tokenizer_json(&self) -> std::path::PathBuf {
        match self {
            Self::Base(dir) => dir.join("tokenizer.json"),
            Self::Trained(path) => path.to_path_buf(),
        }
    }

    /// Writes `tokenizer.json` and the files beside it into the directory `out`.
    pub fn write(&self, out: &Path, config: &LlamaConfig) -> Result<(), ModelError> {
        let tokenizer_json = self.tokenizer_json();
        copy(&tokenizer_json, &out.join("tokenizer.json"))?;
        match self {
            Self::Base(dir) => {
                for name in CARRIED_FILES {
                    let source = dir.join(name);
                    if source.is_file() {
                        copy(&source, &out.join(name))?;
                    }
                }
            }
            Self::Trained(_) => {
                let specials = TrainedSpecials::of(&tokenizer_json, config)?;
                write_json(
                    &out.join("tokenizer_config.json"),
                    &specials.tokenizer_config(config),
                )?;
                write_json(
                    &out.join("special_tokens_map.json"),
                    &Value::Object(specials.map()),
                )?;
            }
        }
        let generation = out.join("generation_config.json");
        if !generation.is_file() {
            write_json(&generation, &generation_config(config))?;
        }
        Ok(())
    }
}

/// `generation_config.json` from the config's BOS and EOS ids.
fn generation_config(config: &LlamaConfig) -> Value {
    let mut fields = Map::new();
    fields.insert("bos_token_id".into(), json!(config.bos_token_id));
    fields.insert("eos_token_id".into(), json!(config.eos_token_id));
    Value::Object(fields)
}

/// The special tokens of a tokenizer llmtool trained: the config's EOS token ends every
/// document, and serves as BOS too (GPT-2's convention: `config.json` names the same id for
/// both); a special token named like a padding token (`<|pad|>`, `<pad>`) pads.
struct TrainedSpecials {
    eos: Option<String>,
    pad: Option<String>,
    /// `(id, content)` of every special token the tokenizer holds.
    added: Vec<(u32, String)>,
}

impl TrainedSpecials {
    fn of(tokenizer_json: &Path, config: &LlamaConfig) -> Result<Self, ModelError> {
        let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| {
            ModelError::Tokenizer {
                path: tokenizer_json.to_path_buf(),
                message: format!("cannot load: {e}"),
            }
        })?;
        let eos_id = config.eos_token_id.as_ref().and_then(TokenIds::first);
        let eos = match eos_id {
            Some(id) => Some(
                tokenizer
                    .id_to_token(id)
                    .ok_or_else(|| ModelError::Tokenizer {
                        path: tokenizer_json.to_path_buf(),
                        message: format!("has no token {id}, the config's eos_token_id"),
                    })?,
            ),
            None => None,
        };
        let mut added: Vec<(u32, String)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, token)| (id, token.content))
            .collect();
        added.sort();
        let pad = added
            .iter()
            .map(|(_, content)| content)
            .find(|content| {
                let bare = content.trim_matches(|c: char| matches!(c, '<' | '>' | '|'));
                bare.eq_ignore_ascii_case("pad")
            })
            .cloned();
        Ok(Self { eos, pad, added })
    }

    /// `special_tokens_map.json`: the named special tokens.
    fn map(&self) -> Map<String, Value> {
        let mut map = Map::new();
        if let Some(eos) = &self.eos {
            map.insert("bos_token".into(), json!(eos));
            map.insert("eos_token".into(), json!(eos));
        }
        if let Some(pad) = &self.pad {
            map.insert("pad_token".into(), json!(pad));
        }
        map
    }

    /// `tokenizer_config.json`: the tokenizer as llmtool uses it, the plain fast tokenizer of
    /// `tokenizer.json` (the Llama class a `llama` config would otherwise pick adds a BOS to
    /// every encode), with its special tokens and the model's context length.
    fn tokenizer_config(&self, config: &LlamaConfig) -> Value {
        let decoder: Map<String, Value> = self
            .added
            .iter()
            .map(|(id, content)| {
                let token = json!({
                    "content": content,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": true,
                });
                (id.to_string(), token)
            })
            .collect();
        let mut fields = Map::new();
        fields.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        fields.insert("add_bos_token".into(), json!(false));
        fields.insert("add_eos_token".into(), json!(false));
        fields.insert("added_tokens_decoder".into(), Value::Object(decoder));
        fields.insert("clean_up_tokenization_spaces".into(), json!(false));
        fields.insert(
            "model_max_length".into(),
            json!(config.max_position_embeddings),
        );
        fields.extend(self.map());
        Value::Object(fields)
    }
}

/// Copies `from` to `to`, read and written rather than copied so the file gets the umask's
/// mode, not the source's.
fn copy(from: &Path, to: &Path) -> Result<(), ModelError> {
    let bytes = std::fs::read(from).map_err(|source| ModelError::Io {
        path: from.to_path_buf(),
        source,
    })?;
    write_atomic(to, &bytes).map_err(|source| ModelError::Io {
        path: to.to_path_buf(),
        source,
    })
}

fn write_json(path: &Path, value: &Value) -> Result<(), ModelError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes()).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    fn read(path: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn a_trained_tokenizer_gets_the_files_transformers_loads_it_with() {
        let mut config = crate::io::read_config(&fixtures().join("tiny-llama")).unwrap();
        config.max_position_embeddings = 96;
        let out = tempfile::tempdir().unwrap();
        let tokenizer = fixtures().join("tokenizer.json");
        TokenizerSource::Trained(&tokenizer)
            .write(out.path(), &config)
            .unwrap();
        assert_eq!(
            std::fs::read(out.path().join("tokenizer.json")).unwrap(),
            std::fs::read(&tokenizer).unwrap()
        );
        let tokenizer_config = read(&out.path().join("tokenizer_config.json"));
        // The fixture's tokenizer: <|endoftext|> (id 0, the config's EOS) and <|pad|> (id 1).
        assert_eq!(
            tokenizer_config,
            json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "add_bos_token": false,
                "add_eos_token": false,
                "added_tokens_decoder": {
                    "0": {"content": "<|endoftext|>", "lstrip": false, "normalized": false,
                          "rstrip": false, "single_word": false, "special": true},
                    "1": {"content": "<|pad|>", "lstrip": false, "normalized": false,
                          "rstrip": false, "single_word": false, "special": true},
                },
                "clean_up_tokenization_spaces": false,
                "model_max_length": 96,
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|pad|>",
            })
        );
        assert_eq!(
            read(&out.path().join("special_tokens_map.json")),
            json!({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|pad|>"})
        );
        assert_eq!(
            read(&out.path().join("generation_config.json")),
            json!({"bos_token_id": 0, "eos_token_id": 0})
        );
    }

    #[test]
    fn an_eos_id_the_tokenizer_lacks_is_an_error_naming_the_tokenizer() {
        let mut config = crate::io::read_config(&fixtures().join("tiny-llama")).unwrap();
        config.eos_token_id = Some(crate::config::TokenIds::One(100_000));
        let out = tempfile::tempdir().unwrap();
        let tokenizer = fixtures().join("tokenizer.json");
        let err = TokenizerSource::Trained(&tokenizer)
            .write(out.path(), &config)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("100000"),
            "{err}"
        );
    }

    #[test]
    fn a_base_without_generation_config_gets_one_from_its_config() {
        let base = tempfile::tempdir().unwrap();
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(
                fixtures().join("tiny-llama").join(name),
                base.path().join(name),
            )
            .unwrap();
        }
        std::fs::write(base.path().join("chat_template.jinja"), "{{ messages }}").unwrap();
        let config = crate::io::read_config(&fixtures().join("tiny-llama")).unwrap();
        let out = tempfile::tempdir().unwrap();
        TokenizerSource::Base(base.path())
            .write(out.path(), &config)
            .unwrap();
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ] {
            assert_eq!(
                std::fs::read(out.path().join(name)).unwrap(),
                std::fs::read(base.path().join(name)).unwrap(),
                "{name}"
            );
        }
        assert!(!out.path().join("special_tokens_map.json").exists());
        assert_eq!(
            read(&out.path().join("generation_config.json")),
            json!({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
        );
    }
}
