//! Incremental decoding of one sequence: a model, its KV cache, and the steps that extend it.
//!
//! Prompts run op by op. One-token steps read their token and position from a small tensor
//! on the model's device (written in place before each step), so their kernels don't depend
//! on the position: on CUDA the first such step is captured as a graph ([`ops::Graph`]) and
//! every later one is a single replay, where op by op the host spent more time launching the
//! step's hundred-odd kernels than the GPU spent running them.

use super::{Cache, Llama};
use candle_core::{DType, IndexOp, Result, Tensor};
use ops::{self, write_u32s};

/// A model and the KV cache of one sequence being decoded.
pub struct Decoder<'m> {
    model: &'m Llama,
    cache: Cache,
    /// `[token, position]` (u32) of the next one-token step, on the model's device.
    step: Tensor,
    replay: Replay,
}

/// How one-token steps run.
enum Replay {
    /// Not captured yet: the first one-token step with the cache allocated captures.
    Pending,
    /// The captured step, and the logits `[vocab]` each replay writes.
    Ready { graph: ops::Graph, logits: Tensor },
    /// Op by op: the device can't capture, or capturing failed (the reason).
    OpByOp(String),
}

impl<'m> Decoder<'m> {
    /// An empty sequence of up to `capacity` positions for `model` (at most its context: RoPE
    /// has no rows past it).
    pub fn new(model: &'m Llama, capacity: usize) -> Result<Self> {
        let replay = match ops::can_capture(model.device()) {
            true => Replay::Pending,
            false => Replay::OpByOp("the device has no CUDA graphs".into()),
        };
        Self::with_replay(model, capacity, replay)
    }

    /// [`Decoder::new`] with every step op by op, as a reference for replayed ones.
    pub fn op_by_op(model: &'m Llama, capacity: usize) -> Result<Self> {
        let replay = Replay::OpByOp("asked for op by op".into());
        Self::with_replay(model, capacity, replay)
    }

    fn with_replay(model: &'m Llama, capacity: usize, replay: Replay) -> Result<Self> {
        Ok(Self {
            model,
            cache: Cache::new(
                model,
                capacity.clamp(1, model.config.max_position_embeddings),
            ),
            step: Tensor::zeros(2, DType::U32, model.device())?,
            replay,
        })
    }

    /// The model decoded with.
    pub fn model(&self) -> &'m Llama {
        self.model
    }

    /// Positions cached so far.
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
    }

    /// Why one-token steps run op by op, or `None` while they replay a captured graph (or
    /// will, from the next one).
    pub fn op_by_op_reason(&self) -> Option<&str> {
        match &self.replay {
            Replay::OpByOp(reason) => Some(reason),
            _ => None,
        }
    }

    /// Runs `ids` after the cached positions and returns the logits `[vocab]` of the last one.
    pub fn forward(&mut self, ids: &[u32]) -> Result<Tensor> {
        let Some(&token) = ids.last() else {
            candle_core::bail!("a decode step needs at least one token");
        };
        if ids.len() > 1 || !self.cache.is_allocated() || self.op_by_op_reason().is_some() {
            return self.unpositioned(ids);
        }
        if self.len() >= self.cache.capacity() {
            candle_core::bail!(
                "the KV cache holds {} positions, all cached",
                self.cache.capacity()
            );
        }
        let position = u32::try_from(self.len())
            .map_err(|_| candle_core::Error::Msg("position beyond u32".into()))?;
        write_u32s(&self.step, &[token, position])?;
        let logits = match &self.replay {
            Replay::Ready { graph, logits } => {
                graph.launch()?;
                // The next replay overwrites the buffer; the caller gets its own copy.
                logits.copy()?
            }
            _ => self.first_positioned_step()?,
        };
        self.cache.advance(1)?;
        Ok(logits)
    }

    /// The model on `ids`, op by op, with the cache at its host-known length.
    fn unpositioned(&mut self, ids: &[u32]) -> Result<Tensor> {
        let input = Tensor::new(ids, self.model.device())?.unsqueeze(0)?;
        let logits = self.model.forward(&input, Some(&mut self.cache))?;
        logits.i((0, ids.len() - 1))
    }

    /// The one-token step at the position in `step`, op by op, with the cache taking its
    /// position from there too: logits `[vocab]`.
    fn positioned_step(model: &Llama, cache: &mut Cache, step: &Tensor) -> Result<Tensor> {
        cache.set_position(Some(&step.narrow(0, 1, 1)?));
        let logits = model.forward(&step.narrow(0, 0, 1)?.unsqueeze(0)?, Some(cache));
        cache.set_position(None);
        logits?.i((0, 0))
    }

    /// Runs the first one-token step op by op, then captures it for the later ones. A
    /// failed capture leaves the steps op by op, with the reason.
    fn first_positioned_step(&mut self) -> Result<Tensor> {
        let (model, step) = (self.model, &self.step);
        let device = model.device();
        let logits = ops::with_capture_cache(device, || {
            Self::positioned_step(model, &mut self.cache, step)
        })?;
        let buffer = logits.zeros_like()?;
        let cache = &mut self.cache;
        let captured = ops::Graph::capture(device, || {
            let step_logits = Self::positioned_step(model, cache, step)?;
            buffer.slice_set(&step_logits, 0, 0)
        });
        self.replay = match captured {
            Ok(graph) => Replay::Ready {
                graph,
                logits: buffer,
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

    fn tiny(fused: bool) -> Llama {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
        let loaded = crate::io::load_stored(&dir, DType::F32, DType::F32, &Device::Cpu);
        let mut model = loaded.unwrap().model;
        if fused {
            model.fuse_projections().unwrap();
        }
        model
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
            let position = positioned.len() as u32;
            write_u32s(&positioned.step, &[token, position]).unwrap();
            let got =
                Decoder::positioned_step(&model, &mut positioned.cache, &positioned.step).unwrap();
            positioned.cache.advance(1).unwrap();
            assert_eq!(got.dims(), want.dims());
            let error = relative_error(&got, &want);
            assert!(error < 1e-6, "step at {position}: {error:.2e}");
        }
        assert_eq!(positioned.len(), 7);
    }

    #[test]
    fn steps_follow_a_full_pass_with_and_without_stacked_projections() {
        let ids = [3u32, 8, 1, 22, 6];
        for fused in [true, false] {
            let model = tiny(fused);
            let want = full_pass(&model, &ids);
            let mut decoder = Decoder::new(&model, ids.len()).unwrap();
            decoder.forward(&ids[..2]).unwrap();
            for (i, &token) in ids.iter().enumerate().skip(2) {
                let got = decoder.forward(&[token]).unwrap();
                let error = relative_error(&got, &want.get(i).unwrap());
                assert!(error < 1e-5, "fused {fused}, position {i}: {error:.2e}");
            }
            let message = decoder.forward(&[1]).unwrap_err().to_string();
            assert!(message.contains("holds 5 positions"), "{message}");
            decoder.reset();
            assert!(decoder.is_empty());
        }
    }
}
