//! YAML (`---`) and TOML (`+++`) front matter.

use std::ops::Range;

/// The `title` of YAML (`title: x`) or TOML (`title = "x"`) front matter.
pub(super) fn front_matter_title(block: &str) -> Option<String> {
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

/// The span of empty front matter (`---` then `---` or `...`, or `+++` twice, with at most
/// blank lines between) at the top of `src`. The parser reads it as two thematic breaks or a
/// paragraph: it takes a metadata block only when its first line has something on it.
pub(super) fn empty_front_matter(src: &str) -> Option<Range<usize>> {
    let start = top(src);
    let mut lines = src[start..].split_inclusive('\n');
    let open = lines.next()?;
    let delimiter = open.trim_end();
    if delimiter != "---" && delimiter != "+++" {
        return None;
    }
    let mut end = start + open.len();
    for line in lines {
        end += line.len();
        let line = line.trim_end();
        if !line.is_empty() {
            let closes = line == delimiter || (delimiter == "---" && line == "...");
            return closes.then_some(start..end);
        }
    }
    None
}

/// Whether a block starting at `offset` is at the top of `src` (only blank lines before it),
/// where front matter is; below the top, `---` lines are thematic breaks and headings.
pub(super) fn at_top(src: &str, offset: usize) -> bool {
    offset <= top(src)
}

/// The start of the first line of `src` with something on it.
fn top(src: &str) -> usize {
    let blank = src.len() - src.trim_start().len();
    src[..blank].rfind('\n').map_or(0, |i| i + 1)
}
