//! Writes a randomly initialised model directory for benchmarks:
//! `cargo run --release --example random_model -- configs/tiny.yaml /tmp/tiny-random`
//! The architecture comes from the config's `model` section; the weights are drawn from
//! N(0, initializer_range) (norms 1), and the tokenizer is the small test fixture (its ids fit any vocab).

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use llmtool::model::io::{save, ModelFiles};
use llmtool::model::names::parameter_shapes;
use llmtool::model::tokenizer_files::TokenizerSource;
use std::path::Path;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, out] = args.as_slice() else {
        bail!("usage: random_model CONFIG OUT_DIR");
    };
    let config = llmtool::config::load(Path::new(config), &[])?;
    let vocab_size = config.model.vocab_size.tokenizer_target();
    let cfg = llmtool::train::init::scratch_config(&config.model, vocab_size, Some(0));
    let tensors = parameter_shapes(&cfg)
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu)?
            } else {
                Tensor::randn(0f32, cfg.initializer_range as f32, shape, &Device::Cpu)?
            };
            Ok((name, t))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer.json");
    save(
        Path::new(out),
        &ModelFiles {
            config: &cfg,
            tensors: &tensors,
            tokenizer: TokenizerSource::Trained(&tokenizer),
            dtype: config.output.dtype.resolve(None),
        },
    )
    .with_context(|| format!("writing {out}"))?;
    let params: usize = tensors.iter().map(|(_, t)| t.elem_count()).sum();
    println!("wrote {out}: {params} parameters");
    Ok(())
}
