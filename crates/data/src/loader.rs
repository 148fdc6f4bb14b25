//! Reading a dataset back for training: memory-mapped shards and a batch sampler that is a
//! pure function of (seed, cursor), so a resumed run sees exactly the data it would have.

use super::shards::{Manifest, SplitInfo, TokenDtype, TOKENIZER};
use super::DataError;
use config::Sampling;
use memmap2::Mmap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A built dataset: its manifest, tokenizer and both splits.
pub struct Dataset {
    /// The dataset folder.
    pub dir: PathBuf,
    /// Its `manifest.json`.
    pub manifest: Manifest,
    /// The tokenizer the shards were encoded with.
    pub tokenizer: Tokenizer,
    /// The training split's tokens.
    pub train: TokenShards,
    /// The validation split's tokens.
    pub val: TokenShards,
}

impl Dataset {
    /// Opens `dir`: reads `manifest.json` and `tokenizer.json`, maps every shard and checks
    /// its size against the manifest.
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let manifest = Manifest::read(dir)?;
        let tokenizer_path = dir.join(TOKENIZER);
        let bytes =
            std::fs::read(&tokenizer_path).map_err(|e| DataError::io(&tokenizer_path, e))?;
        // Another tokenizer gives the stored token ids other meanings.
        if super::sha256_hex(&bytes) != manifest.tokenizer.sha256 {
            return Err(DataError::Tokenizer {
                path: tokenizer_path,
                message: "is not the tokenizer this dataset was tokenized with (its sha256 \
                          differs from manifest.json's): rebuild with `llmtool data build CONFIG \
                          --force`"
                    .into(),
            });
        }
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| DataError::Tokenizer {
            path: tokenizer_path,
            message: e.to_string(),
        })?;
        let train = TokenShards::open(dir, "train", &manifest.train, manifest.token_dtype)?;
        let val = TokenShards::open(dir, "val", &manifest.val, manifest.token_dtype)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            tokenizer,
            train,
            val,
        })
    }

    /// The end-of-text token placed after every document.
    pub fn eos_id(&self) -> u32 {
        self.manifest.tokenizer.eos_id
    }

    /// The tokenizer's vocabulary size (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.manifest.tokenizer.vocab_size
    }
}

/// The token stream of one split, over its memory-mapped shard files.
pub struct TokenShards {
    split: String,
    maps: Vec<Mmap>,
    /// Token offset at which each shard starts.
    starts: Vec<u64>,
    len: u64,
    dtype: TokenDtype,
}

impl TokenShards {
    fn open(
        dir: &Path,
        split: &str,
        info: &SplitInfo,
        dtype: TokenDtype,
    ) -> Result<Self, DataError> {
        let mut maps = Vec::new();
        let mut starts = Vec::new();
        let mut len = 0;
        for shard in &info.shards {
            let path = dir.join(&shard.file);
            let file = std::fs::File::open(&path).map_err(|e| DataError::io(&path, e))?;
            // SAFETY: shards are written once, renamed into place and never modified; a
            // dataset is rebuilt by replacing the folder, which leaves open maps valid.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(&path, e))?;
            let expected = shard.tokens * dtype.width() as u64;
            if map.len() as u64 != expected {
                return Err(DataError::Shard {
                    path,
                    message: format!("{} bytes, but the manifest says {} tokens ({expected} bytes): rebuild with `llmtool data build --force`", map.len(), shard.tokens),
                });
            }
            starts.push(len);
            len += shard.tokens;
            maps.push(map);
        }
        Ok(Self {
            split: split.into(),
            maps,
            starts,
            len,
            dtype,
        })
    }

    /// Tokens in the split.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the split holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `train` or `val`.
    pub fn split(&self) -> &str {
        &self.split
    }

    /// `count` tokens starting at `start`, across shard boundaries. Panics past the end,
    /// which only a caller bug can cause (the sampler stays in range).
    pub fn read(&self, start: u64, count: usize) -> Vec<u32> {
        assert!(
            start + count as u64 <= self.len,
            "read past the end of the {} split",
            self.split
        );
        let mut out = Vec::with_capacity(count);
        let mut at = start;
        while out.len() < count {
            let shard = self.starts.partition_point(|&s| s <= at) - 1;
            let map = &self.maps[shard];
            let offset = (at - self.starts[shard]) as usize;
            let available = map.len() / self.dtype.width() - offset;
            let take = available.min(count - out.len());
            let width = self.dtype.width();
            let bytes = &map[offset * width..(offset + take) * width];
            match self.dtype {
                TokenDtype::U16 => out.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32),
                ),
                TokenDtype::U32 => out.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
            }
            at += take as u64;
        }
        out
    }
}

/// Training batches drawn from a split. Window `k` (of `seq_len + 1` tokens) depends only on
/// the seed and `k`; `batch(cursor, b)` uses windows `cursor .. cursor + b`, so the trainer
/// stores the cursor (advancing it by the batch size each step) to resume exactly.
pub struct Batches<'a> {
    tokens: &'a TokenShards,
    seq_len: usize,
    sampling: Sampling,
    seed: u64,
}

impl<'a> Batches<'a> {
    /// A sampler over `tokens`; the split must hold at least `seq_len + 1` tokens.
    pub fn new(
        tokens: &'a TokenShards,
        seq_len: usize,
        sampling: Sampling,
        seed: u64,
    ) -> Result<Self, DataError> {
        let needed = seq_len as u64 + 1;
        if seq_len == 0 || tokens.len() < needed {
            return Err(DataError::TooShort {
                split: tokens.split.clone(),
                tokens: tokens.len(),
                needed,
            });
        }
        Ok(Self {
            tokens,
            seq_len,
            sampling,
            seed,
        })
    }

    /// Non-overlapping windows in one pass over the split (what one epoch means).
    pub fn windows_per_epoch(&self) -> u64 {
        (self.tokens.len() - 1) / self.seq_len as u64
    }

    /// The first token of window `k`.
    fn window_start(&self, k: u64) -> u64 {
        match self.sampling {
            Sampling::Random => {
                let starts = self.tokens.len() - self.seq_len as u64;
                xxh3_64_with_seed(&k.to_le_bytes(), self.seed) % starts
            }
            Sampling::Sequential => (k % self.windows_per_epoch()) * self.seq_len as u64,
        }
    }

    /// Inputs and targets (shifted by one), each `batch_size * seq_len` tokens, row-major.
    pub fn batch(&self, cursor: u64, batch_size: usize) -> (Vec<u32>, Vec<u32>) {
        let mut inputs = Vec::with_capacity(batch_size * self.seq_len);
        let mut targets = Vec::with_capacity(batch_size * self.seq_len);
        for k in cursor..cursor + batch_size as u64 {
            let window = self.tokens.read(self.window_start(k), self.seq_len + 1);
            inputs.extend_from_slice(&window[..self.seq_len]);
            targets.extend_from_slice(&window[1..]);
        }
        (inputs, targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A split of tokens 0..n in shards of `per_shard`.
    fn shards(n: u32, per_shard: usize, dtype: TokenDtype) -> (tempfile::TempDir, TokenShards) {
        let dir = tempfile::tempdir().unwrap();
        let tokens: Vec<u32> = (0..n).collect();
        let mut info = SplitInfo::default();
        for (i, chunk) in tokens.chunks(per_shard).enumerate() {
            let file = format!("train-{i:05}.bin");
            let bytes: Vec<u8> = match dtype {
                TokenDtype::U16 => chunk
                    .iter()
                    .flat_map(|&t| (t as u16).to_le_bytes())
                    .collect(),
                TokenDtype::U32 => chunk.iter().flat_map(|&t| t.to_le_bytes()).collect(),
            };
            std::fs::write(dir.path().join(&file), bytes).unwrap();
            info.shards.push(super::super::shards::ShardInfo {
                file,
                tokens: chunk.len() as u64,
                sha256: String::new(),
            });
        }
        let shards = TokenShards::open(dir.path(), "train", &info, dtype).unwrap();
        (dir, shards)
    }

    #[test]
    fn reads_across_shards_in_both_widths() {
        for dtype in [TokenDtype::U16, TokenDtype::U32] {
            let (_dir, shards) = shards(100, 30, dtype);
            assert_eq!(shards.len(), 100);
            assert_eq!(shards.read(25, 10), (25..35).collect::<Vec<u32>>());
        }
    }

    #[test]
    fn sequential_windows_are_consecutive_and_wrap() {
        let (_dir, shards) = shards(100, 40, TokenDtype::U16);
        let batches = Batches::new(&shards, 10, Sampling::Sequential, 0).unwrap();
        assert_eq!(batches.windows_per_epoch(), 9);
        let (inputs, targets) = batches.batch(0, 2);
        assert_eq!(inputs, (0..20).collect::<Vec<u32>>());
        assert_eq!(targets, (1..21).collect::<Vec<u32>>());
        assert_eq!(batches.batch(9, 1), batches.batch(0, 1));
    }

    #[test]
    fn random_batches_depend_only_on_seed_and_cursor() {
        let (_dir, shards) = shards(1000, 300, TokenDtype::U32);
        let a = Batches::new(&shards, 16, Sampling::Random, 7).unwrap();
        // Resuming at cursor 12 gives what a run that drew batches 0..12 first would see.
        let run: Vec<_> = (0..4).map(|step| a.batch(step * 4, 4)).collect();
        let resumed = Batches::new(&shards, 16, Sampling::Random, 7).unwrap();
        assert_eq!(resumed.batch(12, 4), run[3]);
        let (inputs, targets) = &run[0];
        assert_eq!(inputs.len(), 64);
        assert_eq!(inputs[1..16], targets[..15]);
        let other = Batches::new(&shards, 16, Sampling::Random, 8).unwrap();
        assert_ne!(other.batch(0, 4), run[0]);
    }

    #[test]
    fn split_shorter_than_a_window_is_an_error() {
        let (_dir, shards) = shards(10, 10, TokenDtype::U16);
        let err = Batches::new(&shards, 10, Sampling::Random, 0)
            .err()
            .unwrap();
        assert!(err.to_string().contains("seq_len + 1 = 11"), "{err}");
    }
}
