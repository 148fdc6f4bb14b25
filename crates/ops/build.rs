//! With the `cuda` feature, compiles `kernels/ops.cu` (which includes the kernel file of each
//! family) with nvcc into one fat binary, embedded in the binary and loaded at run time
//! (`src/launch.rs`). Without it, does nothing: CPU and Metal builds need no CUDA toolkit.
//!
//! nvcc is taken from `NVCC`, else `CUDA_ROOT`/`CUDA_PATH`/`CUDA_HOME` `/bin/nvcc`, else `PATH`.
//! The fat binary holds machine code (SASS) for the GPU generations in `LLMTOOL_CUDA_SASS`
//! (compute capabilities, default `80,86,89,90`: A100, RTX 30xx/A10, RTX 40xx/L4/L40, H100/H200;
//! empty for none), which loads without compiling, and PTX for `compute_$CUDA_COMPUTE_CAP`
//! (default 80: bf16 needs Ampere or newer), which the driver compiles for any other GPU at
//! first use (seconds, for the whole module). Compute capability 9.0's machine code is built
//! for `sm_90a`, whose warpgroup instructions the Hopper flash kernels use
//! (`kernels/flash_wgmma.cuh`); the build then sets the `llmtool_wgmma` cfg, and the launcher
//! picks those kernels on such GPUs.
//!
//! It also writes `OUT_DIR/launch_constants.rs` from `kernels/launch_constants.h`, the sizes a
//! kernel and its launcher share (`launch::constants`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(llmtool_wgmma)");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    // A directory: cargo rebuilds when any file under it changes (ops.cu includes the others).
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "CUDA_COMPUTE_CAP",
        "LLMTOOL_CUDA_SASS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    write_launch_constants(&out.join("launch_constants.rs"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let ptx = format!("arch=compute_{0},code=compute_{0}", capability(&cap));
    let sass = std::env::var("LLMTOOL_CUDA_SASS").unwrap_or_else(|_| "80,86,89,90".into());
    let capabilities: Vec<String> = sass
        .split(',')
        .filter(|c| !c.trim().is_empty())
        .map(capability)
        .collect();
    let hopper = capabilities.iter().any(|c| c == "90");
    let targets = capabilities
        .iter()
        .map(|c| match c.as_str() {
            "90" => "arch=compute_90a,code=sm_90a".to_string(),
            c => format!("arch=compute_{c},code=sm_{c}"),
        })
        .chain([ptx]);
    let status = Command::new(nvcc())
        .args(["--fatbin", "-O3", "-std=c++17", "--threads", "0"])
        .args(targets.flat_map(|t| ["-gencode".to_string(), t]))
        .arg("kernels/ops.cu")
        .arg("-o")
        .arg(out.join("llmtool_ops.fatbin"))
        .status();
    match status {
        Ok(s) if s.success() => {
            if hopper {
                println!("cargo:rustc-cfg=llmtool_wgmma");
            }
        }
        Ok(s) => panic!("nvcc failed on kernels/ops.cu ({s})"),
        Err(e) => panic!(
            "the cuda feature needs nvcc to compile kernels/ops.cu ({e}); set NVCC or CUDA_ROOT"
        ),
    }
}

/// Writes `kernels/launch_constants.h`'s `constexpr int NAME = VALUE;` lines to `path` as
/// `pub(crate) const NAME: usize = VALUE;`, each with the `//` lines right above it as its doc
/// comment. Stops the build on a `constexpr` line of any other form.
fn write_launch_constants(path: &std::path::Path) {
    const HEADER: &str = "kernels/launch_constants.h";
    let text = std::fs::read_to_string(HEADER).unwrap_or_else(|e| panic!("{HEADER}: {e}"));
    let mut rust = format!("// Written by build.rs from {HEADER}.\n");
    let mut doc: Vec<&str> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            doc.clear();
        } else if let Some(comment) = line.strip_prefix("//") {
            doc.push(comment.trim());
        } else if line.starts_with("constexpr") {
            let constant = line
                .strip_prefix("constexpr int ")
                .and_then(|rest| rest.strip_suffix(';'))
                .and_then(|rest| rest.split_once(" = "))
                .filter(|(name, value)| {
                    name.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                        && value.parse::<usize>().is_ok()
                });
            let Some((name, value)) = constant else {
                panic!(
                    "{HEADER}:{}: not `constexpr int NAME = INTEGER;`",
                    number + 1
                );
            };
            for comment in &doc {
                rust += &format!("/// {comment}\n");
            }
            rust += &format!("pub(crate) const {name}: usize = {value};\n");
            doc.clear();
        }
    }
    std::fs::write(path, rust).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A compute capability as nvcc's targets spell it (`9.0` or `90` → `90`).
fn capability(cap: &str) -> String {
    cap.trim().replace('.', "")
}

fn nvcc() -> PathBuf {
    if let Some(path) = std::env::var_os("NVCC") {
        return path.into();
    }
    for root in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(root) {
            let candidate = PathBuf::from(root).join("bin").join("nvcc");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    "nvcc".into()
}
