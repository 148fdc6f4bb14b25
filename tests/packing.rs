//! Packed fine-tuning rows: several examples in one row, each attending only to its own tokens,
//! give each example the loss it has alone, and no example's tokens reach another's.

mod common;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use llmtool::config::Sampling;
use llmtool::data::jsonl::{Example, Examples};
use llmtool::model::Llama;
use llmtool::train::example_source::ExampleBatches;
use llmtool::train::gradients::Batch;
use llmtool::train::BatchSource;

/// Examples of 10, 25, 7 and 40 tokens (tiny-llama's vocabulary), every other target scored.
fn examples() -> Examples {
    let example = |n: usize, seed: u32| Example {
        tokens: (0..n as u32).map(|t| (t * 37 + seed * 11) % 320).collect(),
        weights: (0..n).map(|t| (t % 2) as f32).collect(),
    };
    Examples {
        train: vec![
            example(10, 1),
            example(25, 2),
            example(7, 3),
            example(40, 4),
        ],
        ..Examples::default()
    }
}

fn tiny_llama() -> Llama {
    llmtool::model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu)
        .unwrap()
        .model
}

/// The last hidden states `[rows * seq_len, hidden]` and the per-position NLL of `batch`,
/// with its segments.
fn hidden_and_nll(model: &Llama, batch: &Batch) -> (Vec<Vec<f32>>, Vec<f32>) {
    let device = Device::Cpu;
    let shape = (batch.rows, batch.seq_len);
    let inputs = Tensor::from_slice(&batch.inputs, shape, &device).unwrap();
    let segments = batch.segments.as_ref().map(|starts| {
        let starts = Tensor::from_slice(starts, shape, &device).unwrap();
        llmtool::ops::Segments::new(starts).unwrap()
    });
    let mut x = model.embed(&inputs).unwrap();
    for i in 0..model.layers.len() {
        x = model.training_block(i, &x, segments.as_ref()).unwrap();
    }
    let targets = Tensor::from_slice(&batch.targets, batch.targets.len(), &device).unwrap();
    let nll = model.token_nll(&x, &targets).unwrap().to_vec1().unwrap();
    let hidden = x.flatten_to(1).unwrap().to_vec2().unwrap();
    (hidden, nll)
}

/// Each example's weighted mean NLL, in the order the rows hold them: an example is a run of
/// positions with one segment start (unpacked rows: one example a row, padding unweighted).
fn per_example_loss(batch: &Batch, nll: &[f32]) -> Vec<f64> {
    let weights = batch.weights.as_ref().unwrap();
    let mut losses = Vec::new();
    for row in 0..batch.rows {
        let mut current: Option<(u32, f64, f64)> = None;
        for pos in 0..batch.seq_len {
            let i = row * batch.seq_len + pos;
            let start = batch.segments.as_ref().map_or(0, |s| s[i]);
            if current.is_some_and(|(s, ..)| s != start) {
                let (_, sum, count) = current.take().unwrap();
                losses.push(sum / count);
            }
            let (_, sum, count) = current.get_or_insert((start, 0.0, 0.0));
            *sum += (weights[i] * nll[i]) as f64;
            *count += weights[i] as f64;
        }
        if let Some((_, sum, count)) = current.filter(|c| c.2 > 0.0) {
            losses.push(sum / count);
        }
    }
    losses
}

#[test]
fn packed_rows_give_each_example_its_own_loss() {
    let (model, set) = (tiny_llama(), examples());
    let packed = ExampleBatches::new(&set, 96, Sampling::Sequential, 0, true);
    let unpacked = ExampleBatches::new(&set, 96, Sampling::Sequential, 0, false);
    assert_eq!(packed.train_windows(), 1, "all four fit one row");
    let packed = packed.train_batch(0, 1).unwrap();
    let unpacked = unpacked.train_batch(0, 4).unwrap();
    assert_eq!(packed.real_tokens(), 9 + 24 + 6 + 39);
    assert_eq!(packed.real_tokens(), unpacked.real_tokens());
    let (_, packed_nll) = hidden_and_nll(&model, &packed);
    let (_, unpacked_nll) = hidden_and_nll(&model, &unpacked);
    let got = per_example_loss(&packed, &packed_nll);
    let want = per_example_loss(&unpacked, &unpacked_nll);
    assert_eq!(got.len(), 4);
    for (example, (got, want)) in got.iter().zip(&want).enumerate() {
        assert!(
            (got - want).abs() < 1e-5,
            "example {example}: {got} vs {want}"
        );
    }
}

#[test]
fn no_packed_example_sees_another() {
    let (model, mut set) = (tiny_llama(), examples());
    let batch = |set: &Examples| {
        ExampleBatches::new(set, 96, Sampling::Sequential, 0, true)
            .train_batch(0, 1)
            .unwrap()
    };
    let before = batch(&set);
    // The second example (positions 9..33) gets other tokens.
    set.train[1]
        .tokens
        .iter_mut()
        .for_each(|t| *t = (*t + 5) % 320);
    let after = batch(&set);
    let (before, _) = hidden_and_nll(&model, &before);
    let (after, _) = hidden_and_nll(&model, &after);
    for pos in 0..78 {
        let changed = (9..33).contains(&pos);
        assert_eq!(before[pos] != after[pos], changed, "position {pos}");
    }
}
