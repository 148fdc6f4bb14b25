//! The dataset on disk: packed token shards (`train-00000.bin`, `val-00000.bin`, u16 or u32
//! little-endian) and `manifest.json`, written into a staging folder that replaces the old
//! dataset only once complete.

use super::corpus::{Input, Skipped};
use super::dedup::Removal;
use super::DataError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bumped whenever the layout or the meaning of a manifest field changes.
pub const FORMAT_VERSION: u32 = 1;
/// Tokens per shard file at most (256 MiB of u32, 128 MiB of u16).
pub const SHARD_TOKENS: usize = 64 << 20;
/// File name of the manifest in a dataset folder.
pub const MANIFEST: &str = "manifest.json";
/// File name of the dataset's tokenizer in a dataset folder.
pub const TOKENIZER: &str = "tokenizer.json";

/// How token ids are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenDtype {
    /// Two bytes per id, little-endian: vocabularies of at most 65536 tokens.
    U16,
    /// Four bytes per id, little-endian.
    U32,
}

impl TokenDtype {
    /// u16 when every id of a `vocab_size` vocabulary fits.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            Self::U16
        } else {
            Self::U32
        }
    }

    /// Bytes per stored token id.
    pub fn width(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }

    fn encode(self, tokens: &[u32]) -> Vec<u8> {
        match self {
            Self::U16 => tokens
                .iter()
                .flat_map(|&t| (t as u16).to_le_bytes())
                .collect(),
            Self::U32 => tokens.iter().flat_map(|&t| t.to_le_bytes()).collect(),
        }
    }
}

/// The tokenizer a dataset was built with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// File name of the copy in the dataset folder (`tokenizer.json`).
    pub file: String,
    /// SHA-256 of that file, lowercase hex.
    pub sha256: String,
    /// `trained` or the path of the `tokenizer.json` it was copied from.
    pub source: String,
    /// Tokens in the vocabulary, added tokens included.
    pub vocab_size: usize,
    /// The token appended after each document.
    pub eos_token: String,
    /// Id of `eos_token`.
    pub eos_id: u32,
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name in the dataset folder (`train-00000.bin`).
    pub file: String,
    /// Token ids the file holds.
    pub tokens: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
}

/// One split: its documents and the shards holding their tokens, EOS after each document.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SplitInfo {
    /// Documents in the split.
    pub documents: usize,
    /// Tokens in the split, EOS included.
    pub tokens: u64,
    /// The shard files, in order.
    pub shards: Vec<ShardInfo>,
}

/// Totals over the whole build.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Files that contributed documents.
    pub files: usize,
    /// Files left out (listed in [`Manifest::skipped`]).
    pub skipped_files: usize,
    /// Bytes of every input file read, skipped ones included.
    pub bytes: u64,
    /// Documents kept (after deduplication).
    pub documents: usize,
    /// Documents dropped for being shorter than `data.min_chars`.
    pub short_documents: usize,
    /// Documents removed as duplicates.
    pub duplicates: usize,
    /// Characters (Unicode scalar values) in the kept documents.
    pub chars: u64,
    /// Tokens in both splits, EOS included.
    pub tokens: u64,
    /// `chars / tokens`: how much text a token holds on average.
    pub chars_per_token: f64,
}

/// Documents whose token count (EOS excluded) lies in `[min_tokens, max_tokens]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthBucket {
    /// Shortest length in the bucket, in tokens.
    pub min_tokens: u64,
    /// Longest length in the bucket, in tokens.
    pub max_tokens: u64,
    /// Documents in the bucket.
    pub documents: usize,
}

/// `manifest.json`: what went in, what came out, and everything needed to tell whether a
/// rebuild would change anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The [`FORMAT_VERSION`] the dataset was written with.
    pub format_version: u32,
    /// SHA-256 over the inputs' hashes, the settings and the tokenizer source: equal
    /// fingerprints mean a rebuild would write the same bytes.
    pub fingerprint: String,
    /// The `data` section that built the dataset (less `dataset_dir`), with the vocabulary size.
    pub settings: serde_json::Value,
    /// The tokenizer the documents were encoded with.
    pub tokenizer: TokenizerInfo,
    /// How the shards store token ids.
    pub token_dtype: TokenDtype,
    /// Totals over the whole build.
    pub counts: Counts,
    /// The training split.
    pub train: SplitInfo,
    /// The validation split.
    pub val: SplitInfo,
    /// Document lengths in power-of-two token buckets.
    pub length_histogram: Vec<LengthBucket>,
    /// The files that contributed documents.
    pub inputs: Vec<Input>,
    /// The files left out, each with its reason.
    pub skipped: Vec<Skipped>,
    /// The documents removed as duplicates, each with the one it duplicates.
    pub duplicates: Vec<Removal>,
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| DataError::Manifest {
            path,
            message: e.to_string(),
        })
    }
}

/// Power-of-two buckets of document lengths in tokens.
pub fn length_histogram(lengths: impl IntoIterator<Item = u64>) -> Vec<LengthBucket> {
    let mut counts: Vec<usize> = Vec::new();
    for len in lengths {
        let bucket = (u64::BITS - len.leading_zeros()) as usize;
        if counts.len() <= bucket {
            counts.resize(bucket + 1, 0);
        }
        counts[bucket] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .filter(|(_, n)| *n > 0)
        .map(|(bucket, documents)| LengthBucket {
            min_tokens: if bucket == 0 { 0 } else { 1 << (bucket - 1) },
            max_tokens: if bucket == 0 { 0 } else { (1 << bucket) - 1 },
            documents,
        })
        .collect()
}

/// The name prefix of staging folders.
const STAGING_PREFIX: &str = ".dataset-staging-";

/// The file in a staging folder that its builder holds locked while it lives.
const OWNER_FILE: &str = ".owner";

/// A staging folder without an owner file (a build killed before it made one) older than this
/// is a leftover.
const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// A dataset being written in a staging folder next to its destination.
pub struct Staging {
    dir: tempfile::TempDir,
    dest: PathBuf,
    /// Locked while this build lives: a later build removes staging folders whose owner file
    /// it can lock (their builder died) and leaves the others alone.
    _owner: std::fs::File,
}

impl Staging {
    /// Starts a dataset at `dest`. An existing folder there must be a dataset (or hold only
    /// a `tokenizer.json`): anything else is not overwritten. First removes what killed builds
    /// left beside it.
    pub fn new(dest: &Path) -> Result<Self, DataError> {
        check_replaceable(dest)?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| DataError::io(&parent, e))?;
        remove_leftovers(&parent, dest).map_err(|e| DataError::io(&parent, e))?;
        let mut builder = tempfile::Builder::new();
        builder.prefix(STAGING_PREFIX);
        // As mkdir(2) makes folders (0777 less the umask), not tempfile's 0700.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o777));
        }
        let dir = builder
            .tempdir_in(&parent)
            .map_err(|e| DataError::io(&parent, e))?;
        let owner_path = dir.path().join(OWNER_FILE);
        let owner =
            std::fs::File::create(&owner_path).map_err(|e| DataError::io(&owner_path, e))?;
        owner
            .try_lock()
            .map_err(|e| DataError::io(&owner_path, std::io::Error::other(e.to_string())))?;
        Ok(Self {
            dir,
            dest: dest.to_path_buf(),
            _owner: owner,
        })
    }

    /// Writes `bytes` to the file `name` in the staging folder.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), DataError> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))
    }

    /// Writes `tokens` as shards named `{split}-NNNNN.bin`.
    pub fn write_split(
        &self,
        split: &str,
        tokens: &[u32],
        dtype: TokenDtype,
        documents: usize,
    ) -> Result<SplitInfo, DataError> {
        let mut shards = Vec::new();
        for (i, chunk) in tokens.chunks(SHARD_TOKENS).enumerate() {
            let file = format!("{split}-{i:05}.bin");
            let bytes = dtype.encode(chunk);
            self.write(&file, &bytes)?;
            shards.push(ShardInfo {
                file,
                tokens: chunk.len() as u64,
                sha256: super::sha256_hex(&bytes),
            });
        }
        Ok(SplitInfo {
            documents,
            tokens: tokens.len() as u64,
            shards,
        })
    }

    /// Moves the finished dataset into place, replacing the old one.
    pub fn commit(self) -> Result<(), DataError> {
        let staged = self.dir.keep();
        let dest = &self.dest;
        let old = dest.with_file_name(format!(
            ".{}.old-{}",
            dest.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let replacing = dest.exists();
        if replacing {
            std::fs::rename(dest, &old).map_err(|e| DataError::io(dest, e))?;
        }
        if let Err(e) = std::fs::rename(&staged, dest) {
            if replacing {
                let _ = std::fs::rename(&old, dest);
            }
            let _ = std::fs::remove_dir_all(&staged);
            return Err(DataError::io(dest, e));
        }
        let owner = dest.join(OWNER_FILE);
        std::fs::remove_file(&owner).map_err(|e| DataError::io(&owner, e))?;
        if replacing {
            remove_if_there(&old).map_err(|e| DataError::io(&old, e))?;
        }
        Ok(())
    }
}

/// Removes what killed builds left in `parent`: staging folders whose builder is gone, and
/// the previous dataset a build had moved aside (`.NAME.old-PID`) while `dest` exists. A
/// build killed between moving the old dataset aside and putting the new one in place left
/// only the old one: it is put back.
fn remove_leftovers(parent: &Path, dest: &Path) -> std::io::Result<()> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let old_prefix = format!(".{name}.old-");
    for entry in std::fs::read_dir(parent)? {
        let entry = entry?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if file_name.starts_with(STAGING_PREFIX) && is_abandoned(&path)? {
            remove_if_there(&path)?;
        } else if file_name.starts_with(&old_prefix) {
            match dest.exists() {
                true => remove_if_there(&path)?,
                false => std::fs::rename(&path, dest)?,
            }
        }
    }
    Ok(())
}

/// Whether a staging folder's builder is gone: its owner file can be locked, or it never made
/// one and the folder is older than [`ORPHAN_AGE`].
fn is_abandoned(staging: &Path) -> std::io::Result<bool> {
    match std::fs::File::open(staging.join(OWNER_FILE)) {
        Ok(owner) => Ok(owner.try_lock().is_ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let age = std::fs::metadata(staging)?.modified()?.elapsed();
            Ok(age.is_ok_and(|age| age > ORPHAN_AGE))
        }
        Err(e) => Err(e),
    }
}

/// Removes a folder, which another process may have removed first.
fn remove_if_there(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn check_replaceable(dest: &Path) -> Result<(), DataError> {
    let Ok(entries) = std::fs::read_dir(dest) else {
        return Ok(());
    };
    let names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() || names.iter().any(|n| n == MANIFEST) || names == [TOKENIZER] {
        Ok(())
    } else {
        Err(DataError::Output {
            path: dest.to_path_buf(),
            message:
                "exists and is not a dataset (no manifest.json); remove it or set data.dataset_dir"
                    .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_dead_builds_are_removed_and_live_ones_kept() {
        let parent = tempfile::tempdir().unwrap();
        let p = parent.path();
        let staging = |name: &str| {
            let dir = p.join(format!("{STAGING_PREFIX}{name}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("train-00000.bin"), b"1234").unwrap();
            std::fs::File::create(dir.join(OWNER_FILE)).unwrap()
        };
        drop(staging("dead"));
        let live = staging("live");
        live.try_lock().unwrap();
        let fresh_orphan = p.join(format!("{STAGING_PREFIX}no-owner"));
        std::fs::create_dir(&fresh_orphan).unwrap();
        let dest = p.join("ds");
        std::fs::create_dir(&dest).unwrap();
        std::fs::create_dir(p.join(".ds.old-999")).unwrap();
        remove_leftovers(p, &dest).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [".dataset-staging-live", ".dataset-staging-no-owner", "ds"]
        );
        // Killed between moving the old dataset aside and putting the new one in place.
        std::fs::rename(&dest, p.join(".ds.old-998")).unwrap();
        remove_leftovers(p, &dest).unwrap();
        assert!(dest.is_dir() && !p.join(".ds.old-998").exists());
    }

    #[test]
    fn dtype_follows_vocab_size() {
        assert_eq!(TokenDtype::for_vocab(16384), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65536), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65537), TokenDtype::U32);
        assert_eq!(TokenDtype::U16.encode(&[1, 65535]), [1, 0, 255, 255]);
        assert_eq!(TokenDtype::U32.encode(&[70000]), 70000u32.to_le_bytes());
    }

    #[test]
    fn histogram_buckets_are_powers_of_two() {
        let h = length_histogram([0, 1, 3, 4, 100]);
        let spans: Vec<_> = h
            .iter()
            .map(|b| (b.min_tokens, b.max_tokens, b.documents))
            .collect();
        assert_eq!(
            spans,
            [(0, 0, 1), (1, 1, 1), (2, 3, 1), (4, 7, 1), (64, 127, 1)]
        );
    }

    #[test]
    fn refuses_to_replace_a_folder_that_is_not_a_dataset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.md"), "mine").unwrap();
        assert!(Staging::new(dir.path()).is_err());
    }
}
