//! HTML entities (`&mdash;`, `&#8212;`, `&#x2014;`). The parser decodes those in text events,
//! but the cleaner copies the source, so each one it found is replaced by its character here;
//! in HTML reduced to text they are found and decoded by the parser one by one.

use super::normalize::normalize_unicode;
use pulldown_cmark::{Event, Parser, Tag};
use std::ops::Range;

/// What the text event at `range` of `src`, which the parser decoded to `decoded`, becomes
/// when it is an entity: its character, normalized like the rest of the text (`&nbsp;` is a
/// plain space), or that character escaped (`\*`) where it would read as markdown syntax.
/// None when the event is not an entity (an escaped `\&amp;` is text that reads `&amp;`).
pub(super) fn entity_replacement(src: &str, range: Range<usize>, decoded: &str) -> Option<String> {
    let source = &src[range.clone()];
    let (len, _) = entity_at(source.strip_prefix('&')?)?;
    if len + 1 != source.len() || source == decoded {
        return None;
    }
    let decoded = normalize_unicode(decoded);
    let mut chars = decoded.chars();
    let (Some(c), None) = (chars.next(), chars.next()) else {
        return Some(decoded);
    };
    let after = &src[range.end..];
    let line_start = src[..range.start]
        .rsplit('\n')
        .next()
        .is_some_and(|line| line.trim().is_empty());
    let syntax = match c {
        '\\' | '`' | '*' | '_' | '[' | ']' | '|' | '~' => true,
        '#' | '>' | '-' | '+' | '=' => line_start,
        '<' => after.starts_with(|n: char| n.is_ascii_alphabetic() || matches!(n, '/' | '!' | '?')),
        '&' => entity_at(after).is_some(),
        _ => false,
    };
    Some(if syntax { format!("\\{c}") } else { decoded })
}

/// `text` with its entities decoded (and normalized), for HTML reduced to text.
pub(super) fn decode_entities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(found) = text[at..].find('&') {
        let start = at + found;
        out.push_str(&text[at..start]);
        match entity_at(&text[start + 1..]) {
            Some((len, decoded)) => {
                out.push_str(&normalize_unicode(&decoded));
                at = start + 1 + len;
            }
            None => {
                out.push('&');
                at = start + 1;
            }
        }
    }
    out.push_str(&text[at..]);
    out
}

/// The entity whose name (`mdash;`, `#8212;`) starts `rest` (what follows a `&`): the length
/// of that name and its decoded text, as the parser reads `&name`.
fn entity_at(rest: &str) -> Option<(usize, String)> {
    let len = rest.find(';')? + 1;
    let name = &rest[..len - 1];
    let plausible = (1..=32).contains(&name.len())
        && name
            .trim_start_matches('#')
            .chars()
            .all(|c| c.is_ascii_alphanumeric());
    if !plausible {
        return None;
    }
    let entity = format!("&{}", &rest[..len]);
    let mut events = Parser::new(&entity);
    match (events.next(), events.next(), events.next()) {
        (Some(Event::Start(Tag::Paragraph)), Some(Event::Text(text)), Some(Event::End(_)))
            if *text != *entity =>
        {
            Some((len, text.into_string()))
        }
        _ => None,
    }
}
