//! `llmtool finetune`: adapt a pretrained Hugging Face model to the configured markdown, with
//! LoRA adapters (`--lora`, a PEFT adapter directory) or all weights (an HF model directory).

use super::train::{check_vocab, execute, on_big_stack, open_session, resolve_config};
use crate::cli::FinetuneArgs;
use crate::config::Config;
use crate::model::{self, hub, Adapter, Llama, Weights};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Runs `llmtool finetune` on a thread with a big stack.
pub fn run(args: FinetuneArgs) -> Result<()> {
    on_big_stack(move || finetune(args))?
}

fn finetune(args: FinetuneArgs) -> Result<()> {
    let mut config = resolve_config(&args.run)?;
    let spec = config.model.pretrained.clone().with_context(|| {
        "model.pretrained: set it to a Hugging Face model directory or hub id to fine-tune"
    })?;
    let base_dir = hub::resolve(&spec)?;
    use_base_tokenizer(&mut config, &base_dir)?;
    let session = open_session(config, &args.run)?;
    let config = &session.config;
    let t = &config.training;
    let base_config = model::io::read_config(&base_dir)?;
    check_vocab(&session.dataset, base_config.vocab_size)?;
    let tokenizer = base_dir.join("tokenizer.json");
    if args.lora {
        let loaded = model::io::load_stored(
            &base_dir,
            config.lora.base_dtype.dtype(),
            t.dtype.dtype(),
            &session.device,
        )?;
        let mut llama = loaded.model;
        let mut adapter = Adapter::init(&config.lora, &llama.config, t.seed, &session.device)?;
        adapter.config.base_model_name_or_path = Some(spec.clone());
        llama.attach_adapter(&adapter)?;
        let save = |dir: &Path| adapter.save(dir);
        execute(
            &session,
            &args.run,
            &llama,
            adapter.vars(),
            &save,
            "adapter",
        )
    } else {
        let files = model::io::weight_files(&base_dir)?;
        let weights = Weights::read(&files, candle_core::DType::F32, &session.device)?;
        let (weights, vars) = weights.into_trainable()?;
        let llama = Llama::new(&base_config, &weights, t.dtype.dtype())?;
        let save = |dir: &Path| model::io::save_model(dir, &llama, &tokenizer);
        execute(&session, &args.run, &llama, vars, &save, "model")
    }
}

/// Tokenizes the corpus with the base model's tokenizer, separating documents with its EOS.
fn use_base_tokenizer(config: &mut Config, base_dir: &Path) -> Result<()> {
    let tokenizer_path: PathBuf = base_dir.join("tokenizer.json");
    if config.data.tokenizer.is_none() {
        config.data.tokenizer = Some(tokenizer_path.clone());
    }
    let base_config = model::io::read_config(base_dir)?;
    let eos = base_config
        .eos_token_id
        .as_ref()
        .and_then(|ids| ids.to_vec().first().copied());
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load: {e}", tokenizer_path.display()))?;
    if let Some(token) = eos.and_then(|id| tokenizer.id_to_token(id)) {
        if !config.data.special_tokens.contains(&token) {
            config.data.special_tokens.insert(0, token);
        }
    }
    Ok(())
}
