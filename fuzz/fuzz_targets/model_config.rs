//! A model's `config.json`: `model::io::read_config` (parsing, unsupported options, `check()`),
//! then what loading a model derives from an accepted config before reading weights (the
//! family, the tensor shapes, the parameter count). Any input must give a config or a
//! `ModelError`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model::Family;
use std::path::Path;
use std::sync::OnceLock;

fn dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder"))
        .path()
}

fuzz_target!(|bytes: &[u8]| {
    let dir = dir();
    std::fs::write(dir.join("config.json"), bytes).expect("writing the input");
    let Ok(config) = model::io::read_config(dir) else {
        return;
    };
    let _ = Family::of(&config);
    let _ = model::names::parameter_shapes(&config);
    let _ = config.parameter_count();
    let _ = config.op_shape();
});
