use cudaforge::{CudaToolkit, Error, KernelBuilder, Result};
use std::env;
use std::path::PathBuf;
use std::process::Command;

const CUTILE_FEATURE: &str = "CARGO_FEATURE_CUTILE";

/// llmtool: set for lints only (`.ci/run`): nothing is compiled with nvcc.
const CHECK_ONLY: &str = "LLMTOOL_CUDA_CHECK_ONLY";

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    println!("cargo::rerun-if-changed=src/compatibility.cuh");
    println!("cargo::rerun-if-changed=src/cuda_utils.cuh");
    println!("cargo::rerun-if-changed=src/binary_op_macros.cuh");

    // llmtool: each module candle-core loads at run time is a fat binary rather than PTX alone
    // (vendor/README.md), so a fresh machine does not wait for the driver to compile them.
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    // llmtool: a lint (`cargo check`/`cargo clippy`, .ci/run) compiles no CUDA here: empty
    // modules and no static library, which a check never links. A build without the variable
    // runs this script again and compiles everything.
    println!("cargo::rerun-if-env-changed={CHECK_ONLY}");
    let check_only = env::var_os(CHECK_ONLY).is_some();
    match check_only {
        true => empty_images(&out_dir)?,
        false => fat_binaries(&out_dir)?,
    }
    image_constants(&out_dir)?;
    if check_only {
        return Ok(());
    }

    let mut moe_sources = vec![
        "src/moe/moe_gguf.cu",
        "src/moe/moe_wmma.cu",
        "src/moe/moe_wmma_gguf.cu",
        "src/mmvq_gguf.cu",
        "src/mmq_gguf/mmq_quantize.cu",
        "src/mmq_gguf/mmq_instance_q4_0.cu",
        "src/mmq_gguf/mmq_instance_q4_1.cu",
        "src/mmq_gguf/mmq_instance_q5_0.cu",
        "src/mmq_gguf/mmq_instance_q5_1.cu",
        "src/mmq_gguf/mmq_instance_q8_0.cu",
        "src/mmq_gguf/mmq_instance_q2_k.cu",
        "src/mmq_gguf/mmq_instance_q3_k.cu",
        "src/mmq_gguf/mmq_instance_q4_k.cu",
        "src/mmq_gguf/mmq_instance_q5_k.cu",
        "src/mmq_gguf/mmq_instance_q6_k.cu",
    ];
    if env::var_os(CUTILE_FEATURE).is_some() {
        moe_sources.push("src/moe/moe_align.cu");
    }

    let mut moe_builder = KernelBuilder::default()
        .source_files(moe_sources)
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3");

    // Disable bf16 WMMA kernels on GPUs older than sm_80 (Ampere).
    // bf16 WMMA fragments require compute capability >= 8.0.
    let compute_cap = cudaforge::detect_compute_cap()
        .map(|arch| arch.base())
        .unwrap_or(80);
    if compute_cap < 80 {
        moe_builder = moe_builder.arg("-DNO_BF16_KERNEL");
    }

    let mut is_target_msvc = false;
    if let Ok(target) = std::env::var("TARGET") {
        if target.contains("msvc") {
            is_target_msvc = true;
            moe_builder = moe_builder.arg("-D_USE_MATH_DEFINES");
        }
    }

    if !is_target_msvc {
        moe_builder = moe_builder.arg("-Xcompiler").arg("-fPIC");
    }

    moe_builder.build_lib(out_dir.join("libmoe.a"))?;
    println!("cargo:rustc-link-search={}", out_dir.display());
    println!("cargo:rustc-link-lib=moe");
    println!("cargo:rustc-link-lib=dylib=cudart");
    if !is_target_msvc {
        println!("cargo:rustc-link-lib=stdc++");
    }
    Ok(())
}

/// The modules candle-core loads at run time (`src/lib.rs`), each `src/<name>.cu`.
const MODULES: [&str; 11] = [
    "affine",
    "binary",
    "cast",
    "conv",
    "fill",
    "indexing",
    "quantized",
    "reduce",
    "sort",
    "ternary",
    "unary",
];

/// Modules left as PTX only: candle's GGUF kernels, which llmtool never runs, and whose machine
/// code for four generations would take longer to build than all the others together.
const PTX_ONLY: [&str; 1] = ["quantized"];

/// llmtool: compiles every module in [`MODULES`] with nvcc into `OUT_DIR/<name>.fatbin`
/// ([`image_constants`] embeds them). Each fat binary holds machine
/// code (SASS) for the compute capabilities in `LLMTOOL_CUDA_SASS` (default `80,86,89,90`,
/// as llmtool-ops' kernels; empty for none) and PTX for `compute_$CUDA_COMPUTE_CAP` (else the
/// GPU nvidia-smi finds, else 80), which the driver compiles for any other GPU at first use.
/// Upstream's build makes PTX only, and on a fresh H200 the driver spent about 4 s compiling
/// those modules before llmtool's first token.
fn fat_binaries(out_dir: &std::path::Path) -> Result<()> {
    for var in ["CUDA_COMPUTE_CAP", "LLMTOOL_CUDA_SASS", "NVCC", "CUDA_HOME"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let nvcc = CudaToolkit::detect()?.nvcc_path;
    let ptx_cap = cudaforge::detect_compute_cap()
        .map(|arch| arch.base())
        .unwrap_or(80);
    let sass = env::var("LLMTOOL_CUDA_SASS").unwrap_or_else(|_| "80,86,89,90".into());
    let sass: Vec<String> = sass
        .split(',')
        .map(|cap| cap.trim().replace('.', ""))
        .filter(|cap| !cap.is_empty())
        .collect();
    for name in MODULES {
        let source = format!("src/{name}.cu");
        let image = out_dir.join(format!("{name}.fatbin"));
        let machine_code = match PTX_ONLY.contains(&name) {
            true => &[][..],
            false => &sass[..],
        };
        let targets = machine_code
            .iter()
            .map(|cap| format!("arch=compute_{cap},code=sm_{cap}"))
            .chain([format!("arch=compute_{ptx_cap},code=compute_{ptx_cap}")]);
        let output = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .args(["--default-stream", "per-thread", "--threads", "0"])
            .args(targets.flat_map(|t| ["-gencode".to_string(), t]))
            .arg(&source)
            .arg("-o")
            .arg(&image)
            .output()
            .map_err(|e| Error::NvccNotFound(format!("{}: {e}", nvcc.display())))?;
        if !output.status.success() {
            return Err(Error::CompilationFailed {
                path: source.into(),
                message: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
    }
    Ok(())
}

/// llmtool: an empty `OUT_DIR/<name>.fatbin` for every module, for a lint ([`CHECK_ONLY`]).
fn empty_images(out_dir: &std::path::Path) -> Result<()> {
    for name in MODULES {
        std::fs::write(out_dir.join(format!("{name}.fatbin")), [])?;
    }
    Ok(())
}

/// llmtool: `OUT_DIR/images.rs`, one `&[u8]` constant per module embedding its
/// `OUT_DIR/<name>.fatbin` (`src/lib.rs` includes it).
fn image_constants(out_dir: &std::path::Path) -> Result<()> {
    let images: String = MODULES
        .iter()
        .map(|name| {
            format!(
                "pub const {}: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{name}.fatbin\"));\n",
                name.to_uppercase()
            )
        })
        .collect();
    std::fs::write(out_dir.join("images.rs"), images)?;
    Ok(())
}
