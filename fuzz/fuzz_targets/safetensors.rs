//! Safetensors weights (`model.safetensors`, `adapter_model.safetensors`): `Weights::read_stored`,
//! which every model and adapter load goes through, on one file holding the input, with dense
//! storage and with a 4-bit base (which also reads bitsandbytes' 4-bit tensors). Any input must
//! give tensors or a `ModelError`; a tensor read must match its header, and a 4-bit one must
//! expand to its shape.
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use model::quantized::WeightStorage;
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
    for storage in [WeightStorage::Dense(DType::F32), WeightStorage::Nf4(DType::F32)] {
        let Ok(weights) = Weights::read_stored(std::slice::from_ref(path), storage, &Device::Cpu)
        else {
            continue;
        };
        for name in weights.names() {
            let shape = weights.shape_of(name).expect("a listed tensor");
            let weight = weights
                .linear(name, &shape)
                .expect("a tensor of its own shape");
            if shape.len() == 2 {
                let dense = weight.dense(DType::F32).expect("a 4-bit weight expands");
                assert_eq!(dense.dims(), &shape[..]);
            }
        }
        let _ = weights.to_dtype(DType::BF16);
    }
});
