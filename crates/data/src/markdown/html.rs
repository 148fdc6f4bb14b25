//! HTML in markdown: hidden elements, blocks, and HTML reduced to its text.

use super::entities::decode_entities;
use config::HtmlBlocks;

/// Finds the first `needle` (ASCII, lowercase) in `haystack` ignoring ASCII case.
fn find_ascii_ci(haystack: &str, needle: &str, from: usize) -> Option<usize> {
    haystack.as_bytes()[from..]
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
        .map(|i| from + i)
}

/// Removes comments and `<script>`/`<style>` elements from HTML.
fn remove_hidden_html(html: &str) -> String {
    const HIDDEN: [(&str, &str); 3] = [
        ("<!--", "-->"),
        ("<script", "</script>"),
        ("<style", "</style>"),
    ];
    let mut out = String::with_capacity(html.len());
    let mut at = 0;
    loop {
        let next = HIDDEN
            .iter()
            .filter_map(|(open, close)| find_ascii_ci(html, open, at).map(|i| (i, *close)))
            .min_by_key(|(i, _)| *i);
        let Some((start, close)) = next else { break };
        out.push_str(&html[at..start]);
        at = find_ascii_ci(html, close, start).map_or(html.len(), |i| i + close.len());
    }
    out.push_str(&html[at..]);
    out
}

/// The text of an HTML fragment: tags removed, entities decoded, blank lines dropped.
pub(super) fn html_to_text(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut chars = html.chars().peekable();
    while let Some(c) = chars.next() {
        let is_tag = c == '<'
            && chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphabetic() || matches!(n, '/' | '!'));
        if is_tag {
            for c in chars.by_ref() {
                if c == '>' {
                    break;
                }
            }
        } else {
            text.push(c);
        }
    }
    let text = decode_entities(&text);
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What an HTML block becomes.
pub(super) fn html_block(block: &str, mode: HtmlBlocks) -> String {
    let visible = match mode {
        HtmlBlocks::Drop => return String::new(),
        HtmlBlocks::Keep => remove_hidden_html(block),
        HtmlBlocks::Text => html_to_text(&remove_hidden_html(block)),
    };
    if visible.trim().is_empty() {
        String::new()
    } else {
        format!("{}\n\n", visible.trim_end())
    }
}
