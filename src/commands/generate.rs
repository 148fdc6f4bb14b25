//! `llmtool generate`: sample text from a prompt, a file, stdin, a chat message or a chat
//! session, streaming it to stdout; speeds go to stderr.

use super::runtime::{load_model, Runtime};
use crate::cli::GenerateArgs;
use anyhow::{bail, Context, Result};
use config::GenerateSection;
use generate::{
    eos_ids, keep_tail, ChatTemplate, Finish, Generation, GenerationSettings, Message,
    SamplingParams, Session,
};
use model::{Llama, LoadedModel};
use std::io::{BufRead, Read, Write};

/// Runs `llmtool generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let runtime = Runtime::open(&args.runtime)?;
    let mut settings = settings(&args, &runtime.config.generate)?;
    let loaded = load_model(
        &args.model,
        args.adapter.as_deref(),
        &args.runtime,
        &runtime.device,
    )?;
    settings.eos = eos_ids(&loaded.dir, &loaded.model.config);
    if args.interactive {
        return interactive(&args, &loaded, &settings);
    }
    let text = read_prompt(&args)?;
    let ids = if args.chat {
        let template = chat_template(&args, &loaded)?;
        let mut messages = system_messages(&args);
        messages.push(Message::new("user", &text));
        encode(&loaded, &template.render(&messages, true)?, false)?
    } else {
        encode(&loaded, &text, true)?
    };
    let ids = fit_context(&loaded, ids, settings.max_tokens, args.truncate)?;
    let context = loaded.model.config.max_position_embeddings;
    let mut session = Session::new(
        &loaded.model,
        &loaded.tokenizer,
        (ids.len() + settings.max_tokens).min(context),
    )?;
    let seed = settings.sampling.seed;
    for i in 0..args.num_samples {
        if args.num_samples > 1 {
            println!("--- sample {} of {} ---", i + 1, args.num_samples);
        }
        settings.sampling.seed = seed.wrapping_add(i as u64);
        let generation = session.generate(&ids, &settings, print_piece)?;
        println!();
        report(&generation, context);
    }
    report_op_by_op(&loaded.model, &session);
    Ok(())
}

/// On CUDA, one-token steps replay a captured graph; says so on stderr when they could not.
fn report_op_by_op(model: &Llama, session: &Session) {
    if let (true, Some(reason)) = (model.device().is_cuda(), session.op_by_op_reason()) {
        eprintln!("decoding ran op by op: {reason}");
    }
}

/// Flags over `--config`'s `generate` section over the defaults, checked.
fn settings(args: &GenerateArgs, defaults: &GenerateSection) -> Result<GenerationSettings> {
    let sampling = SamplingParams {
        temperature: args.temperature.unwrap_or(defaults.temperature),
        top_k: args.top_k.or(defaults.top_k),
        top_p: args.top_p.or(defaults.top_p),
        min_p: args.min_p.or(defaults.min_p),
        repetition_penalty: args
            .repetition_penalty
            .unwrap_or(defaults.repetition_penalty),
        seed: args.seed.unwrap_or(defaults.seed),
    };
    sampling.validate()?;
    if args.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    let mut stop = defaults.stop.clone();
    stop.extend(args.stop.iter().cloned());
    Ok(GenerationSettings {
        max_tokens: args.max_tokens.unwrap_or(defaults.max_tokens),
        sampling,
        stop,
        eos: Vec::new(),
    })
}

fn read_prompt(args: &GenerateArgs) -> Result<String> {
    if let Some(p) = &args.prompt {
        return Ok(p.clone());
    }
    if let Some(path) = &args.prompt_file {
        return std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the prompt file {}", path.display()));
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("cannot read the prompt from stdin")?;
    Ok(text)
}

fn system_messages(args: &GenerateArgs) -> Vec<Message> {
    args.system
        .iter()
        .map(|s| Message::new("system", s))
        .collect()
}

/// Token ids of `text`; an empty prompt starts from the model's BOS token.
fn encode(loaded: &LoadedModel, text: &str, special: bool) -> Result<Vec<u32>> {
    let ids = loaded
        .tokenizer
        .encode(text, special)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        if let Some(bos) = &loaded.model.config.bos_token_id {
            return Ok(bos.to_vec());
        }
    }
    Ok(ids)
}

/// Fails on a prompt that fills the context, or with `truncate` keeps its end, leaving room
/// for `max_tokens` new tokens where that keeps at least half the context.
fn fit_context(
    loaded: &LoadedModel,
    ids: Vec<u32>,
    max_tokens: usize,
    truncate: bool,
) -> Result<Vec<u32>> {
    let context = loaded.model.config.max_position_embeddings;
    if ids.len() < context || !truncate {
        return Ok(ids);
    }
    let keep = context.saturating_sub(max_tokens).max(context / 2).max(1);
    eprintln!(
        "note: the prompt is {} tokens; keeping its last {keep} (context {context})",
        ids.len()
    );
    Ok(keep_tail(&ids, keep).to_vec())
}

fn print_piece(piece: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(piece.as_bytes())?;
    out.flush()
}

/// One line of speeds to stderr.
fn report(g: &Generation, context: usize) {
    let rate = |n: usize, t: std::time::Duration| n as f64 / t.as_secs_f64().max(1e-9);
    let finish = match g.finish {
        Finish::Eos => "end of sequence".to_string(),
        Finish::StopString => "stop string".into(),
        Finish::MaxTokens => "max tokens".into(),
        Finish::Context => format!("the model's context ({context} tokens) is full"),
    };
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s; generation: {} tokens, {:.1} tokens/s; stopped: {finish}",
        g.prompt_tokens,
        rate(g.prompt_tokens, g.prompt_time),
        g.tokens.len(),
        rate(g.tokens.len(), g.generation_time),
    );
}

/// The model's chat template with the `--chat-arg` variables set.
fn chat_template(args: &GenerateArgs, loaded: &LoadedModel) -> Result<ChatTemplate> {
    let template = ChatTemplate::load(&loaded.dir)?;
    Ok(args
        .chat_args
        .iter()
        .fold(template, |t, (key, value)| t.with_variable(key, value)))
}

/// A chat on stdin: each line is a user turn; the cache carries over, so each turn only runs
/// its new tokens.
fn interactive(
    args: &GenerateArgs,
    loaded: &LoadedModel,
    settings: &GenerationSettings,
) -> Result<()> {
    let template = chat_template(args, loaded)?;
    let context = loaded.model.config.max_position_embeddings;
    let mut session = Session::new(&loaded.model, &loaded.tokenizer, context)?;
    let mut messages = system_messages(args);
    let mut turns = args.prompt.iter().cloned().map(Ok).chain(
        std::io::stdin()
            .lock()
            .lines()
            .map(|l| l.context("cannot read stdin")),
    );
    loop {
        eprint!("> ");
        let Some(line) = turns.next() else { break };
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        messages.push(Message::new("user", line.trim()));
        let text = template.render(&messages, true)?;
        let ids = session.continuation_ids(&text)?;
        if ids.len() >= context {
            bail!(
                "the conversation is {} tokens, the model's whole context ({context}); start a new one",
                ids.len()
            );
        }
        let generation = session.generate(&ids, settings, print_piece)?;
        println!();
        report(&generation, context);
        messages.push(Message::new("assistant", &generation.text));
    }
    eprintln!();
    report_op_by_op(&loaded.model, &session);
    Ok(())
}
