//! YAML (`---`) and TOML (`+++`) front matter.

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
