use super::{clean, documents};
use config::{Chunking, DataSection, FrontMatter, HtmlBlocks, KeepOrDrop, TextFormat};

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

#[test]
fn reference_links_keep_text_with_or_without_definition() {
    let defined = "See [word][] and [other][ref].\n\n[word]: https://x.org\n[ref]: https://y.org\n";
    assert_eq!(clean_default(defined), "See word and other.");
    // After a site generator the definitions are usually gone; a shortcut `[maybe]` without
    // one may be literal text, and `a[i][j]` is indexing, not a link.
    let undefined = "See [word][], [other][ref] and [maybe] here; a[i][j] too.\n";
    assert_eq!(
        clean_default(undefined),
        "See word, other and [maybe] here; a[i][j] too."
    );
    let urls = clean(defined, &with(|d| d.link_urls = true)).markdown;
    assert_eq!(urls, defined.trim());
}

#[test]
fn hugo_shortcodes_across_lines_with_backticks_and_quotes() {
    let src = "Intro.\n\n{{< figure src=\"a.png\"\n    alt=\"a \\\"cat\\\"\"\n    caption=\"not the end >}} yet\"\n>}}\n\nCall {{< param `site.title` >}} and {{<figure src=\"b.png\">}} now.\n\n{{< note >}}\nKeep this **text**.\n{{< /note >}}\n\n{{% tab name=\"Go\" %}}Tabbed {{% /tab %}}\n\n```go\n{{< readfile\n    file=\"main.go\" >}}\n```\n\nWrite `{{< ref \"a\" >}}` to link. Use {{< alone.\n\nDone {{< x >}}.\n";
    assert_eq!(
        clean_default(src),
        "Intro.\n\nCall  and  now.\n\nKeep this **text**.\n\nTabbed\n\nWrite `{{< ref \"a\" >}}` to link. Use {{< alone.\n\nDone ."
    );
    // Links inside a shortcode go with it; the links after it are cleaned as usual.
    let linked = "Text {{< x caption=\"[a](b)\"\n>}} then [c](d).\n";
    assert_eq!(clean_default(linked), "Text  then c.");
    let kept = clean(src, &with(|d| d.templates = KeepOrDrop::Keep)).markdown;
    assert!(
        kept.contains("{{< figure src=\"a.png\"\n    alt="),
        "{kept}"
    );
}

#[test]
fn empty_front_matter_removed() {
    let titled = with(|d| d.front_matter = FrontMatter::Title);
    for src in [
        "---\n---\nBody.\n",
        "---\n\n  \n---\n\nBody.\n",
        "---\n...\nBody.\n",
        "+++\n+++\nBody.\n",
        "+++\n \n+++\n\nBody.\n",
    ] {
        let cleaned = clean(src, &DataSection::default());
        assert_eq!(cleaned.markdown, "Body.", "{src:?}");
        assert!(cleaned.had_front_matter, "{src:?}");
        assert_eq!(clean(src, &titled).markdown, "Body.", "{src:?}");
    }
    let only = clean("---\n---\n", &DataSection::default());
    assert_eq!(only.markdown, "");
    assert!(only.had_front_matter);
    // Below the top, `---` lines are thematic breaks.
    let rules = "Body.\n\n---\n---\n\nMore.\n";
    assert_eq!(clean_default(rules), rules.trim());
}

#[test]
fn metadata_block_below_the_top_is_markdown() {
    // pulldown-cmark reads `---`/text/`---` anywhere as a metadata block; CommonMark (and a
    // site generator) read a thematic break and a setext heading.
    let src = "Intro.\n\n---\nA heading\n---\n\nMore.\n";
    let cleaned = clean(src, &DataSection::default());
    assert_eq!(cleaned.markdown, src.trim());
    assert!(!cleaned.had_front_matter);
}

#[test]
fn html_entities_decoded_in_prose_not_in_code() {
    let src = "# Tom &amp; Jerry\n\nA&mdash;b, AT&amp;T, 1&#8212;2, 3&#x2014;4, no&nbsp;break, [x &amp; y](u) &copy;.\n\nCode `a &amp;&amp; b` stays.\n\n```html\n&mdash; &amp;\n```\n";
    assert_eq!(
        clean_default(src),
        "# Tom & Jerry\n\nA\u{2014}b, AT&T, 1\u{2014}2, 3\u{2014}4, no break, x & y \u{a9}.\n\nCode `a &amp;&amp; b` stays.\n\n```html\n&mdash; &amp;\n```"
    );
    // A character that would turn into markup is escaped instead.
    assert_eq!(
        clean_default("a &lt; b, &lt;div&gt;, &amp;copy; and &#42;stars&#42;.\n"),
        "a < b, \\<div>, \\&copy; and \\*stars\\*."
    );
    // Escaped, or text that starts with `&` after a shortcode: not entities.
    assert_eq!(
        clean_default("\\&amp; and {{< x `a` >}}&T b\n"),
        "\\&amp; and &T b"
    );
    let block = "<div>\n&mdash; in HTML &hellip; &amp;\n</div>\n";
    assert_eq!(clean_default(block), "\u{2014} in HTML \u{2026} &");
}
