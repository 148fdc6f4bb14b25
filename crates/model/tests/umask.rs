//! Files and directories llmtool writes honour the umask (issue 18, item 10): tempfile creates
//! its files 0600 and its directories 0700, and that mode used to survive the rename into
//! place. The umask is process-wide, so this binary holds this one test only.

#![cfg(unix)]

use candle_core::Device;
use llmtool_model as model;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn written_files_and_model_directories_honour_the_umask() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
    let config = model::io::read_config(&fixture).unwrap();
    let tensors: Vec<_> =
        candle_core::safetensors::load(fixture.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    let old = unsafe { libc::umask(0o022) };
    for mask in [0o022, 0o027, 0o002] {
        unsafe { libc::umask(mask) };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state/training_state.safetensors");
        model::weights::write_atomic(&file, b"bytes").unwrap();
        assert_eq!(
            mode(&file),
            0o666 & !mask,
            "umask {mask:o}: {}",
            file.display()
        );
        let out = dir.path().join("model");
        let files = model::io::ModelFiles {
            config: &config,
            tensors: &tensors,
            tokenizer: model::tokenizer_files::TokenizerSource::Base(&fixture),
            dtype: candle_core::DType::F32,
        };
        // Twice: the second save replaces the first.
        for _ in 0..2 {
            model::io::save(&out, &files).unwrap();
            assert_eq!(
                mode(&out),
                0o777 & !mask,
                "umask {mask:o}: {}",
                out.display()
            );
            for entry in std::fs::read_dir(&out).unwrap() {
                let path = entry.unwrap().path();
                assert_eq!(
                    mode(&path),
                    0o666 & !mask,
                    "umask {mask:o}: {}",
                    path.display()
                );
            }
        }
    }
    unsafe { libc::umask(old) };
}
