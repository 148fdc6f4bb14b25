//! Finding and reading the input files: roots walked in sorted order with include/exclude
//! globs (and the `.gitignore`/`.ignore` rules, as ripgrep's walk), each file read once, and
//! every file that cannot be used recorded with its reason.

use super::markdown;
use super::{sha256_hex, DataError};
use config::DataSection;
use globset::{Glob, GlobSet, GlobSetBuilder};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// One file found under the roots.
#[derive(Debug, Clone)]
pub struct InputFile {
    /// The path as the user sees it: the root joined with the path below it.
    pub path: PathBuf,
    /// File size in bytes.
    pub bytes: u64,
}

/// A file that was read (or failed to be): its hash and either its text or why it is unusable.
#[derive(Debug)]
pub struct Source {
    /// The path as the user sees it.
    pub path: PathBuf,
    /// File size in bytes.
    pub bytes: u64,
    /// `None` when the file could not be read at all.
    pub sha256: Option<String>,
    /// The decoded text, or why the file is unusable (unreadable, empty, binary, invalid UTF-8).
    pub text: Result<String, String>,
}

/// A file that contributed documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Input {
    /// The path with forward slashes.
    pub path: String,
    /// File size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub sha256: String,
    /// Documents the file contributed, before deduplication.
    pub documents: usize,
}

/// A file left out, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// The path with forward slashes.
    pub path: String,
    /// Why the file was left out (`empty file`, `shorter than data.min_chars (32)`).
    pub reason: String,
    /// SHA-256 of the file's bytes; `None` when it could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// One cleaned document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The file the document comes from.
    pub source: PathBuf,
    /// Position among the documents of its file (sections are numbered from 0).
    pub index: usize,
    /// The cleaned text.
    pub text: String,
}

impl Document {
    /// `path#index`, how the manifest names a document.
    pub fn name(&self) -> String {
        format!("{}#{}", display(&self.source), self.index)
    }
}

/// The cleaned documents of a set of files.
#[derive(Debug, Default)]
pub struct Corpus {
    /// The files that contributed documents.
    pub inputs: Vec<Input>,
    /// The documents kept, in file order, at least `data.min_chars` long.
    pub documents: Vec<Document>,
    /// The files left out, each with its reason.
    pub skipped: Vec<Skipped>,
    /// Documents dropped for being shorter than `data.min_chars`.
    pub short_documents: usize,
}

/// Cleans the markdown files under `paths` (files or folders, filtered by the include and
/// exclude globs of `data`) into documents, without deduplicating or tokenizing them; shows a
/// progress bar on a terminal.
pub fn clean_documents(paths: &[PathBuf], data: &DataSection) -> Result<Corpus, DataError> {
    let (files, unwalkable) = list_files(paths, data)?;
    let bar = crate::progress::bytes_bar(files.iter().map(|f| f.bytes).sum());
    bar.set_message(format!("cleaning {} files", files.len()));
    let sources = read_sources(&files, data.lossy_utf8);
    let mut corpus = clean_sources(sources, data, Some(&bar));
    bar.finish_and_clear();
    corpus.skipped.splice(0..0, unwalkable);
    Ok(corpus)
}

/// A path with forward slashes, as stored in the manifest.
pub fn display(path: &Path) -> String {
    path.to_string_lossy().replace('\\', "/")
}

fn glob_set(patterns: &[String]) -> Result<GlobSet, DataError> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = Glob::new(pattern).map_err(|e| DataError::Glob {
            pattern: pattern.clone(),
            message: e.kind().to_string(),
        })?;
        builder.add(glob);
    }
    builder.build().map_err(|e| DataError::Glob {
        pattern: patterns.join(", "),
        message: e.to_string(),
    })
}

/// Every file under `roots` that the globs select, in sorted order, each file once even when
/// reachable by several paths (symlinks, overlapping roots), and the paths the walk could not
/// enter (symlink loops, unreadable folders) with the reason. A root that does not exist is
/// an error.
pub fn list_files(
    roots: &[PathBuf],
    data: &DataSection,
) -> Result<(Vec<InputFile>, Vec<Skipped>), DataError> {
    let include = glob_set(&data.include)?;
    let exclude = glob_set(&data.exclude)?;
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    let mut unwalkable = Vec::new();
    for root in roots {
        if !root.exists() {
            return Err(DataError::MissingRoot(root.clone()));
        }
        for entry in walk(root) {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    unwalkable.push(walk_error(&e));
                    continue;
                }
            };
            if !entry.file_type().is_some_and(|t| t.is_file()) {
                continue;
            }
            let path = entry.path();
            let relative = path.strip_prefix(root).unwrap_or(path);
            let explicit = relative.as_os_str().is_empty();
            let name = Path::new(entry.file_name());
            let selected = explicit
                || (include.is_match(relative)
                    && !exclude.is_match(relative)
                    && !exclude.is_match(name));
            if !selected {
                continue;
            }
            let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            if seen.insert(canonical) {
                let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
                files.push(InputFile {
                    path: path.to_path_buf(),
                    bytes,
                });
            }
        }
    }
    Ok((files, unwalkable))
}

/// The entries under `root` in sorted order, following symlinks, as ripgrep walks: hidden files
/// and folders are skipped, and `.gitignore`, `.ignore` and `.git/info/exclude` rules (also
/// those of the folders above `root`, and also outside a git repository) leave out what they
/// match. `root` itself is always walked, even when a rule matches it.
pub fn walk(root: &Path) -> ignore::Walk {
    ignore::WalkBuilder::new(root)
        .follow_links(true)
        .require_git(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .build()
}

/// A path the walk could not enter, as a skipped entry.
fn walk_error(e: &ignore::Error) -> Skipped {
    let (mut path, mut error) = (String::new(), e);
    loop {
        match error {
            ignore::Error::WithPath { path: p, err } => {
                path = display(p);
                error = err;
            }
            ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
                error = err;
            }
            _ => break,
        }
    }
    let reason = match error {
        ignore::Error::Loop { ancestor, child } => {
            path = display(child);
            format!("symlink loop (back to {})", display(ancestor))
        }
        ignore::Error::Io(io) => format!("unreadable: {io}"),
        other => other.to_string(),
    };
    Skipped {
        path,
        reason,
        sha256: None,
    }
}

/// Reads every file in parallel, hashing its bytes and deciding whether its text is usable.
pub fn read_sources(files: &[InputFile], lossy_utf8: bool) -> Vec<Source> {
    files
        .par_iter()
        .map(|file| read_source(&file.path, lossy_utf8))
        .collect()
}

fn read_source(path: &Path, lossy_utf8: bool) -> Source {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            return Source {
                path: path.to_path_buf(),
                bytes: 0,
                sha256: None,
                text: Err(format!("unreadable: {e}")),
            }
        }
    };
    Source {
        path: path.to_path_buf(),
        bytes: bytes.len() as u64,
        sha256: Some(sha256_hex(&bytes)),
        text: decode(&bytes, lossy_utf8),
    }
}

fn decode(bytes: &[u8], lossy_utf8: bool) -> Result<String, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err("empty file".into());
    }
    if bytes.contains(&0) {
        return Err("binary content (NUL bytes)".into());
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(text.to_owned()),
        Err(_) if lossy_utf8 => Ok(String::from_utf8_lossy(bytes).into_owned()),
        Err(e) => Err(format!(
            "not valid UTF-8 (at byte {}); set data.lossy_utf8: true to decode it with replacement characters",
            e.valid_up_to()
        )),
    }
}

/// Cleans and chunks the usable sources, in parallel, keeping their order; `progress`
/// advances by each file's bytes.
pub fn clean_sources(
    sources: Vec<Source>,
    data: &DataSection,
    progress: Option<&indicatif::ProgressBar>,
) -> Corpus {
    let cleaned: Vec<_> = sources
        .into_par_iter()
        .map(|source| {
            let documents = source.text.as_ref().map(|text| {
                let cleaned = markdown::clean(text, data);
                let documents = markdown::documents(&cleaned.markdown, data);
                (documents, cleaned.had_front_matter)
            });
            let documents = documents.map_err(String::clone);
            if let Some(bar) = progress {
                bar.inc(source.bytes);
            }
            (source, documents)
        })
        .collect();
    let mut corpus = Corpus::default();
    for (source, outcome) in cleaned {
        let path = display(&source.path);
        let (chunks, had_front_matter) = match outcome {
            Ok(outcome) => outcome,
            Err(reason) => {
                corpus.skipped.push(Skipped {
                    path,
                    reason,
                    sha256: source.sha256,
                });
                continue;
            }
        };
        let sha256 = source.sha256.unwrap_or_default();
        if chunks.is_empty() {
            let reason = if had_front_matter {
                "front matter only"
            } else {
                "no text after cleaning"
            };
            corpus.skipped.push(Skipped {
                path,
                reason: reason.into(),
                sha256: Some(sha256),
            });
            continue;
        }
        let (long, short): (Vec<_>, Vec<_>) = chunks
            .into_iter()
            .partition(|text| text.chars().count() >= data.min_chars);
        corpus.short_documents += short.len();
        if long.is_empty() {
            corpus.skipped.push(Skipped {
                path,
                reason: format!("shorter than data.min_chars ({})", data.min_chars),
                sha256: Some(sha256),
            });
            continue;
        }
        corpus.inputs.push(Input {
            path,
            bytes: source.bytes,
            sha256,
            documents: long.len(),
        });
        corpus
            .documents
            .extend(long.into_iter().enumerate().map(|(index, text)| Document {
                source: source.path.clone(),
                index,
                text,
            }));
    }
    corpus
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> DataSection {
        DataSection {
            exclude: vec!["LICENSE*".into()],
            min_chars: 1,
            ..DataSection::default()
        }
    }

    #[test]
    fn walks_sorted_with_globs_and_reads_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/c")).unwrap();
        for name in [
            "z.md",
            "a.markdown",
            "b/c/d.md",
            "b/notes.txt",
            "LICENSE.md",
        ] {
            std::fs::write(root.join(name), "# Title\n\nSome text.\n").unwrap();
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.join("z.md"), root.join("b/alias.md")).unwrap();
            std::os::unix::fs::symlink(root, root.join("b/c/loop")).unwrap();
        }
        let roots = vec![root.to_path_buf(), root.join("z.md")];
        let (files, unwalkable) = list_files(&roots, &data()).unwrap();
        #[cfg(unix)]
        assert!(
            unwalkable[0].reason.starts_with("symlink loop"),
            "{unwalkable:?}"
        );
        let names: Vec<_> = files
            .iter()
            .map(|f| display(f.path.strip_prefix(root).unwrap()))
            .collect();
        // The symlink comes first in sorted order, so z.md (same file) is not read again.
        assert_eq!(names, ["a.markdown", "b/alias.md", "b/c/d.md"]);
    }

    #[test]
    fn ignore_rules_and_hidden_files_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in [
            "notes/a.md",
            "node_modules/pkg/README.md",
            "build/out.md",
            ".hidden/b.md",
            ".c.md",
            "notes/drafts/d.md",
        ] {
            std::fs::create_dir_all(root.join(name).parent().unwrap()).unwrap();
            std::fs::write(root.join(name), "# Title\n\nSome text.\n").unwrap();
        }
        std::fs::write(root.join(".gitignore"), "node_modules/\n").unwrap();
        std::fs::write(root.join(".ignore"), "build\n").unwrap();
        std::fs::write(root.join("notes/.gitignore"), "drafts/\n").unwrap();
        let (files, _) = list_files(&[root.to_path_buf()], &data()).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| display(f.path.strip_prefix(root).unwrap()))
            .collect();
        assert_eq!(names, ["notes/a.md"]);
        // A root is walked even when its parent's rules ignore it.
        let (files, _) = list_files(&[root.join("node_modules")], &data()).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
    }

    #[test]
    fn missing_root_is_an_error_naming_it() {
        let err = list_files(&[PathBuf::from("/no/such/dir")], &data()).unwrap_err();
        assert!(err.to_string().contains("/no/such/dir"), "{err}");
    }

    #[test]
    fn bad_bytes_get_reasons() {
        assert!(decode(b"", false).unwrap_err().contains("empty"));
        assert!(decode(b"a\0b", false).unwrap_err().contains("binary"));
        assert!(decode(b"caf\xe9", false).unwrap_err().contains("UTF-8"));
        assert_eq!(decode(b"caf\xe9", true).unwrap(), "caf\u{fffd}");
    }
}
