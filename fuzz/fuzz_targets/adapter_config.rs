//! An adapter's `adapter_config.json` (`generate --adapter`, `merge`, `finetune --resume`), in
//! both formats `Adapter::load` reads: the input as `adapter_config.json` beside the weights of
//! the tiny-llama-lora fixture (PEFT) or of the tiny-llama-mlx fixture (mlx-lm), for the
//! tiny-llama base; each input is read in both. Any input must give an adapter or a
//! `ModelError`.
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
    peft: tempfile::TempDir,
    mlx: tempfile::TempDir,
}

/// A folder holding a copy of `fixture`'s weights file `weights`.
fn folder_with(fixture: &Path, weights: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary folder");
    std::fs::copy(fixture.join(weights), dir.path().join(weights))
        .expect("copying the fixture's adapter weights");
    dir
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let fixtures = Path::new(FIXTURES);
        Setup {
            base: model::io::read_config(&fixtures.join("tiny-llama")).expect("the base config"),
            peft: folder_with(
                &fixtures.join("tiny-llama-lora"),
                "adapter_model.safetensors",
            ),
            mlx: folder_with(&fixtures.join("tiny-llama-mlx"), "adapters.safetensors"),
        }
    })
}

fuzz_target!(|bytes: &[u8]| {
    let setup = setup();
    for dir in [setup.peft.path(), setup.mlx.path()] {
        std::fs::write(dir.join("adapter_config.json"), bytes).expect("writing the input");
        if let Ok(adapter) = Adapter::load(dir, &setup.base, DType::F32, &Device::Cpu) {
            let _ = adapter.scale();
        }
    }
});
