//! Reading the files to score: markdown goes through the data pipeline's cleaning so that
//! evaluation sees text the way training did; `.txt` files are read as they are.

use super::Document;
use std::path::{Path, PathBuf};

/// Errors reading evaluation inputs.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A path could not be read.
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    /// Nothing to score.
    #[error("no .md, .markdown or .txt files under {0}")]
    Empty(String),
}

const EXTENSIONS: [&str; 3] = ["md", "markdown", "txt"];

fn has_text_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The documents in `paths`: files as given (any extension; markdown by extension), folders
/// walked for `.md`, `.markdown` and `.txt` files in sorted order.
pub fn read_documents(paths: &[PathBuf]) -> Result<Vec<Document>, InputError> {
    let mut files = Vec::new();
    for path in paths {
        let read_error = |message: String| InputError::Read {
            path: path.clone(),
            message,
        };
        if path.is_dir() {
            let mut found: Vec<PathBuf> = walkdir::WalkDir::new(path)
                .sort_by_file_name()
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| read_error(e.to_string()))?
                .into_iter()
                .filter(|e| e.file_type().is_file() && has_text_extension(e.path()))
                .map(|e| e.into_path())
                .collect();
            files.append(&mut found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(read_error("no such file or folder".into()));
        }
    }
    if files.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(InputError::Empty(names.join(", ")));
    }
    files.iter().map(|f| read_document(f)).collect()
}

fn read_document(path: &Path) -> Result<Document, InputError> {
    let text = std::fs::read_to_string(path).map_err(|e| InputError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let is_markdown = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "md" | "markdown"));
    Ok(Document {
        name: path.display().to_string(),
        text: if is_markdown {
            clean_markdown(&text)
        } else {
            text
        },
    })
}

/// The data pipeline's markdown cleaning. Until `data::markdown` lands this keeps the source
/// as it is, so scores on markdown are over raw markdown.
fn clean_markdown(text: &str) -> String {
    text.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_walked_in_order_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.md"), "# B").unwrap();
        std::fs::write(dir.path().join("a.txt"), "a").unwrap();
        std::fs::write(dir.path().join("c.bin"), "x").unwrap();
        let docs = read_documents(&[dir.path().to_path_buf()]).unwrap();
        let names: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(names, ["a", "# B"]);
        let missing = read_documents(&[dir.path().join("nope")]).unwrap_err();
        assert!(missing.to_string().contains("no such file"));
        let empty = tempfile::tempdir().unwrap();
        assert!(read_documents(&[empty.path().to_path_buf()]).is_err());
    }
}
