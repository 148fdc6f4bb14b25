//! A `tokenizer.json` as `llmtool export --gguf` reads it: `model::gguf::Vocab::read` (the
//! model type; for byte-level BPE the pre-tokenizer's llama.cpp name and merges, for
//! SentencePiece-style BPE the normalizer and pre-tokenizer steps, byte tokens and the scores
//! from the merges; tokens and special ids), then the GGUF keys and the Ollama Modelfile made
//! from it. Any input must give a vocabulary or a `GgufError`, never a panic. The seeds
//! include both kinds (vocab_size 400 holds the SentencePiece fixtures' tokens).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;

fn dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder"))
        .path()
}

fn config() -> &'static model::LlamaConfig {
    static CONFIG: OnceLock<model::LlamaConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 400,
            "bos_token_id": 0, "eos_token_id": 0
        }))
        .expect("a valid config")
    })
}

fuzz_target!(|bytes: &[u8]| {
    let dir = dir();
    std::fs::write(dir.join("tokenizer.json"), bytes).expect("writing the input");
    let Ok(vocab) = model::gguf::Vocab::read(dir, config()) else {
        return;
    };
    let _ = vocab.metadata();
    let _ = model::gguf::modelfile("model.gguf", &vocab);
});
