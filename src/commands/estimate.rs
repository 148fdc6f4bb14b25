//! `llmtool estimate`: parameters and peak training memory, before loading anything.

use crate::cli::ConfigArgs;
use anyhow::Result;
use train::memory::{human, plan};

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
pub fn run(args: ConfigArgs) -> Result<()> {
    let config = super::config::load(&args)?;
    let model = match &config.model.pretrained {
        Some(spec) => model::io::read_config(&model::hub::resolve(spec)?)?,
        None => train::init::scratch_config(&config.model, vocab_size(&config), None),
    };
    let p = plan(&model, &config);
    let t = &config.training;
    println!(
        "{}: {:.2}M parameters, batch {} x {} tokens, activations in {:?}",
        args.config.display(),
        p.parameters as f64 / 1e6,
        t.batch_size,
        t.seq_len,
        t.dtype
    );
    println!("  weights (f32)              {:>10}", human(p.weights));
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
    println!("  peak                       {:>10}", human(p.total(false)));
    println!("  peak, checkpointed         {:>10}", human(p.total(true)));
    let chosen = if t.grad_checkpoint { "on" } else { "off" };
    println!("  (training.grad_checkpoint is {chosen})");
    Ok(())
}
