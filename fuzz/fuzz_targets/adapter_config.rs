//! A PEFT adapter's `adapter_config.json` (`generate --adapter`, `merge`, `finetune --resume`):
//! `Adapter::load` on a folder holding the input as `adapter_config.json` beside the
//! tiny-llama-lora fixture's weights, for the tiny-llama base. Any input must give an adapter
//! or a `ModelError`. (llmtool reads adapters in PEFT's format only; mlx-lm's own
//! `adapter_config.json` is not a format it parses.)
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use model::LlamaConfig;
use std::path::Path;
use std::sync::OnceLock;
use train::Adapter;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

struct Setup {
    base: LlamaConfig,
    dir: tempfile::TempDir,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let fixtures = Path::new(FIXTURES);
        let dir = tempfile::tempdir().expect("a temporary folder");
        std::fs::copy(
            fixtures.join("tiny-llama-lora/adapter_model.safetensors"),
            dir.path().join("adapter_model.safetensors"),
        )
        .expect("copying the fixture's adapter weights");
        Setup {
            base: model::io::read_config(&fixtures.join("tiny-llama")).expect("the base config"),
            dir,
        }
    })
}

fuzz_target!(|bytes: &[u8]| {
    let setup = setup();
    let dir = setup.dir.path();
    std::fs::write(dir.join("adapter_config.json"), bytes).expect("writing the input");
    if let Ok(adapter) = Adapter::load(dir, &setup.base, DType::F32, &Device::Cpu) {
        let _ = adapter.scale();
    }
});
