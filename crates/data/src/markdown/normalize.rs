//! Unicode and whitespace normalization, before and after cleaning.

use unicode_normalization::UnicodeNormalization;

/// NFC, no zero-width or soft-hyphen characters, Unix newlines, odd spaces made plain.
pub(super) fn normalize_unicode(source: &str) -> String {
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
pub(super) fn tidy_whitespace(text: &str) -> String {
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
