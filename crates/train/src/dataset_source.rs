//! Training and validation batches from a built dataset.

use super::gradients::Batch;
use super::trainer::BatchSource;
use config::Sampling;
use data::loader::{Batches, Dataset};

/// A dataset's train split (sampled as configured) and val split (sequential windows).
pub struct DatasetBatches<'a> {
    train: Batches<'a>,
    val: Option<Batches<'a>>,
    seq_len: usize,
}

impl<'a> DatasetBatches<'a> {
    /// Batches of `seq_len` tokens; the validation split is skipped when shorter than one
    /// window.
    pub fn new(
        dataset: &'a Dataset,
        seq_len: usize,
        sampling: Sampling,
        seed: u64,
    ) -> Result<Self, data::DataError> {
        Ok(Self {
            train: Batches::new(&dataset.train, seq_len, sampling, seed)?,
            val: Batches::new(&dataset.val, seq_len, Sampling::Sequential, seed).ok(),
            seq_len,
        })
    }

    /// Whether validation batches exist.
    pub fn has_validation(&self) -> bool {
        self.val.is_some()
    }

    fn to_batch(&self, (inputs, targets): (Vec<u32>, Vec<u32>), rows: usize) -> Batch {
        Batch::windows(inputs, targets, rows, self.seq_len)
    }
}

impl BatchSource for DatasetBatches<'_> {
    fn train_batch(&self, cursor: u64, rows: usize) -> Result<Batch, String> {
        Ok(self.to_batch(self.train.batch(cursor, rows), rows))
    }

    fn val_batch(&self, index: u64, rows: usize) -> Result<Option<Batch>, String> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        // One pass over the validation split at most: stop instead of wrapping around.
        let first = index * rows as u64;
        if first >= val.windows_per_epoch() {
            return Ok(None);
        }
        let rows = rows.min((val.windows_per_epoch() - first) as usize);
        Ok(Some(self.to_batch(val.batch(first, rows), rows)))
    }

    fn train_windows(&self) -> u64 {
        self.train.windows_per_epoch()
    }
}
