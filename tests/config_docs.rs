//! docs/config.md documents every key of the schema with its real default, and nothing else.

use llmtool::config::Config;
use serde_norway::Value;

fn render(v: &Value) -> String {
    match v {
        Value::Sequence(items) => {
            let items: Vec<String> = items.iter().map(render).collect();
            format!("[{}]", items.join(", "))
        }
        Value::String(s) => s.clone(),
        other => serde_norway::to_string(other).unwrap().trim().to_string(),
    }
}

/// The keys of the config with their defaults; an empty mapping (a free-form one, such as
/// `data.chat_template_args`) is a leaf whose default is `{}`.
fn leaves(v: &Value, prefix: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Mapping(map) if map.is_empty() => out.push((prefix.to_string(), "{}".into())),
        Value::Mapping(map) => {
            for (k, sub) in map {
                let key = k.as_str().unwrap();
                let path = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(sub, &path, out);
            }
        }
        other => out.push((prefix.to_string(), render(other))),
    }
}

#[test]
fn every_key_is_documented_with_its_default() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/config.md"))
        .unwrap()
        .replace("\\|", "|");
    let mut keys = Vec::new();
    leaves(
        &serde_norway::to_value(Config::default()).unwrap(),
        "",
        &mut keys,
    );
    for (key, default) in &keys {
        let row = format!("| `{key}` | `{default}` |");
        assert!(
            doc.contains(&row),
            "docs/config.md lacks the row starting {row}"
        );
    }
    let documented = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next());
    for key in documented {
        assert!(
            keys.iter().any(|(k, _)| k == key),
            "docs/config.md documents {key}, which the schema does not have"
        );
    }
}
