//! Markdown cleaning and chunking, as `data build` runs them on each corpus file
//! (`markdown::clean`, then `markdown::documents`). The first byte of the input picks the
//! `data` options, so every cleaning mode is reached; the whole input is the file.
#![no_main]

use config::{Chunking, DataSection, FrontMatter, HtmlBlocks, KeepOrDrop, TextFormat};
use data::markdown;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Some(&flags) = bytes.first() else {
        return;
    };
    let bit = |n: u8| flags & (1 << n) != 0;
    let data = DataSection {
        format: if bit(0) {
            TextFormat::Text
        } else {
            TextFormat::Markdown
        },
        front_matter: if bit(1) {
            FrontMatter::Title
        } else {
            FrontMatter::Drop
        },
        html: match flags >> 6 {
            0 => HtmlBlocks::Text,
            1 => HtmlBlocks::Drop,
            _ => HtmlBlocks::Keep,
        },
        code: if bit(2) {
            KeepOrDrop::Drop
        } else {
            KeepOrDrop::Keep
        },
        templates: if bit(3) {
            KeepOrDrop::Keep
        } else {
            KeepOrDrop::Drop
        },
        link_urls: bit(4),
        chunking: if bit(5) {
            Chunking::Section
        } else {
            Chunking::File
        },
        max_chars: bit(5).then_some(256),
        ..DataSection::default()
    };
    // `data.lossy_utf8: true` reads any file this way; without it non-UTF-8 files are skipped.
    let text = String::from_utf8_lossy(bytes);
    let cleaned = markdown::clean(&text, &data);
    let _ = markdown::documents(&cleaned.markdown, &data);
});
