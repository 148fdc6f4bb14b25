//! Incremental decoding of a batch of sequences: a model, its KV cache, and the steps that
//! extend them. Every row of the batch is at the same position; a prompt every row shares runs
//! once and is copied into each row.
//!
//! Prompts run op by op. One-token steps read their tokens and position from a small tensor
//! on the model's device (written in place before each step), so their kernels don't depend
//! on the position: on CUDA the first such step is captured as a graph ([`ops::Graph`]) and
//! every later one is a single replay, where op by op the host spent more time launching the
//! step's hundred-odd kernels than the GPU spent running them.
//!
//! Greedy decoding goes further ([`Decoder::enqueue_greedy`]): a step's argmax is written over
//! the step tensor's tokens and its position moved on, on the device (`ops::greedy_step`), so
//! the next step can be enqueued before the host has read this one's tokens, which the argmax
//! also writes into page-locked host memory the host reads once the step has run
//! (`ops::PicksLog`). The device then never waits for the host between steps, and no copy
//! stands between two steps on the stream.

use super::{Cache, Llama};
use candle_core::{DType, IndexOp, Result, Tensor};
use ops::{self, write_u32s, PicksLog, PICKS_LOG_SLOTS};
use std::collections::VecDeque;

/// A model and the KV cache of a batch of sequences being decoded side by side.
pub struct Decoder<'m> {
    model: &'m Llama,
    cache: Cache,
    /// Sequences in the batch.
    rows: usize,
    /// The next one-token step's tokens, one per row, then its position and that position's
    /// slot in the window layers ([`Cache::set_position`]): u32 `[rows + 2]` on the model's
    /// device.
    step: Tensor,
    replay: Replay,
    /// The greedy steps enqueued whose picks the host has not read, oldest first.
    unread: VecDeque<Picks>,
    /// Where positioned greedy steps leave their picks (made at the first one: a captured
    /// step holds its address).
    log: Option<PicksLog>,
    /// The picks the host read last.
    last_picks: Option<Vec<u32>>,
    /// Set by a positioned greedy step, which leaves its picks and the next position in
    /// `step`: the cache's version then, after which the position is still right.
    picks_in_step: Option<usize>,
}

/// The picks of a greedy step not yet read.
enum Picks {
    /// Known on the host (a step at the host position).
    Known(Vec<u32>),
    /// In the picks log, at the step's position.
    Logged(usize),
}

/// How one-token steps run.
enum Replay {
    /// Not captured yet: the first one-token step with the cache allocated captures.
    Pending,
    /// The captured step, the logits `[rows, vocab]` each replay writes (none for a greedy
    /// step, which leaves its picks in the step tensor instead), and the cache's version it was
    /// captured at ([`Cache::version`]): it holds the addresses of the buffers and of the RoPE
    /// rows of their slots, so a buffer that grows or a window layer that drops positions has
    /// the next step captured again.
    Ready {
        graph: ops::Graph,
        logits: Option<Tensor>,
        version: usize,
    },
    /// Op by op: the device can't capture, or capturing failed (the reason).
    OpByOp(String),
}

impl<'m> Decoder<'m> {
    /// An empty sequence of up to `capacity` positions for `model` (at most its context: RoPE
    /// has no rows past it).
    pub fn new(model: &'m Llama, capacity: usize) -> Result<Self> {
        Self::batched(model, capacity, 1)
    }

    /// `rows` empty sequences of up to `capacity` positions each, decoded as one batch.
    pub fn batched(model: &'m Llama, capacity: usize, rows: usize) -> Result<Self> {
        let replay = match ops::can_capture(model.device()) {
            true => Replay::Pending,
            false => Replay::OpByOp("the device has no CUDA graphs".into()),
        };
        Self::with_replay(model, capacity, rows, replay)
    }

    /// [`Decoder::new`] with every step op by op, as a reference for replayed ones.
    pub fn op_by_op(model: &'m Llama, capacity: usize) -> Result<Self> {
        let replay = Replay::OpByOp("asked for op by op".into());
        Self::with_replay(model, capacity, 1, replay)
    }

    fn with_replay(model: &'m Llama, capacity: usize, rows: usize, replay: Replay) -> Result<Self> {
        if rows == 0 {
            candle_core::bail!("a decoder needs at least one sequence");
        }
        Ok(Self {
            model,
            cache: Cache::new(
                model,
                capacity.clamp(1, model.config.max_position_embeddings),
            ),
            rows,
            step: Tensor::zeros(rows + 2, DType::U32, model.device())?,
            replay,
            unread: VecDeque::new(),
            log: None,
            last_picks: None,
            picks_in_step: None,
        })
    }

    /// The model decoded with.
    pub fn model(&self) -> &'m Llama {
        self.model
    }

    /// Sequences decoded side by side.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Positions each sequence can hold.
    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Positions cached so far (the same in every row).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Drops the cached positions (the buffers, and a captured step, stay for reuse).
    pub fn reset(&mut self) {
        self.cache.reset();
        self.unread.clear();
        self.last_picks = None;
        self.picks_in_step = None;
    }

    /// Why one-token steps run op by op, or `None` while they replay a captured graph (or
    /// will, from the next one).
    pub fn op_by_op_reason(&self) -> Option<&str> {
        match &self.replay {
            Replay::OpByOp(reason) => Some(reason),
            _ => None,
        }
    }

    /// Runs `ids` in every row after the cached positions and returns the logits
    /// `[rows, vocab]` of the last one.
    pub fn forward(&mut self, ids: &[u32]) -> Result<Tensor> {
        self.forward_rows(&vec![ids.to_vec(); self.rows])
    }

    /// Runs `ids[r]` in row `r` after the cached positions (as many tokens in every row) and
    /// returns the logits `[rows, vocab]` of each row's last one. Into an empty cache, ids
    /// that every row shares run once, for one row, and are copied into the others.
    pub fn forward_rows(&mut self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let new = self.new_positions(ids)?;
        if self.rows > 1 && self.is_empty() && ids.iter().all(|row| *row == ids[0]) {
            return self.shared_prompt(&ids[0]);
        }
        if new > 1 || !self.cache.is_allocated() || self.op_by_op_reason().is_some() {
            return Self::unpositioned(self.model, &mut self.cache, ids);
        }
        self.make_room_for_step()?;
        self.write_step(Some(&ids.concat()))?;
        let logits = match &self.replay {
            Replay::Ready {
                graph,
                logits: Some(logits),
                version,
            } if *version == self.cache.version() => {
                graph.launch()?;
                // The next replay overwrites the buffer; the caller gets its own copy.
                logits.copy()?
            }
            _ => self.first_positioned_step(false)?.ok_or_else(|| {
                candle_core::Error::Msg("a step that is not greedy gave no logits".into())
            })?,
        };
        self.cache.advance(1)?;
        Ok(logits)
    }

    /// Whether greedy steps ([`Decoder::enqueue_greedy`]) run on the device while the host
    /// goes on: replayed steps on CUDA. Elsewhere each runs, and its picks are read, before
    /// `enqueue_greedy` returns.
    pub fn runs_ahead(&self) -> bool {
        self.op_by_op_reason().is_none() && ops::can_capture(self.model.device())
    }

    /// Enqueues a one-token greedy step of every row: its tokens are `tokens` (one a row), or
    /// with `None` the picks of the greedy step enqueued just before, and its own picks, the
    /// argmax of each row's logits, are read with [`Decoder::greedy_picks`] in the order the
    /// steps were enqueued. Where the decoder [runs ahead](Decoder::runs_ahead), a step that
    /// follows the one before on the device is replayed without the host writing anything,
    /// and the host reads the picks only when asked for them.
    pub fn enqueue_greedy(&mut self, tokens: Option<&[u32]>) -> Result<()> {
        if tokens.is_some_and(|t| t.len() != self.rows) {
            candle_core::bail!(
                "a greedy step takes one token for each of the {} rows",
                self.rows
            );
        }
        if !self.cache.is_allocated() || self.op_by_op_reason().is_some() {
            // Op by op at the host position: the tokens are needed here.
            let tokens = match tokens {
                Some(t) => t.to_vec(),
                None => self.newest_picks()?,
            };
            let ids: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
            let picks = ops::argmax(&self.forward_rows(&ids)?)?.to_vec1::<u32>()?;
            self.unread.push_back(Picks::Known(picks));
            return Ok(());
        }
        if self.unread.len() >= PICKS_LOG_SLOTS {
            candle_core::bail!("at most {PICKS_LOG_SLOTS} greedy steps may be enqueued unread");
        }
        self.make_room_for_step()?;
        let tokens = match tokens {
            Some(t) => Some(t.to_vec()),
            None if self.picks_in_step.is_some() => None,
            None => Some(self.newest_picks()?),
        };
        match (&tokens, self.picks_in_step) {
            // The step tensor holds the last step's picks and the position after it.
            (None, Some(version)) if version == self.cache.version() => {}
            _ => self.write_step(tokens.as_deref())?,
        }
        if self.log.is_none() {
            self.log = Some(PicksLog::new(self.model.device(), self.rows)?);
        }
        match &self.replay {
            Replay::Ready {
                graph,
                logits: None,
                version,
            } if *version == self.cache.version() => graph.launch()?,
            _ => drop(self.first_positioned_step(true)?),
        }
        let position = self.len();
        self.log_mut()?.enqueued(position)?;
        self.unread.push_back(Picks::Logged(position));
        self.cache.advance(1)?;
        self.picks_in_step = Some(self.cache.version());
        Ok(())
    }

    /// The picks `[rows]` of the oldest greedy step enqueued and not yet read; waits for them.
    pub fn greedy_picks(&mut self) -> Result<Vec<u32>> {
        let Some(picks) = self.unread.pop_front() else {
            candle_core::bail!("no greedy step is enqueued");
        };
        let picks = self.read(&picks)?;
        self.last_picks = Some(picks.clone());
        Ok(picks)
    }

    /// Takes the greedy steps enqueued and not yet read back out of the cache: steps run
    /// ahead whose tokens turned out not to be wanted. The next step follows the last one read.
    pub fn drop_unread(&mut self) -> Result<()> {
        self.cache.retract(self.unread.len())?;
        self.unread.clear();
        self.picks_in_step = None;
        Ok(())
    }

    /// The picks log, once a positioned greedy step has made it.
    fn log_mut(&mut self) -> Result<&mut PicksLog> {
        self.log
            .as_mut()
            .ok_or_else(|| candle_core::Error::Msg("no greedy step has logged picks".into()))
    }

    /// The values of `picks`, waiting for its step to run.
    fn read(&self, picks: &Picks) -> Result<Vec<u32>> {
        match (picks, &self.log) {
            (Picks::Known(picks), _) => Ok(picks.clone()),
            (Picks::Logged(position), Some(log)) => log.read(*position),
            (Picks::Logged(_), None) => candle_core::bail!("no greedy step has logged picks"),
        }
    }

    /// The picks of the newest greedy step (waiting for them if it is still running).
    fn newest_picks(&self) -> Result<Vec<u32>> {
        match (self.unread.back(), &self.last_picks) {
            (Some(picks), _) => self.read(picks),
            (None, Some(picks)) => Ok(picks.clone()),
            (None, None) => candle_core::bail!("no greedy step ran before to continue from"),
        }
    }

    /// Makes room in the cache for a one-token step; fails when every position is cached.
    fn make_room_for_step(&mut self) -> Result<()> {
        if self.len() >= self.cache.capacity() {
            candle_core::bail!(
                "the KV cache holds {} positions, all cached",
                self.cache.capacity()
            );
        }
        self.cache.make_room(1)
    }

    /// Writes a one-token step's tokens (when given: one a row) and position and window slot
    /// into `step`, after [`Cache::make_room`].
    fn write_step(&mut self, tokens: Option<&[u32]>) -> Result<()> {
        let dropped = self.cache.dropped();
        let u32_of = |n: usize| {
            u32::try_from(n).map_err(|_| candle_core::Error::Msg("position beyond u32".into()))
        };
        let position = [u32_of(self.len())?, u32_of(self.len() - dropped)?];
        self.picks_in_step = None;
        match tokens {
            Some(tokens) => write_u32s(&self.step, &[tokens, &position].concat()),
            None => write_u32s(&self.step.narrow(0, self.rows, 2)?, &position),
        }
    }

    /// How many tokens `ids` adds to each row: one list per row, all of one length, not empty.
    fn new_positions(&self, ids: &[Vec<u32>]) -> Result<usize> {
        let new = ids.first().map_or(0, Vec::len);
        if ids.len() != self.rows || new == 0 || ids.iter().any(|row| row.len() != new) {
            candle_core::bail!(
                "a decode step needs the same number of tokens (at least one) for each of the \
                 {} rows, got lengths {:?}",
                self.rows,
                ids.iter().map(Vec::len).collect::<Vec<_>>()
            );
        }
        Ok(new)
    }

    /// `ids` run once into a cache of one sequence, copied into every row: logits
    /// `[rows, vocab]` of the last one (one row of logits, broadcast).
    fn shared_prompt(&mut self, ids: &[u32]) -> Result<Tensor> {
        let mut one = Cache::new(self.model, ids.len());
        let logits = Self::unpositioned(self.model, &mut one, &[ids.to_vec()])?;
        self.cache.fill_rows(&one, self.rows)?;
        logits.broadcast_as((self.rows, logits.dim(1)?))
    }

    /// The model on `ids` (a list per row), op by op, with `cache` at its host-known length:
    /// logits `[rows, vocab]` of each row's last one.
    fn unpositioned(model: &Llama, cache: &mut Cache, ids: &[Vec<u32>]) -> Result<Tensor> {
        let new = ids[0].len();
        let input = Tensor::new(ids.concat(), model.device())?.reshape((ids.len(), new))?;
        model.forward_last(&input, Some(cache))
    }

    /// The one-token step at the position in `step`, op by op, with the cache taking its
    /// position from there too: logits `[rows, vocab]`.
    fn positioned_step(model: &Llama, cache: &mut Cache, step: &Tensor) -> Result<Tensor> {
        Self::at_step_position(cache, step, |tokens, cache| {
            model.forward(tokens, Some(cache))?.i((.., 0))
        })
    }

    /// [`Decoder::positioned_step`]'s logits, or for a greedy one (with the picks `log`) none:
    /// [`Llama::greedy_step`], its picks over the step's tokens and into the log, the
    /// position moved on.
    fn positioned_greedy_step(
        model: &Llama,
        cache: &mut Cache,
        step: &Tensor,
        log: Option<&PicksLog>,
    ) -> Result<Option<Tensor>> {
        let Some(log) = log else {
            return Self::positioned_step(model, cache, step).map(Some);
        };
        Self::at_step_position(cache, step, |tokens, cache| {
            model.greedy_step(tokens, cache, step, log)
        })?;
        Ok(None)
    }

    /// `run` on the step's tokens `[rows, 1]` with `cache` taking its position from `step`.
    fn at_step_position<T>(
        cache: &mut Cache,
        step: &Tensor,
        run: impl FnOnce(&Tensor, &mut Cache) -> Result<T>,
    ) -> Result<T> {
        let rows = step.dim(0)? - 2;
        cache.set_position(Some(&step.narrow(0, rows, 2)?))?;
        let tokens = step.narrow(0, 0, rows)?.reshape((rows, 1))?;
        let out = run(&tokens, cache);
        cache.set_position(None)?;
        out
    }

    /// Runs the first one-token step op by op, then captures it for the later ones (again
    /// at each new version of the cache, or for the other kind of step: `greedy` or not). A
    /// failed capture leaves the steps op by op, with the reason.
    fn first_positioned_step(&mut self, greedy: bool) -> Result<Option<Tensor>> {
        let (model, step) = (self.model, &self.step);
        let log = match greedy {
            true => Some(self.log.as_ref().ok_or_else(|| {
                candle_core::Error::Msg("a greedy step needs its picks log".into())
            })?),
            false => None,
        };
        let device = model.device();
        let logits = ops::with_capture_cache(device, || {
            Self::positioned_greedy_step(model, &mut self.cache, step, log)
        })?;
        let buffer = logits.as_ref().map(Tensor::zeros_like).transpose()?;
        let cache = &mut self.cache;
        let captured = ops::Graph::capture(device, || {
            let step_logits = Self::positioned_greedy_step(model, cache, step, log)?;
            match (&buffer, step_logits) {
                (Some(buffer), Some(step_logits)) => buffer.slice_set(&step_logits, 0, 0),
                _ => Ok(()),
            }
        });
        self.replay = match captured {
            Ok(graph) => Replay::Ready {
                graph,
                logits: buffer,
                version: self.cache.version(),
            },
            Err(e) => Replay::OpByOp(format!("capturing the decode step failed: {e}")),
        };
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use ops::parity::relative_error;
    use std::path::Path;

    fn load(name: &str, fused: bool) -> Llama {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name);
        let loaded = crate::io::load_stored(&dir, DType::F32, DType::F32, &Device::Cpu);
        let mut model = loaded.unwrap().model;
        if fused {
            model.fuse_projections().unwrap();
        }
        model
    }

    fn tiny(fused: bool) -> Llama {
        load("tiny-llama", fused)
    }

    /// Logits of every position of `ids` in one pass without a cache.
    fn full_pass(model: &Llama, ids: &[u32]) -> Tensor {
        let input = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        model.forward(&input, None).unwrap().squeeze(0).unwrap()
    }

    #[test]
    fn positioned_steps_match_steps_at_the_host_position() {
        let model = tiny(true);
        let (mut host, mut positioned) = (
            Decoder::new(&model, 8).unwrap(),
            Decoder::new(&model, 8).unwrap(),
        );
        assert!(host
            .op_by_op_reason()
            .is_some_and(|r| r.contains("no CUDA")));
        let prompt = [1, 5, 9];
        host.forward(&prompt).unwrap();
        positioned.forward(&prompt).unwrap();
        for token in [4u32, 17, 2, 30] {
            let want = host.forward(&[token]).unwrap();
            let position = positioned.len();
            let got = positioned_step(&mut positioned, token);
            assert_eq!(got.dims(), want.dims());
            let error = relative_error(&got, &want);
            assert!(error < 1e-6, "step at {position}: {error:.2e}");
        }
        assert_eq!(positioned.len(), 7);
    }

    /// A one-token step at a device-held position, op by op, as a captured step replays it.
    fn positioned_step(decoder: &mut Decoder, token: u32) -> Tensor {
        decoder.cache.make_room(1).unwrap();
        decoder.write_step(Some(&[token])).unwrap();
        let (model, step) = (decoder.model, &decoder.step);
        let logits = Decoder::positioned_step(model, &mut decoder.cache, step).unwrap();
        decoder.cache.advance(1).unwrap();
        logits
    }

    /// Every position gets the logits of a full pass while the buffers grow from a few slots
    /// and sliding-window layers, holding fewer slots than the sequence has positions, drop
    /// what no later position attends to: through one-token steps at host and at device-held
    /// positions, a chunk that fits after a drop, a prompt longer than the window layers'
    /// slots, and a prompt shared by two rows (Llama without windows; Gemma 2 and 3 with
    /// windows of 8, Phi-3's partial rotary, a Qwen 3 whose later layers slide).
    #[test]
    fn growing_and_dropping_caches_decode_as_a_full_pass() {
        use crate::cache::{window_slots, FIRST_SLOTS};
        let ids: Vec<u32> = (0..60).map(|i| (i * 37 + 11) % 120).collect();
        let slots = window_slots(8, ids.len());
        assert!(slots < ids.len());
        let names = [
            "tiny-llama",
            "tiny-gemma2",
            "tiny-gemma3",
            "tiny-phi3",
            "tiny-qwen3",
        ];
        for name in names {
            let mut model = load(name, true);
            if name == "tiny-qwen3" {
                model.family.layers[1].window = Some(8);
            }
            let want = full_pass(&model, &ids);
            let windows = model.family.layers.iter().any(|l| l.window.is_some());
            assert_eq!(windows, name != "tiny-llama", "{name}");
            let cases = [
                (3, false, 1, FIRST_SLOTS),
                (3, true, 1, FIRST_SLOTS),
                (30, false, 1, FIRST_SLOTS),
                (30, true, 1, FIRST_SLOTS),
                (30, false, 2, FIRST_SLOTS),
                (3, true, 1, 4),
                (3, false, 2, 4),
            ];
            for (prompt, positioned, rows, first_slots) in cases {
                let case = format!(
                    "{name}, prompt {prompt}, positioned {positioned}, rows {rows}, first \
                     slots {first_slots}"
                );
                let mut decoder = Decoder::batched(&model, ids.len(), rows).unwrap();
                decoder.cache = Cache::with_first_slots(&model, ids.len(), first_slots);
                let mut logits = decoder.forward(&ids[..prompt]).unwrap();
                let mut at = prompt;
                loop {
                    for r in 0..rows {
                        let got = logits.narrow(0, r, 1).unwrap();
                        let error = relative_error(&got, &want.narrow(0, at - 1, 1).unwrap());
                        assert!(error < 1e-5, "{case}: position {}: {error:.2e}", at - 1);
                    }
                    if at == ids.len() {
                        break;
                    }
                    // A chunk of 5 after the first 10 steps, later one token at a time.
                    let chunk = if at == prompt + 10 { 5 } else { 1 };
                    logits = match (chunk, positioned) {
                        (1, true) => positioned_step(&mut decoder, ids[at]),
                        _ => decoder.forward(&ids[at..at + chunk]).unwrap(),
                    };
                    at += chunk;
                }
                if windows {
                    assert!(decoder.cache.dropped() >= ids.len() - slots, "{case}");
                }
                let held = model.family.layers.iter().map(|l| match l.window {
                    Some(_) => slots,
                    None => ids.len(),
                });
                let held: Vec<usize> = held.collect();
                assert_eq!(decoder.cache.buffer_slots(), held, "{case}");
            }
        }
    }

    #[test]
    fn steps_follow_a_full_pass_with_and_without_stacked_projections() {
        let ids = [3u32, 8, 1, 22, 6];
        for fused in [true, false] {
            let model = tiny(fused);
            let want = full_pass(&model, &ids);
            let mut decoder = Decoder::new(&model, ids.len()).unwrap();
            let prompt = decoder.forward(&ids[..2]).unwrap();
            let error = relative_error(&prompt, &want.narrow(0, 1, 1).unwrap());
            assert!(
                error < 1e-5,
                "fused {fused}, the prompt's last position: {error:.2e}"
            );
            for (i, &token) in ids.iter().enumerate().skip(2) {
                let got = decoder.forward(&[token]).unwrap();
                let error = relative_error(&got, &want.narrow(0, i, 1).unwrap());
                assert!(error < 1e-5, "fused {fused}, position {i}: {error:.2e}");
            }
            let message = decoder.forward(&[1]).unwrap_err().to_string();
            assert!(message.contains("holds 5 positions"), "{message}");
            decoder.reset();
            assert!(decoder.is_empty());
        }
    }

    /// The logits of a batch equal those of each row decoded alone, bit for bit, from a
    /// prompt the rows share (run once) through steps that differ per row; with a sliding
    /// window shorter than the sequence (Gemma 2) and partial rotary (Phi-3) too.
    #[test]
    fn batched_rows_decode_as_each_row_alone() {
        let prompt = [3u32, 8, 1, 22, 6, 40, 2, 11, 19, 7];
        let continuations = [[4u32, 9, 1], [17, 9, 5], [2, 30, 12]];
        let capacity = prompt.len() + 3;
        let logits = |t: Tensor| t.to_vec2::<f32>().unwrap();
        for name in ["tiny-llama", "tiny-gemma2", "tiny-phi3"] {
            let model = load(name, true);
            let mut batch = Decoder::batched(&model, capacity, 3).unwrap();
            let mut got = vec![logits(batch.forward(&prompt).unwrap())];
            for step in 0..3 {
                let ids: Vec<Vec<u32>> = continuations.iter().map(|c| vec![c[step]]).collect();
                got.push(logits(batch.forward_rows(&ids).unwrap()));
            }
            for (r, continuation) in continuations.iter().enumerate() {
                let mut alone = Decoder::new(&model, capacity).unwrap();
                let mut want = vec![logits(alone.forward(&prompt).unwrap())];
                for &token in continuation {
                    want.push(logits(alone.forward(&[token]).unwrap()));
                }
                for (step, (got, want)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(got[r], want[0], "{name}: row {r}, step {step}");
                }
            }
        }
    }

    /// Prompts that differ per row give each row the logits of its own last position.
    #[test]
    fn different_prompts_give_each_rows_last_logits() {
        let model = tiny(true);
        let prompts = vec![vec![3u32, 8, 1, 22], vec![9u32, 4, 4, 17]];
        let mut decoder = Decoder::batched(&model, 4, 2).unwrap();
        let got = decoder.forward_rows(&prompts).unwrap();
        assert_eq!(got.dims(), [2, model.config.vocab_size]);
        for (r, prompt) in prompts.iter().enumerate() {
            let want = full_pass(&model, prompt).narrow(0, 3, 1).unwrap();
            let error = relative_error(&got.narrow(0, r, 1).unwrap(), &want);
            assert!(error < 1e-5, "row {r}: {error:.2e}");
        }
    }

    /// Greedy picks from `prompt` through `steps` one-token steps op by op at host positions,
    /// each row from its own prompt: the reference for greedy steps.
    fn greedy_reference(model: &Llama, prompts: &[Vec<u32>], steps: usize) -> Vec<Vec<u32>> {
        let mut decoder = Decoder::op_by_op(model, prompts[0].len() + steps + 1).unwrap();
        decoder.rows = prompts.len();
        decoder.step = Tensor::zeros(prompts.len() + 2, DType::U32, model.device()).unwrap();
        let mut logits = decoder.forward_rows(prompts).unwrap();
        let mut picks = vec![];
        for _ in 0..=steps {
            let next = ops::argmax(&logits).unwrap().to_vec1::<u32>().unwrap();
            let ids: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
            picks.push(next);
            logits = decoder.forward_rows(&ids).unwrap();
        }
        picks
    }

    /// Greedy steps enqueued two ahead of the host, each continuing from the picks the one
    /// before left in the step tensor, pick what op-by-op steps at host positions pick: at
    /// host positions (the CPU's steps), and positioned as a captured step replays them (a
    /// capture is tried before every step, and fails on the CPU), with window layers that drop
    /// positions on the way (a new cache version, where the host writes the position again).
    /// Steps run ahead and dropped unread leave the cache as it was.
    #[test]
    fn greedy_steps_ahead_pick_what_op_by_op_steps_pick() {
        for name in ["tiny-llama", "tiny-gemma2"] {
            let model = load(name, true);
            let prompts = vec![vec![3u32, 8, 1], vec![9u32, 4, 17]];
            let steps = 40;
            let want = greedy_reference(&model, &prompts, steps);
            for positioned in [false, true] {
                let case = format!("{name}, positioned {positioned}");
                let mut decoder = Decoder::batched(&model, 3 + steps + 1, 2).unwrap();
                assert!(!decoder.runs_ahead());
                let logits = decoder.forward_rows(&prompts).unwrap();
                let first = ops::argmax(&logits).unwrap().to_vec1::<u32>().unwrap();
                assert_eq!(first, want[0], "{case}");
                let mut got = vec![first];
                let enqueue = |decoder: &mut Decoder, tokens: Option<&[u32]>| {
                    if positioned {
                        decoder.replay = Replay::Pending;
                    }
                    decoder.enqueue_greedy(tokens).unwrap();
                };
                enqueue(&mut decoder, Some(&got[0]));
                for step in 1..=steps {
                    if step < steps {
                        enqueue(&mut decoder, None);
                    }
                    got.push(decoder.greedy_picks().unwrap());
                    assert_eq!(got[step], want[step], "{case}: step {step}");
                    if step == 20 {
                        // Two ahead, both dropped unread; the host goes on from its picks.
                        enqueue(&mut decoder, None);
                        decoder.drop_unread().unwrap();
                        assert_eq!(decoder.len(), 3 + step, "{case}");
                        enqueue(&mut decoder, Some(&got[step]));
                    }
                }
                assert!(decoder.greedy_picks().is_err(), "{case}");
                if name == "tiny-gemma2" && positioned {
                    assert!(decoder.cache.dropped() > 0, "{case}: no window dropped");
                }
            }
        }
    }

    #[test]
    fn rows_must_be_given_as_many_tokens_each() {
        let model = tiny(true);
        assert!(Decoder::batched(&model, 4, 0).is_err());
        let mut decoder = Decoder::batched(&model, 4, 2).unwrap();
        for ids in [
            vec![vec![1]],
            vec![vec![1], vec![2, 3]],
            vec![vec![], vec![]],
        ] {
            let message = decoder.forward_rows(&ids).unwrap_err().to_string();
            assert!(message.contains("for each of the 2 rows"), "{message}");
        }
        assert!(decoder.is_empty());
    }
}
