//! The cleaning and deduplication rules on real corpora: the Rust book (mdBook includes,
//! HTML comments, `<Listing>` tags) and tldr pages (thousands of short pages with alias
//! stubs). Skipped, with a message, when `../shared/corpus` is absent.

use llmtool::config::{DataSection, Dedup};
use llmtool::data::build::unique_documents;
use llmtool::data::clean_documents;
use std::path::PathBuf;

fn corpus(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/corpus")
        .join(name);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipping: {} is absent", path.display());
        None
    }
}

#[test]
fn rust_book_has_no_templates_comments_or_listing_tags_left() {
    let Some(book) = corpus("book") else { return };
    let data = DataSection {
        exclude: vec!["LICENSE*".into()],
        ..DataSection::default()
    };
    let corpus = clean_documents(&[book], &data).unwrap();
    assert!(
        corpus.documents.len() > 80,
        "{} documents",
        corpus.documents.len()
    );
    for doc in &corpus.documents {
        let name = doc.name();
        for leftover in [
            "{{#include",
            "{{#rustdoc_include",
            "<!--",
            "<Listing",
            "</Listing>",
        ] {
            assert!(!doc.text.contains(leftover), "{name} still has {leftover}");
        }
    }
    let with_code = corpus
        .documents
        .iter()
        .filter(|d| d.text.contains("```rust"))
        .count();
    assert!(
        with_code > 20,
        "code blocks with their info string are kept: {with_code}"
    );
}

#[test]
fn tldr_alias_stubs_are_deduplicated_and_placeholders_kept() {
    let Some(tldr) = corpus("tldr") else { return };
    let data = DataSection {
        dedup: Dedup::Near,
        near_dup_threshold: 0.4,
        ..DataSection::default()
    };
    let corpus = clean_documents(&[tldr.join("pages/common")], &data).unwrap();
    let is_stub = |text: &str| text.contains("This command is an alias of");
    let stubs = corpus.documents.iter().filter(|d| is_stub(&d.text)).count();
    let (kept, removals) = unique_documents(&corpus, &data);
    let kept_stubs = kept.iter().filter(|d| is_stub(&d.text)).count();
    assert!(stubs > 100, "{stubs} alias stubs");
    assert!(
        kept_stubs * 5 < stubs,
        "{kept_stubs} of {stubs} alias stubs kept"
    );
    assert!(removals.iter().all(|r| r.document != r.duplicate_of));
    assert!(
        kept.iter().any(|d| d.text.contains("{{path/to/")),
        "tldr placeholders are content"
    );
}
