//! Text from agents and services (service output, reasons, error messages, names, hook answers) made safe for the
//! operator's terminal and the store: control characters, ANSI/OSC escape sequences, C1 controls and invisible
//! Unicode format characters (bidi overrides, zero-width) are shown as visible escapes (`\x1b]8;;…`, `\u{202e}`),
//! so a service cannot retitle the terminal, hide text, forge a hyperlink or reorder what the operator reads.
//! [`escape`] is the one function for this; it is applied where such text enters the controller (the agent
//! calls in `agent/`, hook answers in `hooks.rs`, display rows in `node_status.rs`).

use std::borrow::Cow;
use std::fmt::Write as _;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// `text` with every character a terminal would act on, or would not show, replaced by a visible escape:
/// `\n`, `\r`, `\t`, `\x..` for other C0 controls and DEL, `\u{..}` for C1 controls, Unicode format characters and
/// line/paragraph separators. Printable text (any script) is kept as is; clean text is returned without copying.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !needs_escape(c) {
            out.push(c);
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
        }
    }
    Cow::Owned(out)
}

/// [`escape`] into an owned string.
pub fn escaped(text: &str) -> String {
    escape(text).into_owned()
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c.general_category(),
            GeneralCategory::Format
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_and_invisible_characters_become_visible() {
        assert!(matches!(escape("plain text, 日本語 ok"), Cow::Borrowed(_)));
        assert_eq!(
            escape("\x1b]8;;https://evil.example\x07click\x1b]8;;\x07"),
            "\\x1b]8;;https://evil.example\\x07click\\x1b]8;;\\x07"
        );
        assert_eq!(escape("\x1b[2J\x1b[31mred"), "\\x1b[2J\\x1b[31mred");
        assert_eq!(escape("a\nb\rc\td\x7f"), "a\\nb\\rc\\td\\x7f");
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape("abc\u{202e}fdp.exe"), "abc\\u{202e}fdp.exe");
        assert_eq!(escape("zero\u{200b}width"), "zero\\u{200b}width");
        // Already-escaped text passes through unchanged (escaping twice changes nothing more than once).
        let once = escaped("\x1b]0;title\x07");
        assert_eq!(escape(&once), once);
    }
}
