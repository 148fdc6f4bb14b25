//! Safetensors weights (`model.safetensors`, `adapter_model.safetensors`): `Weights::read`, which
//! every model and adapter load goes through, on one file holding the input. Any input must
//! give tensors or a `ModelError`; a tensor read must match its header.
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use model::Weights;
use std::path::PathBuf;
use std::sync::OnceLock;

fn file() -> &'static PathBuf {
    static FILE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &FILE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary folder");
            let file = dir.path().join("model.safetensors");
            (dir, file)
        })
        .1
}

fuzz_target!(|bytes: &[u8]| {
    let path = file();
    std::fs::write(path, bytes).expect("writing the input");
    let Ok(weights) = Weights::read(std::slice::from_ref(path), DType::F32, &Device::Cpu) else {
        return;
    };
    for name in weights.names() {
        let tensor = weights.maybe(name).expect("a listed tensor");
        let _ = weights
            .get(name, tensor.dims())
            .expect("a tensor of its own shape");
    }
    let _ = weights.to_dtype(DType::BF16);
});
