//! `llmtool export --gguf`: a model (and optionally a LoRA adapter, merged as `merge` merges
//! it) to a GGUF file with an Ollama Modelfile beside it.

use crate::cli::{ExportArgs, QuantName};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use model::gguf::{self, ExportOptions, Quant};
use model::{hub, io};
use std::path::Path;
use train::{lora, Adapter};

/// Exports `args.model` (merged with `args.adapter`) to `args.out`.
pub fn run(args: &ExportArgs) -> Result<()> {
    let modelfile = args.out.with_file_name("Modelfile");
    for path in [&args.out, &modelfile] {
        if path.exists() && !args.force {
            bail!(
                "{}: already exists; pass --force to replace it",
                path.display()
            );
        }
    }
    let dir = hub::resolve(&args.model)?;
    let device = Device::Cpu;
    let base = io::load(&dir, DType::F32, &device)?;
    let config = &base.model.config;
    let mut tensors = base.model.named_parameters()?;
    if let Some(adapter_dir) = &args.adapter {
        let adapter = Adapter::load(adapter_dir, config, DType::F32, &device)?;
        tensors = lora::merge(&tensors, &adapter)
            .with_context(|| format!("merging {}", adapter_dir.display()))?;
    }
    let name = display_name(&dir, args.adapter.as_deref());
    let options = ExportOptions {
        model_dir: &dir,
        quant: quant(args.quant),
        name: &name,
    };
    let exported = gguf::export(config, &tensors, &options, &args.out, args.force)?;
    for warning in &exported.warnings {
        eprintln!("warning: {warning}");
    }
    let file_name = args
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let (text, template) = gguf::modelfile(&file_name.unwrap_or_default(), &exported.vocab);
    model::weights::write_atomic(&modelfile, text.as_bytes())
        .with_context(|| format!("writing {}", modelfile.display()))?;
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "exported {} tensors of {} ({:?}) as {} -> {} ({:.1} MB)",
        exported.tensors.len(),
        args.model,
        model::family::Kind::of(config),
        args.quant.as_str(),
        args.out.display(),
        bytes as f64 / 1e6
    );
    let template = template.unwrap_or(match exported.vocab.chat_template {
        Some(_) => "none recognised (Ollama reads the GGUF's chat template)",
        None => "raw prompt (no chat template)",
    });
    println!(
        "Modelfile -> {} (template: {template}); run: ollama create NAME -f {}",
        modelfile.display(),
        modelfile.display()
    );
    Ok(())
}

fn quant(q: QuantName) -> Quant {
    match q {
        QuantName::F16 => Quant::F16,
        QuantName::Bf16 => Quant::Bf16,
        QuantName::Q8_0 => Quant::Q8_0,
        QuantName::Q4KM => Quant::Q4KM,
    }
}

impl QuantName {
    fn as_str(self) -> &'static str {
        match self {
            QuantName::F16 => "f16",
            QuantName::Bf16 => "bf16",
            QuantName::Q8_0 => "q8_0",
            QuantName::Q4KM => "q4_k_m",
        }
    }
}

/// `general.name`: the model directory's name, with the adapter's.
fn display_name(dir: &Path, adapter: Option<&Path>) -> String {
    let base = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    };
    match adapter {
        Some(a) => format!("{} + {}", base(dir), base(a)),
        None => base(dir),
    }
}
