//! With the `cuda` feature, compiles `kernels/ops.cu` (which includes the kernel file of each
//! family) to one PTX module with nvcc, embedded in the binary and loaded at run time through
//! candle's `CudaDevice` (`src/launch.rs`). Without it, does nothing: CPU and Metal builds
//! need no CUDA toolkit.
//!
//! nvcc is taken from `NVCC`, else `CUDA_ROOT`/`CUDA_PATH`/`CUDA_HOME` `/bin/nvcc`, else `PATH`.
//! The PTX targets `compute_$CUDA_COMPUTE_CAP` (default 80: bf16 needs Ampere or newer); the
//! driver compiles it for the GPU it runs on.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
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
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.trim().replace('.', "");
    let status = Command::new(nvcc())
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("kernels/ops.cu")
        .arg("-o")
        .arg(out.join("llmtool_ops.ptx"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed on kernels/ops.cu ({s})"),
        Err(e) => panic!(
            "the cuda feature needs nvcc to compile kernels/ops.cu ({e}); set NVCC or CUDA_ROOT"
        ),
    }
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
