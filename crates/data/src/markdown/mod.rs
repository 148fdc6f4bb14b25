//! Markdown cleaning driven by pulldown-cmark events. The parser decides what each byte of
//! the source is (front matter, HTML, code, link syntax, text); the cleaner then copies the
//! source minus the spans it removes, so what stays is the author's own markdown, untouched.
//!
//! `editor` walks the events and collects the edits; `front_matter`, `templates`, `html` and
//! `entities` know their kind of content; `normalize` handles Unicode and whitespace; `chunks` turns
//! cleaned markdown into documents.

mod chunks;
mod editor;
mod entities;
mod front_matter;
mod html;
mod normalize;
mod templates;
#[cfg(test)]
mod tests;

use config::DataSection;
use pulldown_cmark::Options;

pub use chunks::documents;

/// A file's cleaned markdown.
#[derive(Debug, Clone, PartialEq)]
pub struct Cleaned {
    /// The cleaned markdown, before chunking and any rendering to plain text.
    pub markdown: String,
    /// Whether the file started with YAML/TOML front matter (tells "front matter only" apart).
    pub had_front_matter: bool,
}

fn parser_options() -> Options {
    Options::ENABLE_TABLES
        | Options::ENABLE_FOOTNOTES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_YAML_STYLE_METADATA_BLOCKS
        | Options::ENABLE_PLUSES_DELIMITED_METADATA_BLOCKS
}

/// Cleans one file's markdown according to `data` (front matter, HTML, code, templates,
/// links, Unicode and whitespace).
pub fn clean(source: &str, data: &DataSection) -> Cleaned {
    let normalized = normalize::normalize_unicode(source);
    let mut editor = editor::Editor::new(&normalized, data);
    editor.run();
    let had_front_matter = editor.had_front_matter;
    let markdown = normalize::tidy_whitespace(&editor::apply(&normalized, editor.edits));
    Cleaned {
        markdown,
        had_front_matter,
    }
}
