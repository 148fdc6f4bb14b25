//! Chat templates, rendered with minijinja as transformers' `apply_chat_template` renders them
//! with Jinja2: the template from `chat_template.jinja` or `tokenizer_config.json`, the
//! environment's options (`trim_blocks`, `lstrip_blocks`, loop controls), Python's string and
//! dict methods (minijinja-contrib's `pycompat`), transformers' globals and filters
//! (`raise_exception`, `strftime_now`, `tojson`, in `python.rs`), and the variables it passes:
//! `messages`, `add_generation_prompt`, `tools` and `documents` (none), the special tokens of
//! `tokenizer_config.json` (`bos_token`, `eos_token`, `unk_token`, `pad_token`) and any extra
//! ones set with [`ChatTemplate::with_variable`] (`enable_thinking`).

mod python;

use minijinja::Value;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Errors loading or rendering a chat template. Each names the file the template came from.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model has no template.
    #[error("{path}: no chat_template; this model was not trained for chat (drop --chat)")]
    NoTemplate {
        /// The `tokenizer_config.json` without a template.
        path: PathBuf,
    },
    /// `tokenizer_config.json` or `chat_template.jinja` could not be read or parsed.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The template is not valid Jinja.
    #[error("{path}: the chat template does not compile: {message}")]
    Template {
        /// The file the template came from.
        path: PathBuf,
        /// The compiler's error.
        message: String,
    },
    /// The template failed while rendering (including its own `raise_exception`).
    #[error("{path}: the chat template failed: {message}")]
    Render {
        /// The file the template came from.
        path: PathBuf,
        /// The renderer's error, or the template's own message.
        message: String,
    },
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of the turn.
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

/// The special tokens transformers passes to a template (its `special_tokens_map`).
const SPECIAL_TOKENS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

/// A model's chat template, compiled, with the variables it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// The file the template came from, named by every error.
    path: PathBuf,
    env: minijinja::Environment<'static>,
    /// Special tokens and extra variables, passed to every render.
    variables: BTreeMap<String, Value>,
}

/// A token field that is a string or an AddedToken object `{"content": ...}`.
fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        obj => obj
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
    }
}

/// Name of the compiled template in the environment.
const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Reads the template of model directory `dir` as transformers does: `chat_template.jinja`
    /// when present, else `tokenizer_config.json`'s `chat_template` (of a list of named
    /// templates, `default`), with the special tokens of `tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Self, ChatError> {
        let config_path = dir.join("tokenizer_config.json");
        let read = |path: &Path| -> Result<Option<String>, ChatError> {
            match std::fs::read_to_string(path) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(ChatError::Config {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                }),
            }
        };
        let config_error = |message: String| ChatError::Config {
            path: config_path.clone(),
            message,
        };
        let config: serde_json::Value = match read(&config_path)? {
            Some(text) => serde_json::from_str(&text).map_err(|e| config_error(e.to_string()))?,
            None => serde_json::Value::Null,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let (path, source) = match (read(&jinja_path)?, config.get("chat_template")) {
            (Some(source), _) => (jinja_path, source),
            (None, Some(serde_json::Value::String(s))) => (config_path.clone(), s.clone()),
            (None, Some(serde_json::Value::Array(list))) => {
                let source = list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| config_error("chat_template list has no \"default\"".into()))?;
                (config_path.clone(), source.to_string())
            }
            _ => return Err(ChatError::NoTemplate { path: config_path }),
        };
        let tokens: Vec<(&str, String)> = SPECIAL_TOKENS
            .iter()
            .filter_map(|&name| Some((name, config.get(name).and_then(token_string)?)))
            .collect();
        Self::from_source(&path, source, &tokens)
    }

    /// Compiles `source`, a template read from `path`, rendered with the special tokens
    /// `tokens` (`("bos_token", "<s>")`, ...).
    pub fn from_source(
        path: &Path,
        source: String,
        tokens: &[(&str, String)],
    ) -> Result<Self, ChatError> {
        let mut env = minijinja::Environment::new();
        // Python's Jinja keeps a template's trailing newline only with this flag; HF leaves it off.
        env.set_keep_trailing_newline(false);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", python::raise_exception);
        env.add_function("strftime_now", python::strftime_now);
        env.add_filter("tojson", python::tojson);
        env.add_template_owned(NAME, source)
            .map_err(|e| ChatError::Template {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let variables = tokens
            .iter()
            .map(|(name, token)| (name.to_string(), Value::from(token.as_str())))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            env,
            variables,
        })
    }

    /// Sets an extra variable of every render, as keyword arguments of `apply_chat_template`
    /// do (`enable_thinking=False`).
    pub fn with_variable(mut self, name: &str, value: impl Serialize) -> Self {
        self.variables
            .insert(name.to_string(), Value::from_serialize(value));
        self
    }

    /// The file the template came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renders `messages`, ending with the assistant's header when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let render_error = |e: minijinja::Error| ChatError::Render {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let mut context = self.variables.clone();
        context.insert("messages".into(), Value::from_serialize(messages));
        context.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        for absent in ["tools", "documents"] {
            context.insert(absent.into(), Value::from(()));
        }
        self.env
            .get_template(NAME)
            .and_then(|template| template.render(context))
            .map_err(render_error)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name)
    }

    /// `tests/fixtures/chat/expected.json`, made by `make_chat_fixtures.py`.
    pub(crate) fn chat_fixtures() -> serde_json::Value {
        let text = std::fs::read_to_string(fixture("chat/expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// The fixtures' template `name` (`qwen3`, `gemma3`, `phi4`, `llama3`, `mistral`) from
    /// `tests/fixtures/chat/NAME.jinja`, with its special tokens.
    pub(crate) fn fixture_template(fixtures: &serde_json::Value, name: &str) -> ChatTemplate {
        let tokens: Vec<(&str, String)> = fixtures["templates"][name]["tokens"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap().to_string()))
            .collect();
        let path = fixture(&format!("chat/{name}.jinja"));
        let source = std::fs::read_to_string(&path).unwrap();
        ChatTemplate::from_source(&path, source, &tokens).unwrap()
    }

    pub(crate) fn fixture_messages(value: &serde_json::Value) -> Vec<Message> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect()
    }

    #[test]
    fn renders_like_transformers() {
        let text = std::fs::read_to_string(fixture("tokenizer_expected.json")).unwrap();
        let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
        let case = &expected["chat_template"];
        let messages = fixture_messages(&case["messages"]);
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
    fn each_familys_template_renders_as_apply_chat_template() {
        let fixtures = chat_fixtures();
        // Llama 3.x writes today's date (`strftime_now`); the fixture holds the day it was made.
        let today = python::strftime_now("%d %b %Y".into()).unwrap();
        let fixture_day = fixtures["today"].as_str().unwrap();
        let cases = fixtures["cases"].as_array().unwrap();
        assert!(cases.len() >= 40, "{} cases", cases.len());
        for case in cases {
            let name = case["template"].as_str().unwrap();
            let mut template = fixture_template(&fixtures, name);
            for (key, value) in case["variables"].as_object().unwrap() {
                template = template.with_variable(key, value);
            }
            let conversation = case["conversation"].as_str().unwrap();
            let messages = fixture_messages(&fixtures["conversations"][conversation]);
            let prompt = case["add_generation_prompt"].as_bool().unwrap();
            let got = template.render(&messages, prompt).unwrap();
            let expected = case["expected"]
                .as_str()
                .unwrap()
                .replace(fixture_day, today.as_str().unwrap());
            assert_eq!(
                got, expected,
                "{name} on {conversation}, add_generation_prompt={prompt}, {}",
                case["variables"]
            );
        }
    }

    #[test]
    fn a_template_error_is_one_line_naming_the_file_and_the_templates_message() {
        let fixtures = chat_fixtures();
        for case in fixtures["errors"].as_array().unwrap() {
            let name = case["template"].as_str().unwrap();
            let messages = fixture_messages(
                &fixtures["conversations"][case["conversation"].as_str().unwrap()],
            );
            let err = fixture_template(&fixtures, name)
                .render(&messages, false)
                .unwrap_err()
                .to_string();
            let message = case["message"].as_str().unwrap();
            let path = fixture(&format!("chat/{name}.jinja"));
            assert!(err.starts_with(&format!("{}: ", path.display())), "{err}");
            assert!(err.contains(message), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn a_template_that_does_not_compile_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"eos_token": "</s>"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{% for m in messages %}{{ m.content }}",
        )
        .unwrap();
        let err = ChatTemplate::load(dir.path()).unwrap_err().to_string();
        let path = dir.path().join("chat_template.jinja");
        assert!(
            err.starts_with(&format!(
                "{}: the chat template does not compile: ",
                path.display()
            )),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn chat_template_jinja_wins_over_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"eos_token": {"content": "</s>"}, "chat_template": "config"}"#,
        )
        .unwrap();
        let template = ChatTemplate::load(dir.path()).unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "config");
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "jinja {{ eos_token }}\n",
        )
        .unwrap();
        let template = ChatTemplate::load(dir.path()).unwrap();
        assert_eq!(template.path(), dir.path().join("chat_template.jinja"));
        assert_eq!(template.render(&[], false).unwrap(), "jinja </s>");
    }

    #[test]
    fn strftime_and_tojson_match_python() {
        let fixtures = chat_fixtures();
        let strftime = &fixtures["strftime"];
        let seconds = strftime["timestamp"].as_i64().unwrap();
        for (format, expected) in strftime["formats"].as_object().unwrap() {
            assert_eq!(
                python::strftime(seconds, format).unwrap(),
                expected.as_str().unwrap()
            );
        }
        assert!(python::strftime(seconds, "%Q").is_err());
        let indented = |indent: &str| {
            ChatTemplate::from_source(
                Path::new("t"),
                format!("{{{{ [1] | tojson(indent={indent}) }}}}"),
                &[],
            )
            .unwrap()
            .render(&[], false)
        };
        assert_eq!(indented("256").unwrap().len(), "[\n1\n]".len() + 256);
        for too_long in ["257", "10**12", "' ' * 257"] {
            let error = indented(too_long).unwrap_err().to_string();
            assert!(error.contains("indent longer than 256"), "{error}");
        }
        for case in fixtures["tojson"].as_array().unwrap() {
            let source = case["template"].as_str().unwrap().to_string();
            let template = ChatTemplate::from_source(Path::new("t"), source, &[])
                .unwrap()
                .with_variable("value", &case["value"]);
            assert_eq!(
                template.render(&[], false).unwrap(),
                case["expected"].as_str().unwrap(),
                "{}",
                case["template"]
            );
        }
    }
}
