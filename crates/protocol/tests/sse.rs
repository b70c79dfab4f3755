//! The SSE decoder against the `eventsource-stream` crate it replaced: the same events for any
//! stream of SSE-like lines cut anywhere, and no panic on arbitrary bytes.

#![allow(clippy::unwrap_used)]

use eventsource_stream::Eventsource;
use futures::StreamExt;
use marga_protocol::sse::{Decoder, Event};
use proptest::prelude::*;

/// What eventsource-stream decodes from `parts` (each part one chunk of the body).
fn reference(parts: &[Vec<u8>]) -> Vec<Event> {
    let chunks: Vec<Result<Vec<u8>, std::convert::Infallible>> = parts.iter().cloned().map(Ok).collect();
    let events = futures::executor::block_on(futures::stream::iter(chunks).eventsource().collect::<Vec<_>>());
    events
        .into_iter()
        .map(|e| e.unwrap())
        .map(|e| Event { event: e.event.into(), data: e.data, id: e.id, retry: e.retry })
        .collect()
}

fn decode(parts: &[Vec<u8>]) -> Vec<Event> {
    let mut decoder = Decoder::new();
    let mut out = Vec::new();
    for part in parts {
        decoder.push(part, &mut out).unwrap();
    }
    out
}

/// One SSE line: a field of the spec or not, a value that may be empty, a line end of any kind.
fn line() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        Just("data: ".to_owned()),
        Just("data:".to_owned()),
        Just("data".to_owned()),
        Just("event: ".to_owned()),
        Just("id: ".to_owned()),
        Just("retry: ".to_owned()),
        Just(": ".to_owned()),
        Just("other: ".to_owned()),
        Just(String::new()),
    ];
    let value = prop_oneof![Just(String::new()), "[a-z0-9{}\":, ]{1,12}", "[0-9]{1,4}", Just("é ✓".to_owned())];
    let end = prop_oneof![Just("\n"), Just("\r\n"), Just("\n"), Just("\r")];
    (field, value, end).prop_map(|(f, v, e)| format!("{f}{v}{e}"))
}

/// `text` cut at the given points (fractions of its length). `for_reference` moves each point
/// forward past a split character (eventsource-stream fails on one) and past a CR that would
/// end a chunk (eventsource-stream waits for an LF there, and drops a line end that only the
/// next chunk completes, which the HTML standard does not).
fn cut(text: &str, cuts: &[f64], for_reference: bool) -> Vec<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut points: Vec<usize> = cuts.iter().map(|c| (c * text.len() as f64) as usize).collect();
    if for_reference {
        for p in &mut points {
            while !text.is_char_boundary(*p) || (*p > 0 && *p < bytes.len() && bytes[*p - 1] == b'\r') {
                *p += 1;
            }
        }
    }
    points.sort_unstable();
    let mut parts = Vec::new();
    let mut start = 0;
    for p in points.into_iter().chain([text.len()]) {
        parts.push(text.as_bytes()[start..p].to_vec());
        start = p;
    }
    parts
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn decodes_what_eventsource_stream_decodes(
        lines in prop::collection::vec(line(), 0..24),
        cuts in prop::collection::vec(0.0..1.0f64, 0..6),
    ) {
        // eventsource-stream cannot end the stream with a lone CR (it waits for a possible
        // LF), so such a stream ends with the LF here; `cut` keeps CRs off chunk ends.
        let mut text = lines.concat();
        if text.ends_with('\r') {
            text.push('\n');
        }
        let parts = cut(&text, &cuts, true);
        prop_assert!(!parts.iter().any(|p| p.ends_with(b"\r")));
        prop_assert_eq!(decode(&parts), reference(&parts));
    }

    #[test]
    fn the_same_events_however_the_stream_is_cut(
        lines in prop::collection::vec(line(), 0..24),
        cuts in prop::collection::vec(0.0..1.0f64, 0..8),
    ) {
        let text = lines.concat();
        prop_assert_eq!(decode(&cut(&text, &cuts, false)), decode(&[text.into_bytes()]));
    }

    #[test]
    fn arbitrary_bytes_never_panic(parts in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..6)) {
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        for part in &parts {
            if decoder.push(part, &mut out).is_err() {
                break;
            }
        }
    }
}
