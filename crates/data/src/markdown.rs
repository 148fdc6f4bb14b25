//! Markdown cleaning driven by pulldown-cmark events. The parser decides what each byte of
//! the source is (front matter, HTML, code, link syntax, text); the cleaner then copies the
//! source minus the spans it removes, so what stays is the author's own markdown, untouched.

use config::{Chunking, DataSection, FrontMatter, HtmlBlocks, KeepOrDrop, TextFormat};
use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use std::ops::Range;
use unicode_normalization::UnicodeNormalization;

/// A file's cleaned markdown.
#[derive(Debug, Clone, PartialEq)]
pub struct Cleaned {
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
    let normalized = normalize_unicode(source);
    let mut editor = Editor::new(&normalized, data);
    editor.run();
    let had_front_matter = editor.had_front_matter;
    let markdown = tidy_whitespace(&apply(&normalized, editor.edits));
    Cleaned {
        markdown,
        had_front_matter,
    }
}

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

/// NFC, no zero-width or soft-hyphen characters, Unix newlines, odd spaces made plain.
fn normalize_unicode(source: &str) -> String {
    source
        .replace("\r\n", "\n")
        .nfc()
        .filter(|c| {
            !matches!(
                c,
                '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}'
            )
        })
        .map(|c| match c {
            '\u{00A0}' | '\u{2000}'..='\u{200A}' | '\u{202F}' | '\u{205F}' | '\u{3000}' => ' ',
            '\r' => '\n',
            c => c,
        })
        .collect()
}

/// Trailing spaces removed, runs of blank lines collapsed to one, ends trimmed.
fn tidy_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for line in text.trim().lines() {
        let line = line.trim_end();
        if line.is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(line);
    }
    out
}

/// Applies non-overlapping replacements (sorted by start) to `source`.
fn apply(source: &str, mut edits: Vec<(Range<usize>, String)>) -> String {
    edits.sort_by_key(|(range, _)| (range.start, range.end));
    let mut out = String::with_capacity(source.len());
    let mut at = 0;
    for (range, replacement) in edits {
        if range.start < at {
            continue; // nested in an edit already applied
        }
        out.push_str(&source[at..range.start]);
        out.push_str(&replacement);
        at = range.end;
    }
    out.push_str(&source[at..]);
    out
}

/// A link or image whose syntax is removed, keeping the source of its children.
struct LinkSpan {
    range: Range<usize>,
    children: Option<Range<usize>>,
}

/// A fenced code block being read: its edits start at `first_edit`; it is dropped whole when
/// nothing but template directives is inside.
struct CodeSpan {
    range: Range<usize>,
    first_edit: usize,
    has_content: bool,
}

/// Walks the events of one source and collects the edits that clean it.
struct Editor<'a> {
    src: &'a str,
    data: &'a DataSection,
    edits: Vec<(Range<usize>, String)>,
    /// Events starting before this offset belong to an element already replaced whole.
    skip_until: usize,
    /// Adjacent text events, scanned for template directives together (the parser splits
    /// text at characters like `_` that could start emphasis).
    pending_text: Option<Range<usize>>,
    links: Vec<LinkSpan>,
    code: Option<CodeSpan>,
    /// Start of an inline `<script>`/`<style>` element being dropped.
    script_from: Option<usize>,
    had_front_matter: bool,
}

impl<'a> Editor<'a> {
    fn new(src: &'a str, data: &'a DataSection) -> Self {
        Self {
            src,
            data,
            edits: Vec::new(),
            skip_until: 0,
            pending_text: None,
            links: Vec::new(),
            code: None,
            script_from: None,
            had_front_matter: false,
        }
    }

    fn remove(&mut self, range: Range<usize>) {
        self.edits.push((range, String::new()));
    }

    fn run(&mut self) {
        let mut events = Parser::new_ext(self.src, parser_options()).into_offset_iter();
        for (event, range) in events.by_ref() {
            if range.start < self.skip_until {
                continue;
            }
            if self.script_from.is_some() && !matches!(event, Event::InlineHtml(_)) {
                continue;
            }
            self.track_link_children(&event, &range);
            if let Event::Text(_) = event {
                self.push_text(range);
                continue;
            }
            self.flush_text();
            self.event(event, range);
        }
        self.flush_text();
        if !self.data.link_urls {
            let spans: Vec<_> = events
                .reference_definitions()
                .iter()
                .map(|(_, def)| def.span.clone())
                .collect();
            for span in spans {
                self.remove(span);
            }
        }
    }

    fn event(&mut self, event: Event<'_>, range: Range<usize>) {
        match event {
            Event::Start(Tag::MetadataBlock(_)) => {
                self.had_front_matter = true;
                let title = match self.data.front_matter {
                    FrontMatter::Title => front_matter_title(&self.src[range.clone()])
                        .map(|title| format!("# {title}\n\n")),
                    FrontMatter::Drop => None,
                };
                self.skip_until = range.end;
                self.edits.push((range, title.unwrap_or_default()));
            }
            Event::Start(Tag::HtmlBlock) => {
                let replacement = html_block(&self.src[range.clone()], self.data.html);
                self.skip_until = range.end;
                self.edits.push((range, replacement));
            }
            Event::InlineHtml(html) => self.inline_html(&html, range),
            Event::Start(Tag::CodeBlock(_)) => {
                if self.data.code == KeepOrDrop::Drop {
                    self.skip_until = range.end;
                    self.remove(range);
                } else {
                    self.code = Some(CodeSpan {
                        range,
                        first_edit: self.edits.len(),
                        has_content: false,
                    });
                }
            }
            Event::End(TagEnd::CodeBlock) => {
                if let Some(code) = self.code.take() {
                    if !code.has_content {
                        self.edits.truncate(code.first_edit);
                        self.remove(code.range);
                    }
                }
            }
            Event::Start(Tag::Link { .. } | Tag::Image { .. }) if !self.data.link_urls => {
                self.links.push(LinkSpan {
                    range,
                    children: None,
                });
            }
            Event::End(TagEnd::Link | TagEnd::Image) if !self.data.link_urls => {
                if let Some(link) = self.links.pop() {
                    match link.children {
                        Some(children) => {
                            self.remove(link.range.start..children.start);
                            self.remove(children.end..link.range.end);
                        }
                        None => self.remove(link.range),
                    }
                }
            }
            _ => {}
        }
    }

    /// Every event inside a link widens the span of its children (the link text).
    fn track_link_children(&mut self, event: &Event<'_>, range: &Range<usize>) {
        if matches!(event, Event::End(TagEnd::Link | TagEnd::Image)) {
            return;
        }
        if let Some(link) = self.links.last_mut() {
            let children = link.children.get_or_insert(range.clone());
            children.start = children.start.min(range.start);
            children.end = children.end.max(range.end);
        }
    }

    /// Inline tags: comments always go; `<script>`/`<style>` go with everything up to their
    /// closing tag (`run` ignores the events in between); other tags follow `data.html`.
    fn inline_html(&mut self, html: &str, range: Range<usize>) {
        let lower = html.to_ascii_lowercase();
        let closes_hidden = lower.starts_with("</script") || lower.starts_with("</style");
        if let Some(from) = self.script_from {
            if closes_hidden {
                self.script_from = None;
                self.remove(from..range.end);
            }
        } else if lower.starts_with("<script") || lower.starts_with("<style") {
            self.script_from = Some(range.start);
        } else if lower.starts_with("<!--") || self.data.html != HtmlBlocks::Keep {
            self.remove(range);
        }
    }

    fn push_text(&mut self, range: Range<usize>) {
        match &mut self.pending_text {
            Some(pending) if pending.end == range.start => pending.end = range.end,
            _ => {
                self.flush_text();
                self.pending_text = Some(range);
            }
        }
    }

    /// Removes template directives from the pending text run (when asked to) and notes
    /// whether a code block has anything else in it.
    fn flush_text(&mut self) {
        let Some(range) = self.pending_text.take() else {
            return;
        };
        let text = &self.src[range.clone()];
        let directives = template_directives(text);
        let mut rest = 0;
        let mut has_content = false;
        for directive in &directives {
            has_content |= !text[rest..directive.start].trim().is_empty();
            rest = directive.end;
        }
        has_content |= !text[rest..].trim().is_empty();
        if let Some(code) = &mut self.code {
            code.has_content |= has_content || self.data.templates == KeepOrDrop::Keep;
        }
        if self.data.templates == KeepOrDrop::Drop {
            for directive in directives {
                let span = whole_line(
                    self.src,
                    range.start + directive.start..range.start + directive.end,
                );
                self.remove(span);
            }
        }
    }
}

/// The spans of `{{#name …}}` (mdBook) and `{{< … >}}` / `{{% … %}}` (Hugo) directives.
/// Anything else in double braces, like tldr's `{{path/to/file}}`, is content.
fn template_directives(text: &str) -> Vec<Range<usize>> {
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
fn whole_line(src: &str, span: Range<usize>) -> Range<usize> {
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

/// The `title` of YAML (`title: x`) or TOML (`title = "x"`) front matter.
fn front_matter_title(block: &str) -> Option<String> {
    block.lines().find_map(|line| {
        let rest = line.strip_prefix("title")?.trim_start();
        let value = rest
            .strip_prefix(':')
            .or_else(|| rest.strip_prefix('='))?
            .trim();
        let value = value.trim_matches(|c| c == '"' || c == '\'').trim();
        (!value.is_empty()).then(|| value.to_owned())
    })
}

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

/// The text of an HTML fragment: tags removed, common entities decoded, blank lines dropped.
fn html_to_text(html: &str) -> String {
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
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What an HTML block becomes.
fn html_block(block: &str, mode: HtmlBlocks) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut DataSection)) -> DataSection {
        let mut data = DataSection::default();
        f(&mut data);
        data
    }

    fn clean_default(source: &str) -> String {
        clean(source, &DataSection::default()).markdown
    }

    #[test]
    fn front_matter_dropped_or_title() {
        let yaml = "---\ntitle: \"My Guide\"\ntags: [a]\n---\n\nBody text.\n";
        let cleaned = clean(yaml, &DataSection::default());
        assert_eq!(cleaned.markdown, "Body text.");
        assert!(cleaned.had_front_matter);
        let titled = with(|d| d.front_matter = FrontMatter::Title);
        assert_eq!(clean(yaml, &titled).markdown, "# My Guide\n\nBody text.");
        let toml = "+++\ntitle = 'Notes'\n+++\nBody.\n";
        assert_eq!(clean(toml, &titled).markdown, "# Notes\n\nBody.");
        let only = clean("---\ntitle: x\n---\n", &DataSection::default());
        assert_eq!(only.markdown, "");
        assert!(only.had_front_matter);
    }

    #[test]
    fn html_comments_removed_block_and_inline() {
        let src = "Intro.\n\n<!-- a block comment -->\n\nSee [Chapter 16][ch16]<!-- ignore --> now.\n\n[ch16]: ch16.html\n";
        assert_eq!(clean_default(src), "Intro.\n\nSee Chapter 16 now.");
    }

    #[test]
    fn html_blocks_keep_drop_text_and_script_style_always_dropped() {
        let src = "<div class=\"note\">\n<p>Hello &amp; welcome</p>\n<script>alert(1)</script>\n<style>p{}</style>\n</div>\n\nAfter.\n";
        let text = clean_default(src);
        assert_eq!(text, "Hello & welcome\n\nAfter.");
        let kept = clean(src, &with(|d| d.html = HtmlBlocks::Keep)).markdown;
        assert!(
            kept.contains("<p>Hello &amp; welcome</p>")
                && !kept.contains("alert")
                && !kept.contains("p{}"),
            "{kept}"
        );
        let dropped = clean(src, &with(|d| d.html = HtmlBlocks::Drop)).markdown;
        assert_eq!(dropped, "After.");
        let inline = clean_default("Text <span>kept</span> <script>bad()</script> end.\n");
        assert_eq!(inline, "Text kept  end.");
    }

    #[test]
    fn code_kept_with_info_string_or_dropped() {
        let src = "Before.\n\n```rust\nfn main() {}\n```\n\nAfter.\n";
        assert_eq!(
            clean_default(src),
            "Before.\n\n```rust\nfn main() {}\n```\n\nAfter."
        );
        let dropped = clean(src, &with(|d| d.code = KeepOrDrop::Drop)).markdown;
        assert_eq!(dropped, "Before.\n\nAfter.");
    }

    #[test]
    fn templates_dropped_but_placeholders_untouched() {
        let src = "Listing:\n\n```rust\n{{#rustdoc_include ../listings/no_listing_01/src/main.rs:here}}\n```\n\n```text\n{{#include out.txt}}\nreal line\n```\n\n{{< figure src=\"a.png\" >}}\n\n- Copy a file:\n\n`cp {{path/to/source}} {{path/to/target}}`\n";
        let out = clean_default(src);
        assert_eq!(
            out,
            "Listing:\n\n```text\nreal line\n```\n\n- Copy a file:\n\n`cp {{path/to/source}} {{path/to/target}}`"
        );
        let kept = clean(src, &with(|d| d.templates = KeepOrDrop::Keep)).markdown;
        assert!(
            kept.contains("{{#rustdoc_include") && kept.contains("{{< figure"),
            "{kept}"
        );
    }

    #[test]
    fn links_keep_text_urls_optional() {
        let src = "Read [the *guide*](https://x.org/g) and ![a cat](cat.png) or <https://y.org>.\n";
        assert_eq!(
            clean_default(src),
            "Read the *guide* and a cat or https://y.org."
        );
        let urls = clean(src, &with(|d| d.link_urls = true)).markdown;
        assert_eq!(urls, src.trim());
    }

    #[test]
    fn tables_stay_markdown() {
        let src = "| key | value |\n|-----|-------|\n| a   | [b](u) |\n";
        assert_eq!(
            clean_default(src),
            "| key | value |\n|-----|-------|\n| a   | b |"
        );
    }

    #[test]
    fn unicode_nfc_zero_width_and_whitespace() {
        let src = "Cafe\u{301}\u{200B} time\u{00A0}now   \r\n\r\n\r\n\r\nnext\u{FEFF} line\t \n";
        assert_eq!(clean_default(src), "Caf\u{e9} time now\n\nnext line");
    }

    #[test]
    fn plain_text_format() {
        let data = with(|d| d.format = TextFormat::Text);
        let cleaned = clean(
            "# Title\n\nSome *emphasis* and `code`.\n\n- one\n- two\n",
            &data,
        );
        assert_eq!(
            documents(&cleaned.markdown, &data),
            ["Title\n\nSome emphasis and code.\n\n- one\n- two"]
        );
    }

    #[test]
    fn section_chunking_prepends_heading_paths() {
        let data = with(|d| d.chunking = Chunking::Section);
        let src = "Preamble.\n\n# Guide\n\nIntro.\n\n## Install\n\nRun it.\n\n## Use\n\n### Flags\n\nSet them.\n\n# Other\n\nMore.\n";
        let docs = documents(&clean(src, &data).markdown, &data);
        assert_eq!(
            docs,
            [
                "Preamble.",
                "# Guide\n\nIntro.",
                "# Guide > ## Install\n\nRun it.",
                "# Guide > ## Use > ### Flags\n\nSet them.",
                "# Other\n\nMore.",
            ]
        );
    }

    #[test]
    fn long_documents_split_at_block_boundaries() {
        let data = with(|d| d.max_chars = Some(40));
        let src = "First paragraph here.\n\nSecond paragraph.\n\nThird one is here too.\n";
        let docs = documents(&clean(src, &data).markdown, &data);
        assert_eq!(
            docs,
            [
                "First paragraph here.\n\nSecond paragraph.",
                "Third one is here too."
            ]
        );
        let line = "x".repeat(100);
        let docs = documents(&line, &data);
        assert_eq!(
            docs.iter().map(|d| d.len()).collect::<Vec<_>>(),
            [40, 40, 20]
        );
    }
}
