//! The YAML run config (`llmtool train CONFIG`): `config::load_str` is what `config::load` runs
//! on a file's text. Any input must give a config or a `ConfigError`, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    // `config::load` reads the file with `read_to_string`, so only UTF-8 reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = config::load_str(text, Path::new("fuzz.yaml"), &[]) {
        // Formatting the error runs the located-message code too.
        let _ = e.to_string();
    }
});
