//! Template directives: mdBook's `{{#include …}}` and Hugo's shortcodes.

use std::ops::Range;

/// The spans of `{{#name …}}` (mdBook) and `{{< … >}}` / `{{% … %}}` (Hugo) directives.
/// Anything else in double braces, like tldr's `{{path/to/file}}`, is content.
pub(super) fn template_directives(text: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("{{") {
        let start = from + found;
        let opener = text[start + 2..].chars().next();
        let close = text[start + 2..].find("}}").map(|end| start + 2 + end + 2);
        match (opener, close) {
            (Some('#' | '<' | '%'), Some(end)) => {
                out.push(start..end);
                from = end;
            }
            _ => from = start + 2,
        }
    }
    out
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
