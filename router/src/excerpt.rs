//! User input quoted in error messages and logs, cut short: a request with
//! a 900 KB model name gets an error of a few hundred bytes, not 900 KB.
//!
//! [`Excerpt`] quotes a value the client sent (a model name, a header, a
//! role); [`shorten`] cuts a message composed elsewhere (serde's, the chat
//! template's) that may hold such a value somewhere inside.

use std::borrow::Cow;
use std::fmt;

/// Characters of a value an error message quotes before it cuts.
pub const EXCERPT_CHARS: usize = 64;

/// Characters of a composed message kept at each end when it is cut.
const MESSAGE_END_CHARS: usize = 160;

/// A value from the request, for a message: quoted and escaped as Rust's
/// `{:?}` writes a string, and cut after [`EXCERPT_CHARS`] characters with
/// its full length said (`"aaaa…" (900000 bytes)`).
#[derive(Clone, Copy)]
pub struct Excerpt<'a>(pub &'a str);

impl fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(EXCERPT_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => {
                let quoted = format!("{:?}", &self.0[..cut]);
                let open = &quoted[..quoted.len() - 1];
                write!(f, "{open}…\" ({} bytes)", self.0.len())
            }
        }
    }
}

impl fmt::Debug for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `message` as is when short; else its beginning and its end (where
/// serde says what it expected and where) around a note of what was cut.
pub fn shorten(message: &str) -> Cow<'_, str> {
    let chars = message.chars().count();
    if chars <= 2 * MESSAGE_END_CHARS + 1 {
        return Cow::Borrowed(message);
    }
    let head_end = message
        .char_indices()
        .nth(MESSAGE_END_CHARS)
        .map_or(message.len(), |(i, _)| i);
    let tail_start = message
        .char_indices()
        .nth(chars - MESSAGE_END_CHARS)
        .map_or(message.len(), |(i, _)| i);
    Cow::Owned(format!(
        "{}… ({} bytes cut) …{}",
        &message[..head_end],
        tail_start - head_end,
        &message[tail_start..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_value_is_quoted_whole() {
        assert_eq!(Excerpt("gpt-4").to_string(), "\"gpt-4\"");
        assert_eq!(Excerpt("a\"b\n").to_string(), r#""a\"b\n""#);
    }

    #[test]
    fn a_long_value_is_cut_and_its_length_said() {
        let name = "é".repeat(450_000);
        let quoted = Excerpt(&name).to_string();
        assert_eq!(
            quoted,
            format!("\"{}…\" (900000 bytes)", "é".repeat(EXCERPT_CHARS))
        );
    }

    #[test]
    fn escapes_do_not_escape_the_cut() {
        let control = "\u{1}".repeat(10_000);
        let quoted = Excerpt(&control).to_string();
        assert!(quoted.len() < 64 * 6 + 40, "{}", quoted.len());
        assert!(quoted.ends_with("…\" (10000 bytes)"), "{quoted}");
    }

    #[test]
    fn a_long_message_keeps_both_ends() {
        let message = format!(
            "invalid type: string \"{}\", expected f32 at line 1 column 900030",
            "a".repeat(900_000)
        );
        let short = shorten(&message);
        assert!(short.len() < 2 * MESSAGE_END_CHARS + 40, "{}", short.len());
        assert!(short.starts_with("invalid type: string \"aaa"), "{short}");
        assert!(
            short.ends_with("\", expected f32 at line 1 column 900030"),
            "{short}"
        );
        assert!(short.contains("bytes cut"), "{short}");
        assert_eq!(shorten("short"), "short");
    }
}
