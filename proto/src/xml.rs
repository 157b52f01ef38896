//! Text put into XML the project writes (the sample registers' XML
//! evidence, the OOTS bridge's EDM documents): escaped once, here.

/// Escapes `text` for XML element content and attribute values: markup
/// and quotes as entities, tabs and line ends as character references (so
/// an attribute keeps them), and characters XML 1.0 does not allow at all
/// dropped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#x9;"),
            '\n' => out.push_str("&#xA;"),
            '\r' => out.push_str("&#xD;"),
            c if allowed(c) => out.push(c),
            _ => {}
        }
    }
    out
}

/// XML 1.0's Char production, without the three escaped above.
fn allowed(c: char) -> bool {
    matches!(c, '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

#[cfg(test)]
mod tests {
    #[test]
    fn markup_and_quotes_are_escaped_and_the_rest_kept() {
        assert_eq!(
            super::escape(r#"<a href="x">Tom & 'Jerry'</a> ü"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &apos;Jerry&apos;&lt;/a&gt; ü"
        );
        assert_eq!(super::escape("a\nb\u{0}\u{1b}c\u{FFFE}"), "a&#xA;bc");
    }
}
