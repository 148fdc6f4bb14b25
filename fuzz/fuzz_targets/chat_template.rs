//! Chat templates (`generate --chat`, `chat`, JSONL `messages`): the five real templates of
//! `tests/fixtures/chat` (Qwen 3, Gemma 3, Phi-4, Llama 3, Mistral) rendering turns made from
//! the input, and transformers' globals and filters that `data::chat` writes itself
//! (`strftime_now`'s format directives, `tojson`'s keyword arguments and its Python-style JSON)
//! called with arguments from the input. The input is three lines and the rest: a `strftime`
//! format, `tojson`'s `indent` (an integer when it parses as one, else the string), its
//! `separators` as JSON, then a JSON value (the text itself when it is not JSON); the turns are
//! that value when it is a list of `{role, content}`, else one user turn holding the text. Any
//! input must render or give a `ChatError`.
#![no_main]

use data::chat::{ChatTemplate, Message};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::path::Path;
use std::sync::OnceLock;

const CHAT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/chat");

/// The five fixture templates, with a `<s>`/`</s>` pair as their special tokens.
fn fixtures() -> &'static [ChatTemplate] {
    static TEMPLATES: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let tokens = [("bos_token", "<s>".to_string()), ("eos_token", "</s>".to_string())];
        ["qwen3", "gemma3", "phi4", "llama3", "mistral"]
            .iter()
            .map(|name| {
                let path = Path::new(CHAT).join(format!("{name}.jinja"));
                let source = std::fs::read_to_string(&path).expect("a fixture template");
                ChatTemplate::from_source(&path, source, &tokens).expect("a fixture template")
            })
            .collect()
    })
}

/// A template calling the filters and globals with the input's arguments.
const FILTERS: &str = "{{ strftime_now(format) }}|{{ value | tojson }}|\
{{ value | tojson(indent=indent, sort_keys=true) }}|\
{{ value | tojson(ensure_ascii=true, separators=separators) }}|{{ raise_exception(format) }}";

fn filters() -> &'static ChatTemplate {
    static TEMPLATE: OnceLock<ChatTemplate> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        ChatTemplate::from_source(Path::new("filters.jinja"), FILTERS.to_string(), &[])
            .expect("the filters' template")
    })
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let mut lines = text.splitn(4, '\n');
    let format = lines.next().unwrap_or_default();
    let indent = lines.next().unwrap_or_default();
    let separators = lines.next().unwrap_or_default();
    let rest = lines.next().unwrap_or_default();
    let value: Value = serde_json::from_str(rest).unwrap_or_else(|_| Value::from(rest));
    let indent = indent
        .parse::<i64>()
        .map_or_else(|_| Value::from(indent), Value::from);
    let separators: Value = serde_json::from_str(separators).unwrap_or(Value::Null);

    let rendered = filters()
        .clone()
        .with_variable("format", format)
        .with_variable("indent", indent)
        .with_variable("separators", separators)
        .with_variable("value", &value)
        .render(&[], false);
    // The template ends in raise_exception: it never renders.
    assert!(rendered.is_err());

    let turns: Vec<Message> = match value.as_array() {
        Some(list) => list
            .iter()
            .filter_map(|turn| {
                Some(Message::new(
                    turn.get("role")?.as_str()?,
                    turn.get("content")?.as_str()?,
                ))
            })
            .collect(),
        None => vec![Message::new("user", rest)],
    };
    for template in fixtures() {
        for add_generation_prompt in [false, true] {
            let _ = template.render(&turns, add_generation_prompt);
        }
    }
});
