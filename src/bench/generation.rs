//! Decoding for the `generate` rows (greedy, prompt included) and the `prefill` rows (a prompt
//! into an empty KV cache), through the same `Decoder` as `llmtool generate`.

use super::Sampling;
use candle_core::IndexOp;
use model::{Decoder, Llama, LlamaConfig};
use rand::{Rng, SeedableRng};

/// The prompt of the generate rows, in tokens.
const PROMPT: usize = 16;

/// `n` random token ids of `model`'s vocabulary (the same ones for the same `n`).
fn random_prompt(model: &Llama, n: usize) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let vocab = model.config.vocab_size as u32;
    (0..n).map(|_| rng.random_range(0..vocab)).collect()
}

/// Runs a random `tokens`-token prompt into a fresh decoder with room for `new_tokens` more,
/// as `llmtool generate` starts: the prompt's KV cache and its last position's logits.
pub(super) fn prefill(model: &Llama, tokens: usize, new_tokens: usize) -> candle_core::Result<()> {
    let prompt = random_prompt(model, tokens);
    let mut decoder = Decoder::new(model, tokens + new_tokens)?;
    decoder.forward(&prompt).map(drop)
}

/// The model FLOPs of a `tokens`-token prefill: two per multiply-add of every block
/// projection on every token, the output head on the last token only, and causal attention's
/// two products over the positions each token sees (`2 × layers × q width × tokens²` in all).
pub(super) fn prefill_flops(cfg: &LlamaConfig, tokens: usize) -> f64 {
    let projections: usize = model::names::parameter_shapes(cfg)
        .iter()
        .filter(|(name, shape)| name.starts_with("model.layers.") && shape.len() == 2)
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum();
    let head = cfg.vocab_size * cfg.hidden_size;
    let q_width = cfg.num_attention_heads * cfg.head_size();
    let n = tokens as f64;
    2.0 * projections as f64 * n
        + 2.0 * head as f64
        + 2.0 * (cfg.num_hidden_layers * q_width) as f64 * n * n
}

/// Greedy decoding of `new_tokens` tokens after a random 16-token prompt, with a KV cache: as
/// `llmtool generate` decodes (`replay`: greedy steps replayed from a captured graph where the
/// device can, the next enqueued before the host reads this one's token), or op by op, one
/// step's logits at a time, as the reference. Returns the tokens and, where one-token steps
/// ran op by op, why.
pub(super) fn greedy(
    model: &Llama,
    new_tokens: usize,
    replay: bool,
) -> candle_core::Result<(Vec<u32>, Option<String>)> {
    let prompt = random_prompt(model, PROMPT);
    let mut decoder = match replay {
        true => Decoder::new(model, PROMPT + new_tokens)?,
        false => Decoder::op_by_op(model, PROMPT + new_tokens)?,
    };
    // The decoder holds one row: logits `[1, vocab]`.
    let logits = decoder.forward(&prompt)?;
    let mut out = vec![ops::argmax(&logits.i(0)?)?.to_scalar::<u32>()?];
    let ahead = if decoder.runs_ahead() { 2 } else { 1 };
    let mut enqueued = 0;
    while out.len() < new_tokens {
        if !replay {
            let logits = decoder.forward(&out[out.len() - 1..])?;
            out.push(ops::argmax(&logits.i(0)?)?.to_scalar::<u32>()?);
            continue;
        }
        while enqueued < ahead && out.len() + enqueued < new_tokens {
            let last = (enqueued == 0).then(|| &out[out.len() - 1..]);
            decoder.enqueue_greedy(last)?;
            enqueued += 1;
        }
        out.extend(decoder.greedy_picks()?);
        enqueued -= 1;
    }
    out.truncate(new_tokens);
    Ok((out, decoder.op_by_op_reason().map(str::to_owned)))
}

/// Sampled decoding of `new_tokens` tokens in each of `sampling.samples` rows after the
/// generate rows' prompt, as `llmtool generate --num-samples N` samples: the prompt run into
/// every row, each step's logits read back and the rows drawn from on the CPU in parallel
/// ([`generate::sample_logits`], row i's sampler seeded i), the next step replayed where the
/// device can. Returns each row's tokens.
pub(super) fn sampled(
    model: &Llama,
    new_tokens: usize,
    sampling: Sampling,
) -> candle_core::Result<Vec<Vec<u32>>> {
    let prompt = random_prompt(model, PROMPT);
    let rows = sampling.samples;
    let mut decoder = Decoder::batched(model, PROMPT + new_tokens, rows)?;
    let mut samplers: Vec<_> = (0..rows)
        .map(|i| generate::Sampler::new(sampling.params(i)))
        .collect();
    let mut logits = decoder.forward(&prompt)?;
    let mut out = vec![Vec::with_capacity(new_tokens); rows];
    for step in 0..new_tokens {
        // Logits `[rows, vocab]`, one row a sample; every row draws, and its token is the
        // row's next step.
        let draws = samplers
            .iter_mut()
            .map(|sampler| Some((sampler, prompt.as_slice())))
            .collect();
        let next: Vec<Vec<u32>> = generate::sample_logits(&logits, draws)?
            .into_iter()
            .map(Vec::from_iter)
            .collect();
        for (row, token) in out.iter_mut().zip(&next) {
            row.extend(token);
        }
        if step + 1 < new_tokens {
            logits = decoder.forward_rows(&next)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Preset;

    /// Counted by hand for Llama-3.1-8B's shape and a 2,048-token prompt: 32 blocks of
    /// q/o (4096²), k/v (4096 × 1024) and three 4096 × 14336 MLP projections, the head's
    /// 128256 × 4096 once, and causal attention's 2 × 32 × 4096 × 2048². torch_ref.py's
    /// prefill_flops gives the same 29,687,864,623,104.
    #[test]
    fn prefill_flops_count_projections_one_head_row_and_causal_attention() {
        let projections =
            32.0 * (2.0 * 4096.0 * 4096.0 + 2.0 * 4096.0 * 1024.0 + 3.0 * 4096.0 * 14336.0);
        let want = 2.0 * projections * 2048.0
            + 2.0 * 128256.0 * 4096.0
            + 2.0 * 32.0 * 4096.0 * 2048.0 * 2048.0;
        let got = prefill_flops(&Preset::EightB.config(2048), 2048);
        assert_eq!(got, want);
        assert_eq!(got, 29_687_864_623_104.0);
    }
}
