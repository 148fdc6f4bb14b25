//! JSONL fine-tuning examples (`finetune` on `.jsonl` files): `data::jsonl::load`, the function
//! `finetune` calls, on one file holding the input, with the tiny-llama fixture's tokenizer
//! and chat template. Any input must give examples or a `DataError`.
#![no_main]

use data::chat::ChatTemplate;
use data::jsonl::{self, ExampleOptions};
use data::Tokenizer;
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The fixture model whose tokenizer and chat template the examples go through.
const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-llama");

struct Setup {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    _dir: tempfile::TempDir,
    file: PathBuf,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        Setup {
            tokenizer: Tokenizer::from_file(Path::new(MODEL).join("tokenizer.json"))
                .expect("the fixture's tokenizer"),
            template: ChatTemplate::load(Path::new(MODEL)).expect("the fixture's chat template"),
            file: dir.path().join("train.jsonl"),
            _dir: dir,
        }
    })
}

fuzz_target!(|bytes: &[u8]| {
    let setup = setup();
    std::fs::write(&setup.file, bytes).expect("writing the input");
    let options = ExampleOptions {
        tokenizer: &setup.tokenizer,
        eos_id: 0,
        chat_template: Ok(&setup.template),
        seq_len: 64,
        val_fraction: 0.1,
    };
    let files = jsonl::JsonlFiles {
        train: vec![setup.file.clone()],
        ..Default::default()
    };
    if let Ok(examples) = jsonl::load(&files, &options) {
        for e in examples.train.iter().chain(&examples.val) {
            assert_eq!(e.tokens.len(), e.weights.len());
            assert!(e.tokens.len() <= options.seq_len + 1);
        }
    }
});
