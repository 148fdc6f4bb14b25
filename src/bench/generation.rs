//! Greedy decoding for the `generate` rows, through the same `Decoder` as `llmtool generate`.

use candle_core::IndexOp;
use model::{Decoder, Llama};
use rand::{Rng, SeedableRng};

/// Greedy decoding of `new_tokens` tokens after a random 16-token prompt, with a KV cache,
/// replaying captured steps where the device can (`replay`) or op by op. Returns the tokens
/// and, where one-token steps ran op by op, why.
pub(super) fn greedy(
    model: &Llama,
    new_tokens: usize,
    replay: bool,
) -> candle_core::Result<(Vec<u32>, Option<String>)> {
    const PROMPT: usize = 16;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let vocab = model.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..PROMPT).map(|_| rng.random_range(0..vocab)).collect();
    let mut decoder = match replay {
        true => Decoder::new(model, PROMPT + new_tokens)?,
        false => Decoder::op_by_op(model, PROMPT + new_tokens)?,
    };
    let mut logits = decoder.forward(&prompt)?;
    let mut out = Vec::with_capacity(new_tokens);
    for _ in 0..new_tokens {
        // The decoder holds one row: logits `[1, vocab]`.
        let next = ops::argmax(&logits.i(0)?)?.to_scalar::<u32>()?;
        out.push(next);
        if out.len() < new_tokens {
            logits = decoder.forward(&[next])?;
        }
    }
    Ok((out, decoder.op_by_op_reason().map(str::to_owned)))
}
