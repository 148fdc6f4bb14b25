//! One sample being generated ([`Continuation`]), and what a decoding loop does with a batch of
//! them: draw each active row's next token, take it (streaming the text it completes, ending
//! the row at an end id, a stop string or `max_tokens`), and end the rows still active.

use crate::sampler::SamplingParams;
use crate::{
    tokenizer_error, Finish, GenerateError, Generation, GenerationSettings, Sampler, Stop,
    StopStrings, Streamed, TextStream,
};
use candle_core::Tensor;
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;

/// Whether any row still takes tokens.
pub(crate) fn any_active(rows: &[Continuation]) -> bool {
    rows.iter().any(Continuation::is_active)
}

/// Each active row takes its token: `tokens` has one per row, `None` where none was drawn.
pub(crate) fn take_tokens(
    rows: &mut [Continuation],
    tokens: impl IntoIterator<Item = Option<u32>>,
    settings: &GenerationSettings,
    emit: &mut impl FnMut(usize, Streamed<'_>) -> std::io::Result<()>,
) -> Result<(), GenerateError> {
    for (i, (row, token)) in rows.iter_mut().zip(tokens).enumerate() {
        if let Some(token) = token.filter(|_| row.is_active()) {
            row.take(token, settings, |s| emit(i, s))?;
        }
    }
    Ok(())
}

/// Ends every row still active, for `finish`.
pub(crate) fn end_active(
    rows: &mut [Continuation],
    finish: Finish,
    emit: &mut impl FnMut(usize, Streamed<'_>) -> std::io::Result<()>,
) -> Result<(), GenerateError> {
    for (i, row) in rows.iter_mut().enumerate() {
        if row.is_active() {
            row.end(finish, |s| emit(i, s))?;
        }
    }
    Ok(())
}

/// The next token of each active row (`None` for an ended one) from `logits` `[rows, vocab]`.
/// Greedy decoding with no penalty takes the argmax on the device and reads back one id per
/// row; any other sampling reads the logits back and samples the rows on the CPU, in parallel
/// ([`crate::sample_logits`]).
pub(crate) fn next_tokens(
    rows: &mut [Continuation],
    logits: &Tensor,
    sampling: &SamplingParams,
) -> Result<Vec<Option<u32>>, GenerateError> {
    if sampling.is_plain_argmax() {
        let ids = ops::argmax(logits)?.to_vec1::<u32>()?;
        return Ok(rows
            .iter()
            .zip(ids)
            .map(|(row, id)| row.is_active().then_some(id))
            .collect());
    }
    let draws = rows
        .iter_mut()
        .map(|row| {
            let active = row.is_active();
            active.then_some((&mut row.sampler, row.context.as_slice()))
        })
        .collect();
    Ok(crate::sample_logits(logits, draws)?)
}

/// One sample being generated: its sampler, what it has produced, its text stream and stop
/// strings, and whether (and when) it ended.
pub(crate) struct Continuation<'t> {
    sampler: Sampler,
    stream: TextStream<'t>,
    stops: StopStrings,
    /// The prompt and the sampled tokens: what the repetition penalty looks at.
    context: Vec<u32>,
    tokens: Vec<u32>,
    text: String,
    finish: Finish,
    started: Instant,
    /// Set when the sample ends: the time from `started`.
    ended: Option<Duration>,
}

impl<'t> Continuation<'t> {
    /// Sample `index` of `prompt`'s continuations, seeded `seed + index`.
    pub(crate) fn new(
        tokenizer: &'t Tokenizer,
        settings: &GenerationSettings,
        index: usize,
        prompt: &[u32],
    ) -> Self {
        let mut sampling = settings.sampling.clone();
        sampling.seed = sampling.seed.wrapping_add(index as u64);
        Self {
            sampler: Sampler::new(sampling),
            stream: TextStream::new(tokenizer),
            stops: StopStrings::new(&settings.stop),
            context: prompt.to_vec(),
            tokens: Vec::new(),
            text: String::new(),
            finish: Finish::MaxTokens,
            started: Instant::now(),
            ended: None,
        }
    }

    /// Whether the sample still takes tokens.
    pub(crate) fn is_active(&self) -> bool {
        self.ended.is_none()
    }

    /// How many tokens the sample has taken.
    pub(crate) fn produced(&self) -> usize {
        self.tokens.len()
    }

    /// The token to run for this row at the next step: the last one sampled (an ended sample
    /// runs its last token again; its logits are ignored).
    pub(crate) fn last_token(&self) -> u32 {
        self.context.last().copied().unwrap_or_default()
    }

    /// Takes `next` as the sample's next token and streams the text it completes; ends the
    /// sample at an end-of-sequence id, a stop string or `max_tokens`.
    fn take(
        &mut self,
        next: u32,
        settings: &GenerationSettings,
        mut emit: impl FnMut(Streamed<'_>) -> std::io::Result<()>,
    ) -> Result<(), GenerateError> {
        if settings.eos.contains(&next) {
            return self.end(Finish::Eos, emit);
        }
        self.tokens.push(next);
        self.context.push(next);
        let piece = self.stream.push(next).map_err(tokenizer_error)?;
        match self.stops.feed(&piece) {
            Stop::Continue(piece) => self.emit_text(&piece, &mut emit)?,
            Stop::Stopped(piece) => {
                self.emit_text(&piece, &mut emit)?;
                return self.end(Finish::StopString, emit);
            }
        }
        if self.tokens.len() == settings.max_tokens {
            return self.end(Finish::MaxTokens, emit);
        }
        Ok(())
    }

    /// Ends the sample for `finish`: the text held back is released (unless a stop string cut
    /// it), then the end is streamed.
    fn end(
        &mut self,
        finish: Finish,
        mut emit: impl FnMut(Streamed<'_>) -> std::io::Result<()>,
    ) -> Result<(), GenerateError> {
        if finish != Finish::StopString {
            let rest = self.stream.finish().map_err(tokenizer_error)?;
            let rest = match self.stops.feed(&rest) {
                Stop::Continue(piece) => piece + &self.stops.finish(),
                Stop::Stopped(piece) => piece,
            };
            self.emit_text(&rest, &mut emit)?;
        }
        self.finish = finish;
        self.ended = Some(self.started.elapsed());
        emit(Streamed::Done(finish))?;
        Ok(())
    }

    /// Keeps `piece` as part of the text and streams it.
    fn emit_text(
        &mut self,
        piece: &str,
        emit: &mut impl FnMut(Streamed<'_>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        if piece.is_empty() {
            return Ok(());
        }
        self.text.push_str(piece);
        emit(Streamed::Text(piece))
    }

    /// The outcome, with the prompt's share of the batch.
    pub(crate) fn into_generation(self, prompt_tokens: usize, prompt_time: Duration) -> Generation {
        Generation {
            generation_time: self.ended.unwrap_or_else(|| self.started.elapsed()),
            tokens: self.tokens,
            text: self.text,
            finish: self.finish,
            prompt_tokens,
            prompt_time,
        }
    }
}
