//! Deterministic content shared by every wire format: the reply text, the
//! "token" counts (whitespace words), stream splitting, stop/length shaping,
//! the canned tool call, ids and embeddings.
//!
//! Everything here is a pure function of its inputs (ids and timestamps
//! aside) so tests can predict exactly what the mock answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// How many characters of the user (or tool) text are echoed in the reply.
const ECHO_CHARS: usize = 40;

/// Arguments of the canned tool call, serialized.
pub(crate) const TOOL_ARGS: &str = r#"{"location":"Paris"}"#;

/// The same arguments cut in two, for streamed tool calls.
pub(crate) const TOOL_ARG_FRAGMENTS: [&str; 2] = [r#"{"location":"#, r#""Paris"}"#];

/// Id of the canned OpenAI tool call.
pub(crate) const OPENAI_TOOL_ID: &str = "call_mock_1";

/// Id of the canned Anthropic tool_use block.
pub(crate) const ANTHROPIC_TOOL_ID: &str = "toolu_mock_1";

/// Embedding dimensions when the request does not say.
pub(crate) const DEFAULT_DIMS: usize = 8;

/// Why generation stopped, provider neutral.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// Natural end of the reply.
    Stop,
    /// Cut by the request's max-tokens limit.
    Length,
    /// Cut before this stop sequence.
    StopSequence(String),
}

/// What the fake model decided to answer.
#[derive(Clone, Debug)]
pub(crate) enum Answer {
    /// Plain text, already shaped by max tokens / stop sequences.
    Text { text: String, finish: Finish },
    /// One call to the named tool with [`TOOL_ARGS`].
    Tool { name: String },
}

impl Answer {
    /// Completion "tokens" of this answer.
    pub(crate) fn completion_tokens(&self) -> u64 {
        match self {
            Answer::Text { text, .. } => word_count(text),
            Answer::Tool { .. } => word_count(TOOL_ARGS),
        }
    }
}

/// First `n` characters of `s` (never splits a character).
pub(crate) fn truncate_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((idx, _)) => &s[..idx],
        None => s,
    }
}

/// `"Mock reply to: <first 40 chars of the last user text>"`.
pub(crate) fn reply_text(last_user: &str) -> String {
    format!("Mock reply to: {}", truncate_chars(last_user, ECHO_CHARS))
}

/// `"Tool said: <first 40 chars of the tool result>"`.
pub(crate) fn tool_reply_text(result: &str) -> String {
    format!("Tool said: {}", truncate_chars(result, ECHO_CHARS))
}

/// `{"reply":"<text>"}` for JSON modes.
pub(crate) fn json_object_reply(text: &str) -> String {
    serde_json::json!({ "reply": text }).to_string()
}

/// Number of whitespace-separated words.
pub(crate) fn word_count(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Prompt "tokens": words across all texts plus one per message, at least 1.
pub(crate) fn prompt_tokens<'a>(texts: impl IntoIterator<Item = &'a str>, messages: usize) -> u64 {
    let words: u64 = texts.into_iter().map(word_count).sum();
    (words + messages as u64).max(1)
}

/// Splits `s` into stream pieces: one per word, each carrying the
/// whitespace before it. Concatenating the pieces gives back `s`.
pub(crate) fn stream_pieces(s: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut prev_ws = false;
    for (idx, ch) in s.char_indices() {
        let ws = ch.is_whitespace();
        if ws && !prev_ws && idx > start {
            pieces.push(&s[start..idx]);
            start = idx;
        }
        prev_ws = ws;
    }
    if start < s.len() {
        pieces.push(&s[start..]);
    }
    pieces
}

/// Applies stop sequences (earliest match wins) then the word limit.
pub(crate) fn shape(reply: String, max_tokens: Option<u64>, stops: &[&str]) -> Answer {
    let mut text = reply;
    let mut finish = Finish::Stop;
    let hit = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s).map(|pos| (pos, *s)))
        .min_by_key(|(pos, _)| *pos);
    if let Some((pos, stop)) = hit {
        text.truncate(pos);
        finish = Finish::StopSequence(stop.to_owned());
    }
    if let Some(max) = max_tokens {
        if word_count(&text) > max {
            let pieces = stream_pieces(&text);
            let kept: String = pieces.iter().take(max as usize).copied().collect();
            text = kept;
            finish = Finish::Length;
        }
    }
    Answer::Text { text, finish }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A process-unique id such as `chatcmpl-mock-17`.
pub(crate) fn next_id(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

/// FNV-1a 64-bit hash.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64 step: next pseudo-random value from the state.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A deterministic unit-length vector derived from a hash of `text`.
pub(crate) fn embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut state = fnv1a(text);
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            let unit = (splitmix(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
            (unit * 2.0 - 1.0) as f32
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Little-endian f32 bytes, standard base64 (OpenAI `encoding_format: base64`).
pub(crate) fn embedding_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_round_trip() {
        let s = "Mock reply to: hello  world";
        let p = stream_pieces(s);
        assert_eq!(p, vec!["Mock", " reply", " to:", " hello", "  world"]);
        assert_eq!(p.concat(), s);
        assert!(stream_pieces("").is_empty());
        assert_eq!(stream_pieces(" a ").concat(), " a ");
    }

    #[test]
    fn truncation_is_char_safe() {
        assert_eq!(truncate_chars("héllo", 2), "hé");
        assert_eq!(truncate_chars("hi", 40), "hi");
    }

    #[test]
    fn shaping() {
        let a = shape("one two three four".into(), Some(2), &[]);
        assert!(
            matches!(a, Answer::Text { ref text, finish: Finish::Length } if text == "one two")
        );
        let b = shape("one two three".into(), None, &[" three", "two"]);
        assert!(
            matches!(b, Answer::Text { ref text, finish: Finish::StopSequence(ref s) } if text == "one " && s == "two")
        );
    }

    #[test]
    fn embeddings_are_unit_and_deterministic() {
        let a = embedding("hello", 16);
        assert_eq!(a, embedding("hello", 16));
        assert_ne!(a, embedding("world", 16));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }

    #[test]
    fn tokens() {
        assert_eq!(prompt_tokens(["a b", "c"], 2), 5);
        assert_eq!(prompt_tokens([], 0), 1);
        assert_eq!(TOOL_ARG_FRAGMENTS.concat(), TOOL_ARGS);
    }
}
