//! Cleaned markdown into documents: sections, long documents split, plain text.

use super::html::html_to_text;
use super::normalize::tidy_whitespace;
use super::parser_options;
use config::{Chunking, DataSection, TextFormat};
use pulldown_cmark::{Event, Parser, Tag, TagEnd};
use std::ops::Range;

/// Turns cleaned markdown into documents: one per file or one per section (heading path
/// prepended), long ones split at block boundaries, rendered as `data.format` asks.
pub fn documents(markdown: &str, data: &DataSection) -> Vec<String> {
    let sections = match data.chunking {
        Chunking::File => vec![(Vec::new(), markdown)],
        Chunking::Section => sections(markdown),
    };
    let mut out = Vec::new();
    for (path, body) in sections {
        let prefix = heading_path(&path, data.format);
        let budget = data
            .max_chars
            .map(|max| max.saturating_sub(prefix.chars().count()).max(1));
        for piece in split_long(body, budget) {
            let text = match data.format {
                TextFormat::Markdown => piece.trim().to_owned(),
                TextFormat::Text => plain_text(piece),
            };
            if text.is_empty() {
                continue;
            }
            out.push(if prefix.is_empty() {
                text
            } else {
                format!("{prefix}\n\n{text}")
            });
        }
    }
    out
}

/// A heading path (level, text) as the prefix of a section document.
fn heading_path(path: &[(usize, String)], format: TextFormat) -> String {
    let parts: Vec<String> = path
        .iter()
        .map(|(level, text)| match format {
            TextFormat::Markdown => format!("{} {text}", "#".repeat(*level)),
            TextFormat::Text => text.clone(),
        })
        .collect();
    parts.join(" > ")
}

/// Splits markdown at its headings: each section's heading path and body (heading excluded).
fn sections(markdown: &str) -> Vec<(Vec<(usize, String)>, &str)> {
    let mut headings: Vec<(Range<usize>, usize, String)> = Vec::new();
    let mut current: Option<(Range<usize>, usize, String)> = None;
    for (event, range) in Parser::new_ext(markdown, parser_options()).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                current = Some((range, level as usize, String::new()))
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some((_, _, text)) = &mut current {
                    text.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => headings.extend(current.take()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let first = headings.first().map_or(markdown.len(), |(r, _, _)| r.start);
    out.push((Vec::new(), &markdown[..first]));
    let mut path: Vec<(usize, String)> = Vec::new();
    for (i, (range, level, text)) in headings.iter().enumerate() {
        while path.last().is_some_and(|(l, _)| l >= level) {
            path.pop();
        }
        path.push((*level, text.trim().to_owned()));
        let end = headings
            .get(i + 1)
            .map_or(markdown.len(), |(r, _, _)| r.start);
        out.push((path.clone(), &markdown[range.end.min(end)..end]));
    }
    out.retain(|(_, body)| !body.trim().is_empty());
    out
}

/// Splits `text` into pieces of at most `max` characters at top-level block boundaries;
/// a block longer than `max` is cut at line, then character, boundaries.
fn split_long(text: &str, max: Option<usize>) -> Vec<&str> {
    let Some(max) = max else {
        return vec![text];
    };
    if text.chars().count() <= max {
        return vec![text];
    }
    let mut units = Vec::new();
    let mut depth = 0usize;
    for (event, range) in Parser::new_ext(text, parser_options()).into_offset_iter() {
        let range = range.start..range.start + text[range.clone()].trim_end().len();
        match event {
            Event::Start(_) => {
                if depth == 0 {
                    units.extend(hard_split(text, range.clone(), max));
                }
                depth += 1;
            }
            Event::End(_) => depth = depth.saturating_sub(1),
            _ if depth == 0 => units.extend(hard_split(text, range, max)),
            _ => {}
        }
    }
    let mut pieces = Vec::new();
    let mut current: Option<(Range<usize>, usize)> = None;
    for unit in units {
        current = match current {
            Some((range, chars)) => {
                let added = text[range.end..unit.end].chars().count();
                if chars + added > max {
                    pieces.push(&text[range]);
                    Some((unit.clone(), text[unit].chars().count()))
                } else {
                    Some((range.start..unit.end, chars + added))
                }
            }
            None => Some((unit.clone(), text[unit].chars().count())),
        };
    }
    pieces.extend(current.map(|(range, _)| &text[range]));
    pieces
}

/// Cuts a range longer than `max` characters at newlines, and lines longer than that at
/// character boundaries.
fn hard_split(text: &str, range: Range<usize>, max: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = range.start;
    let mut chars = 0;
    let mut last_newline = None;
    for (offset, c) in text[range.clone()].char_indices() {
        let at = range.start + offset;
        if chars == max {
            let cut = last_newline.unwrap_or(at);
            out.push(start..cut);
            chars = text[cut..at].chars().count();
            start = cut;
            last_newline = None;
        }
        chars += 1;
        if c == '\n' {
            last_newline = Some(at + 1);
        }
    }
    if start < range.end {
        out.push(start..range.end);
    }
    out
}

/// Plain text rendered from markdown: the words, one block per paragraph, list items as
/// `- item`, table cells separated by ` | `.
fn plain_text(markdown: &str) -> String {
    let mut out = String::with_capacity(markdown.len());
    for event in Parser::new_ext(markdown, parser_options()) {
        match event {
            Event::Text(t) | Event::Code(t) => out.push_str(&t),
            Event::Html(t) => out.push_str(&html_to_text(&t)),
            Event::SoftBreak | Event::HardBreak => out.push('\n'),
            Event::Start(Tag::Item) => out.push_str("- "),
            Event::End(TagEnd::TableCell) => out.push_str(" | "),
            Event::End(TagEnd::TableHead | TagEnd::TableRow | TagEnd::Item) => out.push('\n'),
            Event::End(
                TagEnd::Paragraph
                | TagEnd::Heading(_)
                | TagEnd::CodeBlock
                | TagEnd::Table
                | TagEnd::List(_)
                | TagEnd::HtmlBlock
                | TagEnd::BlockQuote(_),
            ) => out.push_str("\n\n"),
            _ => {}
        }
    }
    tidy_whitespace(&out.replace(" | \n", "\n"))
}
