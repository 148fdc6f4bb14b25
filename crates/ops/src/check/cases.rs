//! The cases of the op checks: every fused op at the shapes of a model ([`model_cases`], what
//! `llmtool bench --tasks ops` runs) and at small shapes that exercise edges ([`edge_cases`],
//! what the unit tests run), each against its composite reference. The file is long because it
//! is a table: one short constructor per case, some forty of them, with no logic between them.

use super::{Case, Input};
use crate::reference;
use crate::Glu;
use candle_core::{DType, Result, Tensor, D};

/// The dimensions of a model that its ops run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Size of one attention head.
    pub head_size: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    /// Rows of the embedding and the output head.
    pub vocab: usize,
}

/// Every fused op at the shapes of a model of `shape` trained on `batch` × `seq` tokens.
pub fn model_cases(shape: &ModelShape, batch: usize, seq: usize) -> Vec<Case> {
    let (h, d) = (shape.heads, shape.head_size);
    let tokens = batch * seq;
    let vocab = shape.vocab as u32;
    let float = |shape: &[usize]| Input::Float(shape.to_vec(), 1.0);
    vec![
        attention_case(vec![batch, h, seq, d], seq),
        options_attention_case(OPTIONS, (batch, h, shape.kv_heads), (seq, seq), d),
        // A prefill chunk against cached keys, and a head size without flash kernels (the
        // fused causal softmax on CUDA).
        options_attention_case(OPTIONS_CHUNK, (batch, h, shape.kv_heads), (seq / 2, seq), d),
        options_attention_case(OPTIONS_D96, (batch, h, shape.kv_heads), (seq, seq), 96),
        flash_case(batch, h, shape.kv_heads, seq, seq, d),
        self_attention_case(batch, h, shape.kv_heads, seq, d),
        packed_self_attention_case((batch, h, shape.kv_heads), seq, d),
        self_attention_options_case(batch, h, shape.kv_heads, seq, d),
        segments_attention_case::<false>((batch, h, shape.kv_heads), seq, d),
        segments_attention_case::<true>((batch, h, shape.kv_heads), seq, d),
        self_attention_segments_case::<false>(batch, h, shape.kv_heads, seq, d),
        self_attention_segments_case::<true>(batch, h, shape.kv_heads, seq, d),
        Case {
            name: "rms_norm",
            fused: |t| crate::rms_norm(&t[0], &t[1], 1e-5),
            reference: |t| reference::rms_norm(&t[0], &t[1], 0.0, 1e-5),
            inputs: vec![float(&[batch, seq, shape.hidden]), float(&[shape.hidden])],
        },
        rms_norm_offset_case(vec![batch, seq, shape.hidden]),
        residual_norm_case::<false>(vec![batch, seq, shape.hidden]),
        residual_norm_case::<true>(vec![batch, seq, shape.hidden]),
        add_norm_train_case::<false, 0>(vec![batch, seq, shape.hidden]),
        add_norm_train_case::<true, 0>(vec![batch, seq, shape.hidden]),
        qk_norm_case(vec![batch, seq, h, d]),
        rope_case(vec![batch, h, seq, d], d),
        rope_case(vec![batch, h, seq, d], d / 4 * 3 / 2 * 2),
        swap_case(vec![batch, seq, h, d]),
        decode_case(1, h, shape.kv_heads, seq, d),
        decode_window_case(1, h, shape.kv_heads, seq, d),
        add_norm_case::<0>(1, shape.hidden),
        add_norm_case::<1>(1, shape.hidden),
        gemv_case(1, shape.hidden, shape.vocab),
        gemv_case(1, shape.ffn, shape.hidden),
        rms_norm_linear_case::<0>(1, shape.hidden, (h + 2 * shape.kv_heads) * d),
        rms_norm_glu_case::<false>(1, shape.hidden, shape.ffn),
        rms_norm_glu_case::<true>(1, shape.hidden, shape.ffn),
        linear_residual_case(1, h * d, shape.hidden),
        linear_residual_case(1, shape.ffn, shape.hidden),
        argmax_case(1, shape.vocab),
        greedy_step_case(1, shape.vocab),
        head_greedy_step_case(shape.hidden, shape.vocab),
        master_linear_case(tokens, shape.hidden, shape.ffn),
        lora_linear_case(tokens, shape.hidden, shape.ffn),
        lora_linear_dropout_case(tokens, shape.hidden, shape.ffn),
        stacked_lora_linear_case(
            tokens,
            shape.hidden,
            [h * d, shape.kv_heads * d, shape.kv_heads * d],
        ),
        stacked_lora_linear_dropout_case(tokens, shape.hidden, [shape.ffn, shape.ffn]),
        dropout_case(vec![tokens, shape.hidden]),
        masked_lora_case::<BOTTLENECK, 16, 16, 16>(tokens, shape.hidden),
        masked_lora_case::<FACTOR_GRAD, 16, 16, 16>(tokens, shape.hidden),
        masked_lora_case::<SHARES, 16, 16, 16>(tokens, shape.hidden),
        nf4_linear_case("nf4_linear", tokens, shape.hidden, shape.ffn),
        nf4_linear_case("nf4_linear_rows", 1, shape.hidden, shape.ffn),
        cast_case(vec![shape.ffn, shape.hidden]),
        glu_projection_case::<false>(shape.hidden, shape.ffn),
        glu_master_case::<false>(tokens, shape.hidden, shape.ffn),
        glu_packed_case::<false>(tokens, shape.ffn),
        glu_projection_case::<true>(shape.hidden, shape.ffn),
        glu_master_case::<true>(tokens, shape.hidden, shape.ffn),
        glu_packed_case::<true>(tokens, shape.ffn),
        write_kv_case("write_kv", (1, 1, h, shape.kv_heads), (d, d)),
        write_kv_at_case("write_kv_at", (1, h, shape.kv_heads), (d, d)),
        write_kv_case("write_kv_partial", (1, 1, h, shape.kv_heads), (d, d / 2)),
        write_kv_at_case("write_kv_at_partial", (1, h, shape.kv_heads), (d, d / 2)),
        decode_at_case(h, shape.kv_heads, seq, d),
        cached_attention_case::<false, false>(
            "cached_attention",
            (1, h, shape.kv_heads),
            (d, d),
            seq,
        ),
        cached_attention_case::<true, true>(
            "cached_attention_at",
            (1, h, shape.kv_heads),
            (d, d),
            seq,
        ),
        cached_attention_case::<false, true>(
            "cached_attention_at_partial",
            (1, h, shape.kv_heads),
            (d, d / 2),
            seq,
        ),
        Case {
            name: "add",
            fused: |t| crate::add(&t[0], &t[1]),
            reference: |t| &t[0] + &t[1],
            inputs: vec![
                float(&[tokens, shape.hidden]),
                float(&[tokens, shape.hidden]),
            ],
        },
        glu_case::<false>(vec![batch, seq, shape.ffn]),
        glu_case::<true>(vec![batch, seq, shape.ffn]),
        Case {
            name: "token_nll",
            fused: |t| crate::token_nll(&t[0], &t[1]),
            reference: |t| reference::token_nll(&t[0], &t[1]),
            inputs: vec![
                Input::Float(vec![tokens, shape.vocab], 4.0),
                Input::Ids(vec![tokens], vocab),
            ],
        },
        nll_with_grad_case(tokens, shape.vocab, Input::Table(vec![tokens])),
        Case {
            name: "head_mean_nll",
            fused: |t| crate::head_mean_nll(&t[0], &t[1], &t[2], &t[3], None),
            reference: |t| {
                let nll = reference::token_nll(&t[0].matmul(&t[1].t()?)?, &t[2])?;
                crate::weighted_mean(&nll, &t[3])
            },
            inputs: vec![
                float(&[tokens, shape.hidden]),
                Input::Float(vec![shape.vocab, shape.hidden], 0.1),
                Input::Ids(vec![tokens], vocab),
                // Loss weights: 0 or 1 per position.
                Input::Ids(vec![tokens], 2),
            ],
        },
        Case {
            // A tied table: the lookup's rows are the head's input, so the lookup's backward
            // adds its rows into the head's gradient of the table, which arrives first.
            name: "embedding_tied",
            fused: |t| {
                let rows = crate::embedding(&t[0], &t[1])?;
                crate::head_mean_nll(&rows, &t[1], &t[2], &t[3], None)
            },
            reference: |t| {
                let rows = reference::embedding(&t[0], &t[1])?;
                let nll = reference::token_nll(&rows.matmul(&t[1].t()?)?, &t[2])?;
                crate::weighted_mean(&nll, &t[3])
            },
            inputs: vec![
                Input::Ids(vec![tokens], vocab),
                Input::Float(vec![shape.vocab, shape.hidden], 0.1),
                Input::Ids(vec![tokens], vocab),
                Input::Ids(vec![tokens], 2),
            ],
        },
        Case {
            name: "embedding",
            fused: |t| crate::embedding(&t[0], &t[1]),
            reference: |t| reference::embedding(&t[0], &t[1]),
            inputs: vec![
                Input::Ids(vec![batch, seq], vocab),
                float(&[shape.vocab, shape.hidden]),
            ],
        },
        embedding_from_host_case(batch * seq, shape.vocab, shape.hidden),
    ]
}

/// A frozen table in host memory looked up for ids on the device (a LoRA base's input
/// embedding on a GPU), against the lookup beside the ids.
fn embedding_from_host_case(tokens: usize, vocab: usize, width: usize) -> Case {
    Case {
        name: "embedding_from_host",
        fused: |t| crate::embedding(&t[0], &t[1].to_device(&candle_core::Device::Cpu)?),
        reference: |t| reference::embedding(&t[0], &t[1]),
        inputs: vec![
            Input::Ids(vec![tokens], vocab as u32),
            Input::Table(vec![vocab, width]),
        ],
    }
}

/// NLL and logits gradient together of `[rows, vocab]` logits, for row scales `scales`.
fn nll_with_grad_case(rows: usize, vocab: usize, scales: Input) -> Case {
    Case {
        name: "token_nll_with_grad",
        fused: |t| {
            let g = t[2].to_dtype(DType::F32)?;
            side_by_side(crate::token_nll_with_grad(&t[0], &t[1], &g)?)
        },
        reference: |t| {
            let g = t[2].to_dtype(DType::F32)?;
            let nll = reference::token_nll(&t[0], &t[1])?;
            side_by_side((nll, reference::token_nll_grad(&t[0], &t[1], &g)?))
        },
        inputs: vec![
            Input::Table(vec![rows, vocab]),
            Input::Ids(vec![rows], vocab as u32),
            scales,
        ],
    }
}

/// Per-row values `[n]` and rows `[n, width]` as one f32 `[n, width + 1]` tensor, for ops with
/// two outputs.
fn side_by_side((values, rows): (Tensor, Tensor)) -> Result<Tensor> {
    Tensor::cat(&[values.unsqueeze(1)?, rows.to_dtype(DType::F32)?], 1)
}

fn attention_case(q: Vec<usize>, kv_len: usize) -> Case {
    let mut kv = q.clone();
    kv[2] = kv_len;
    Case {
        name: "causal_attention",
        fused: |t| crate::causal_attention(&t[0], &t[1], &t[2]),
        reference: |t| reference::causal_attention(&t[0], &t[1], &t[2]),
        inputs: vec![
            Input::Float(q, 1.0),
            Input::Float(kv.clone(), 1.0),
            Input::Float(kv, 1.0),
        ],
    }
}

/// The options the attention cases with soft-capping and a window use: scores scaled as by a
/// `query_pre_attn_scalar` of 256, capped at 5 (Gemma 2's 50 would hardly bend random
/// scores), and a window of a fifth of the keys (at least 5).
fn capped_window(kv_len: usize) -> crate::AttentionOptions {
    crate::AttentionOptions {
        scale: 1.0 / 16.0,
        softcap: Some(5.0),
        window: Some(5.max(kv_len / 5)),
        segments: None,
    }
}

/// Segment starts for rows of `len` positions packing segments of lengths 37, 70, 1, 20, 64
/// and 5 in turn (row `b` starting `b` lengths into the cycle): several segments a row, some
/// crossing the flash kernels' 64-key tile boundaries, one of a single token.
fn packed_segments(
    batch: usize,
    len: usize,
    device: &candle_core::Device,
) -> Result<crate::Segments> {
    const LENGTHS: [usize; 6] = [37, 70, 1, 20, 64, 5];
    let rows: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            let mut starts = Vec::with_capacity(len);
            let mut lengths = LENGTHS.iter().cycle().skip(b);
            while starts.len() < len {
                let (start, n) = (starts.len() as u32, *lengths.next().unwrap_or(&1));
                starts.extend(std::iter::repeat_n(start, n.min(len - starts.len())));
            }
            starts
        })
        .collect();
    crate::Segments::from_rows(&rows, device)
}

/// The options of the segmented cases for queries `q` `[b, heads, t, d]`: plain scores, or
/// [`capped_window`]'s with `WINDOW`, over [`packed_segments`].
fn segmented<const WINDOW: bool>(q: &Tensor) -> Result<crate::AttentionOptions> {
    let (b, _, t, d) = q.dims4()?;
    segmented_rows::<WINDOW>((b, t, d), q.device())
}

/// [`segmented`] for `b` rows of `t` positions, heads of `d`.
fn segmented_rows<const WINDOW: bool>(
    (b, t, d): (usize, usize, usize),
    device: &candle_core::Device,
) -> Result<crate::AttentionOptions> {
    let segments = Some(packed_segments(b, t, device)?);
    Ok(match WINDOW {
        true => crate::AttentionOptions {
            segments,
            ..capped_window(t)
        },
        false => crate::AttentionOptions {
            segments,
            ..crate::AttentionOptions::plain(d)
        },
    })
}

/// Grouped-query attention over packed rows ([`packed_segments`]), with soft-capped scores
/// (`q` scaled up) and a window with `WINDOW`, through [`crate::windowed_attention`] (on CUDA
/// the flash kernels at their head sizes, else the fused causal softmax), with gradients.
fn segments_attention_case<const WINDOW: bool>(
    (batch, heads, kv_heads): (usize, usize, usize),
    t: usize,
    d: usize,
) -> Case {
    Case {
        name: match WINDOW {
            true => "causal_attention_segments_window",
            false => "causal_attention_segments",
        },
        fused: |t| crate::windowed_attention(&t[0], &t[1], &t[2], segmented::<WINDOW>(&t[0])?),
        reference: |t| {
            let options = segmented::<WINDOW>(&t[0])?;
            reference::windowed_attention(&t[0], &t[1], &t[2], options)
        },
        inputs: vec![
            Input::Float(vec![batch, heads, t, d], if WINDOW { 40.0 } else { 1.0 }),
            Input::Float(vec![batch, kv_heads, t, d], 1.0),
            Input::Float(vec![batch, kv_heads, t, d], 1.0),
        ],
    }
}

/// [`self_attention_case`] over packed rows ([`packed_segments`]), with [`capped_window`]'s
/// scores and window with `WINDOW`: the flash kernels' token-major path on CUDA.
fn self_attention_segments_case<const WINDOW: bool>(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    d: usize,
) -> Case {
    Case {
        name: match WINDOW {
            true => "self_attention_segments_window",
            false => "self_attention_segments",
        },
        fused: |t| {
            let (b, len, _) = t[0].dims3()?;
            let options = segmented_rows::<WINDOW>((b, len, 2 * t[3].dim(1)?), t[0].device())?;
            fused_self_attention(t, options)
        },
        reference: |t| {
            let [q, k, v] = split_rotated(t)?;
            let options = segmented::<WINDOW>(&q)?;
            merged(&reference::windowed_attention(&q, &k, &v, options)?)
        },
        inputs: projection_inputs(
            (batch, heads, kv_heads),
            t,
            d,
            if WINDOW { 40.0 } else { 1.0 },
        ),
    }
}

/// The names of [`options_attention_case`]'s variants.
const OPTIONS: &str = "causal_attention_softcap_window";
const OPTIONS_CHUNK: &str = "causal_attention_softcap_window_chunk";
const OPTIONS_D96: &str = "causal_attention_softcap_window_d96";

/// Grouped-query causal attention with soft-capped scores (`q` scaled up so that the cap
/// bends them) and a sliding window, `q_len` queries against `kv_len` keys, through
/// [`crate::windowed_attention`] (on CUDA the flash kernels at their head sizes, else the
/// fused causal softmax), with gradients.
fn options_attention_case(
    name: &'static str,
    (batch, heads, kv_heads): (usize, usize, usize),
    (q_len, kv_len): (usize, usize),
    d: usize,
) -> Case {
    Case {
        name,
        fused: |t| crate::windowed_attention(&t[0], &t[1], &t[2], capped_window(t[1].dim(2)?)),
        reference: |t| {
            let options = capped_window(t[1].dim(2)?);
            reference::windowed_attention(&t[0], &t[1], &t[2], options)
        },
        inputs: vec![
            Input::Float(vec![batch, heads, q_len, d], 40.0),
            Input::Float(vec![batch, kv_heads, kv_len, d], 1.0),
            Input::Float(vec![batch, kv_heads, kv_len, d], 1.0),
        ],
    }
}

/// A decode step (constant inputs, one query per head) with soft-capped scores and a window
/// over `kv_len` cached positions.
fn decode_window_case(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    kv_len: usize,
    d: usize,
) -> Case {
    Case {
        name: "decode_window",
        fused: |t| {
            let q = (&t[0] * 40.0)?;
            crate::windowed_attention(&q, &t[1], &t[2], capped_window(t[1].dim(2)?))
        },
        reference: |t| {
            let q = (&t[0] * 40.0)?;
            let options = capped_window(t[1].dim(2)?);
            reference::windowed_attention(&q, &t[1], &t[2], options)
        },
        inputs: vec![
            Input::Table(vec![batch, heads, 1, d]),
            Input::Table(vec![batch, kv_heads, kv_len, d]),
            Input::Table(vec![batch, kv_heads, kv_len, d]),
        ],
    }
}

/// Grouped-query causal attention through [`crate::flash_attention`] (the flash kernels on
/// CUDA), `q_len` queries against `kv_len` keys, with gradients.
fn flash_case(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    d: usize,
) -> Case {
    Case {
        name: "flash_attention",
        fused: |t| crate::flash_attention(&t[0], &t[1], &t[2]),
        reference: repeated_reference,
        inputs: vec![
            Input::Float(vec![batch, heads, q_len, d], 1.0),
            Input::Float(vec![batch, kv_heads, kv_len, d], 1.0),
            Input::Float(vec![batch, kv_heads, kv_len, d], 1.0),
        ],
    }
}

/// A block's attention from its projections (`q` `[b, t, heads · d]`, `k`/`v`
/// `[b, t, kv_heads · d]`, RoPE tables `[t, d / 2]`) through [`crate::self_attention`].
fn self_attention_case(batch: usize, heads: usize, kv_heads: usize, t: usize, d: usize) -> Case {
    Case {
        name: "self_attention",
        fused: |t| fused_self_attention(t, crate::AttentionOptions::plain(2 * t[3].dim(1)?)),
        reference: self_attention_reference,
        inputs: projection_inputs((batch, heads, kv_heads), t, d, 1.0),
    }
}

/// [`self_attention_case`] from one packed projection `[b, t, (heads + 2 · kv_heads) · d]`
/// through [`crate::packed_self_attention`]; the last input only carries the head counts in
/// its shape `[heads, kv_heads]`.
fn packed_self_attention_case(
    (batch, heads, kv_heads): (usize, usize, usize),
    t: usize,
    d: usize,
) -> Case {
    Case {
        name: "packed_self_attention",
        fused: |t| {
            let heads = t[3].dims2()?;
            let options = crate::AttentionOptions::plain(2 * t[1].dim(1)?);
            crate::packed_self_attention(&t[0], (&t[1], &t[2]), heads, options)
        },
        reference: |t| {
            let (heads, kv_heads) = t[3].dims2()?;
            let d = 2 * t[1].dim(1)?;
            let part = |first: usize, count: usize| {
                t[0].narrow(D::Minus1, first * d, count * d)?.contiguous()
            };
            let (q, k) = (part(0, heads)?, part(heads, kv_heads)?);
            let v = part(heads + kv_heads, kv_heads)?;
            self_attention_reference(&[q, k, v, t[1].clone(), t[2].clone()])
        },
        inputs: vec![
            Input::Float(vec![batch, t, (heads + 2 * kv_heads) * d], 1.0),
            Input::Table(vec![t, d / 2]),
            Input::Table(vec![t, d / 2]),
            Input::Ids(vec![heads, kv_heads], 1),
        ],
    }
}

/// [`self_attention_case`] with soft-capped scores (`q` scaled up) and a sliding window.
fn self_attention_options_case(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    d: usize,
) -> Case {
    Case {
        name: "self_attention_softcap_window",
        fused: |t| fused_self_attention(t, capped_window(t[0].dim(1)?)),
        reference: |t| {
            let [q, k, v] = split_rotated(t)?;
            let y = reference::windowed_attention(&q, &k, &v, capped_window(t[0].dim(1)?))?;
            merged(&y)
        },
        inputs: projection_inputs((batch, heads, kv_heads), t, d, 40.0),
    }
}

/// The inputs of a self-attention case: q, k and v projections of `t` positions (the queries
/// scaled by `q_scale`), then the RoPE tables.
fn projection_inputs(
    (batch, heads, kv_heads): (usize, usize, usize),
    t: usize,
    d: usize,
    q_scale: f32,
) -> Vec<Input> {
    let table = vec![t, d / 2];
    vec![
        Input::Float(vec![batch, t, heads * d], q_scale),
        Input::Float(vec![batch, t, kv_heads * d], 1.0),
        Input::Float(vec![batch, t, kv_heads * d], 1.0),
        Input::Table(table.clone()),
        Input::Table(table),
    ]
}

/// [`crate::self_attention`] of a self-attention case's inputs with `options`.
fn fused_self_attention(t: &[Tensor], options: crate::AttentionOptions) -> Result<Tensor> {
    let (heads, kv_heads) = projection_heads(t)?;
    crate::self_attention(
        [&t[0], &t[1], &t[2]],
        (&t[3], &t[4]),
        heads,
        kv_heads,
        options,
    )
}

/// The query and kv heads of [`self_attention_case`]'s inputs (head size twice the tables').
fn projection_heads(t: &[Tensor]) -> Result<(usize, usize)> {
    let d = 2 * t[3].dim(1)?;
    Ok((t[0].dim(2)? / d, t[1].dim(2)? / d))
}

/// [`self_attention_case`] from the composite references.
fn self_attention_reference(t: &[Tensor]) -> Result<Tensor> {
    merged(&repeated_reference(&split_rotated(t)?)?)
}

/// The projections of a self-attention case's inputs split into heads `[b, heads, t, d]`, the
/// queries and keys rotated by the composite RoPE.
fn split_rotated(t: &[Tensor]) -> Result<[Tensor; 3]> {
    let (heads, kv_heads) = projection_heads(t)?;
    let (cos, sin) = (&t[3], &t[4]);
    let split = |x: &Tensor, heads: usize| -> Result<Tensor> {
        let (b, len, width) = x.dims3()?;
        x.reshape((b, len, heads, width / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = reference::rope(&split(&t[0], heads)?, cos, sin)?;
    let k = reference::rope(&split(&t[1], kv_heads)?, cos, sin)?;
    Ok([q, k, split(&t[2], kv_heads)?])
}

/// Heads `[b, heads, t, d]` merged back into rows `[b, t, heads · d]`.
fn merged(y: &Tensor) -> Result<Tensor> {
    let (b, heads, len, d) = y.dims4()?;
    y.transpose(1, 2)?.reshape((b, len, heads * d))
}

/// The reference attention with kv heads repeated to the query heads.
fn repeated_reference(t: &[Tensor]) -> Result<Tensor> {
    let (k, v) = crate::attention::repeat_kv_heads(&t[0], &t[1], &t[2])?;
    reference::causal_attention(&t[0], &k, &v)
}

/// A projection of a few untracked rows (a decode step's): the matrix-vector kernel on CUDA.
fn gemv_case(rows: usize, inp: usize, out: usize) -> Case {
    Case {
        name: "linear_rows",
        fused: |t| crate::linear(&t[0], &t[1]),
        reference: |t| t[0].matmul(&t[1].t()?),
        inputs: vec![Input::Table(vec![rows, inp]), Input::Table(vec![out, inp])],
    }
}

/// Greedy decoding's argmax over rows of logits, against candle's on the CPU (ties to the
/// lowest index; 16-bit rows have many). Compared as one-hot rows, so that any other index
/// is an error of 1, however close its value.
fn argmax_case(rows: usize, width: usize) -> Case {
    Case {
        name: "argmax",
        fused: |t| one_hot(crate::argmax(&t[0])?, t[0].dim(1)?),
        reference: |t| {
            let cpu = t[0].to_device(&candle_core::Device::Cpu)?;
            one_hot(cpu.argmax(1)?.to_device(t[0].device())?, t[0].dim(1)?)
        },
        inputs: vec![Input::Table(vec![rows, width])],
    }
}

/// Indices `[rows]` as one-hot rows `[rows, width]` of f32.
fn one_hot(indices: Tensor, width: usize) -> Result<Tensor> {
    let columns = Tensor::arange(0u32, width as u32, indices.device())?;
    columns
        .unsqueeze(0)?
        .broadcast_eq(&indices.unsqueeze(1)?)?
        .to_dtype(DType::F32)
}

/// Greedy decoding's hand-off between captured steps: the argmax of each row written over a
/// step's tokens and into the picks log at its position (40 here), the position and slot (40
/// and 12) one further. Compared as the picks one-hot, the logged picks one-hot, then the two
/// counters.
fn greedy_step_case(rows: usize, width: usize) -> Case {
    fn picks_and_counters(step: &Tensor, logged: &[u32], width: usize) -> Result<Tensor> {
        let rows = logged.len();
        let picks = one_hot(step.narrow(0, 0, rows)?, width)?.flatten_all()?;
        let logged = Tensor::new(logged, step.device())?;
        let logged = one_hot(logged, width)?.flatten_all()?;
        let counters = step.narrow(0, rows, 2)?.to_dtype(DType::F32)?;
        Tensor::cat(&[picks, logged, counters], 0)
    }
    Case {
        name: "greedy_step",
        fused: |t| {
            let (rows, width) = t[0].dims2()?;
            let step: Vec<u32> = std::iter::repeat_n(7, rows).chain([40, 12]).collect();
            let step = Tensor::new(step, t[0].device())?;
            let mut log = crate::PicksLog::new(t[0].device(), rows)?;
            crate::greedy_step(&t[0], &step, &log)?;
            log.enqueued(40)?;
            picks_and_counters(&step, &log.read(40)?, width)
        },
        reference: |t| {
            let (_, width) = t[0].dims2()?;
            let picks = t[0].to_device(&candle_core::Device::Cpu)?.argmax(1)?;
            let counters = Tensor::new(&[41u32, 13], &candle_core::Device::Cpu)?;
            let step = Tensor::cat(&[&picks, &counters], 0)?.to_device(t[0].device())?;
            picks_and_counters(&step, &picks.to_vec1::<u32>()?, width)
        },
        inputs: vec![Input::Table(vec![rows, width])],
    }
}

/// A greedy step's head: the final norm taken into the head's product of one row, with the
/// argmax's first pass (on CUDA), against the norm-taking product, then [`greedy_step_case`]'s
/// op, on the same device (the same rounded logits: the pick must be the same, however close
/// the runner-up). Compared as that case compares.
fn head_greedy_step_case(inp: usize, vocab: usize) -> Case {
    fn step_and_log(t: &[Tensor]) -> Result<(Tensor, crate::PicksLog)> {
        let step = Tensor::new(&[7u32, 40, 12], t[0].device())?;
        Ok((step, crate::PicksLog::new(t[0].device(), 1)?))
    }
    fn compared(step: &Tensor, mut log: crate::PicksLog, vocab: usize) -> Result<Tensor> {
        log.enqueued(40)?;
        let logged = Tensor::new(log.read(40)?, step.device())?;
        let picks = one_hot(step.narrow(0, 0, 1)?, vocab)?.flatten_all()?;
        let logged = one_hot(logged, vocab)?.flatten_all()?;
        let counters = step.narrow(0, 1, 2)?.to_dtype(DType::F32)?;
        Tensor::cat(&[picks, logged, counters], 0)
    }
    Case {
        name: "rms_norm_head_greedy_step",
        fused: |t| {
            let (step, log) = step_and_log(t)?;
            let norm = input_norm::<0>(&t[2]);
            crate::rms_norm_head_greedy_step(&t[0], norm, (&t[1], HELD), &step, &log)?;
            compared(&step, log, t[1].dim(0)?)
        },
        reference: |t| {
            let (step, log) = step_and_log(t)?;
            let logits = crate::rms_norm_linear(&t[0], input_norm::<0>(&t[2]), (&t[1], HELD))?;
            crate::greedy_step(&logits, &step, &log)?;
            compared(&step, log, t[1].dim(0)?)
        },
        inputs: vec![
            Input::Table(vec![1, inp]),
            Input::Table(vec![vocab, inp]),
            Input::Table(vec![inp]),
        ],
    }
}

/// The widening and narrowing casts of mixed precision (identities in f32), with gradients.
fn cast_case(shape: Vec<usize>) -> Case {
    Case {
        name: "cast",
        fused: |t| {
            let wide = crate::cast(&t[0], DType::F32)?;
            crate::cast(&(wide * 2.0)?, t[0].dtype())
        },
        reference: |t| &t[0] * 2.0,
        inputs: vec![Input::Float(shape, 1.0)],
    }
}

/// A trained projection whose weight is an f32 master (in 16-bit modes its gradient comes from
/// the widening GEMM on CUDA).
fn master_linear_case(rows: usize, inp: usize, out: usize) -> Case {
    Case {
        name: "master_linear",
        fused: |t| crate::master_linear(&t[0], &t[1].to_dtype(DType::F32)?),
        reference: |t| t[0].matmul(&t[1].t()?),
        inputs: vec![
            Input::Float(vec![rows, inp], 1.0),
            Input::Float(vec![out, inp], 1.0),
        ],
    }
}

/// A LoRA projection `x·wᵀ + 2·(x·aᵀ)·bᵀ` over a frozen `w` (rank 16), gradients to `x`, `a`
/// and `b`: in 16 bits the update stays separate from the weight, and on CUDA the two
/// products of the forward and of the input gradient each write one output
/// ([`crate::matmul_sum`]).
fn lora_linear_case(rows: usize, inp: usize, out: usize) -> Case {
    Case {
        name: "lora_linear",
        fused: |t| lora_projections(t, None),
        reference: |t| lora_references(t, None),
        inputs: lora_inputs(rows, inp, &[out]),
    }
}

/// [`lora_linear_case`] with dropout of the update's input (p 0.1): the dropped input drawn
/// by the kernel in the forward pass and again in the backward's, the masked share of the
/// input's gradient added in one pass; the reference multiplies by the host's mask.
fn lora_linear_dropout_case(rows: usize, inp: usize, out: usize) -> Case {
    Case {
        name: "lora_linear_dropout",
        fused: |t| lora_projections(t, Some(&dropout_masks::<1>())),
        reference: |t| lora_references(t, Some(&dropout_masks::<1>())),
        inputs: lora_inputs(rows, inp, &[out]),
    }
}

/// A block's q, k and v (`outs` rows each) as one LoRA projection of rank 16 a part
/// ([`crate::stacked_lora_linear`]: the stacked frozen weight, the parts' `a` stacked and
/// their `b` block-diagonal), gradients to `x` and every factor, against each part's own
/// `x·w_iᵀ + 2·(x·a_iᵀ)·b_iᵀ` side by side.
fn stacked_lora_linear_case(rows: usize, inp: usize, outs: [usize; 3]) -> Case {
    Case {
        name: "stacked_lora_linear",
        fused: |t| lora_projections(t, None),
        reference: |t| lora_references(t, None),
        inputs: lora_inputs(rows, inp, &outs),
    }
}

/// A block's gate and up (`outs` rows each) as one LoRA projection with a dropout mask each
/// ([`crate::stacked_lora_linear`]), against each part's own update of its own dropped input.
fn stacked_lora_linear_dropout_case(rows: usize, inp: usize, outs: [usize; 2]) -> Case {
    Case {
        name: "stacked_lora_linear_dropout",
        fused: |t| lora_projections(t, Some(&dropout_masks::<2>())),
        reference: |t| lora_references(t, Some(&dropout_masks::<2>())),
        inputs: lora_inputs(rows, inp, &outs),
    }
}

/// The inputs of a LoRA case: `x` `[rows, inp]`, the frozen weight of all parts stacked
/// `[Σ outs, inp]`, then each part's `a` `[16, inp]` and `b` `[out, 16]`.
fn lora_inputs(rows: usize, inp: usize, outs: &[usize]) -> Vec<Input> {
    let mut inputs = vec![
        Input::Float(vec![rows, inp], 1.0),
        Input::Table(vec![outs.iter().sum(), inp]),
    ];
    for &out in outs {
        inputs.push(Input::Float(vec![16, inp], 1.0));
        inputs.push(Input::Float(vec![out, 16], 1.0));
    }
    inputs
}

/// [`lora_inputs`] through [`crate::lora_linear`] (one part) or [`crate::stacked_lora_linear`]
/// (several), scale 2, the factors as f32 masters as LoRA layers hold them.
fn lora_projections(t: &[Tensor], dropouts: Option<&[crate::Dropout]>) -> Result<Tensor> {
    let w = crate::LinearWeight::Dense(t[1].clone());
    let masters = t[2..]
        .iter()
        .map(|f| f.to_dtype(DType::F32))
        .collect::<Result<Vec<_>>>()?;
    let factors: Vec<_> = masters.chunks(2).map(|f| (&f[0], &f[1])).collect();
    match factors[..] {
        [(a, b)] => crate::lora_linear(&t[0], &w, a, b, 2.0, dropouts.map(|d| d[0])),
        _ => crate::stacked_lora_linear(&t[0], &w, &factors, 2.0, dropouts),
    }
}

/// Each part's `x·w_iᵀ + 2·(dropout_i(x)·a_iᵀ)·b_iᵀ` by candle's ops (the host's masks), side by
/// side.
fn lora_references(t: &[Tensor], dropouts: Option<&[crate::Dropout]>) -> Result<Tensor> {
    let mut row = 0;
    let mut parts = Vec::new();
    for (i, f) in t[2..].chunks(2).enumerate() {
        let out = f[1].dim(0)?;
        let dropped = match dropouts {
            Some(d) => reference_dropped(&t[0], d[i])?,
            None => t[0].clone(),
        };
        let update = dropped.matmul(&f[0].t()?)?.matmul(&f[1].t()?)?;
        let w = t[1].narrow(0, row, out)?;
        parts.push((t[0].matmul(&w.t()?)? + (update * 2.0)?)?);
        row += out;
    }
    Tensor::cat(&parts, 1)
}

/// The dropout masks of the op checks: one a part, from fixed seeds.
fn dropout_masks<const N: usize>() -> [crate::Dropout; N] {
    std::array::from_fn(|i| crate::Dropout::new(0.1, 1234 + i as u64).expect("a probability"))
}

/// `x` through its mask (from the host's bits, [`crate::Dropout::mask`]).
fn reference_dropped(x: &Tensor, dropout: crate::Dropout) -> Result<Tensor> {
    x * dropout.mask(x.dims(), x.device())?.to_dtype(x.dtype())?
}

/// Inverted dropout with its backward ([`crate::Dropout::forward`]: the kernel's mask, drawn
/// again for the gradient) against the input times the host's mask.
fn dropout_case(shape: Vec<usize>) -> Case {
    Case {
        name: "dropout",
        fused: |t| {
            let [dropout] = dropout_masks();
            dropout.forward(&t[0])
        },
        reference: |t| {
            let [dropout] = dropout_masks();
            reference_dropped(&t[0], dropout)
        },
        inputs: vec![Input::Float(shape, 1.0)],
    }
}

/// Which of LoRA's products with a dropped input a [`masked_lora_case`] checks.
const BOTTLENECK: u8 = 0;
const FACTOR_GRAD: u8 = 1;
const SHARES: u8 = 2;

/// One of LoRA's products with a dropped input ([`crate::masked_lora`]: a kernel each on
/// CUDA) for three parts of ranks `R0`, `R1`, `R2` with a mask each, against each part's
/// product by candle's ops with the host's masks. `KERNEL` picks the product and its inputs:
/// [`BOTTLENECK`] the input `[rows, cols]` and the stacked `a` `[R, cols]`; [`FACTOR_GRAD`] the
/// bottleneck's gradient `[rows, R]` and the input (scale 0.5); [`SHARES`] the frozen
/// product's gradient `[rows, cols]`, the bottleneck's and `a` (scale 0.5).
fn masked_lora_case<const KERNEL: u8, const R0: usize, const R1: usize, const R2: usize>(
    rows: usize,
    cols: usize,
) -> Case {
    const SCALE: f64 = 0.5;
    fn parts<const R0: usize, const R1: usize, const R2: usize>() -> Vec<(usize, crate::Dropout)> {
        [R0, R1, R2].into_iter().zip(dropout_masks::<3>()).collect()
    }
    let total = R0 + R1 + R2;
    let (name, inputs) = match KERNEL {
        BOTTLENECK => (
            "masked_lora_bottleneck",
            vec![vec![rows, cols], vec![total, cols]],
        ),
        FACTOR_GRAD => (
            "masked_lora_factor_grad",
            vec![vec![rows, total], vec![rows, cols]],
        ),
        _ => (
            "masked_lora_shares",
            vec![vec![rows, cols], vec![rows, total], vec![total, cols]],
        ),
    };
    Case {
        name,
        fused: |t| {
            let parts = parts::<R0, R1, R2>();
            match KERNEL {
                BOTTLENECK => crate::masked_lora::masked_bottleneck(&t[0], &t[1], &parts),
                FACTOR_GRAD => {
                    let dtype = t[1].dtype();
                    crate::masked_lora::masked_factor_grad(&t[0], &t[1], &parts, dtype, SCALE)
                }
                _ => crate::masked_lora::add_masked_shares(&t[0], &t[1], &t[2], &parts, SCALE),
            }
        },
        reference: |t| {
            let mut row = 0;
            let mut products = Vec::new();
            let mut sum = t[0].clone();
            for (rank, dropout) in parts::<R0, R1, R2>() {
                match KERNEL {
                    BOTTLENECK => {
                        let a = t[1].narrow(0, row, rank)?;
                        products.push(reference_dropped(&t[0], dropout)?.matmul(&a.t()?)?);
                    }
                    FACTOR_GRAD => {
                        let g = t[0].narrow(1, row, rank)?.contiguous()?.t()?;
                        let product = g.matmul(&reference_dropped(&t[1], dropout)?)?;
                        products.push((product * SCALE)?);
                    }
                    _ => {
                        let g = t[1].narrow(1, row, rank)?.contiguous()?;
                        let share = g.matmul(&t[2].narrow(0, row, rank)?)?;
                        sum = (sum + (reference_dropped(&share, dropout)? * SCALE)?)?;
                    }
                }
                row += rank;
            }
            match KERNEL {
                BOTTLENECK => Tensor::cat(&products, 1),
                FACTOR_GRAD => Tensor::cat(&products, 0),
                _ => Ok(sum),
            }
        },
        inputs: inputs.into_iter().map(Input::Table).collect(),
    }
}

/// A frozen projection of a 4-bit (NF4) weight quantized from the second input: many rows
/// (dequantized, then a GEMM; with the input's gradient) or a decode step's one (the 4-bit
/// matrix-vector kernel on CUDA). The reference is the host's dequantization and a matmul.
fn nf4_linear_case(name: &'static str, rows: usize, inp: usize, out: usize) -> Case {
    let x = match rows {
        1 => Input::Table(vec![rows, inp]),
        _ => Input::Float(vec![rows, inp], 1.0),
    };
    Case {
        name,
        fused: |t| {
            let w = crate::nf4::Nf4Tensor::quantize(&t[1], t[1].device())?;
            crate::frozen_linear(&t[0], &crate::LinearWeight::nf4(w)?)
        },
        reference: |t| {
            let values = t[1].flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let dense = crate::nf4::Nf4Parts::quantize(&values).dequantize(values.len());
            let w = Tensor::from_vec(dense, t[1].shape(), t[1].device())?;
            t[0].matmul(&w.to_dtype(t[0].dtype())?.t()?)
        },
        inputs: vec![x, Input::Table(vec![out, inp])],
    }
}

/// The unit of the gated-unit cases: SwiGLU, or GeGLU where `GEGLU` (a case is a pair of
/// plain functions, so the choice is a type parameter).
const fn unit<const GEGLU: bool>() -> Glu {
    match GEGLU {
        true => Glu::GeGlu,
        false => Glu::SwiGlu,
    }
}

/// `swiglu` or `geglu` of separate gate `[..]` (values in ±4) and up of the same shape.
fn glu_case<const GEGLU: bool>(shape: Vec<usize>) -> Case {
    Case {
        name: match GEGLU {
            true => "geglu",
            false => "swiglu",
        },
        fused: |t| crate::glu(&t[0], &t[1], unit::<GEGLU>()),
        reference: |t| reference::glu(&t[0], &t[1], unit::<GEGLU>()),
        inputs: vec![Input::Float(shape.clone(), 4.0), Input::Float(shape, 1.0)],
    }
}

/// The gated unit of a stacked gate/up projection of one untracked row (a decode step's MLP).
fn glu_projection_case<const GEGLU: bool>(inp: usize, ffn: usize) -> Case {
    Case {
        name: match GEGLU {
            true => "geglu_projection",
            false => "swiglu_projection",
        },
        fused: |t| crate::glu_projection(&t[0], &t[1], unit::<GEGLU>()),
        reference: |t| glu_projection_reference(&t[0], &t[1], unit::<GEGLU>()),
        inputs: vec![Input::Table(vec![1, inp]), Input::Table(vec![2 * ffn, inp])],
    }
}

/// The unit of `x`'s projections by the stacked gate/up weight `[2 ffn, in]`, separately.
fn glu_projection_reference(x: &Tensor, gate_up: &Tensor, glu: Glu) -> Result<Tensor> {
    let ffn = gate_up.dim(0)? / 2;
    let gate = x.matmul(&gate_up.narrow(0, 0, ffn)?.t()?)?;
    let up = x.matmul(&gate_up.narrow(0, ffn, ffn)?.t()?)?;
    reference::glu(&gate, &up, glu)
}

/// The RMSNorm a decode step's projection takes on the way in, with the norm weight `weight`:
/// `OFFSET` 1 is Gemma's `1 + w`.
fn input_norm<const OFFSET: u8>(weight: &Tensor) -> crate::InputNorm<'_> {
    crate::InputNorm {
        weight,
        offset: OFFSET as f64,
        eps: 1e-5,
    }
}

/// The source of the decode products' weights in their cases: the inputs are made before the
/// op runs, the weight before the norm weight or residual after it, so no kernel still running
/// when the product starts writes it, and on Hopper the cases check the programmatic launch.
const HELD: crate::WeightSource = crate::WeightSource::Held;

/// A decode step's projection of rows `[rows, inp]` with their RMSNorm taken on the way in
/// (the q/k/v projection's), against the norm and the product.
fn rms_norm_linear_case<const OFFSET: u8>(rows: usize, inp: usize, out: usize) -> Case {
    Case {
        name: match OFFSET {
            0 => "rms_norm_linear",
            _ => "rms_norm_linear_offset",
        },
        fused: |t| crate::rms_norm_linear(&t[0], input_norm::<OFFSET>(&t[2]), (&t[1], HELD)),
        reference: |t| reference::rms_norm(&t[0], &t[2], OFFSET as f64, 1e-5)?.matmul(&t[1].t()?),
        inputs: vec![
            Input::Table(vec![rows, inp]),
            Input::Table(vec![out, inp]),
            Input::Table(vec![inp]),
        ],
    }
}

/// The gated unit of a stacked gate/up projection of rows `[rows, inp]` with their RMSNorm
/// taken on the way in (a decode step's MLP up to its down projection).
fn rms_norm_glu_case<const GEGLU: bool>(rows: usize, inp: usize, ffn: usize) -> Case {
    Case {
        name: match GEGLU {
            true => "rms_norm_geglu_projection",
            false => "rms_norm_swiglu_projection",
        },
        fused: |t| {
            let norm = input_norm::<0>(&t[2]);
            crate::rms_norm_glu_projection(&t[0], norm, (&t[1], HELD), unit::<GEGLU>())
        },
        reference: |t| {
            let normed = reference::rms_norm(&t[0], &t[2], 0.0, 1e-5)?;
            glu_projection_reference(&normed, &t[1], unit::<GEGLU>())
        },
        inputs: vec![
            Input::Table(vec![rows, inp]),
            Input::Table(vec![2 * ffn, inp]),
            Input::Table(vec![inp]),
        ],
    }
}

/// A decode step's projection of rows `[rows, inp]` with the residual `[rows, out]` added on
/// the way out (its output and down projections').
fn linear_residual_case(rows: usize, inp: usize, out: usize) -> Case {
    Case {
        name: "linear_residual",
        fused: |t| crate::linear_residual(&t[0], (&t[1], HELD), &t[2]),
        reference: |t| &t[2] + t[0].matmul(&t[1].t()?)?,
        inputs: vec![
            Input::Table(vec![rows, inp]),
            Input::Table(vec![out, inp]),
            Input::Table(vec![rows, out]),
        ],
    }
}

/// A training block's gated projection from f32 master weights: `x` `[rows, inp]`, gate and
/// up `[ffn, inp]`, all differentiable (on CUDA the two weights cast into one stacked weight,
/// one projection into a packed unit).
fn glu_master_case<const GEGLU: bool>(rows: usize, inp: usize, ffn: usize) -> Case {
    let float = |shape: &[usize]| Input::Float(shape.to_vec(), 1.0);
    Case {
        name: match GEGLU {
            true => "geglu_master_projection",
            false => "swiglu_master_projection",
        },
        fused: |t| {
            let master = |w: &Tensor| w.to_dtype(DType::F32);
            crate::glu_master_projection(&t[0], &master(&t[1])?, &master(&t[2])?, unit::<GEGLU>())
        },
        reference: |t| {
            let project = |w: &Tensor| t[0].matmul(&w.t()?);
            reference::glu(&project(&t[1])?, &project(&t[2])?, unit::<GEGLU>())
        },
        inputs: vec![float(&[rows, inp]), float(&[ffn, inp]), float(&[ffn, inp])],
    }
}

/// A packed projection `[rows, 2 · width]` into the unit, differentiable.
fn glu_packed_case<const GEGLU: bool>(rows: usize, width: usize) -> Case {
    Case {
        name: match GEGLU {
            true => "geglu_packed",
            false => "swiglu_packed",
        },
        fused: |t| crate::glu_packed(&t[0], unit::<GEGLU>()),
        reference: |t| {
            let half = t[0].dim(1)? / 2;
            let (gate, up) = (t[0].narrow(1, 0, half)?, t[0].narrow(1, half, half)?);
            reference::glu(&gate, &up, unit::<GEGLU>())
        },
        inputs: vec![Input::Float(vec![rows, 2 * width], 4.0)],
    }
}

/// Both results of [`crate::add_rms_norm`] of `t[0] + t[1]` with `weight` (and `offset`),
/// stacked.
fn stacked_add_norm(t: &[Tensor], weight: &Tensor, offset: u8) -> Result<Tensor> {
    let (sum, normed) = crate::add_rms_norm(&t[0], &t[1], weight, offset as f64, 1e-5)?;
    Tensor::stack(&[sum, normed], 0)
}

/// [`stacked_add_norm`] from the composite add and norm, with the weight `t[2]`.
fn stacked_add_norm_reference<const OFFSET: u8>(t: &[Tensor]) -> Result<Tensor> {
    let sum = (&t[0] + &t[1])?;
    let normed = reference::rms_norm(&sum, &t[2], OFFSET as f64, 1e-5)?;
    Tensor::stack(&[sum, normed], 0)
}

/// The residual add and norm of inference (constant inputs): both outputs, stacked. `OFFSET`
/// 1 is Gemma's `1 + w` norm weight.
fn add_norm_case<const OFFSET: u8>(rows: usize, width: usize) -> Case {
    Case {
        name: if OFFSET == 0 {
            "add_rms_norm"
        } else {
            "add_rms_norm_offset"
        },
        fused: |t| stacked_add_norm(t, &t[2], OFFSET),
        reference: stacked_add_norm_reference::<OFFSET>,
        inputs: vec![
            Input::Table(vec![rows, width]),
            Input::Table(vec![rows, width]),
            Input::Table(vec![width]),
        ],
    }
}

/// The residual add and the norm after it in training: both outputs, stacked, with gradients
/// to both addends and the weight; with `MASTER` the weight an f32 master (mixed precision),
/// with `OFFSET` 1 Gemma's `1 + w`. The norm's backward finds the sum's gradient from the
/// stack already held, as a block's residual stream's.
fn add_norm_train_case<const MASTER: bool, const OFFSET: u8>(x: Vec<usize>) -> Case {
    let width = x[x.len() - 1];
    Case {
        name: match (MASTER, OFFSET) {
            (true, _) => "add_rms_norm_master",
            (false, 0) => "add_rms_norm_train",
            (false, _) => "add_rms_norm_train_offset",
        },
        fused: |t| {
            let weight = match MASTER {
                true => t[2].to_dtype(DType::F32)?,
                false => t[2].clone(),
            };
            stacked_add_norm(t, &weight, OFFSET)
        },
        reference: stacked_add_norm_reference::<OFFSET>,
        inputs: vec![
            Input::Float(x.clone(), 1.0),
            Input::Float(x, 1.0),
            Input::Float(vec![width], 1.0),
        ],
    }
}

/// RMSNorm scaled by `1 + w` (Gemma) over rows `x`, with gradients.
fn rms_norm_offset_case(x: Vec<usize>) -> Case {
    let width = x[x.len() - 1];
    Case {
        name: "rms_norm_offset",
        fused: |t| crate::rms_norm_offset(&t[0], &t[1], 1.0, 1e-5),
        reference: |t| reference::rms_norm(&t[0], &t[1], 1.0, 1e-5),
        inputs: vec![Input::Float(x, 1.0), Input::Float(vec![width], 1.0)],
    }
}

/// A pre-norm block's residual stream: `x + rms_norm(x)`, whose input gradient the residual
/// path holds before the norm's backward runs (the norm writes its gradient onto it), with the
/// weight trained or, with `FROZEN` (a LoRA base), a constant.
fn residual_norm_case<const FROZEN: bool>(x: Vec<usize>) -> Case {
    let width = x[x.len() - 1];
    Case {
        name: match FROZEN {
            false => "residual_rms_norm",
            true => "residual_rms_norm_frozen",
        },
        fused: |t| crate::add(&t[0], &crate::rms_norm(&t[0], &t[1], 1e-5)?),
        reference: |t| &t[0] + reference::rms_norm(&t[0], &t[1], 0.0, 1e-5)?,
        inputs: vec![
            Input::Float(x, 1.0),
            match FROZEN {
                false => Input::Float(vec![width], 1.0),
                true => Input::Table(vec![width]),
            },
        ],
    }
}

/// A residual stream's norm (as [`residual_norm_case`]) whose weight is an f32 master, as in
/// mixed-precision training.
fn master_norm_case(x: Vec<usize>) -> Case {
    let width = x[x.len() - 1];
    Case {
        name: "rms_norm_master",
        fused: |t| {
            let master = t[1].to_dtype(DType::F32)?;
            crate::add(&t[0], &crate::rms_norm(&t[0], &master, 1e-5)?)
        },
        reference: |t| &t[0] + reference::rms_norm(&t[0], &t[1], 0.0, 1e-5)?,
        inputs: vec![Input::Float(x, 1.0), Input::Float(vec![width], 1.0)],
    }
}

/// Per-head q/k norms (Qwen3, Gemma 3): RMSNorm over each head of projections
/// `[b, t, heads, head_size]`, one weight of `head_size` shared by the heads, with gradients.
fn qk_norm_case(x: Vec<usize>) -> Case {
    let width = x[x.len() - 1];
    Case {
        name: "qk_norm",
        fused: |t| crate::rms_norm(&t[0], &t[1], 1e-6),
        reference: |t| reference::rms_norm(&t[0], &t[1], 0.0, 1e-6),
        inputs: vec![Input::Float(x, 1.0), Input::Float(vec![width], 1.0)],
    }
}

/// The position the write_kv cases write at.
const WRITE_KV_START: usize = 3;

/// The heads and cache shape of a write_kv case: packed projections `t[0]`, the number of kv
/// heads as the length of `t[3]` and the head size as that of `t[4]`.
fn write_kv_layout<'a>(
    t: &[Tensor],
    at: crate::Position<'a>,
) -> Result<(crate::KvLayout<'a>, Vec<usize>)> {
    let (b, positions, width) = t[0].dims3()?;
    let (kv_heads, head_size) = (t[3].dim(0)?, t[4].dim(0)?);
    let layout = crate::KvLayout {
        heads: width / head_size - 2 * kv_heads,
        kv_heads,
        head_size,
        at,
    };
    Ok((layout, vec![2, b, kv_heads, positions + 5, head_size]))
}

/// Packed projections `[b, t, (heads + 2 kv) · d]` split into queries and a fresh cache
/// written at position 3, the first `rotary` elements of each head rotated (inference,
/// constant inputs). The fourth and fifth inputs only carry the number of kv heads and the
/// head size, as their lengths. Returns the cache and the queries, flattened.
fn write_kv_case(
    name: &'static str,
    (b, t, heads, kv_heads): (usize, usize, usize, usize),
    (d, rotary): (usize, usize),
) -> Case {
    Case {
        name,
        fused: |t| {
            let (layout, shape) = write_kv_layout(t, crate::Position::Host(WRITE_KV_START))?;
            let cache = Tensor::zeros(shape, t[0].dtype(), t[0].device())?;
            let q = crate::write_kv(&cache, &t[0], &t[1], &t[2], layout)?;
            Tensor::cat(&[cache.flatten_all()?, q.flatten_all()?], 0)
        },
        reference: |t| write_kv_reference(t, &t[1], &t[2]),
        inputs: write_kv_inputs((b, t, heads, kv_heads), (d, rotary), t),
    }
}

/// [`write_kv_case`] for one position held on the device, with whole tables.
fn write_kv_at_case(
    name: &'static str,
    (b, heads, kv_heads): (usize, usize, usize),
    (d, rotary): (usize, usize),
) -> Case {
    Case {
        name,
        fused: |t| {
            let position = Tensor::new(&[WRITE_KV_START as u32], t[0].device())?;
            let at = crate::Position::Device(&position);
            let (layout, shape) = write_kv_layout(t, at)?;
            let cache = Tensor::zeros(shape, t[0].dtype(), t[0].device())?;
            let q = crate::write_kv(&cache, &t[0], &t[1], &t[2], layout)?;
            Tensor::cat(&[cache.flatten_all()?, q.flatten_all()?], 0)
        },
        reference: |t| {
            let window = |table: &Tensor| table.narrow(0, WRITE_KV_START, 1);
            write_kv_reference(t, &window(&t[1])?, &window(&t[2])?)
        },
        inputs: write_kv_inputs((b, 1, heads, kv_heads), (d, rotary), 6),
    }
}

fn write_kv_inputs(
    (b, t, heads, kv_heads): (usize, usize, usize, usize),
    (d, rotary): (usize, usize),
    table_rows: usize,
) -> Vec<Input> {
    vec![
        Input::Table(vec![b, t, (heads + 2 * kv_heads) * d]),
        Input::Table(vec![table_rows, rotary / 2]),
        Input::Table(vec![table_rows, rotary / 2]),
        Input::Ids(vec![kv_heads], 1),
        Input::Ids(vec![d], 1),
    ]
}

/// The composite write_kv: split, rotate by `cos`/`sin` (the step's rows), copy into a cache.
fn write_kv_reference(t: &[Tensor], cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (l, shape) = write_kv_layout(t, crate::Position::Host(WRITE_KV_START))?;
    let (q, k, v) = rotated_heads(&t[0], &l, cos, sin)?;
    let cache = Tensor::zeros(shape, t[0].dtype(), t[0].device())?;
    cache.slice_set(&Tensor::stack(&[k, v], 0)?, 3, WRITE_KV_START)?;
    Tensor::cat(&[cache.flatten_all()?, q.flatten_all()?], 0)
}

/// Packed projections `[b, t, (heads + 2 kv_heads) · d]` split into heads
/// `[b, heads or kv_heads, t, d]`: the queries and keys rotated by `cos`/`sin` (the positions'
/// rows), and the values.
fn rotated_heads(
    qkv: &Tensor,
    l: &crate::KvLayout,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, positions, _) = qkv.dims3()?;
    let part = |first: usize, heads: usize| -> Result<Tensor> {
        qkv.narrow(2, first * l.head_size, heads * l.head_size)?
            .reshape((b, positions, heads, l.head_size))?
            .transpose(1, 2)?
            .contiguous()
    };
    Ok((
        reference::rope(&part(0, l.heads)?, cos, sin)?,
        reference::rope(&part(l.heads, l.kv_heads)?, cos, sin)?,
        part(l.heads + l.kv_heads, l.kv_heads)?,
    ))
}

/// The layout, the position and the options of a [`cached_attention_case`] step.
fn cached_step<const OPTIONS: bool>(
    t: &[Tensor],
) -> Result<(crate::KvLayout<'static>, usize, crate::AttentionOptions)> {
    let (kv_heads, capacity, d) = (t[3].dim(0)?, t[4].dim(3)?, t[4].dim(4)?);
    let layout = crate::KvLayout {
        heads: t[0].dim(2)? / d - 2 * kv_heads,
        kv_heads,
        head_size: d,
        at: crate::Position::Host(0),
    };
    let position = capacity - 3;
    let options = match OPTIONS {
        true => capped_window(position + 1),
        false => crate::AttentionOptions::plain(d),
    };
    Ok((layout, position, options))
}

/// A decode step's attention from its packed projections over a filled cache
/// ([`crate::cached_attention`]: on CUDA one kernel that also writes the cache) at position
/// `capacity - 3`; with soft-capped, windowed scores where `OPTIONS`, the position held on the
/// device (and the whole RoPE tables passed) where `DEVICE`. Inputs: the projections
/// `[b, 1, (heads + 2 kv_heads) · d]`, the tables `[capacity, rotary / 2]`, the number of kv
/// heads as a length, and the cache's earlier contents `[2, b, kv_heads, capacity, d]`. Compares
/// the cache after the step and the step's output.
fn cached_attention_case<const OPTIONS: bool, const DEVICE: bool>(
    name: &'static str,
    (b, heads, kv_heads): (usize, usize, usize),
    (d, rotary): (usize, usize),
    capacity: usize,
) -> Case {
    Case {
        name,
        fused: |t| {
            let (layout, position, options) = cached_step::<OPTIONS>(t)?;
            let cache = t[4].copy()?;
            let out = match DEVICE {
                true => {
                    let at = Tensor::new(&[position as u32], t[0].device())?;
                    let layout = crate::KvLayout {
                        at: crate::Position::Device(&at),
                        ..layout
                    };
                    crate::cached_attention(&cache, &t[0], (&t[1], &t[2]), layout, options)?
                }
                false => {
                    let (cos, sin) = (t[1].narrow(0, position, 1)?, t[2].narrow(0, position, 1)?);
                    let layout = crate::KvLayout {
                        at: crate::Position::Host(position),
                        ..layout
                    };
                    crate::cached_attention(&cache, &t[0], (&cos, &sin), layout, options)?
                }
            };
            Tensor::cat(&[cache.flatten_all()?, out.flatten_all()?], 0)
        },
        reference: |t| {
            let (layout, position, options) = cached_step::<OPTIONS>(t)?;
            let (cos, sin) = (t[1].narrow(0, position, 1)?, t[2].narrow(0, position, 1)?);
            let (q, k, v) = rotated_heads(&t[0], &layout, &cos, &sin)?;
            let cache = t[4].copy()?;
            cache.slice_set(&Tensor::stack(&[k, v], 0)?, 3, position)?;
            let seen = |i: usize| cache.get(i)?.narrow(2, 0, position + 1);
            let q = q.contiguous()?;
            let out = reference::windowed_attention(&q, &seen(0)?, &seen(1)?, options)?;
            Tensor::cat(&[cache.flatten_all()?, out.flatten_all()?], 0)
        },
        inputs: vec![
            Input::Table(vec![b, 1, (heads + 2 * kv_heads) * d]),
            Input::Table(vec![capacity, rotary / 2]),
            Input::Table(vec![capacity, rotary / 2]),
            Input::Ids(vec![kv_heads], 1),
            Input::Table(vec![2, b, kv_heads, capacity, d]),
        ],
    }
}

/// A decode step: one query per head against `kv_len` cached positions (forward only: the op
/// is for inference, so its inputs are constants).
fn decode_case(batch: usize, heads: usize, kv_heads: usize, kv_len: usize, d: usize) -> Case {
    Case {
        name: "decode_attention",
        fused: |t| crate::grouped_attention(&t[0], &t[1], &t[2]),
        reference: repeated_reference,
        inputs: vec![
            Input::Table(vec![batch, heads, 1, d]),
            Input::Table(vec![batch, kv_heads, kv_len, d]),
            Input::Table(vec![batch, kv_heads, kv_len, d]),
        ],
    }
}

/// A decode step whose position is held on the device, against a whole cache buffer of
/// `capacity` positions: it attends to the first `capacity - 2`.
fn decode_at_case(heads: usize, kv_heads: usize, capacity: usize, d: usize) -> Case {
    fn position(k: &Tensor) -> Result<usize> {
        Ok(k.dim(2)? - 3)
    }
    Case {
        name: "decode_attention_at",
        fused: |t| {
            let at = Tensor::new(&[position(&t[1])? as u32], t[0].device())?;
            let plain = crate::AttentionOptions::plain(t[0].dim(3)?);
            crate::decode_attention_at(&t[0], &t[1], &t[2], &at, plain)
        },
        reference: |t| {
            let len = position(&t[1])? + 1;
            repeated_reference(&[
                t[0].clone(),
                t[1].narrow(2, 0, len)?,
                t[2].narrow(2, 0, len)?,
            ])
        },
        inputs: vec![
            Input::Table(vec![1, heads, 1, d]),
            Input::Table(vec![1, kv_heads, capacity, d]),
            Input::Table(vec![1, kv_heads, capacity, d]),
        ],
    }
}

fn swap_case(x: Vec<usize>) -> Case {
    Case {
        name: "swap_middle",
        fused: |t| crate::swap_middle(&t[0]),
        reference: |t| t[0].transpose(1, 2)?.contiguous(),
        inputs: vec![Input::Float(x, 1.0)],
    }
}

/// RoPE over the first `rotary` dimensions of each head of `x` `[b, h, t, d]`: the whole head
/// (`rope`), or part of it with the rest passed through (`rope_partial`, Phi-3).
fn rope_case(x: Vec<usize>, rotary: usize) -> Case {
    let name = if rotary == x[3] {
        "rope"
    } else {
        "rope_partial"
    };
    let table = vec![x[2], rotary / 2];
    Case {
        name,
        fused: |t| crate::rope(&t[0], &t[1], &t[2]),
        reference: |t| reference::rope(&t[0], &t[1], &t[2]),
        inputs: vec![
            Input::Float(x, 1.0),
            Input::Table(table.clone()),
            Input::Table(table),
        ],
    }
}

/// Small shapes that exercise edges: one row, decode steps (fewer queries than keys), widths
/// that are not multiples of a warp, a single-class vocabulary.
pub fn edge_cases() -> Vec<Case> {
    let float = |shape: &[usize]| Input::Float(shape.to_vec(), 1.0);
    vec![
        attention_case(vec![1, 1, 1, 4], 1),
        attention_case(vec![2, 3, 7, 8], 7),
        attention_case(vec![1, 2, 1, 16], 37),
        attention_case(vec![2, 2, 3, 16], 9),
        options_attention_case(OPTIONS, (2, 4, 2), (30, 30), 8),
        options_attention_case(OPTIONS, (1, 2, 1), (7, 7), 16),
        // The flash kernels' head sizes: windows of 20 and 40 keys, tiles wholly outside them.
        options_attention_case(OPTIONS, (2, 4, 2), (100, 100), 64),
        options_attention_case(OPTIONS_CHUNK, (1, 2, 1), (37, 200), 64),
        options_attention_case(OPTIONS, (1, 2, 2), (130, 130), 128),
        decode_window_case(2, 4, 2, 37, 16),
        decode_window_case(1, 2, 2, 3, 8),
        flash_case(2, 4, 2, 100, 100, 64),
        flash_case(1, 2, 1, 130, 130, 128),
        flash_case(1, 2, 2, 37, 200, 64),
        flash_case(1, 1, 1, 1, 3, 64),
        self_attention_case(2, 4, 2, 100, 64),
        self_attention_case(1, 2, 1, 70, 128),
        self_attention_options_case(2, 4, 2, 100, 64),
        self_attention_options_case(1, 2, 1, 150, 128),
        // Packed rows: segments across 64-key tiles, with and without a window.
        segments_attention_case::<false>((2, 4, 2), 30, 8),
        segments_attention_case::<false>((2, 4, 2), 200, 64),
        segments_attention_case::<true>((2, 4, 2), 200, 64),
        segments_attention_case::<false>((1, 2, 1), 150, 128),
        segments_attention_case::<true>((1, 2, 2), 130, 128),
        self_attention_segments_case::<false>(2, 4, 2, 200, 64),
        self_attention_segments_case::<true>(2, 4, 2, 150, 64),
        self_attention_segments_case::<false>(1, 2, 1, 130, 128),
        Case {
            name: "rms_norm",
            fused: |t| crate::rms_norm(&t[0], &t[1], 1e-5),
            reference: |t| reference::rms_norm(&t[0], &t[1], 0.0, 1e-5),
            inputs: vec![float(&[5, 17]), float(&[17])],
        },
        // Only the weight trained (the input a constant): its gradient's own kernel path.
        Case {
            name: "rms_norm",
            fused: |t| crate::rms_norm(&t[0], &t[1], 1e-5),
            reference: |t| reference::rms_norm(&t[0], &t[1], 0.0, 1e-5),
            inputs: vec![Input::Table(vec![70, 40]), float(&[40])],
        },
        rms_norm_offset_case(vec![5, 17]),
        // CUDA's held norm gradients (16-bit rows of 1,024, 1,536 and 2,048 elements): a
        // residual's held gradient, Gemma's offset with none, fewer rows than a block's warps.
        residual_norm_case::<false>(vec![3, 100, 2048]),
        rms_norm_offset_case(vec![2, 50, 1536]),
        residual_norm_case::<false>(vec![7, 1024]),
        // An f32 master weight over 16-bit rows: CUDA's kernels read its compute copy and sum
        // its gradient in f32 (each of the three weight-gradient paths).
        master_norm_case(vec![70, 40]),
        master_norm_case(vec![3, 100, 2048]),
        master_norm_case(vec![3, 10, 4096]),
        residual_norm_case::<false>(vec![5, 17]),
        residual_norm_case::<true>(vec![3, 5, 16]),
        // Training's residual add and norm: on CUDA a warp a row of at most 2, 4 or 8 16-byte
        // words a lane (40: part of a lane's words; 768; 2,048, the most in 16 bits and past
        // it in f32), else (17: not whole words; 2,056) the two ops; Gemma's offset.
        add_norm_train_case::<false, 0>(vec![3, 7, 40]),
        add_norm_train_case::<false, 1>(vec![70, 768]),
        add_norm_train_case::<true, 0>(vec![2, 50, 2048]),
        add_norm_train_case::<true, 1>(vec![9, 1024]),
        add_norm_train_case::<false, 0>(vec![5, 17]),
        add_norm_train_case::<true, 0>(vec![3, 2056]),
        qk_norm_case(vec![2, 3, 4, 8]),
        rope_case(vec![2, 3, 5, 6], 6),
        rope_case(vec![2, 3, 5, 10], 6),
        rope_case(vec![1, 2, 4, 96], 32),
        swap_case(vec![3, 5, 2, 7]),
        cast_case(vec![3, 13]),
        // Rows past whole 64-row tiles, 16-rank tiles holding two parts' ranks, columns whole
        // 64-wide tiles (the kernels on CUDA); then columns that are not, and ranks not
        // multiples of 8 (the separate ops everywhere).
        masked_lora_case::<BOTTLENECK, 8, 40, 16>(77, 192),
        masked_lora_case::<FACTOR_GRAD, 8, 40, 16>(77, 192),
        masked_lora_case::<SHARES, 8, 40, 16>(77, 192),
        masked_lora_case::<BOTTLENECK, 8, 8, 8>(70, 200),
        masked_lora_case::<FACTOR_GRAD, 8, 8, 8>(70, 200),
        masked_lora_case::<SHARES, 4, 4, 4>(5, 13),
        decode_case(2, 4, 2, 37, 16),
        add_norm_case::<0>(5, 17),
        add_norm_case::<1>(3, 17),
        // 16-byte packs, two or three per thread (4104; 8200 in bf16), and rows of more
        // packs than a block's threads hold (16400; 8200 in f32: the one-element kernel).
        add_norm_case::<0>(3, 8200),
        add_norm_case::<1>(2, 4104),
        add_norm_case::<1>(2, 16400),
        gemv_case(3, 24, 5),
        gemv_case(1, 17, 5),
        // Rows longer than a warp's round of loads, with a short last round.
        gemv_case(3, 4104, 5),
        glu_projection_case::<false>(4104, 7),
        // The norm-taking products: a batch of rows, Gemma's offset, rows of more 16-byte
        // packs than a block's threads load in one round (8200: the f32 rows then take the
        // separate ops, too long for shared memory), and a width with no 16-byte packs (the
        // separate ops).
        rms_norm_linear_case::<0>(3, 24, 5),
        rms_norm_linear_case::<1>(2, 40, 9),
        rms_norm_linear_case::<0>(2, 8200, 5),
        rms_norm_linear_case::<1>(1, 17, 5),
        rms_norm_glu_case::<false>(3, 24, 7),
        rms_norm_glu_case::<true>(1, 4104, 7),
        linear_residual_case(3, 24, 5),
        linear_residual_case(1, 4104, 7),
        linear_residual_case(2, 17, 3),
        argmax_case(3, 9000),
        argmax_case(2, 5),
        greedy_step_case(3, 9000),
        // A vocabulary of fewer features than a block's warps, and rows the separate ops take.
        head_greedy_step_case(24, 5),
        head_greedy_step_case(17, 9000),
        glu_projection_case::<false>(24, 7),
        glu_projection_case::<false>(17, 3),
        glu_projection_case::<true>(24, 7),
        glu_master_case::<false>(5, 24, 7),
        glu_master_case::<true>(5, 24, 7),
        glu_packed_case::<false>(3, 9),
        glu_packed_case::<false>(2, 16),
        glu_packed_case::<true>(3, 9),
        write_kv_case("write_kv", (2, 3, 4, 2), (8, 8)),
        write_kv_case("write_kv", (1, 1, 3, 3), (6, 6)),
        write_kv_case("write_kv_partial", (2, 3, 4, 2), (16, 12)),
        write_kv_at_case("write_kv_at", (2, 4, 2), (8, 8)),
        write_kv_at_case("write_kv_at_partial", (2, 4, 2), (16, 12)),
        decode_at_case(3, 1, 40, 16),
        // More keys than a decode block has threads; a head size the kernels read one element
        // at a time.
        decode_window_case(1, 2, 1, 1100, 6),
        cached_attention_case::<true, false>("cached_attention", (2, 4, 2), (16, 16), 40),
        cached_attention_case::<false, true>(
            "cached_attention_at_partial",
            (2, 4, 2),
            (16, 12),
            40,
        ),
        cached_attention_case::<true, true>("cached_attention_at", (1, 3, 3), (6, 6), 9),
        cached_attention_case::<false, true>("cached_attention_at", (1, 2, 1), (64, 64), 2100),
        // CUDA's tiled step (heads of 64 and 128): several tiles a warp, a batch of grouped
        // heads, a window that skips whole tiles, partial rotation.
        cached_attention_case::<true, true>("cached_attention_at", (2, 4, 2), (128, 128), 700),
        cached_attention_case::<true, false>("cached_attention", (1, 3, 1), (64, 64), 300),
        cached_attention_case::<false, false>("cached_attention_partial", (2, 2, 2), (128, 64), 45),
        decode_case(1, 3, 3, 1, 8),
        glu_case::<false>(vec![3, 5, 7]),
        glu_case::<true>(vec![3, 5, 7]),
        Case {
            name: "token_nll",
            fused: |t| crate::token_nll(&t[0], &t[1]),
            reference: |t| reference::token_nll(&t[0], &t[1]),
            inputs: vec![
                Input::Float(vec![13, 1000], 4.0),
                Input::Ids(vec![13], 1000),
            ],
        },
        Case {
            name: "token_nll",
            fused: |t| crate::token_nll(&t[0], &t[1]),
            reference: |t| reference::token_nll(&t[0], &t[1]),
            inputs: vec![float(&[4, 1]), Input::Ids(vec![4], 1)],
        },
        // Row scales of 0 and 1, as the loss weights give: skipped rows get zero gradients.
        nll_with_grad_case(7, 33, Input::Ids(vec![7], 2)),
        // CUDA's rows read once (held in registers): a block a row with threads holding
        // nothing (40), a cluster with a block past the row's end (70,000), the 1b's rows
        // (128,256), and rows wider than a cluster holds, read twice (300,000).
        nll_with_grad_case(3, 40, Input::Ids(vec![3], 2)),
        nll_with_grad_case(3, 70_000, Input::Table(vec![3])),
        nll_with_grad_case(2, 128_256, Input::Table(vec![2])),
        nll_with_grad_case(2, 300_000, Input::Table(vec![2])),
        embedding_from_host_case(9, 11, 5),
        // 4-bit weights whose values end past the last whole 16 a thread expands (168, 40).
        nf4_linear_case("nf4_linear", 5, 24, 7),
        nf4_linear_case("nf4_linear", 3, 8, 5),
    ]
}
