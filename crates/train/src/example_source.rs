//! Training and validation batches from fine-tuning examples. A row holds one example, or with
//! packing several whole examples (best fit, in an order fixed by the seed), padded to
//! `seq_len` with token 0 at weight 0. Packed rows carry each position's example start, so that
//! attention stays within each example ([`ops::Segments`]).

use super::gradients::Batch;
use super::trainer::BatchSource;
use config::Sampling;
use data::jsonl::{Example, Examples};
use std::collections::BTreeSet;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Rows of examples: training row `k` is a pure function of the seed and `k` (each epoch
/// visits every train row once, shuffled with `Sampling::Random`), validation rows are the
/// val rows in order.
pub struct ExampleBatches<'a> {
    examples: &'a Examples,
    seq_len: usize,
    sampling: Sampling,
    seed: u64,
    packing: bool,
    /// The train examples of each training row, and the val examples of each validation row.
    train_rows: Vec<Vec<usize>>,
    val_rows: Vec<Vec<usize>>,
}

/// The shuffle key of the order in which examples are packed (epochs use their number).
const PACKING_ORDER: u64 = u64::MAX;

impl<'a> ExampleBatches<'a> {
    /// Batches of `seq_len` positions; examples are cut to `seq_len + 1` tokens. With
    /// `packing`, each row holds as many whole examples as fit.
    pub fn new(
        examples: &'a Examples,
        seq_len: usize,
        sampling: Sampling,
        seed: u64,
        packing: bool,
    ) -> Self {
        let rows = |set: &[Example], order: Vec<usize>| match packing {
            true => pack(set, order, seq_len),
            false => order.into_iter().map(|i| vec![i]).collect(),
        };
        let train_order = match sampling {
            Sampling::Sequential => (0..examples.train.len()).collect(),
            Sampling::Random => shuffled(examples.train.len(), PACKING_ORDER, seed),
        };
        Self {
            examples,
            seq_len,
            sampling,
            seed,
            packing,
            train_rows: rows(&examples.train, train_order),
            val_rows: rows(&examples.val, (0..examples.val.len()).collect()),
        }
    }

    /// Which training row row `k` of the stream is.
    fn train_index(&self, k: u64) -> usize {
        let n = self.train_rows.len() as u64;
        let (epoch, i) = (k / n, (k % n) as usize);
        match self.sampling {
            Sampling::Sequential => i,
            Sampling::Random => shuffled(n as usize, epoch, self.seed)[i],
        }
    }

    fn batch<'e>(&self, rows: impl ExactSizeIterator<Item = Vec<&'e Example>>) -> Batch {
        let (n, len) = (rows.len(), self.seq_len);
        let mut batch = Batch {
            inputs: Vec::with_capacity(n * len),
            targets: Vec::with_capacity(n * len),
            weights: Some(Vec::with_capacity(n * len)),
            segments: self.packing.then(|| Vec::with_capacity(n * len)),
            padding: 0,
            rows: n,
            seq_len: len,
        };
        for row in rows {
            let filled = batch.inputs.len();
            for example in row {
                push_example(&mut batch, example, len);
            }
            let used = batch.inputs.len() - filled;
            push_padding(&mut batch, len - used, used as u32);
        }
        batch
    }
}

/// Appends `example`'s positions (at most `len`) to the batch: inputs, next tokens, weights
/// and, with segments, where the example starts in its row.
fn push_example(batch: &mut Batch, example: &Example, len: usize) {
    let used = example.tokens.len().min(len + 1);
    let tokens = &example.tokens[..used];
    let start = (batch.inputs.len() % len) as u32;
    let positions = used.saturating_sub(1);
    batch.inputs.extend(&tokens[..positions]);
    batch.targets.extend(tokens.iter().skip(1));
    if let Some(weights) = batch.weights.as_mut() {
        weights.extend(example.weights[..used].iter().skip(1));
    }
    if let Some(segments) = batch.segments.as_mut() {
        segments.extend(std::iter::repeat_n(start, positions));
    }
}

/// Appends `n` padding positions (token 0 at weight 0), a segment of their own from `start`.
fn push_padding(batch: &mut Batch, n: usize, start: u32) {
    batch.inputs.extend(std::iter::repeat_n(0, n));
    batch.targets.extend(std::iter::repeat_n(0, n));
    if let Some(weights) = batch.weights.as_mut() {
        weights.extend(std::iter::repeat_n(0.0, n));
    }
    if let Some(segments) = batch.segments.as_mut() {
        segments.extend(std::iter::repeat_n(start, n));
    }
    batch.padding += n;
}

/// `0..n` shuffled (Fisher-Yates) with a hash of (seed, key, position) as the random source.
fn shuffled(n: usize, key: u64, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for j in (1..order.len()).rev() {
        let bytes = [key.to_le_bytes(), (j as u64).to_le_bytes()].concat();
        let pick = (xxh3_64_with_seed(&bytes, seed) % (j as u64 + 1)) as usize;
        order.swap(j, pick);
    }
    order
}

/// The examples of `set` in `order` packed into rows of `len` positions, best fit: each goes
/// into the fullest row it fits in, or a new row. An example takes one position per token
/// but its first (an example longer than a row fills one alone, cut as unpacked).
fn pack(set: &[Example], order: Vec<usize>, len: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (free positions, row) of every row, fullest first.
    let mut free: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let need = set[i].tokens.len().saturating_sub(1).min(len);
        let row = match free.range((need, 0)..).next().copied() {
            Some(slot @ (left, row)) => {
                free.remove(&slot);
                free.insert((left - need, row));
                row
            }
            None => {
                free.insert((len - need, rows.len()));
                rows.push(Vec::new());
                rows.len() - 1
            }
        };
        rows[row].push(i);
    }
    rows
}

impl BatchSource for ExampleBatches<'_> {
    fn train_batch(&self, cursor: u64, rows: usize) -> Result<Batch, String> {
        let train = &self.examples.train;
        let row = |r: usize| {
            let examples = &self.train_rows[self.train_index(cursor + r as u64)];
            examples.iter().map(|&i| &train[i]).collect()
        };
        Ok(self.batch((0..rows).map(row)))
    }

    fn val_batch(&self, index: u64, rows: usize) -> Result<Option<Batch>, String> {
        let val = &self.examples.val;
        let first = (index as usize).saturating_mul(rows);
        if first >= self.val_rows.len() {
            return Ok(None);
        }
        let row = |examples: &Vec<usize>| examples.iter().map(|&i| &val[i]).collect();
        Ok(Some(
            self.batch(self.val_rows[first..].iter().take(rows).map(row)),
        ))
    }

    fn train_windows(&self) -> u64 {
        self.train_rows.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(train: usize, val: usize) -> Examples {
        let example = |i: usize| Example {
            tokens: (0..=i as u32 % 7 + 1).map(|t| t + 10 * i as u32).collect(),
            weights: (0..=i % 7 + 1).map(|t| (t % 2) as f32).collect(),
        };
        Examples {
            train: (0..train).map(example).collect(),
            val: (100..100 + val).map(example).collect(),
            ..Examples::default()
        }
    }

    #[test]
    fn rows_are_shifted_padded_and_weighted() {
        let set = Examples {
            train: vec![Example {
                tokens: vec![5, 6, 7],
                weights: vec![0.0, 0.0, 1.0],
            }],
            ..Examples::default()
        };
        let batch = ExampleBatches::new(&set, 4, Sampling::Sequential, 0, false)
            .train_batch(0, 1)
            .unwrap();
        assert_eq!(batch.inputs, [5, 6, 0, 0]);
        assert_eq!(batch.targets, [6, 7, 0, 0]);
        assert_eq!(batch.weights.unwrap(), [0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn long_examples_are_cut_to_the_window() {
        let set = examples(8, 0);
        let source = ExampleBatches::new(&set, 3, Sampling::Sequential, 0, false);
        // Example 6 has 8 tokens: 60..68.
        let batch = source.train_batch(6, 1).unwrap();
        assert_eq!(batch.inputs, [60, 61, 62]);
        assert_eq!(batch.targets, [61, 62, 63]);
        assert_eq!(batch.weights.unwrap(), [1.0, 0.0, 1.0]);
    }

    #[test]
    fn each_epoch_visits_every_example_once_and_depends_only_on_the_seed() {
        let set = examples(10, 0);
        let source = ExampleBatches::new(&set, 8, Sampling::Random, 3, false);
        for epoch in 0..3u64 {
            let mut seen: Vec<usize> = (0..10)
                .map(|i| source.train_index(epoch * 10 + i))
                .collect();
            seen.sort();
            assert_eq!(seen, (0..10).collect::<Vec<_>>());
        }
        let first: Vec<usize> = (0..10).map(|k| source.train_index(k)).collect();
        let second: Vec<usize> = (10..20).map(|k| source.train_index(k)).collect();
        assert_ne!(first, second, "epochs are shuffled differently");
        let again = ExampleBatches::new(&set, 8, Sampling::Random, 3, false);
        assert_eq!(source.train_batch(5, 4), again.train_batch(5, 4));
        assert_eq!(source.train_windows(), 10);
    }

    #[test]
    fn validation_is_one_sequential_pass() {
        let set = examples(2, 5);
        let source = ExampleBatches::new(&set, 8, Sampling::Random, 0, false);
        assert_eq!(source.val_batch(0, 2).unwrap().unwrap().rows, 2);
        assert_eq!(source.val_batch(2, 2).unwrap().unwrap().rows, 1);
        assert!(source.val_batch(3, 2).unwrap().is_none());
        let empty = examples(2, 0);
        let source = ExampleBatches::new(&empty, 8, Sampling::Random, 0, false);
        assert!(source.val_batch(0, 2).unwrap().is_none());
    }

    #[test]
    fn packed_rows_hold_whole_examples_best_fit_with_their_starts() {
        // Positions needed: 4, 6, 2, 3 (an example takes one fewer than its tokens).
        let example = |n: u32, base: u32| Example {
            tokens: (base..base + n).collect(),
            weights: vec![1.0; n as usize],
        };
        let set = Examples {
            train: vec![
                example(5, 10),
                example(7, 20),
                example(3, 30),
                example(4, 40),
            ],
            ..Examples::default()
        };
        let source = ExampleBatches::new(&set, 8, Sampling::Sequential, 0, true);
        // Best fit: 6 opens a second row, 2 fills it (2 free against 4), 3 joins the first.
        assert_eq!(source.train_rows, [vec![0, 3], vec![1, 2]]);
        let batch = source.train_batch(0, 1).unwrap();
        assert_eq!(batch.inputs, [10, 11, 12, 13, 40, 41, 42, 0]);
        assert_eq!(batch.targets, [11, 12, 13, 14, 41, 42, 43, 0]);
        assert_eq!(
            batch.segments.as_deref(),
            Some(&[0, 0, 0, 0, 4, 4, 4, 7][..])
        );
        assert_eq!(
            batch.weights.as_deref().unwrap(),
            [1., 1., 1., 1., 1., 1., 1., 0.]
        );
        assert_eq!((batch.padding, batch.real_tokens()), (1, 7));
        let random = ExampleBatches::new(&set, 8, Sampling::Random, 9, true);
        let mut seen: Vec<usize> = random.train_rows.concat();
        seen.sort();
        assert_eq!(seen, [0, 1, 2, 3], "every example packed once");
    }

    #[test]
    fn an_example_longer_than_a_row_fills_one_alone() {
        let set = examples(8, 0);
        let source = ExampleBatches::new(&set, 3, Sampling::Sequential, 0, true);
        let long = source
            .train_rows
            .iter()
            .position(|r| r.contains(&6))
            .unwrap();
        assert_eq!(source.train_rows[long], [6]);
        let batch = source.train_batch(long as u64, 1).unwrap();
        assert_eq!(batch.inputs, [60, 61, 62]);
        assert_eq!(batch.segments.unwrap(), [0, 0, 0]);
    }
}
