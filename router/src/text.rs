//! From generated token ids to text as it streams: an incremental decoder
//! that never emits half a UTF-8 character, and stop strings matched on the
//! text (holding back what could still become a stop string).

use std::sync::Arc;

use tramontane_model::Tokenizer;

use crate::sampling::InvalidParam;

/// Prompt tokens decoded as context before the first generated token, so that
/// a leading space (SentencePiece's "▁") comes out as the full decode has it.
const CONTEXT_TOKENS: usize = 6;

/// Decodes a window of ids each time (as TGI does) rather than the whole
/// sequence: the text added by the newest ids is the decode of the window
/// minus the decode of its start.
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>, prompt: &[u32]) -> Self {
        let ids = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let read_offset = ids.len();
        Self {
            tokenizer,
            ids,
            prefix_offset: 0,
            read_offset,
        }
    }

    /// Text added by `id`; empty while a character is incomplete.
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        self.emit(false)
    }

    /// What is left at the end (an incomplete character comes out as U+FFFD).
    pub fn finish(&mut self) -> String {
        self.emit(true)
    }

    fn emit(&mut self, last: bool) -> String {
        let decode = |ids: &[u32]| self.tokenizer.decode(ids).unwrap_or_default();
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let text = decode(&self.ids[self.prefix_offset..]);
        if text.len() <= prefix.len()
            || !text.starts_with(&prefix)
            || (!last && text.ends_with('\u{FFFD}'))
        {
            return String::new();
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        text[prefix.len()..].to_string()
    }
}

/// Stop strings one request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Longest stop string, in bytes: the matcher holds back up to this much text.
pub const MAX_STOP_BYTES: usize = 512;

/// A request's stop strings, checked: at most [`MAX_STOP_STRINGS`], none
/// empty, none longer than [`MAX_STOP_BYTES`]. Made once per request, before
/// its prompts are tokenized; its one copy is shared by all its prompts.
#[derive(Debug, Clone, Default)]
pub struct StopList(Arc<[String]>);

impl StopList {
    pub fn new(stops: &[String]) -> Result<Self, InvalidParam> {
        if stops.len() > MAX_STOP_STRINGS {
            return Err(InvalidParam::new(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings (got {})",
                    stops.len()
                ),
            ));
        }
        for stop in stops {
            if stop.is_empty() {
                return Err(InvalidParam::new("stop", "a stop string is empty"));
            }
            if stop.len() > MAX_STOP_BYTES {
                return Err(InvalidParam::new(
                    "stop",
                    format!(
                        "a stop string is at most {MAX_STOP_BYTES} bytes (got {})",
                        stop.len()
                    ),
                ));
            }
        }
        Ok(Self(stops.into()))
    }
}

/// Stop strings over streamed text.
pub struct StopStrings {
    stops: StopList,
    /// Text held back: it might be the start of a stop string.
    held: String,
}

/// What a piece of text gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    /// Text safe to emit.
    pub text: String,
    /// A stop string was found; nothing after it is emitted.
    pub stopped: bool,
}

impl StopStrings {
    pub fn new(stops: StopList) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> Matched {
        self.held.push_str(piece);
        let stops = &self.stops.0;
        if stops.is_empty() {
            return Matched {
                text: std::mem::take(&mut self.held),
                stopped: false,
            };
        }
        if let Some(at) = stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let mut text = std::mem::take(&mut self.held);
            text.truncate(at);
            return Matched {
                text,
                stopped: true,
            };
        }
        // Hold back the longest tail that begins some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let held = self.held.split_off(keep);
        Matched {
            text: std::mem::replace(&mut self.held, held),
            stopped: false,
        }
    }

    /// The held-back text, at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stop_strings_over_the_caps_are_refused_naming_the_limit() {
        let stops = |n: usize, len: usize| vec!["x".repeat(len); n];
        assert!(StopList::new(&stops(MAX_STOP_STRINGS, MAX_STOP_BYTES)).is_ok());
        assert!(StopList::new(&[]).is_ok());
        let many = StopList::new(&stops(MAX_STOP_STRINGS + 1, 1)).unwrap_err();
        assert_eq!(many.param, "stop");
        assert!(many.message.contains("at most 4"), "{}", many.message);
        let long = StopList::new(&stops(1, MAX_STOP_BYTES + 1)).unwrap_err();
        assert!(long.message.contains("512 bytes"), "{}", long.message);
        let empty = StopList::new(&["a".into(), String::new()]).unwrap_err();
        assert!(empty.message.contains("empty"), "{}", empty.message);
    }

    /// Feeds `pieces` and returns the emitted text and whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut matcher = StopStrings::new(StopList::new(&stops).unwrap());
        let mut out = String::new();
        for piece in pieces {
            let m = matcher.push(piece);
            out.push_str(&m.text);
            if m.stopped {
                return (out, true);
            }
        }
        out.push_str(&matcher.flush());
        (out, false)
    }

    #[test]
    fn a_stop_string_across_pieces_is_found_and_cut() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D world"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn a_near_miss_is_released() {
        assert_eq!(run(&["END"], &["EN", "d"]), ("ENd".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }

    #[test]
    fn multibyte_text_is_split_on_characters() {
        assert_eq!(run(&["é!"], &["café", "?"]), ("café?".into(), false));
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
    }

    proptest! {
        #[test]
        fn streaming_matches_matching_the_whole_text(
            text in "[ab ]{0,40}",
            cuts in proptest::collection::vec(0usize..40, 0..6),
            stop in "[ab]{1,3}",
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= text.len()).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([text.len()]) {
                pieces.push(&text[start..cut.max(start)]);
                start = cut.max(start);
            }
            let expected = match text.find(&stop) {
                Some(at) => (text[..at].to_string(), true),
                None => (text.clone(), false),
            };
            prop_assert_eq!(run(&[&stop], &pieces), expected);
        }
    }

    const TEXTS: &[&str] = &[
        "Le café de la gare, naïve façade, déjà vu.",
        "日本語のテキスト、そして中文。",
        "Emoji: 🌍🚀 family 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✨done✨",
        "  leading spaces,\ttabs\nand new lines  ",
    ];

    /// Streamed text never splits a UTF-8 character: the incremental decoder
    /// over the real Mistral tokenizer, on text whose characters span several
    /// byte-fallback tokens (accents, CJK, emoji with joiners and flags).
    #[test]
    fn pieces_are_whole_characters_and_add_up_to_the_full_decode()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        tramontane_synthetic::write(dir.path(), &tramontane_synthetic::Spec::default())?;
        let tokenizer = Arc::new(Tokenizer::from_dir(dir.path())?);
        let prompt = tokenizer.encode("Once upon a time")?;
        for text in TEXTS {
            // The text as if generated after the prompt (without its BOS).
            let generated = tokenizer.encode(text)?[1..].to_vec();
            let mut decoder = IncrementalDecoder::new(tokenizer.clone(), &prompt);
            let mut pieces: Vec<String> = generated.iter().map(|&id| decoder.push(id)).collect();
            pieces.push(decoder.finish());
            for piece in &pieces {
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "{text:?}: broken piece {piece:?}"
                );
            }
            let whole: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
            let expected =
                tokenizer.decode(&whole)?[tokenizer.decode(&prompt)?.len()..].to_string();
            assert_eq!(pieces.concat(), expected, "{text:?}");
            // Several pieces were empty while a character was incomplete.
            if text.contains('🌍') {
                assert!(pieces.iter().any(String::is_empty), "{pieces:?}");
            }
            // A stop string made of a multi-byte character is found across tokens.
            if text.contains('🚀') {
                let mut stops = StopStrings::new(StopList::new(&["🚀".to_string()]).unwrap());
                let mut out = String::new();
                for piece in &pieces {
                    let matched = stops.push(piece);
                    out.push_str(&matched.text);
                    if matched.stopped {
                        break;
                    }
                }
                assert_eq!(out, expected[..expected.find('🚀').unwrap()]);
            }
        }
        Ok(())
    }
}
