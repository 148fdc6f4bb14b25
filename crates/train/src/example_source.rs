//! Training and validation batches from fine-tuning examples: one example a row, padded to
//! `seq_len` with token 0 at weight 0 (causal attention keeps padding out of the real tokens).

use super::gradients::Batch;
use super::trainer::BatchSource;
use config::Sampling;
use data::jsonl::{Example, Examples};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Rows of examples: training row `k` is a pure function of the seed and `k` (each epoch
/// visits every train example once, shuffled with `Sampling::Random`), validation rows are the
/// val examples in order.
pub struct ExampleBatches<'a> {
    examples: &'a Examples,
    seq_len: usize,
    sampling: Sampling,
    seed: u64,
}

impl<'a> ExampleBatches<'a> {
    /// Batches of `seq_len` positions; examples are cut to `seq_len + 1` tokens.
    pub fn new(examples: &'a Examples, seq_len: usize, sampling: Sampling, seed: u64) -> Self {
        Self {
            examples,
            seq_len,
            sampling,
            seed,
        }
    }

    /// Which train example row `k` holds.
    fn train_index(&self, k: u64) -> usize {
        let n = self.examples.train.len() as u64;
        let (epoch, i) = (k / n, (k % n) as usize);
        match self.sampling {
            Sampling::Sequential => i,
            Sampling::Random => {
                // Fisher-Yates with a hash of (seed, epoch, position) as the random source.
                let mut order: Vec<usize> = (0..n as usize).collect();
                for j in (1..order.len()).rev() {
                    let key = [epoch.to_le_bytes(), (j as u64).to_le_bytes()].concat();
                    let pick = (xxh3_64_with_seed(&key, self.seed) % (j as u64 + 1)) as usize;
                    order.swap(j, pick);
                }
                order[i]
            }
        }
    }

    fn batch<'e>(&self, rows: impl ExactSizeIterator<Item = &'e Example>) -> Batch {
        let (n, len) = (rows.len(), self.seq_len);
        let mut inputs = Vec::with_capacity(n * len);
        let mut targets = Vec::with_capacity(n * len);
        let mut weights = Vec::with_capacity(n * len);
        for example in rows {
            let used = example.tokens.len().min(len + 1);
            let tokens = &example.tokens[..used];
            let pad = len + 1 - used.max(1);
            inputs.extend(&tokens[..used.saturating_sub(1)]);
            inputs.extend(std::iter::repeat_n(0, pad));
            targets.extend(tokens.iter().skip(1));
            targets.extend(std::iter::repeat_n(0, pad));
            weights.extend(example.weights[..used].iter().skip(1));
            weights.extend(std::iter::repeat_n(0.0, pad));
        }
        Batch {
            inputs,
            targets,
            weights: Some(weights),
            rows: n,
            seq_len: len,
        }
    }
}

impl BatchSource for ExampleBatches<'_> {
    fn train_batch(&self, cursor: u64, rows: usize) -> Result<Batch, String> {
        let train = &self.examples.train;
        Ok(self.batch((0..rows).map(|r| &train[self.train_index(cursor + r as u64)])))
    }

    fn val_batch(&self, index: u64, rows: usize) -> Result<Option<Batch>, String> {
        let val = &self.examples.val;
        let first = (index as usize).saturating_mul(rows);
        if first >= val.len() {
            return Ok(None);
        }
        Ok(Some(self.batch(val[first..].iter().take(rows))))
    }

    fn train_windows(&self) -> u64 {
        self.examples.train.len() as u64
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
        let batch = ExampleBatches::new(&set, 4, Sampling::Sequential, 0)
            .train_batch(0, 1)
            .unwrap();
        assert_eq!(batch.inputs, [5, 6, 0, 0]);
        assert_eq!(batch.targets, [6, 7, 0, 0]);
        assert_eq!(batch.weights.unwrap(), [0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn long_examples_are_cut_to_the_window() {
        let set = examples(8, 0);
        let source = ExampleBatches::new(&set, 3, Sampling::Sequential, 0);
        // Example 6 has 8 tokens: 60..68.
        let batch = source.train_batch(6, 1).unwrap();
        assert_eq!(batch.inputs, [60, 61, 62]);
        assert_eq!(batch.targets, [61, 62, 63]);
        assert_eq!(batch.weights.unwrap(), [1.0, 0.0, 1.0]);
    }

    #[test]
    fn each_epoch_visits_every_example_once_and_depends_only_on_the_seed() {
        let set = examples(10, 0);
        let source = ExampleBatches::new(&set, 8, Sampling::Random, 3);
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
        let again = ExampleBatches::new(&set, 8, Sampling::Random, 3);
        assert_eq!(source.train_batch(5, 4), again.train_batch(5, 4));
        assert_eq!(source.train_windows(), 10);
    }

    #[test]
    fn validation_is_one_sequential_pass() {
        let set = examples(2, 5);
        let source = ExampleBatches::new(&set, 8, Sampling::Random, 0);
        assert_eq!(source.val_batch(0, 2).unwrap().unwrap().rows, 2);
        assert_eq!(source.val_batch(2, 2).unwrap().unwrap().rows, 1);
        assert!(source.val_batch(3, 2).unwrap().is_none());
        let empty = examples(2, 0);
        let source = ExampleBatches::new(&empty, 8, Sampling::Random, 0);
        assert!(source.val_batch(0, 2).unwrap().is_none());
    }
}
