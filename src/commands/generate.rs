//! `llmtool generate`: sample text from a prompt, a file, stdin, a chat message or a chat
//! session, streaming it to stdout; speeds go to stderr.

use super::runtime::{load_model, Runtime};
use crate::cli::GenerateArgs;
use anyhow::{bail, Context, Result};
use config::GenerateSection;
use generate::{
    eos_ids, keep_tail, ChatTemplate, Finish, Generation, GenerationSettings, Message,
    SamplingParams, Session, Streamed,
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
    let mut blocks = SampleBlocks::new(args.num_samples)?;
    let generations =
        session.generate_samples(&ids, &settings, args.num_samples, |i, streamed| {
            blocks.take(i, streamed)
        })?;
    report(&generations, context);
    report_op_by_op(&loaded.model, &session);
    Ok(())
}

/// Prints the samples of a batch to stdout in order, each as a `--- sample i of N ---` block
/// (one sample as bare text), each ended by a newline. The first sample not yet printed
/// whole streams live; later ones are held until the blocks before them are complete.
struct SampleBlocks {
    /// Text of each sample not yet printed.
    held: Vec<String>,
    ended: Vec<bool>,
    /// The sample whose block is open.
    live: usize,
}

impl SampleBlocks {
    /// Blocks for `samples` samples, the first one opened.
    fn new(samples: usize) -> std::io::Result<Self> {
        let blocks = Self {
            held: vec![String::new(); samples],
            ended: vec![false; samples],
            live: 0,
        };
        blocks.open()?;
        Ok(blocks)
    }

    /// Takes what sample `i` streamed.
    fn take(&mut self, i: usize, streamed: Streamed<'_>) -> std::io::Result<()> {
        match streamed {
            Streamed::Text(piece) if i == self.live => print_piece(piece),
            Streamed::Text(piece) => {
                self.held[i].push_str(piece);
                Ok(())
            }
            Streamed::Done(_) => {
                self.ended[i] = true;
                self.close_ended()
            }
        }
    }

    /// Closes the open block while its sample has ended, opening the next with what it held.
    fn close_ended(&mut self) -> std::io::Result<()> {
        while self.ended.get(self.live) == Some(&true) {
            print_piece("\n")?;
            self.live += 1;
            if self.live < self.held.len() {
                self.open()?;
                print_piece(&std::mem::take(&mut self.held[self.live]))?;
            }
        }
        Ok(())
    }

    /// The header of the open block, when there are several.
    fn open(&self) -> std::io::Result<()> {
        match self.held.len() {
            1 => Ok(()),
            n => print_piece(&format!("--- sample {} of {n} ---\n", self.live + 1)),
        }
    }
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

/// Speeds to stderr: one line for a single sample; for a batch, a line per sample (its tokens
/// and why it stopped), then the prompt's speed and the batch's (every sample's tokens over
/// the time until the last one ended).
fn report(generations: &[Generation], context: usize) {
    match generations {
        [] => {}
        [g] => eprintln!(
            "{}; generation: {} tokens, {:.1} tokens/s; stopped: {}",
            prompt_speed(g),
            g.tokens.len(),
            rate(g.tokens.len(), g.generation_time),
            finish_reason(g.finish, context)
        ),
        [first, ..] => {
            for (i, g) in generations.iter().enumerate() {
                let finish = finish_reason(g.finish, context);
                eprintln!(
                    "sample {}: {} tokens; stopped: {finish}",
                    i + 1,
                    g.tokens.len()
                );
            }
            let tokens: usize = generations.iter().map(|g| g.tokens.len()).sum();
            let time = generations.iter().map(|g| g.generation_time).max();
            eprintln!(
                "{}; generation: {} samples, {tokens} tokens, {:.1} tokens/s (all samples)",
                prompt_speed(first),
                generations.len(),
                rate(tokens, time.unwrap_or_default())
            );
        }
    }
}

/// The prompt's tokens and speed (the samples of a batch share them).
fn prompt_speed(g: &Generation) -> String {
    let speed = rate(g.prompt_tokens, g.prompt_time);
    format!("prompt: {} tokens, {speed:.1} tokens/s", g.prompt_tokens)
}

/// Tokens per second.
fn rate(tokens: usize, time: std::time::Duration) -> f64 {
    tokens as f64 / time.as_secs_f64().max(1e-9)
}

/// Why a generation stopped, in words.
fn finish_reason(finish: Finish, context: usize) -> String {
    match finish {
        Finish::Eos => "end of sequence".to_string(),
        Finish::StopString => "stop string".into(),
        Finish::MaxTokens => "max tokens".into(),
        Finish::Context => format!("the model's context ({context} tokens) is full"),
    }
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
        report(std::slice::from_ref(&generation), context);
        messages.push(Message::new("assistant", &generation.text));
    }
    eprintln!();
    report_op_by_op(&loaded.model, &session);
    Ok(())
}
