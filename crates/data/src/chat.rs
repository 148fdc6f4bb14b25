//! Chat templates from `tokenizer_config.json`, rendered with minijinja the way transformers'
//! `apply_chat_template` does: variables `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`, and a `raise_exception(message)` function.

use serde::Serialize;
use std::path::{Path, PathBuf};

/// Errors loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model has no template.
    #[error("{path}: no chat_template; this model was not trained for chat (drop --chat)")]
    NoTemplate { path: PathBuf },
    /// `tokenizer_config.json` could not be read or parsed.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// The template failed to compile or render.
    #[error("chat template: {0}")]
    Render(String),
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A turn by `role`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's chat template with its special-token strings.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// A token field that is a string or an AddedToken object `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(obj) => obj
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

impl ChatTemplate {
    /// Reads `DIR/tokenizer_config.json`. A template list (`[{name, template}]`) uses `default`.
    pub fn load(dir: &Path) -> Result<Self, ChatError> {
        let path = dir.join("tokenizer_config.json");
        let config_error = |message: String| ChatError::Config {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ChatError::NoTemplate { path: path.clone() }
            } else {
                config_error(e.to_string())
            }
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| config_error(e.to_string()))?;
        let source = match json.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| config_error("chat_template list has no \"default\"".into()))?
                .to_string(),
            _ => return Err(ChatError::NoTemplate { path }),
        };
        Ok(Self {
            source,
            bos_token: token_string(json.get("bos_token")),
            eos_token: token_string(json.get("eos_token")),
        })
    }

    /// Renders `messages`, ending with the assistant's header when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let mut env = minijinja::Environment::new();
        // Python's Jinja keeps a template's trailing newline only with this flag; HF sets it.
        env.set_keep_trailing_newline(false);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |message: String| -> Result<String, _> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        });
        let render_error = |e: minijinja::Error| ChatError::Render(e.to_string());
        env.add_template("chat", &self.source)
            .map_err(render_error)?;
        let template = env.get_template("chat").map_err(render_error)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(render_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name)
    }

    #[test]
    fn renders_like_transformers() {
        let text = std::fs::read_to_string(fixture("tokenizer_expected.json")).unwrap();
        let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
        let case = &expected["chat_template"];
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let template = ChatTemplate::load(&fixture("tiny-llama")).unwrap();
        for (flag, key) in [
            (true, "rendered_add_generation_prompt_true"),
            (false, "rendered_add_generation_prompt_false"),
        ] {
            let got = template.render(&messages, flag).unwrap();
            assert_eq!(got, case[key].as_str().unwrap());
        }
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let template = ChatTemplate {
            source: "{{ raise_exception('roles must alternate') }}".into(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        let err = template.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }
}
