//! `llmtool estimate`: parameters and peak training memory, before loading anything.

use crate::cli::EstimateArgs;
use anyhow::{bail, Context, Result};
use train::memory::{human, plan, plan_lora, MemoryPlan};

/// The embedding rows of a model trained from scratch: with `vocab_size: auto`, sized to the
/// dataset's tokenizer when the dataset is built, else to the most a trained tokenizer gets.
fn vocab_size(config: &config::Config) -> usize {
    let vocab = config.model.vocab_size;
    let built = data::Manifest::read(&config.data.dataset_dir(&config.output));
    match (vocab.limit(), built) {
        (None, Ok(manifest)) => vocab.embedding_rows(manifest.tokenizer.vocab_size),
        _ => vocab.tokenizer_target(),
    }
}

/// Runs `llmtool estimate`.
pub fn run(args: EstimateArgs) -> Result<()> {
    let path = &args.config.config;
    let config = super::config::load(&args.config)?;
    let pretrained = match &config.model.pretrained {
        Some(spec) => Some(model::io::read_config(&model::hub::resolve(spec)?)?),
        None => None,
    };
    let t = &config.training;
    let (p, labels) = match (args.lora, pretrained) {
        (true, None) => bail!("{}: --lora needs model.pretrained", path.display()),
        (true, Some(model)) => {
            let stored = model.stored_dtype().unwrap_or(candle_core::DType::BF16);
            let device = super::config::training_device(&config)?;
            let on_cuda = ops::device::computes_on_cuda(device);
            let (p, adapter) = plan_lora(&model, &config, stored, on_cuda)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{}: lora", path.display()))?;
            let labels = PlanLabels {
                weights: format!("base ({:?}) + adapter", config.lora.base_dtype).to_lowercase(),
                trained: format!("a {} adapter", train::memory::count(adapter)),
                copied: "adapter",
            };
            (p, labels)
        }
        (false, pretrained) => {
            let model = pretrained.unwrap_or_else(|| {
                train::init::scratch_config(&config.model, vocab_size(&config), None)
            });
            let labels = PlanLabels {
                weights: "weights (f32)".into(),
                trained: "all".into(),
                copied: "weight",
            };
            (plan(&model, &config), labels)
        }
    };
    print_plan(path, &p, &labels, t);
    Ok(())
}

/// How `estimate` names the parts of a plan.
struct PlanLabels {
    /// The weights line: a model's f32 weights, or a LoRA plan's base and adapter.
    weights: String,
    /// What is trained: all the weights, or an adapter of so many parameters.
    trained: String,
    /// What AdamW keeps compute-dtype copies of: the weights, or a LoRA plan's adapter.
    copied: &'static str,
}

/// The plan as `estimate` prints it, its lines named by `labels`.
fn print_plan(
    path: &std::path::Path,
    p: &MemoryPlan,
    labels: &PlanLabels,
    t: &config::TrainingSection,
) {
    println!(
        "{}: {:.2}M parameters, training {}, batch {} x {} tokens, activations in {:?}",
        path.display(),
        p.parameters as f64 / 1e6,
        labels.trained,
        t.batch_size,
        t.seq_len,
        t.dtype
    );
    println!("  {:<27}{:>10}", labels.weights, human(p.weights));
    println!("  gradients (f32)            {:>10}", human(p.gradients));
    println!("  AdamW moments (f32)        {:>10}", human(p.optimizer));
    println!("  activations                {:>10}", human(p.activations));
    println!(
        "  activations, checkpointed  {:>10}",
        human(p.activations_checkpointed)
    );
    println!(
        "  backward workspace         {:>10}",
        human(p.backward_workspace)
    );
    if p.compute_copies > 0 {
        let label = format!("{} copies ({:?})", labels.copied, t.dtype).to_lowercase();
        println!(
            "  {label:<27}{:>10}  (AdamW keeps them between steps; none with checkpointing)",
            human(p.compute_copies)
        );
    }
    if p.host_weights > 0 {
        println!(
            "  input embedding (host)     {:>10}  (not in the peak: it waits in host memory on CUDA)",
            human(p.host_weights)
        );
    }
    println!("  peak                       {:>10}", human(p.total(false)));
    println!("  peak, checkpointed         {:>10}", human(p.total(true)));
    let chosen = if t.grad_checkpoint { "on" } else { "off" };
    println!("  (training.grad_checkpoint is {chosen})");
}
