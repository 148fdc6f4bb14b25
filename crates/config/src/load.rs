//! Reading a config file: YAML syntax, unknown keys with suggestions, types and ranges,
//! `--set` overrides, then cross-field checks. Every problem is collected and reported at once.

use super::locate::KeyPositions;
use super::schema::Config;
use super::validate::cross_field_issues;
use serde_norway::{Mapping, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a problem was found.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A position in the config file.
    File { line: usize, column: usize },
    /// A `--set` override.
    Override,
    /// The file as a whole.
    Unknown,
}

/// One problem with a configuration, pointing at its key.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigIssue {
    /// Dotted key path (`training.lr`); empty for the document itself.
    pub key: String,
    /// What is wrong.
    pub message: String,
    /// Where it was found.
    pub origin: Origin,
}

/// All problems found in a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A `--set` argument is not `key.path=value`.
    #[error("--set {0}: expected KEY=VALUE, e.g. --set training.lr=3e-4")]
    BadOverride(String),
    /// The text is not valid YAML or not a valid configuration.
    #[error("{}", format_issues(.path, .issues))]
    Invalid {
        /// The config file the problems are in.
        path: PathBuf,
        /// Every problem found, in file order; overrides and problems without a position come
        /// last.
        issues: Vec<ConfigIssue>,
    },
}

impl ConfigError {
    /// The individual problems (empty for read errors).
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            Self::Invalid { issues, .. } => issues,
            _ => &[],
        }
    }
}

fn format_issues(path: &Path, issues: &[ConfigIssue]) -> String {
    let lines: Vec<String> = issues
        .iter()
        .map(|i| {
            let key = if i.key.is_empty() {
                String::new()
            } else {
                format!("{}: ", i.key)
            };
            match i.origin {
                Origin::File { line, column } => {
                    format!("{}:{line}:{column}: {key}{}", path.display(), i.message)
                }
                Origin::Override => format!("--set {key}{}", i.message),
                Origin::Unknown => format!("{}: {key}{}", path.display(), i.message),
            }
        })
        .collect();
    lines.join("\n")
}

/// One `--set key.path=value` override; the value is parsed as YAML.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// Dotted key path, e.g. `training.lr`.
    pub key: String,
    /// The value, parsed as YAML (text that is not YAML stays a string).
    pub value: Value,
}

impl std::str::FromStr for Override {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (key, raw) = s
            .split_once('=')
            .ok_or_else(|| ConfigError::BadOverride(s.to_string()))?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(ConfigError::BadOverride(s.to_string()));
        }
        let value = serde_norway::from_str(raw).unwrap_or_else(|_| Value::String(raw.into()));
        Ok(Self {
            key: key.to_string(),
            value,
        })
    }
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.key)
    }
}

/// Read, override and validate the config at `path`.
pub fn load(path: &Path, overrides: &[Override]) -> Result<Config, ConfigError> {
    load_with(path, overrides, &[])
}

/// A check of a layer above the config (e.g. LoRA target names, which the model's naming
/// table knows): each problem as `(key, message)`, reported with its line like the config's
/// own.
pub type Check = fn(&Config) -> Vec<(String, String)>;

/// [`load`], with the cross-field problems `checks` find reported alongside the config's own.
pub fn load_with(
    path: &Path,
    overrides: &[Override],
    checks: &[Check],
) -> Result<Config, ConfigError> {
    load_str_with(&read_text(path)?, path, overrides, checks)
}

/// The text of the config file at `path`, for a caller that reads more from it than the config.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Validate config `text` as if read from `path` (used for messages only).
pub fn load_str(text: &str, path: &Path, overrides: &[Override]) -> Result<Config, ConfigError> {
    load_str_with(text, path, overrides, &[])
}

/// [`load_str`] with the checks of [`load_with`]: for a caller that needs the text as well.
pub fn load_str_with(
    text: &str,
    path: &Path,
    overrides: &[Override],
    checks: &[Check],
) -> Result<Config, ConfigError> {
    // Editors on Windows save UTF-8 with a byte order mark; YAML allows one at the start.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Err(issue) = check_nesting(text) {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            issues: vec![issue],
        });
    }
    let positions = KeyPositions::of(text);
    let mut issues = Vec::new();
    let mut doc = match parse_document(text) {
        Ok(doc) => doc,
        Err(issue) => {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                issues: vec![issue],
            })
        }
    };
    let from_file = |key: &str| match positions.find(key) {
        Some(p) => Origin::File {
            line: p.line,
            column: p.column,
        },
        None => Origin::Unknown,
    };
    let schema = serde_norway::to_value(Config::default()).unwrap_or(Value::Null);

    remove_unknown_keys(&mut doc, &schema, "", &mut |key, message| {
        issues.push(ConfigIssue {
            origin: from_file(key),
            key: key.to_string(),
            message,
        })
    });
    let mut overridden = Vec::new();
    for o in overrides {
        match set_key(&mut doc, &schema, &o.key, o.value.clone()) {
            Ok(()) => overridden.push(o.key.clone()),
            Err(message) => issues.push(ConfigIssue {
                key: o.key.clone(),
                message,
                origin: Origin::Override,
            }),
        }
    }
    let origin_of = |key: &str| {
        if overridden
            .iter()
            .any(|o| key == o || key.starts_with(&format!("{o}.")))
        {
            Origin::Override
        } else {
            from_file(key)
        }
    };

    let mut mistyped = Vec::new();
    let mut config = deserialize_all(&mut doc, &mut |key, message| {
        mistyped.push(key.to_string());
        issues.push(ConfigIssue {
            origin: origin_of(key),
            key: key.to_string(),
            message,
        })
    });
    expand_home(&mut config);
    // Cross-field problems are reported with the others, all at once, except in a section
    // where a value was unreadable: there the default that stands in for it could make up a
    // problem the file does not have.
    let section = |key: &str| key.split('.').next().unwrap_or_default().to_string();
    let unreadable: Vec<String> = mistyped.iter().map(|k| section(k)).collect();
    let above = checks.iter().flat_map(|check| check(&config));
    for (key, message) in cross_field_issues(&config).into_iter().chain(above) {
        if !unreadable.contains(&section(&key)) {
            issues.push(ConfigIssue {
                origin: origin_of(&key),
                key,
                message,
            });
        }
    }
    if issues.is_empty() {
        Ok(config)
    } else {
        issues.sort_by_key(|i| match i.origin {
            Origin::File { line, column } => (0, line, column),
            Origin::Override => (1, 0, 0),
            Origin::Unknown => (2, 0, 0),
        });
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            issues,
        })
    }
}

/// `~/notes` as the shell would expand it, for every path the config names: a `--set` value
/// or a YAML string never passes through a shell. Left as it is without a home directory.
fn expand_home(config: &mut Config) {
    let home = std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE"));
    let Some(home) = home.map(PathBuf::from) else {
        return;
    };
    let expand = |path: &mut PathBuf| {
        if let Ok(rest) = path.strip_prefix("~") {
            *path = home.join(rest);
        }
    };
    let data = &mut config.data;
    data.roots.iter_mut().for_each(expand);
    data.tokenizer.iter_mut().for_each(expand);
    data.dataset_dir.iter_mut().for_each(expand);
    expand(&mut config.output.dir);
    if let Some(spec) = &mut config.model.pretrained {
        if spec == "~" || spec.starts_with("~/") {
            *spec = home
                .join(spec[1..].trim_start_matches('/'))
                .to_string_lossy()
                .into_owned();
        }
    }
}

/// The deepest nesting a config may have: the schema is three levels deep, and a parser walks
/// a pathological document (200,000 nested brackets) for minutes.
const MAX_NESTING: usize = 32;

/// Refuses a document nested deeper than [`MAX_NESTING`] (flow brackets or block indentation
/// levels), before any parser sees it.
fn check_nesting(text: &str) -> Result<(), ConfigIssue> {
    let too_deep = |line: usize, column: usize| ConfigIssue {
        key: String::new(),
        message: format!("invalid YAML: nested more than {MAX_NESTING} levels deep"),
        origin: Origin::File { line, column },
    };
    let mut depth = 0usize;
    for (i, line) in text.lines().enumerate() {
        // Block nesting: each level indents by at least one column.
        let indent = line.len() - line.trim_start_matches([' ', '-']).len();
        if indent > 4 * MAX_NESTING && !line.trim().is_empty() {
            return Err(too_deep(i + 1, indent + 1));
        }
        let mut quote = None;
        for (column, c) in line.char_indices() {
            match (quote, c) {
                (None, '#') => break,
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Err(too_deep(i + 1, column + 1));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

fn parse_document(text: &str) -> Result<Value, ConfigIssue> {
    let value: Value = serde_norway::from_str(text).map_err(|e| {
        let origin = e.location().map_or(Origin::Unknown, |l| Origin::File {
            line: l.line(),
            column: l.column(),
        });
        let message = e.to_string();
        let message = message.split(" at line ").next().unwrap_or(&message);
        ConfigIssue {
            key: String::new(),
            message: format!("invalid YAML: {message}"),
            origin,
        }
    })?;
    match value {
        Value::Null => Ok(Value::Mapping(Mapping::new())),
        Value::Mapping(_) => Ok(value),
        _ => Err(ConfigIssue {
            key: String::new(),
            message: "expected a mapping of sections (model:, data:, training:, ...)".into(),
            origin: Origin::Unknown,
        }),
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn key_name(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_norway::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// The closest valid key to `key`, if any is close enough to be a likely typo.
fn suggestion(key: &str, valid: &Mapping) -> String {
    let best = valid
        .keys()
        .filter_map(|k| k.as_str())
        .map(|k| (strsim::jaro_winkler(key, k), k))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, k)) if score > 0.8 => format!(" (did you mean `{k}`?)"),
        _ => {
            let all: Vec<&str> = valid.keys().filter_map(|k| k.as_str()).collect();
            format!(" (valid keys: {})", all.join(", "))
        }
    }
}

/// Removes keys the schema does not have, reporting each with a suggestion. A mapping whose
/// default is empty (`data.chat_template_args`) is free-form: any key is kept.
fn remove_unknown_keys(
    doc: &mut Value,
    schema: &Value,
    prefix: &str,
    report: &mut dyn FnMut(&str, String),
) {
    let (Value::Mapping(map), Value::Mapping(valid)) = (doc, schema) else {
        return;
    };
    if valid.is_empty() {
        return;
    }
    map.retain(|key, value| {
        let name = key_name(key);
        let path = join(prefix, &name);
        match valid.get(key) {
            Some(sub) => {
                remove_unknown_keys(value, sub, &path, report);
                true
            }
            None => {
                report(&path, format!("unknown key{}", suggestion(&name, valid)));
                false
            }
        }
    });
}

/// Sets `dotted` to `value`, creating sections as needed; the key must exist in the schema.
fn set_key(doc: &mut Value, schema: &Value, dotted: &str, value: Value) -> Result<(), String> {
    let mut node = doc;
    let mut valid = schema;
    let free_form = Value::Null;
    let parts: Vec<&str> = dotted.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Value::Mapping(valid_map) = valid else {
            return Err(format!("`{}` has no sub-keys", parts[..i].join(".")));
        };
        let key = Value::String(part.to_string());
        let sub_schema = match valid_map.get(&key) {
            Some(sub) => sub,
            // A free-form mapping (see `remove_unknown_keys`) takes any key.
            None if valid_map.is_empty() => &free_form,
            None => return Err(format!("unknown key{}", suggestion(part, valid_map))),
        };
        if !node.is_mapping() {
            *node = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(map) = node else {
            unreachable!("made a mapping just above")
        };
        if i + 1 == parts.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map.entry(key).or_insert(Value::Mapping(Mapping::new()));
        valid = sub_schema;
    }
    Ok(())
}

/// Deserializes `doc`, removing each offending key and trying again so that every type or
/// range error is reported, not just the first. Returns the config with defaults in place of
/// the offending keys.
fn deserialize_all(doc: &mut Value, report: &mut dyn FnMut(&str, String)) -> Config {
    for _ in 0..64 {
        match serde_path_to_error::deserialize::<_, Config>(doc.clone()) {
            Ok(config) => return config,
            Err(e) => {
                let path = e.path().to_string();
                report(&path, readable(&e.inner().to_string()));
                if !remove_path(doc, &path) {
                    break;
                }
            }
        }
    }
    Config::default()
}

/// Rewrites serde's `invalid type: string "fast", expected a positive number` as
/// `expected a positive number, got "fast"`.
fn readable(message: &str) -> String {
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "));
    let Some(rest) = rest else {
        return message.to_string();
    };
    let Some((got, expected)) = rest.split_once(", expected ") else {
        return message.to_string();
    };
    let got = ["string ", "floating point ", "integer "]
        .iter()
        .find_map(|p| got.strip_prefix(p))
        .unwrap_or(got);
    let got = got.strip_prefix("unit value").map_or(got, |_| "null");
    let got = got.trim_matches('`');
    format!("expected {expected}, got {got}")
}

fn remove_path(doc: &mut Value, dotted: &str) -> bool {
    let parts: Vec<&str> = dotted.split('.').collect();
    let Some((last, parents)) = parts.split_last() else {
        return false;
    };
    let mut node = doc;
    for part in parents {
        let next = match node {
            Value::Mapping(map) => map.get_mut(*part),
            Value::Sequence(seq) => part.parse::<usize>().ok().and_then(|i| seq.get_mut(i)),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    match node {
        Value::Mapping(map) => map.remove(*last).is_some(),
        Value::Sequence(seq) => match last.parse::<usize>() {
            Ok(i) if i < seq.len() => {
                seq.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_form_mapping_takes_any_key_from_the_file_and_from_set() {
        let path = Path::new("ft.yaml");
        // Roots that exist, wherever the test runs.
        let roots = format!("data:\n  roots: [{}]\n", env!("CARGO_MANIFEST_DIR"));
        let text = format!("{roots}  chat_template_args: {{enable_thinking: false, name: x}}\n");
        let config = load_str(&text, path, &[]).unwrap();
        let args = &config.data.chat_template_args;
        assert_eq!(args["enable_thinking"], serde_json::json!(false));
        assert_eq!(args["name"], serde_json::json!("x"));
        let set: Override = "data.chat_template_args.depth=3".parse().unwrap();
        let config = load_str(&roots, path, &[set]).unwrap();
        assert_eq!(
            config.data.chat_template_args["depth"],
            serde_json::json!(3)
        );
        // Sections keep refusing keys they do not have.
        let err = load_str(&format!("{roots}  chat_template_arg: {{}}\n"), path, &[]).unwrap_err();
        assert!(err.to_string().contains("chat_template_args"), "{err}");
    }
}
