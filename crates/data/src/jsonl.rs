//! Fine-tuning examples from JSONL files (and mlx-lm's data folders: `train.jsonl`,
//! `valid.jsonl`, `test.jsonl`), one example a line, in the formats mlx-lm reads:
//! `{"text": ...}` (every token scored), `{"prompt": ..., "completion": ...}` (the completion
//! and the EOS after it scored) and `{"messages": [{"role", "content"}, ...]}` (rendered with the
//! model's chat template; each assistant turn, from the end of the generation prompt before it
//! to the end of its content, and the one token after it, its end-of-turn token, scored).
//!
//! Each line becomes a text plus the byte spans of it that are scored; the tokenizer's offsets
//! then mark which tokens are targets of the loss.
//!
//! The file is long for its tests: about half of it is unit tests, one per format, masking
//! rule and bad line.

use super::corpus::list_files;
use super::dedup::is_validation;
use super::{DataError, Tokenizer};
use crate::chat::{ChatTemplate, Message};
use config::DataSection;
use serde_json::Value;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What a line must hold.
const FORMATS: &str = "expected \"text\", \"prompt\"/\"completion\" or \"messages\"";

/// Roles a chat message may have.
const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids of the rendered example, at most `seq_len + 1`.
    pub tokens: Vec<u32>,
    /// Loss weight of each token as a prediction target: 1 scored, 0 context only.
    pub weights: Vec<f32>,
}

/// The examples of a set of JSONL files, split into train and val.
#[derive(Debug, Default)]
pub struct Examples {
    /// Examples to train on.
    pub train: Vec<Example>,
    /// Examples to validate on.
    pub val: Vec<Example>,
    /// Examples cut to `seq_len + 1` tokens.
    pub truncated: usize,
    /// Examples dropped because no scored token was left (after truncation).
    pub unscored: usize,
}

impl Examples {
    /// SHA-256 over every example's tokens and weights, train then val: equal fingerprints mean
    /// a run sees the same examples.
    pub fn fingerprint(&self) -> String {
        let mut bytes = Vec::new();
        for (split, examples) in [(b'T', &self.train), (b'V', &self.val)] {
            bytes.push(split);
            for e in examples {
                bytes.extend((e.tokens.len() as u64).to_le_bytes());
                bytes.extend(e.tokens.iter().flat_map(|t| t.to_le_bytes()));
                bytes.extend(e.weights.iter().flat_map(|w| w.to_bits().to_le_bytes()));
            }
        }
        super::sha256_hex(&bytes)
    }
}

/// How to turn lines into examples.
pub struct ExampleOptions<'a> {
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Appended (and scored) after `text` and `completion`.
    pub eos_id: u32,
    /// The model's chat template for `messages` lines, or why it has none.
    pub chat_template: Result<&'a ChatTemplate, String>,
    /// Examples longer than `seq_len + 1` tokens are truncated.
    pub seq_len: usize,
    /// Share of a file's examples sent to the validation split by text hash (`data.val_fraction`),
    /// where the files do not name the split.
    pub val_fraction: f64,
}

/// A line rendered to text, with the byte spans whose tokens are scored.
#[derive(Debug, PartialEq)]
struct Rendered {
    text: String,
    scored: Vec<Range<usize>>,
    /// `text` and `prompt`/`completion` end with EOS and let the tokenizer add its special
    /// tokens; a chat template writes its own.
    plain: bool,
}

impl Rendered {
    /// A `text` or `prompt`/`completion` line, scored from byte `scored_from` to the end.
    fn plain(text: String, scored_from: usize) -> Self {
        Self {
            scored: std::iter::once(scored_from..text.len()).collect(),
            text,
            plain: true,
        }
    }
}

/// The `.jsonl` files a fine-tuning run reads, by role.
#[derive(Debug, Default, PartialEq)]
pub struct JsonlFiles {
    /// Files whose examples train (and, without `valid`, are split by `data.val_fraction`).
    pub train: Vec<PathBuf>,
    /// mlx-lm's `valid.jsonl`: the validation examples, in place of a split of `train`.
    pub valid: Vec<PathBuf>,
    /// mlx-lm's `test.jsonl`: held out, never read by training.
    pub test: Vec<PathBuf>,
}

impl JsonlFiles {
    /// No examples to train on.
    pub fn is_empty(&self) -> bool {
        self.train.is_empty()
    }
}

/// The `.jsonl` files of `data.roots`: `.jsonl` roots, and `.jsonl` files directly inside root
/// folders (`data.include` is not applied, `data.exclude` is). Deeper files are not picked up,
/// so JSON lines kept among documentation (logs, benchmark results) do not turn a markdown
/// corpus into a JSONL one. Fine-tuning reads these instead of the markdown when there are any.
///
/// A root folder holding `train.jsonl` is an mlx-lm data folder: its `valid.jsonl` is the
/// validation set and its `test.jsonl` is held out; the other files train.
pub fn find_files(data: &DataSection) -> Result<JsonlFiles, DataError> {
    let jsonl_only = DataSection {
        include: vec!["**/*.jsonl".into()],
        ..data.clone()
    };
    let (listed, _) = list_files(&data.roots, &jsonl_only)?;
    let mut files = JsonlFiles::default();
    for path in listed.into_iter().map(|f| f.path) {
        if path.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        let Some(root) = data
            .roots
            .iter()
            .find(|root| path == **root || path.parent() == Some(root.as_path()))
        else {
            continue;
        };
        let mlx_folder = *root != path && root.join("train.jsonl").is_file();
        let name = path.file_name().and_then(|n| n.to_str());
        match name {
            Some("valid.jsonl") if mlx_folder => files.valid.push(path),
            Some("test.jsonl") if mlx_folder => files.test.push(path),
            _ => files.train.push(path),
        }
    }
    Ok(files)
}

/// Reads, renders and tokenizes every line of `files` (blank lines are skipped). Without
/// `valid` files the examples are split by a hash of their text (`val_fraction`); with them,
/// `train` files train and `valid` files validate. `test` files are not read. The first bad
/// line fails the whole load, naming the file and line.
pub fn load(files: &JsonlFiles, options: &ExampleOptions) -> Result<Examples, DataError> {
    let mut examples = Examples::default();
    let split_by_hash = files.valid.is_empty();
    for (paths, role) in [(&files.train, Role::Train), (&files.valid, Role::Valid)] {
        for path in paths {
            for line in read_file(path, options)? {
                examples.truncated += usize::from(line.truncated);
                let Some((example, text)) = line.example else {
                    examples.unscored += 1;
                    continue;
                };
                let val = match role {
                    Role::Valid => true,
                    Role::Train => split_by_hash && is_validation(&text, options.val_fraction),
                };
                if val {
                    examples.val.push(example);
                } else {
                    examples.train.push(example);
                }
            }
        }
    }
    if examples.train.is_empty() {
        return Err(DataError::NoExamples {
            files: files.train.len() + files.valid.len(),
            val: examples.val.len(),
            unscored: examples.unscored,
        });
    }
    Ok(examples)
}

/// Which set a file's examples go to.
#[derive(Clone, Copy)]
enum Role {
    Train,
    Valid,
}

/// One line of a file, tokenized.
pub struct ReadLine {
    /// The example and the text it was rendered to; `None` when no scored token was left
    /// after truncation.
    pub example: Option<(Example, String)>,
    /// Cut to `seq_len + 1` tokens.
    pub truncated: bool,
}

/// Renders and tokenizes every non-blank line of the JSONL file `path`, as fine-tuning reads
/// it; the first bad line is an error naming the file and line.
pub fn read_file(path: &Path, options: &ExampleOptions) -> Result<Vec<ReadLine>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let mut read = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at_line = |message: String| DataError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let template = options
            .chat_template
            .as_ref()
            .copied()
            .map_err(String::as_str);
        let rendered = render(line, template).map_err(at_line)?;
        let mut example = tokenize(&rendered, options).map_err(at_line)?;
        let limit = options.seq_len + 1;
        let truncated = example.tokens.len() > limit;
        if truncated {
            example.tokens.truncate(limit);
            example.weights.truncate(limit);
        }
        let scored = example.weights.iter().skip(1).any(|&w| w != 0.0);
        read.push(ReadLine {
            example: scored.then_some((example, rendered.text)),
            truncated,
        });
    }
    Ok(read)
}

/// A line's text and scored spans.
fn render(line: &str, template: Result<&ChatTemplate, &str>) -> Result<Rendered, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Some(record) = value.as_object() else {
        return Err(FORMATS.into());
    };
    if let Some(text) = record.get("text") {
        return Ok(Rendered::plain(string(Some(text), "text")?, 0));
    }
    if record.contains_key("prompt") || record.contains_key("completion") {
        let prompt = string(record.get("prompt"), "prompt")?;
        let completion = string(record.get("completion"), "completion")?;
        return Ok(Rendered::plain(prompt.clone() + &completion, prompt.len()));
    }
    match record.get("messages") {
        Some(messages) => render_chat(messages, template),
        None => Err(FORMATS.into()),
    }
}

fn string(value: Option<&Value>, key: &str) -> Result<String, String> {
    match value {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("\"{key}\" must be a string")),
        None => Err(format!("missing \"{key}\"")),
    }
}

/// Stands in for an assistant turn's content to find where the template writes it: a
/// private-use character, which no template writes and no whitespace trimming removes.
const PROBE: &str = "\u{E000}";

/// Renders a conversation and finds each assistant turn's scored span: from the end of the
/// conversation before it rendered with the generation prompt (the header the model is given,
/// so a thinking block the model writes itself is scored) to the end of its content; the token
/// after each span, its end-of-turn token, is scored too (see `tokenize`). The content is found
/// by rendering the whole conversation again with the turn's content replaced by [`PROBE`]:
/// the text that differs is the content as the template wrote it (trimmed, or without an
/// earlier turn's thinking block). Where the conversation before the turn renders differently
/// inside the whole one (Mistral puts the system message into the last user turn, Qwen3 with
/// `enable_thinking=false` adds an empty thinking block only after the last prompt), the span
/// starts at the content.
fn render_chat(value: &Value, template: Result<&ChatTemplate, &str>) -> Result<Rendered, String> {
    let Some(list) = value.as_array() else {
        return Err("\"messages\" must be a list".into());
    };
    let messages = list
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field =
                |key: &str| string(m.get(key), key).map_err(|e| format!("messages[{i}]: {e}"));
            let role = field("role")?;
            if !ROLES.contains(&role.as_str()) {
                return Err(format!(
                    "messages[{i}]: unknown role \"{role}\" (expected {})",
                    ROLES.join(", ")
                ));
            }
            Ok(Message::new(&role, &field("content")?))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("messages: no assistant turn to train on".into());
    }
    let template = template.map_err(|e| format!("messages need a chat template: {e}"))?;
    let render = |messages: &[Message], prompt: bool| {
        template.render(messages, prompt).map_err(|e| e.to_string())
    };
    let text = render(&messages, false)?;
    let mut scored: Vec<Range<usize>> = Vec::new();
    for (i, _) in messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "assistant")
    {
        let unclear = || {
            format!(
                "the chat template does not render messages[{i}] where it can be found; cannot tell which tokens the assistant wrote"
            )
        };
        let mut probe = messages.clone();
        probe[i].content = PROBE.into();
        let probed = render(&probe, false)?;
        let content = differing(&text, &probed).ok_or_else(unclear)?;
        let before = render(&messages[..i], true)?;
        let start = if text.starts_with(&before) && before.len() <= content.start {
            before.len()
        } else {
            content.start
        };
        if scored.last().is_some_and(|last| start < last.end) {
            return Err(unclear());
        }
        scored.push(start..content.end);
    }
    Ok(Rendered {
        text,
        scored,
        plain: false,
    })
}

/// The byte range of `a` that differs from `b`, between their longest common prefix and
/// suffix (on character boundaries); `None` when they are equal.
fn differing(a: &str, b: &str) -> Option<Range<usize>> {
    if a == b {
        return None;
    }
    let prefix: usize = a
        .chars()
        .zip(b.chars())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.len_utf8())
        .sum();
    let suffix: usize = a[prefix..]
        .chars()
        .rev()
        .zip(b[prefix..].chars().rev())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.len_utf8())
        .sum();
    Some(prefix..a.len() - suffix)
}

/// Tokenizes a rendered line; a token is scored when its bytes overlap a scored span, and in a
/// chat also the first token after each span (the assistant turn's end-of-turn token).
fn tokenize(rendered: &Rendered, options: &ExampleOptions) -> Result<Example, String> {
    let encoding = options
        .tokenizer
        .encode(rendered.text.as_str(), rendered.plain)
        .map_err(|e| format!("cannot tokenize: {e}"))?;
    let mut tokens = encoding.get_ids().to_vec();
    let mut weights: Vec<f32> = encoding
        .get_offsets()
        .iter()
        .map(|&(start, end)| {
            let end = end.max(start + 1);
            let scored = rendered
                .scored
                .iter()
                .any(|span| start < span.end && end > span.start);
            if scored {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    if !rendered.plain {
        let offsets = encoding.get_offsets();
        for span in &rendered.scored {
            if let Some(next) = offsets.iter().position(|&(start, _)| start >= span.end) {
                weights[next] = 1.0;
            }
        }
    }
    if rendered.plain {
        tokens.push(options.eos_id);
        weights.push(1.0);
    }
    Ok(Example { tokens, weights })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
    }

    struct Setup {
        tokenizer: Tokenizer,
        template: ChatTemplate,
        dir: tempfile::TempDir,
    }

    impl Setup {
        fn new() -> Self {
            Self {
                tokenizer: Tokenizer::from_file(fixture().join("tokenizer.json")).unwrap(),
                template: ChatTemplate::load(&fixture()).unwrap(),
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn options(&self, seq_len: usize, val_fraction: f64) -> ExampleOptions<'_> {
            ExampleOptions {
                tokenizer: &self.tokenizer,
                eos_id: 0,
                chat_template: Ok(&self.template),
                seq_len,
                val_fraction,
            }
        }

        fn write(&self, name: &str, lines: &[&str]) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, lines.join("\n")).unwrap();
            path
        }

        fn load(&self, lines: &[&str]) -> Result<Examples, DataError> {
            load(
                &train_only(self.write("train.jsonl", lines)),
                &self.options(512, 0.0),
            )
        }

        /// The example's (unscored, scored) targets, decoded.
        fn split_text(&self, example: &Example) -> (String, String) {
            let pick = |scored: bool| -> Vec<u32> {
                example.tokens[1..]
                    .iter()
                    .zip(&example.weights[1..])
                    .filter(|(_, &w)| (w == 1.0) == scored)
                    .map(|(&t, _)| t)
                    .collect()
            };
            let decode = |ids: Vec<u32>| self.tokenizer.decode(&ids, false).unwrap();
            (decode(pick(false)), decode(pick(true)))
        }
    }

    #[test]
    fn text_scores_every_token_and_ends_with_eos() {
        let setup = Setup::new();
        let set = setup
            .load(&[r#"{"text": "The quick brown fox."}"#])
            .unwrap();
        let example = &set.train[0];
        assert_eq!(example.tokens.last(), Some(&0));
        assert!(example.weights[1..].iter().all(|&w| w == 1.0));
        let (context, scored) = setup.split_text(example);
        assert!(context.is_empty(), "{context:?}");
        assert!(
            scored.ends_with(" quick brown fox.<|endoftext|>"),
            "{scored:?}"
        );
    }

    #[test]
    fn prompt_tokens_are_unscored_and_the_completion_with_eos_scored() {
        let setup = Setup::new();
        let line =
            r#"{"prompt": "Question: what jumps?\nAnswer:", "completion": " the quick brown fox"}"#;
        let set = setup.load(&[line]).unwrap();
        let example = &set.train[0];
        let prompt = setup
            .tokenizer
            .encode("Question: what jumps?\nAnswer:", false)
            .unwrap();
        let n = prompt.get_ids().len();
        assert_eq!(&example.tokens[..n], prompt.get_ids());
        assert!(example.weights[..n].iter().all(|&w| w == 0.0));
        assert!(example.weights[n..].iter().all(|&w| w == 1.0));
        let (_, scored) = setup.split_text(example);
        assert_eq!(scored, " the quick brown fox<|endoftext|>");
    }

    #[test]
    fn only_assistant_turns_and_their_end_token_are_scored() {
        let setup = Setup::new();
        let line = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}]}"#;
        let set = setup.load(&[line]).unwrap();
        let (context, scored) = setup.split_text(&set.train[0]);
        assert_eq!(scored, "Hello there<|endoftext|>Fine.<|endoftext|>");
        assert!(context.contains("Be brief.") && context.contains("How are you?"));
        // The assistant header is context; the newline after the end token is not scored.
        assert!(
            context.ends_with("Hi<|endoftext|>\n<|im_start|>assistant\n\n<|im_start|>user\nHow are you?<|endoftext|>\n<|im_start|>assistant\n\n"),
            "{context:?}"
        );
    }

    /// The special tokens each fixture template writes, added to the test tokenizer so that
    /// each is one token as in the family's own tokenizer.
    const FAMILY_TOKENS: [(&str, &[&str]); 5] = [
        (
            "qwen3",
            &["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        ),
        ("gemma3", &["<bos>", "<start_of_turn>", "<end_of_turn>"]),
        (
            "phi4",
            &[
                "<|system|>",
                "<|user|>",
                "<|assistant|>",
                "<|end|>",
                "<|endoftext|>",
            ],
        ),
        (
            "llama3",
            &[
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
        ),
        ("mistral", &["<s>", "</s>", "[INST]", "[/INST]"]),
    ];

    #[test]
    fn each_familys_assistant_turns_and_end_tokens_are_scored() {
        let fixtures = crate::chat::tests::chat_fixtures();
        let conversation = |name: &str| {
            serde_json::json!({"messages": fixtures["conversations"][name]}).to_string()
        };
        let turns = "4<T>6, of course.<T>";
        let cases: [(&str, &str, Option<bool>, String); 12] = [
            (
                "qwen3",
                "system_multi_turn",
                None,
                "4<|im_end|><think>\n\n</think>\n\n6, of course.<|im_end|>".into(),
            ),
            (
                "qwen3",
                "system_multi_turn",
                Some(false),
                turns.replace("<T>", "<|im_end|>"),
            ),
            (
                "qwen3",
                "thinking",
                None,
                "Yes.<|im_end|><think>\n3 times 3.\n</think>\n\nNo, 9 = 3 x 3.<|im_end|>".into(),
            ),
            // Thinking off, yet the last turn has reasoning: its thinking block differs from
            // the prompt's empty one from the reasoning on, which is scored.
            (
                "qwen3",
                "thinking",
                Some(false),
                "Yes.<|im_end|>3 times 3.\n</think>\n\nNo, 9 = 3 x 3.<|im_end|>".into(),
            ),
            (
                "gemma3",
                "system_multi_turn",
                None,
                turns.replace("<T>", "<end_of_turn>"),
            ),
            (
                "gemma3",
                "whitespace",
                None,
                "Hello!<end_of_turn>See you.<end_of_turn>".into(),
            ),
            (
                "phi4",
                "system_multi_turn",
                None,
                turns.replace("<T>", "<|end|>"),
            ),
            (
                "phi4",
                "whitespace",
                None,
                "\n Hello!  \n\n<|end|> See you. <|end|>".into(),
            ),
            (
                "llama3",
                "system_multi_turn",
                None,
                turns.replace("<T>", "<|eot_id|>"),
            ),
            (
                "llama3",
                "whitespace",
                None,
                "Hello!<|eot_id|>See you.<|eot_id|>".into(),
            ),
            (
                "mistral",
                "system_multi_turn",
                None,
                turns.replace("<T>", "</s>"),
            ),
            (
                "mistral",
                "whitespace",
                None,
                "\n Hello!  \n\n</s> See you. </s>".into(),
            ),
        ];
        for (family, name, thinking, expected) in cases {
            let (_, specials) = FAMILY_TOKENS.iter().find(|(f, _)| *f == family).unwrap();
            let mut setup = Setup::new();
            let added: Vec<tokenizers::AddedToken> = specials
                .iter()
                .map(|t| tokenizers::AddedToken::from(*t, true))
                .collect();
            setup.tokenizer.add_special_tokens(added).unwrap();
            setup.template = crate::chat::tests::fixture_template(&fixtures, family);
            if let Some(on) = thinking {
                setup.template = setup.template.with_variable("enable_thinking", on);
            }
            let set = setup.load(&[&conversation(name)]).unwrap();
            let (context, scored) = setup.split_text(&set.train[0]);
            assert_eq!(
                scored, expected,
                "{family} {name} {thinking:?}; context {context:?}"
            );
        }
    }

    #[test]
    fn a_bad_line_names_the_file_and_line() {
        let setup = Setup::new();
        let good = r#"{"text": "fine"}"#;
        for (bad, expected) in [
            (r#"{"input": "x"}"#, FORMATS),
            ("[1, 2]", FORMATS),
            ("{not json", "invalid JSON"),
            (r#"{"text": 3}"#, "\"text\" must be a string"),
            (r#"{"prompt": "q"}"#, "missing \"completion\""),
            (r#"{"messages": "hi"}"#, "\"messages\" must be a list"),
            (
                r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
                "messages[0]: unknown role \"robot\"",
            ),
            (
                r#"{"messages": [{"role": "user"}]}"#,
                "messages[0]: missing \"content\"",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}]}"#,
                "no assistant turn",
            ),
        ] {
            let err = setup.load(&[good, "", bad, good]).unwrap_err().to_string();
            assert!(err.contains("train.jsonl:3: "), "{err}");
            assert!(err.contains(expected), "{bad}: {err}");
        }
    }

    #[test]
    fn messages_without_a_template_are_an_error() {
        let setup = Setup::new();
        let path = setup.write(
            "chat.jsonl",
            &[r#"{"messages": [{"role": "assistant", "content": "x"}]}"#],
        );
        let options = ExampleOptions {
            chat_template: Err("no chat_template".into()),
            ..setup.options(64, 0.0)
        };
        let err = load(&train_only(path), &options).unwrap_err().to_string();
        assert!(
            err.contains("chat.jsonl:1: messages need a chat template"),
            "{err}"
        );
    }

    #[test]
    fn long_examples_are_truncated_and_unscored_ones_dropped() {
        let setup = Setup::new();
        let long = format!(r#"{{"text": "{}"}}"#, "word ".repeat(50));
        let prompt_only = format!(
            r#"{{"prompt": "{}", "completion": "x"}}"#,
            "word ".repeat(50)
        );
        let path = setup.write("t.jsonl", &[&long, &prompt_only]);
        let set = load(&train_only(path), &setup.options(8, 0.0)).unwrap();
        assert_eq!((set.train.len(), set.truncated, set.unscored), (1, 2, 1));
        assert_eq!(set.train[0].tokens.len(), 9);
    }

    #[test]
    fn the_split_depends_only_on_each_example() {
        let setup = Setup::new();
        let lines: Vec<String> = (0..40)
            .map(|i| format!(r#"{{"text": "example number {i}"}}"#))
            .collect();
        let mut lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let forward = load(
            &train_only(setup.write("a.jsonl", &lines)),
            &setup.options(64, 0.3),
        )
        .unwrap();
        lines.reverse();
        let backward = load(
            &train_only(setup.write("b.jsonl", &lines)),
            &setup.options(64, 0.3),
        )
        .unwrap();
        assert!(!forward.val.is_empty() && !forward.train.is_empty());
        let sorted = |v: &[Example]| {
            let mut t: Vec<Vec<u32>> = v.iter().map(|e| e.tokens.clone()).collect();
            t.sort();
            t
        };
        assert_eq!(sorted(&forward.val), sorted(&backward.val));
        assert_eq!(sorted(&forward.train), sorted(&backward.train));
    }

    #[test]
    fn jsonl_files_are_found_at_the_top_of_root_folders_and_as_roots() {
        let setup = Setup::new();
        let dir = setup.dir.path();
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("notes.md"), "# x").unwrap();
        std::fs::write(dir.join("sub/chat.jsonl"), "").unwrap();
        std::fs::write(dir.join("a.jsonl"), "").unwrap();
        let data = |roots: Vec<PathBuf>| DataSection {
            roots,
            ..DataSection::default()
        };
        let found = find_files(&data(vec![dir.to_path_buf()])).unwrap();
        assert_eq!(
            found,
            train_only(dir.join("a.jsonl")),
            "sub/chat.jsonl is too deep"
        );
        let found = find_files(&data(vec![dir.join("a.jsonl"), dir.join("notes.md")])).unwrap();
        assert_eq!(found, train_only(dir.join("a.jsonl")));
        std::fs::remove_file(dir.join("a.jsonl")).unwrap();
        std::fs::remove_dir_all(dir.join("sub")).unwrap();
        assert!(find_files(&data(vec![dir.to_path_buf()]))
            .unwrap()
            .is_empty());
    }

    fn train_only(path: PathBuf) -> JsonlFiles {
        JsonlFiles {
            train: vec![path],
            ..JsonlFiles::default()
        }
    }

    #[test]
    fn an_mlx_data_folder_trains_on_train_validates_on_valid_and_never_reads_test() {
        let setup = Setup::new();
        let dir = setup.dir.path();
        let line = |i: usize| format!(r#"{{"text": "Example number {i} of the set."}}"#);
        let lines = |range: std::ops::Range<usize>| -> Vec<String> { range.map(line).collect() };
        let write = |name: &str, lines: &[String]| {
            std::fs::write(dir.join(name), lines.join("\n")).unwrap();
        };
        write("train.jsonl", &lines(0..20));
        write("valid.jsonl", &lines(20..23));
        // A bad test file proves it is never read.
        std::fs::write(dir.join("test.jsonl"), "not json").unwrap();
        let data = DataSection {
            roots: vec![dir.to_path_buf()],
            ..DataSection::default()
        };
        let files = find_files(&data).unwrap();
        assert_eq!(
            files,
            JsonlFiles {
                train: vec![dir.join("train.jsonl")],
                valid: vec![dir.join("valid.jsonl")],
                test: vec![dir.join("test.jsonl")],
            }
        );
        // val_fraction would move some train examples to val; with valid.jsonl none move.
        let set = load(&files, &setup.options(64, 0.5)).unwrap();
        assert_eq!((set.train.len(), set.val.len()), (20, 3));

        // Without train.jsonl the folder is not mlx-lm's: every file trains (and is split).
        std::fs::rename(dir.join("train.jsonl"), dir.join("notes.jsonl")).unwrap();
        std::fs::remove_file(dir.join("test.jsonl")).unwrap();
        let files = find_files(&data).unwrap();
        assert_eq!(files.train.len(), 2);
        assert!(files.valid.is_empty() && files.test.is_empty());
    }
}
