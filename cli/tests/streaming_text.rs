//! Streamed text never splits a UTF-8 character: the router's incremental
//! decoder over the real Mistral tokenizer, on text whose characters span
//! several byte-fallback tokens (accents, CJK, emoji with joiners and flags).

mod common;

use std::sync::Arc;

use anyhow::Result;
use tramontane_model::Tokenizer;
use tramontane_router::text::{IncrementalDecoder, StopStrings};

const TEXTS: &[&str] = &[
    "Le café de la gare, naïve façade, déjà vu.",
    "日本語のテキスト、そして中文。",
    "Emoji: 🌍🚀 family 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✨done✨",
    "  leading spaces,\ttabs\nand new lines  ",
];

#[test]
fn pieces_are_whole_characters_and_add_up_to_the_full_decode() -> Result<()> {
    let dir = tempfile::tempdir()?;
    common::gen_model(dir.path(), &["--preset", "tiny"])?;
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
        let expected = tokenizer.decode(&whole)?[tokenizer.decode(&prompt)?.len()..].to_string();
        assert_eq!(pieces.concat(), expected, "{text:?}");
        // Several pieces were empty while a character was incomplete.
        if text.contains('🌍') {
            assert!(pieces.iter().any(String::is_empty), "{pieces:?}");
        }
        // A stop string made of a multi-byte character is found across tokens.
        if text.contains('🚀') {
            let mut stops = StopStrings::new(vec!["🚀".into()]);
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
