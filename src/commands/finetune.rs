//! `llmtool finetune`: adapt a pretrained Hugging Face model to the configured markdown or
//! JSONL examples, with LoRA adapters (`--lora`, a PEFT adapter directory) or all weights (an
//! HF model directory).

use super::session::{build_dataset, execute, open_session, resolve_config, TrainData};
use crate::cli::FinetuneArgs;
use anyhow::{Context, Result};
use candle_core::DType;
use config::{Config, TrainingSection};
use data::jsonl::{self, ExampleOptions, Examples};
use data::Dataset;
use generate::ChatTemplate;
use model::config::TokenIds;
use model::quantized::WeightStorage;
use model::tokenizer_files::TokenizerSource;
use model::{hub, Llama, LlamaConfig, Weights};
use std::path::{Path, PathBuf};
use train::example_source::ExampleBatches;
use train::run::on_big_stack;
use train::Adapter;
use train::BatchSource;

/// Runs `llmtool finetune` on a thread with a big stack, or starts its ranks (`--gpus N`).
pub fn run(args: FinetuneArgs) -> Result<()> {
    if super::launch::launched(&args.run.launch)? {
        return Ok(());
    }
    on_big_stack(move || finetune(args))?
}

fn finetune(args: FinetuneArgs) -> Result<()> {
    let mut config = resolve_config(&args.run)?;
    let spec = config.model.pretrained.clone().with_context(|| {
        "model.pretrained: set it to a Hugging Face model directory or hub id to fine-tune"
    })?;
    let base_dir = hub::resolve(&spec)?;
    let base_config = model::io::read_config(&base_dir)?;
    use_base_tokenizer(&mut config, &base_dir, &base_config)?;
    let command = if args.lora {
        "finetune --lora"
    } else {
        "finetune"
    };
    let session = open_session(command, config, &args.run, |config, pin| {
        FinetuneData::load(config, &base_dir, base_config.vocab_size, pin)
    })?;
    let config = &session.config;
    let t = &config.training;
    if args.lora {
        let storage = match config.lora.base_dtype.dense() {
            Some(dtype) => WeightStorage::Dense(dtype),
            // Embeddings, norms and the head stay in the checkpoint's 16 (or 32) bits.
            None => WeightStorage::Nf4(base_config.stored_dtype().unwrap_or(DType::BF16)),
        };
        let loaded = model::io::load_stored(&base_dir, storage, t.dtype.dtype(), &session.device)?;
        let mut llama = loaded.model;
        llama.keep_input_embedding_on_host()?;
        let mut adapter = Adapter::init(&config.lora, &llama.config, t.seed, &session.device)?;
        adapter.config.base_model_name_or_path = Some(spec.clone());
        adapter.attach(&mut llama)?;
        let layers = llama.config.num_hidden_layers;
        let save = |dir: &Path| adapter.save(dir, args.adapter_format, layers);
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
        let tokenizer = TokenizerSource::Base(&base_dir);
        let dtype = config.output.dtype.resolve(base_config.stored_dtype());
        let save = |dir: &Path| model::io::save_model(dir, &llama, tokenizer, dtype);
        execute(&session, &args.run, &llama, vars, &save, "model")
    }
}

/// Tokenizes the corpus with the base model's tokenizer, separating documents with its EOS.
fn use_base_tokenizer(
    config: &mut Config,
    base_dir: &Path,
    base_config: &LlamaConfig,
) -> Result<()> {
    let tokenizer_path: PathBuf = base_dir.join("tokenizer.json");
    if config.data.tokenizer.is_none() {
        config.data.tokenizer = Some(tokenizer_path.clone());
    }
    let eos = base_config.eos_token_id.as_ref().and_then(TokenIds::first);
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load: {e}", tokenizer_path.display()))?;
    if let Some(token) = eos.and_then(|id| tokenizer.id_to_token(id)) {
        if !config.data.special_tokens.contains(&token) {
            config.data.special_tokens.insert(0, token);
        }
    }
    Ok(())
}

/// What `finetune` trains on: JSONL examples when `data.roots` holds `.jsonl` files, else the
/// markdown dataset.
enum FinetuneData {
    Markdown(Box<Dataset>),
    /// The examples, and whether to pack them (`data.packing`).
    Examples(Examples, bool),
}

impl FinetuneData {
    /// Loads the examples (with the configured tokenizer and the base model's chat template)
    /// or builds the dataset, checking the tokenizer fits the model's `vocab_size`.
    fn load(
        config: &Config,
        base_dir: &Path,
        vocab_size: usize,
        pin: Option<&str>,
    ) -> Result<Self> {
        let files = jsonl::find_files(&config.data)?;
        if files.is_empty() {
            return Ok(Self::Markdown(Box::new(build_dataset(
                config,
                Some(vocab_size),
                pin,
            )?)));
        }
        let tokenizer_path = config
            .data
            .tokenizer
            .clone()
            .unwrap_or_else(|| base_dir.join("tokenizer.json"));
        let tokenizer = data::tokenizer::load(&tokenizer_path, Some(vocab_size))?;
        let eos_id =
            data::tokenizer::eos_id(&tokenizer, &config.data.special_tokens, &tokenizer_path)?;
        let template = ChatTemplate::load(base_dir).map(|template| {
            let args = &config.data.chat_template_args;
            args.iter()
                .fold(template, |t, (key, value)| t.with_variable(key, value))
        });
        let examples = jsonl::load(
            &files,
            &ExampleOptions {
                tokenizer: &tokenizer,
                eos_id,
                chat_template: template.as_ref().map_err(|e| e.to_string()),
                seq_len: config.training.seq_len,
                val_fraction: config.data.val_fraction,
            },
        )?;
        let sources = if files.valid.is_empty() {
            format!("{} JSONL files", files.train.len())
        } else {
            let names = |paths: &[PathBuf]| {
                let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                names.join(", ")
            };
            format!("{} train, {} val", names(&files.train), names(&files.valid))
        };
        eprintln!(
            "examples: {sources}, {} train / {} val examples, {} truncated to training.seq_len + 1 = {} tokens, {} dropped with nothing to score",
            examples.train.len(),
            examples.val.len(),
            examples.truncated,
            config.training.seq_len + 1,
            examples.unscored,
        );
        for test in &files.test {
            eprintln!(
                "examples: {} held out (not trained on); score it with `llmtool eval --data {}`",
                test.display(),
                test.display()
            );
        }
        Ok(Self::Examples(examples, config.data.packing))
    }
}

impl TrainData for FinetuneData {
    fn fingerprint(&self) -> Result<String> {
        match self {
            Self::Markdown(dataset) => dataset.fingerprint(),
            Self::Examples(examples, _) => Ok(examples.fingerprint()),
        }
    }

    fn batches(&self, t: &TrainingSection) -> Result<Box<dyn BatchSource + '_>> {
        match self {
            Self::Markdown(dataset) => dataset.batches(t),
            Self::Examples(examples, packing) => {
                if examples.val.is_empty() {
                    eprintln!("warning: no validation examples; no validation loss (raise data.val_fraction)");
                }
                Ok(Box::new(ExampleBatches::new(
                    examples, t.seq_len, t.sampling, t.seed, *packing,
                )))
            }
        }
    }
}
