//! `llmtool train`: build the dataset if needed, initialise or resume a model, train, report.

use super::session::{build_dataset, execute, open_session, resolve_config};
use crate::cli::TrainArgs;
use anyhow::Result;
use model::tokenizer_files::TokenizerSource;
use model::Llama;
use std::path::Path;
use train::init;
use train::run::on_big_stack;

/// Runs `llmtool train` on a thread with a big stack, or starts its ranks (`--gpus N`).
pub fn run(args: TrainArgs) -> Result<()> {
    if super::launch::launched(&args.launch)? {
        return Ok(());
    }
    on_big_stack(move || train(args))?
}

fn train(args: TrainArgs) -> Result<()> {
    let session = open_session("train", resolve_config(&args)?, &args, |config, pin| {
        build_dataset(config, config.model.vocab_size.limit(), pin)
    })?;
    let (config, dataset) = (&session.config, &session.data);
    let vocab_size = config.model.vocab_size.embedding_rows(dataset.vocab_size());
    let model_config = init::scratch_config(&config.model, vocab_size, Some(dataset.eos_id()));
    let t = &config.training;
    let weights = init::random_weights(&model_config, t.seed, &session.device)?;
    let (weights, vars) = weights.into_trainable()?;
    let llama = Llama::new(&model_config, &weights, t.dtype.dtype())?;
    let tokenizer_path = dataset.dir.join("tokenizer.json");
    let tokenizer = TokenizerSource::Trained(&tokenizer_path);
    let dtype = config.output.dtype.resolve(None);
    let save = |dir: &Path| model::io::save_model(dir, &llama, tokenizer, dtype);
    execute(&session, &args, &llama, vars, &save, "model")
}
