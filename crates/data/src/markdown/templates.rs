//! Template directives: mdBook's `{{#include …}}` and Hugo's shortcodes. Hugo expands
//! shortcodes before it reads the markdown, so a shortcode is not markdown: it can run over
//! several lines and hold backticks, quotes or `>` that the parser reads as code spans, HTML
//! or block quotes. A directive is therefore recognised where it starts in text, and its end
//! is found in the source from there.

use std::ops::Range;

/// The spans of the `{{#name …}}` (mdBook) and `{{< … >}}` / `{{% … %}}` (Hugo) directives
/// that start in the text run `text` of `src`. An mdBook directive ends in the run; a Hugo
/// shortcode may end past it, but not past `limit` (the end of the code block holding it).
/// Anything else in double braces, like tldr's `{{path/to/file}}`, is content.
pub(super) fn template_directives(
    src: &str,
    text: Range<usize>,
    limit: usize,
) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut from = text.start;
    while from < text.end {
        let Some(found) = src[from..text.end].find("{{") else {
            break;
        };
        let start = from + found;
        let end = match src[start + 2..].chars().next() {
            Some('#') => src[start + 2..text.end]
                .find("}}")
                .map(|end| start + 2 + end + 2),
            Some(delimiter @ ('<' | '%')) => shortcode_end(src, start, delimiter, limit),
            _ => None,
        };
        match end {
            Some(end) => {
                out.push(start..end);
                from = end;
            }
            None => from = start + 2,
        }
    }
    out
}

/// The end of the Hugo shortcode opened by `{{<` or `{{%` at `start`: just past its `>}}` or
/// `%}}`, skipping quoted (`"…"`) and raw (`` `…` ``) parameters. None when no name follows
/// the opener, or when a blank line or another `{{` comes first (then it was prose).
fn shortcode_end(src: &str, start: usize, delimiter: char, limit: usize) -> Option<usize> {
    let body = start + 3;
    let name = src[body..limit].trim_start_matches([' ', '\t']);
    let name = name
        .strip_prefix("/*")
        .unwrap_or(name)
        .trim_start_matches([' ', '\t']);
    let name = name.strip_prefix('/').unwrap_or(name);
    if !name.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
        return None;
    }
    let close = match delimiter {
        '<' => ">}}",
        _ => "%}}",
    };
    let mut quote = None;
    let mut escaped = false;
    for (offset, c) in src[body..limit].char_indices() {
        let at = body + offset;
        if c == '\n'
            && src[at + 1..limit]
                .lines()
                .next()
                .is_none_or(|l| l.trim().is_empty())
        {
            return None;
        }
        match quote {
            Some(_) if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '`' => quote = Some(c),
            None if src[at..limit].starts_with(close) => return Some(at + close.len()),
            None if src[at..limit].starts_with("{{") => return None,
            None => {}
        }
    }
    None
}

/// Widens a span to its whole line (newline included) when nothing else is on that line.
pub(super) fn whole_line(src: &str, span: Range<usize>) -> Range<usize> {
    let line_start = src[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = src[span.end..]
        .find('\n')
        .map_or(src.len(), |i| span.end + i + 1);
    let alone =
        src[line_start..span.start].trim().is_empty() && src[span.end..line_end].trim().is_empty();
    if alone {
        line_start..line_end
    } else {
        span
    }
}
