//! An Ollama `Modelfile` for an exported GGUF: `FROM`, a Go `TEMPLATE` for chat templates of
//! the known families (recognised by their turn markers), and `PARAMETER stop` lines.

use super::Vocab;

/// A family's chat format in Ollama's Go template language.
struct KnownTemplate {
    name: &'static str,
    /// Every marker must occur in the Jinja template.
    markers: &'static [&'static str],
    go: &'static str,
    /// End-of-turn strings Ollama stops at (with the tokenizer's eos).
    stops: &'static [&'static str],
}

const KNOWN: &[KnownTemplate] = &[
    KnownTemplate {
        name: "llama3",
        markers: &["<|start_header_id|>", "<|eot_id|>"],
        go: "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n\
             {{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        stops: &["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    },
    KnownTemplate {
        name: "phi4",
        markers: &["<|im_start|>", "<|im_sep|>"],
        go: "{{- range .Messages }}<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>\
             {{- end }}<|im_start|>assistant<|im_sep|>",
        stops: &["<|im_end|>", "<|im_start|>", "<|im_sep|>"],
    },
    KnownTemplate {
        name: "chatml",
        markers: &["<|im_start|>", "<|im_end|>"],
        go: "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n\
             {{ end }}<|im_start|>assistant\n",
        stops: &["<|im_end|>", "<|im_start|>"],
    },
    KnownTemplate {
        name: "gemma",
        markers: &["<start_of_turn>", "<end_of_turn>"],
        go: "{{- range .Messages }}<start_of_turn>\
             {{- if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n\
             {{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        stops: &["<end_of_turn>", "<start_of_turn>"],
    },
    KnownTemplate {
        name: "phi4-mini",
        markers: &["<|assistant|>", "<|end|>", "'|>' + message['content']"],
        go: "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>",
        stops: &["<|end|>", "<|user|>", "<|assistant|>"],
    },
    KnownTemplate {
        name: "phi3",
        markers: &["<|assistant|>", "<|end|>"],
        go: "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n\
             {{ end }}<|assistant|>\n",
        stops: &["<|end|>", "<|user|>", "<|assistant|>"],
    },
    KnownTemplate {
        name: "mistral",
        markers: &["[INST]", "[/INST]"],
        go: "{{- range .Messages }}\
             {{- if eq .Role \"assistant\" }} {{ .Content }}</s>\
             {{- else }}[INST] {{ .Content }}[/INST]{{ end }}{{ end }}",
        stops: &["[INST]", "[/INST]", "</s>"],
    },
];

/// The Modelfile text for `gguf_name` (a file in the same directory) and the name of the
/// template recognised (`None`: the chat template is none of the known families', so no
/// `TEMPLATE` is written and Ollama falls back to its own detection from the GGUF's
/// `tokenizer.chat_template`). A model without a chat template gets the raw prompt.
pub fn modelfile(gguf_name: &str, vocab: &Vocab) -> (String, Option<&'static str>) {
    let mut text = format!("FROM ./{gguf_name}\n");
    let mut stops: Vec<String> = Vec::new();
    let known = vocab.chat_template.as_deref().and_then(|t| {
        KNOWN
            .iter()
            .find(|k| k.markers.iter().all(|m| t.contains(m)))
    });
    match (&vocab.chat_template, known) {
        (_, Some(k)) => {
            text.push_str(&format!("TEMPLATE \"\"\"{}\"\"\"\n", k.go));
            stops.extend(k.stops.iter().map(|s| s.to_string()));
        }
        (Some(_), None) => text.push_str(
            "# The chat template is none llmtool recognises (llama3, chatml, gemma, phi3, \
             phi4, phi4-mini, mistral):\n# Ollama reads the GGUF's tokenizer.chat_template; add a TEMPLATE \
             here if its answer is wrong.\n",
        ),
        (None, None) => text.push_str("TEMPLATE \"\"\"{{ .Prompt }}\"\"\"\n"),
    }
    if let Some(eos) = vocab.eos.and_then(|id| vocab.text(id)) {
        stops.push(eos.to_string());
    }
    let mut seen = std::collections::HashSet::new();
    for stop in stops.into_iter().filter(|s| seen.insert(s.clone())) {
        text.push_str(&format!("PARAMETER stop {}\n", go_quote(&stop)));
    }
    (text, known.map(|k| k.name))
}

/// A Modelfile parameter value in double quotes, as Ollama's parser reads them.
fn go_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(template: Option<&str>) -> Vocab {
        Vocab {
            tokens: vec!["<|endoftext|>".into(), "a".into()],
            token_types: vec![3, 1],
            model: super::super::TokenizerModel::Gpt2 {
                merges: vec![],
                pre: "gpt-2".into(),
            },
            bos: None,
            eos: Some(0),
            pad: None,
            unk: None,
            add_bos: false,
            add_eos: false,
            chat_template: template.map(String::from),
        }
    }

    #[test]
    fn known_templates_become_go_templates() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/chat");
        for (file, name) in [
            ("llama3.jinja", "llama3"),
            ("qwen3.jinja", "chatml"),
            ("gemma3.jinja", "gemma"),
            ("phi4.jinja", "phi4-mini"),
            ("mistral.jinja", "mistral"),
        ] {
            let t = std::fs::read_to_string(format!("{fixtures}/{file}")).unwrap();
            let (text, found) = modelfile("m.gguf", &vocab(Some(&t)));
            assert_eq!(found, Some(name), "{file}");
            assert!(text.starts_with("FROM ./m.gguf\nTEMPLATE \"\"\""), "{text}");
            assert!(text.contains("PARAMETER stop \"<|endoftext|>\""), "{text}");
        }
    }

    #[test]
    fn unknown_and_missing_templates() {
        let (text, found) = modelfile("m.gguf", &vocab(Some("{{ messages }}")));
        assert_eq!(found, None);
        assert!(!text.contains("TEMPLATE \"\"\""), "{text}");
        let (text, _) = modelfile("m.gguf", &vocab(None));
        assert!(
            text.contains("TEMPLATE \"\"\"{{ .Prompt }}\"\"\""),
            "{text}"
        );
    }
}
