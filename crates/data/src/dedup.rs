//! Duplicate removal and the train/validation split, both decided by each document's own
//! text, so results do not depend on which other files happen to be present.

use config::Dedup;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64_with_seed};

/// MinHash signature length: 32 bands of 4 rows. Candidates share a band; they are then
/// kept or removed by their estimated Jaccard similarity against the threshold.
const BANDS: usize = 32;
const ROWS: usize = 4;
/// Words per shingle.
const SHINGLE: usize = 3;

/// A document removed as a duplicate of an earlier one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removal {
    /// The removed document, as `path#index`.
    pub document: String,
    /// The earlier document it duplicates, as `path#index`.
    pub duplicate_of: String,
    /// Whether the texts are identical or only similar.
    pub kind: DuplicateKind,
    /// Estimated Jaccard similarity of word shingles (1 for exact duplicates).
    pub similarity: f64,
}

/// How a removed document matches the one it duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicateKind {
    /// Identical normalized text.
    Exact,
    /// MinHash-estimated similarity at or above `data.near_dup_threshold`.
    Near,
}

/// Lowercased words: what "the same text" means for deduplication.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn minhash(words: &[String]) -> Vec<u32> {
    let mut signature = vec![u32::MAX; BANDS * ROWS];
    let shingles = words.windows(SHINGLE.min(words.len()).max(1));
    for shingle in shingles {
        let key = shingle.join(" ");
        for (seed, slot) in signature.iter_mut().enumerate() {
            *slot = (*slot).min(xxh3_64_with_seed(key.as_bytes(), seed as u64) as u32);
        }
    }
    signature
}

fn similarity(a: &[u32], b: &[u32]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

/// Which documents to keep (`true`), in order, and the removals: the first occurrence in
/// input order is kept, later copies are removed naming it.
pub fn deduplicate(
    texts: &[&str],
    names: &[String],
    mode: Dedup,
    threshold: f64,
) -> (Vec<bool>, Vec<Removal>) {
    let mut keep = vec![true; texts.len()];
    let mut removals = Vec::new();
    if mode == Dedup::None {
        return (keep, Vec::new());
    }
    let tokenized: Vec<Vec<String>> = texts.par_iter().map(|t| words(t)).collect();
    let mut exact: HashMap<u128, usize> = HashMap::new();
    for (i, w) in tokenized.iter().enumerate() {
        let key = xxh3_128(w.join(" ").as_bytes());
        if let Some(&first) = exact.get(&key) {
            keep[i] = false;
            removals.push((
                i,
                Removal {
                    document: names[i].clone(),
                    duplicate_of: names[first].clone(),
                    kind: DuplicateKind::Exact,
                    similarity: 1.0,
                },
            ));
        } else {
            exact.insert(key, i);
        }
    }
    if mode == Dedup::Near {
        let signatures: Vec<Vec<u32>> = tokenized.par_iter().map(|w| minhash(w)).collect();
        let mut buckets: HashMap<(usize, u64), Vec<usize>> = HashMap::new();
        for i in 0..texts.len() {
            if !keep[i] {
                continue;
            }
            let bands: Vec<(usize, u64)> = signatures[i]
                .chunks(ROWS)
                .enumerate()
                .map(|(band, rows)| (band, xxh3_64_with_seed(bytemuck_u32(rows).as_slice(), 0)))
                .collect();
            let best = bands
                .iter()
                .filter_map(|key| buckets.get(key))
                .flatten()
                .map(|&j| (j, similarity(&signatures[i], &signatures[j])))
                .filter(|&(_, s)| s >= threshold)
                .min_by_key(|&(j, _)| j);
            match best {
                Some((j, s)) => {
                    keep[i] = false;
                    removals.push((
                        i,
                        Removal {
                            document: names[i].clone(),
                            duplicate_of: names[j].clone(),
                            kind: DuplicateKind::Near,
                            similarity: s,
                        },
                    ));
                }
                None => {
                    for key in bands {
                        buckets.entry(key).or_default().push(i);
                    }
                }
            }
        }
    }
    removals.sort_by_key(|(i, _)| *i);
    (keep, removals.into_iter().map(|(_, r)| r).collect())
}

fn bytemuck_u32(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A document's place in the validation order: a hash of its text, in [0, 1].
fn validation_score(text: &str) -> f64 {
    xxh3_64_with_seed(text.as_bytes(), 0x5eed) as f64 / u64::MAX as f64
}

/// Whether a document belongs to the validation split: a hash of its text, compared with
/// `val_fraction`. Depends on nothing else, so adding files never moves a document.
pub fn is_validation(text: &str, val_fraction: f64) -> bool {
    validation_score(text) < val_fraction
}

/// The fewest documents a validation split holds when the corpus has enough: one or two
/// documents make a validation loss that swings with whichever file they are.
pub const MIN_VALIDATION_DOCUMENTS: usize = 4;

/// Which documents form the validation split: those [`is_validation`] picks, topped up (in
/// the same hash order) to [`MIN_VALIDATION_DOCUMENTS`], or to a quarter of the corpus if that
/// is fewer. `val_fraction: 0` means no validation split at all.
pub fn validation_split(texts: &[&str], val_fraction: f64) -> Vec<bool> {
    let scores: Vec<f64> = texts.iter().map(|t| validation_score(t)).collect();
    let mut split: Vec<bool> = scores.iter().map(|s| *s < val_fraction).collect();
    if val_fraction <= 0.0 {
        return split;
    }
    let wanted = MIN_VALIDATION_DOCUMENTS.min(texts.len() / 4);
    let mut order: Vec<usize> = (0..texts.len()).filter(|i| !split[*i]).collect();
    order.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]));
    let missing = wanted.saturating_sub(split.iter().filter(|v| **v).count());
    for i in order.into_iter().take(missing) {
        split[i] = true;
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_corpus_still_gets_a_few_validation_documents() {
        let docs: Vec<String> = (0..20).map(|i| format!("document number {i}")).collect();
        let texts: Vec<&str> = docs.iter().map(String::as_str).collect();
        let by_hash = texts.iter().filter(|t| is_validation(t, 0.05)).count();
        assert!(by_hash < MIN_VALIDATION_DOCUMENTS, "{by_hash}");
        let split = validation_split(&texts, 0.05);
        assert_eq!(
            split.iter().filter(|v| **v).count(),
            MIN_VALIDATION_DOCUMENTS
        );
        // The hash picks stay picked: adding the top-up never moves a document out.
        for (t, v) in texts.iter().zip(&split) {
            assert!(*v || !is_validation(t, 0.05));
        }
        // A quarter of a tiny corpus at most; none when asked for none.
        assert_eq!(
            validation_split(&texts[..6], 0.05)
                .iter()
                .filter(|v| **v)
                .count(),
            1
        );
        assert!(!validation_split(&texts, 0.0).contains(&true));
        // A big share is left as the hash decides.
        let half = validation_split(&texts, 0.5).iter().filter(|v| **v).count();
        assert_eq!(half, texts.iter().filter(|t| is_validation(t, 0.5)).count());
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("doc{i}")).collect()
    }

    #[test]
    fn exact_duplicates_ignore_case_and_spacing() {
        let texts = [
            "Hello   World, again.",
            "unique text here",
            "hello world again",
        ];
        let (keep, removals) = deduplicate(&texts, &names(3), Dedup::Exact, 0.8);
        assert_eq!(keep, [true, true, false]);
        assert_eq!(removals[0].duplicate_of, "doc0");
        assert_eq!(removals[0].kind, DuplicateKind::Exact);
    }

    #[test]
    fn near_duplicates_removed_distinct_kept() {
        let base = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat in the sun all afternoon long";
        let near = base.replace("afternoon", "morning");
        let other = "markdown documents become token shards after cleaning deduplication and tokenization with a byte level bpe";
        let texts = [base, near.as_str(), other];
        let (keep, removals) = deduplicate(&texts, &names(3), Dedup::Near, 0.8);
        assert_eq!(keep, [true, false, true]);
        assert_eq!(removals[0].kind, DuplicateKind::Near);
        assert!(removals[0].similarity >= 0.8);
        let (keep, _) = deduplicate(&texts, &names(3), Dedup::Exact, 0.8);
        assert_eq!(keep, [true, true, true]);
    }

    #[test]
    fn alias_stubs_are_near_duplicates() {
        let stub = |name: &str, target: &str| {
            format!("# {name}\n\n> This command is an alias of `{target}`.\n\n- View documentation for the original command:\n\n`tldr {target}`")
        };
        let texts = [
            stub("gmake", "make"),
            stub("gtruncate", "truncate"),
            stub("gls", "ls"),
        ];
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        // Three words in sixteen differ: a true shingle Jaccard of about 0.47, so template
        // stubs like these need a threshold below the default 0.8 (see docs/data.md).
        let (keep, removals) = deduplicate(&refs, &names(3), Dedup::Near, 0.4);
        assert!(removals.iter().all(|r| r.duplicate_of == "doc0"));
        assert_eq!(keep, [true, false, false]);
    }

    #[test]
    fn split_is_stable_when_files_are_added() {
        let docs: Vec<String> = (0..2000).map(|i| format!("document number {i}")).collect();
        let before: Vec<bool> = docs.iter().map(|d| is_validation(d, 0.1)).collect();
        let share = before.iter().filter(|&&v| v).count() as f64 / docs.len() as f64;
        assert!((0.07..0.13).contains(&share), "{share}");
        let mut more = docs.clone();
        more.extend((0..500).map(|i| format!("new file {i}")));
        let after: Vec<bool> = more.iter().map(|d| is_validation(d, 0.1)).collect();
        assert_eq!(before, after[..docs.len()]);
    }
}
