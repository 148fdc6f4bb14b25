//! The walk over pulldown-cmark events that decides which spans of the source are removed
//! or replaced.

use super::entities::entity_replacement;
use super::front_matter::{at_top, empty_front_matter, front_matter_title};
use super::html::html_block;
use super::parser_options;
use super::templates::{template_directives, whole_line};
use config::{DataSection, FrontMatter, HtmlBlocks, KeepOrDrop};
use pulldown_cmark::{BrokenLink, CowStr, Event, LinkType, Parser, Tag, TagEnd};
use std::ops::Range;

/// Applies non-overlapping replacements (sorted by start) to `source`.
pub(super) fn apply(source: &str, mut edits: Vec<(Range<usize>, String)>) -> String {
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
pub(super) struct Editor<'a> {
    src: &'a str,
    data: &'a DataSection,
    pub(super) edits: Vec<(Range<usize>, String)>,
    /// Events starting before this offset belong to an element already replaced whole.
    skip_until: usize,
    /// Adjacent text events, scanned for template directives together (the parser splits
    /// text at characters like `_` that could start emphasis).
    pending_text: Option<Range<usize>>,
    /// The last template directive removed: the events inside it are ignored.
    directive: Range<usize>,
    links: Vec<LinkSpan>,
    code: Option<CodeSpan>,
    /// Start of an inline `<script>`/`<style>` element being dropped.
    script_from: Option<usize>,
    pub(super) had_front_matter: bool,
}

impl<'a> Editor<'a> {
    pub(super) fn new(src: &'a str, data: &'a DataSection) -> Self {
        Self {
            src,
            data,
            edits: Vec::new(),
            skip_until: 0,
            pending_text: None,
            directive: 0..0,
            links: Vec::new(),
            code: None,
            script_from: None,
            had_front_matter: false,
        }
    }

    fn remove(&mut self, range: Range<usize>) {
        self.edits.push((range, String::new()));
    }

    pub(super) fn run(&mut self) {
        if let Some(range) = empty_front_matter(self.src) {
            self.skip_until = range.end;
            self.front_matter(range);
        }
        let src = self.src;
        let undefined = move |link: BrokenLink<'a>| undefined_reference(src, &link);
        let mut events =
            Parser::new_with_broken_link_callback(self.src, parser_options(), Some(undefined))
                .into_offset_iter();
        for (event, mut range) in events.by_ref() {
            if range.start < self.skip_until {
                continue;
            }
            if self.script_from.is_some() && !matches!(event, Event::InlineHtml(_)) {
                continue;
            }
            if self.in_directive(&event, &mut range) {
                continue;
            }
            self.track_link_children(&event, &range);
            if let Event::Text(text) = &event {
                self.entity(text, range.clone());
                self.push_text(range);
                continue;
            }
            self.flush_text();
            // The text just flushed may hold a directive that covers this event.
            if self.in_directive(&event, &mut range) {
                continue;
            }
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
                self.skip_until = range.end;
                if at_top(self.src, range.start) {
                    self.front_matter(range);
                }
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
            Event::Start(Tag::Link { link_type, .. } | Tag::Image { link_type, .. })
                if !self.data.link_urls =>
            {
                // The parser's span of a collapsed reference `[text][]` stops before the `[]`.
                let collapsed =
                    matches!(link_type, LinkType::Collapsed | LinkType::CollapsedUnknown);
                let range = if collapsed && self.src[range.end..].starts_with("[]") {
                    range.start..range.end + 2
                } else {
                    range
                };
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

    /// The parser decodes an entity (`&mdash;`) into a text event of its own; outside code,
    /// the source of that event is replaced by what it decoded.
    fn entity(&mut self, text: &str, range: Range<usize>) {
        if self.code.is_some() {
            return;
        }
        if let Some(replacement) = entity_replacement(self.src, range.clone(), text) {
            self.edits.push((range, replacement));
        }
    }

    /// Front matter goes, or becomes its title as a heading.
    fn front_matter(&mut self, range: Range<usize>) {
        self.had_front_matter = true;
        let title = match self.data.front_matter {
            FrontMatter::Title => {
                front_matter_title(&self.src[range.clone()]).map(|title| format!("# {title}\n\n"))
            }
            FrontMatter::Drop => None,
        };
        self.edits.push((range, title.unwrap_or_default()));
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
        let keep = self.data.templates == KeepOrDrop::Keep;
        let limit = self
            .code
            .as_ref()
            .map_or(self.src.len(), |code| code.range.end);
        let directives = template_directives(self.src, range.clone(), limit);
        if let Some(code) = &mut self.code {
            let mut rest = range.start;
            let mut has_content = false;
            for directive in &directives {
                has_content |= !self.src[rest..directive.start].trim().is_empty();
                rest = directive.end;
            }
            has_content |= rest < range.end && !self.src[rest..range.end].trim().is_empty();
            code.has_content |= has_content || keep;
        }
        if keep {
            return;
        }
        for directive in directives {
            self.remove(whole_line(self.src, directive.clone()));
            self.directive = directive;
        }
    }

    /// Whether an event lies inside the last directive removed, which may run on past the
    /// text it started in (a Hugo shortcode over several lines, or holding a code span);
    /// a text event that starts inside it and goes on is cut to the part after it.
    fn in_directive(&self, event: &Event<'_>, range: &mut Range<usize>) -> bool {
        let directive = &self.directive;
        if !directive.contains(&range.start) {
            return false;
        }
        if range.end <= directive.end {
            return true;
        }
        if let Event::Text(_) = event {
            range.start = directive.end;
        }
        false
    }
}

/// Makes a reference link whose definition is missing (site generators drop them) a link
/// anyway when it is written as one, `[text][]` or `[text][ref]`, and not glued to a word as
/// in `a[i][j]`. A shortcut `[text]` stays text: it may be literal brackets.
fn undefined_reference<'s>(src: &str, link: &BrokenLink<'_>) -> Option<(CowStr<'s>, CowStr<'s>)> {
    let written = matches!(link.link_type, LinkType::Collapsed | LinkType::Reference);
    let glued = src[..link.span.start]
        .chars()
        .next_back()
        .is_some_and(|c| c.is_alphanumeric() || matches!(c, '_' | ')' | ']'));
    (written && !glued).then_some((CowStr::Borrowed(""), CowStr::Borrowed("")))
}
