//! Server-sent events framing: an incremental decoder fed the bytes of a stream as they
//! arrive, which yields each complete event (the `text/event-stream` rules of the HTML
//! standard: lines end in LF, CRLF or CR; `data` lines join with LF; `event` names it;
//! comments and unknown fields are ignored; an event is dispatched at a blank line and only if
//! it has data; an unfinished event at the end of the stream is dropped).
//!
//! Marga reads every upstream stream through it, one call per batch of bytes. It scans lines
//! with `memchr` and makes one `String` per event (none when an event has a single `data` line
//! that needs no copy beyond its own); the `eventsource-stream` crate it replaces parsed with
//! `nom` a character at a time, which was a twentieth of Marga's CPU on a streamed answer, and
//! it panicked on a byte-order mark split from its first byte.

use std::borrow::Cow;
use std::time::Duration;

/// The longest event (or line) the decoder holds before giving up on a stream: far more than
/// any model's chunk, and a bound on what a broken upstream can make it buffer.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The event's type: its `event` field, else `message` (borrowed: no allocation for the
    /// unnamed events that OpenAI-style streams are made of).
    pub event: Cow<'static, str>,
    /// Its `data` lines joined with LF.
    pub data: String,
    /// The last event id seen on the stream (`id` fields persist across events).
    pub id: String,
    /// The `retry` field, if this event had one.
    pub retry: Option<Duration>,
}

/// Why a stream cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    #[error("the event stream is not valid UTF-8")]
    Utf8,
    #[error("an event in the stream is longer than {MAX_EVENT_BYTES} bytes")]
    TooLong,
}

/// The incremental decoder: [`Decoder::push`] takes the next bytes and appends the events they
/// complete.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    /// The previous bytes ended in CR: an LF that starts the next ones ends nothing.
    after_cr: bool,
    started: bool,
    event: String,
    data: String,
    has_data: bool,
    id: String,
    retry: Option<Duration>,
}

const BOM: &[u8] = "\u{feff}".as_bytes();

impl Decoder {
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Decodes `bytes`, the next part of the stream, appending completed events to `out` (a `Vec`, a `VecDeque`…).
    pub fn push(&mut self, mut bytes: &[u8], out: &mut impl Extend<Event>) -> Result<(), SseError> {
        if !self.started {
            if self.partial.len() + bytes.len() < BOM.len() && BOM.starts_with(&[&self.partial[..], bytes].concat()) {
                self.partial.extend_from_slice(bytes);
                return Ok(());
            }
            self.started = true;
            let mut head = std::mem::take(&mut self.partial);
            head.extend_from_slice(bytes);
            let head = head.strip_prefix(BOM).unwrap_or(&head).to_vec();
            return self.push_lines(&head, out);
        }
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        self.push_lines(bytes, out)
    }

    fn push_lines(&mut self, mut bytes: &[u8], out: &mut impl Extend<Event>) -> Result<(), SseError> {
        while let Some(end) = memchr::memchr2(b'\n', b'\r', bytes) {
            let (line, rest) = (&bytes[..end], &bytes[end + 1..]);
            if bytes[end] == b'\r' {
                match rest.first() {
                    Some(b'\n') => bytes = &rest[1..],
                    Some(_) => bytes = rest,
                    None => {
                        self.after_cr = true;
                        bytes = rest;
                    }
                }
            } else {
                bytes = rest;
            }
            if self.partial.is_empty() {
                self.line(line, out)?;
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole, out)?;
                whole.clear();
                self.partial = whole;
            }
        }
        if self.partial.len() + bytes.len() > MAX_EVENT_BYTES {
            return Err(SseError::TooLong);
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }

    /// Handles one line (without its end).
    fn line(&mut self, line: &[u8], out: &mut impl Extend<Event>) -> Result<(), SseError> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let value = std::str::from_utf8(value).map_err(|_| SseError::Utf8)?;
        match field {
            b"data" => {
                if self.data.len() + value.len() > MAX_EVENT_BYTES {
                    return Err(SseError::TooLong);
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            b"event" => value.clone_into(&mut self.event),
            b"id" if !value.contains('\0') => value.clone_into(&mut self.id),
            b"retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = value.parse().ok().map(Duration::from_millis);
            }
            _ => {}
        }
        Ok(())
    }

    /// A blank line: the event so far, if it has data.
    fn dispatch(&mut self, out: &mut impl Extend<Event>) {
        let event = std::mem::take(&mut self.event);
        let retry = self.retry.take();
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        out.extend(Some(Event {
            event: if event.is_empty() { Cow::Borrowed("message") } else { Cow::Owned(event) },
            data: std::mem::take(&mut self.data),
            id: self.id.clone(),
            retry,
        }));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn decode(parts: &[&[u8]]) -> Vec<Event> {
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        for part in parts {
            decoder.push(part, &mut out).unwrap();
        }
        out
    }

    fn data(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn events_are_dispatched_at_blank_lines_whatever_the_line_ends() {
        let events = decode(&[b"data: one\n\ndata: two\r\n\r\ndata: three\r\rdata: four\n"]);
        assert_eq!(data(&events), ["one", "two", "three"]);
        assert!(events.iter().all(|e| e.event == "message"));
    }

    #[test]
    fn an_event_split_anywhere_is_the_same_event() {
        let whole: &[u8] = b"event: delta\ndata: {\"a\":\n data:1}\r\n\r\n";
        let expected = decode(&[whole]);
        assert_eq!(expected[0].event, "delta");
        assert_eq!(expected[0].data, "{\"a\":");
        for cut in 0..whole.len() {
            assert_eq!(decode(&[&whole[..cut], &whole[cut..]]), expected, "cut at {cut}");
        }
    }

    #[test]
    fn data_lines_join_comments_and_unknown_fields_are_ignored() {
        let events = decode(&[b": keep-alive\ndata:a\nfoo: bar\ndata\ndata: c\nid: 7\nretry: 250\n\n"]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "a\n\nc");
        assert_eq!(events[0].id, "7");
        assert_eq!(events[0].retry, Some(Duration::from_millis(250)));
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_and_an_unfinished_one_is_dropped() {
        let events = decode(&[b"event: ping\n\ndata: kept\n\ndata: never finished"]);
        assert_eq!(data(&events), ["kept"]);
        assert_eq!(events[0].event, "message");
    }

    #[test]
    fn a_byte_order_mark_is_skipped_even_split_across_pushes() {
        let bom = "\u{feff}".as_bytes();
        let events = decode(&[&bom[..1], &bom[1..], b"data: x\n\n"]);
        assert_eq!(data(&events), ["x"]);
    }

    #[test]
    fn invalid_utf8_and_endless_lines_are_errors() {
        let mut out = Vec::new();
        assert_eq!(Decoder::new().push(b"data: \xff\n\n", &mut out), Err(SseError::Utf8));
        let mut decoder = Decoder::new();
        let big = vec![b'x'; MAX_EVENT_BYTES / 2 + 1];
        decoder.push(b"data: ", &mut out).unwrap();
        decoder.push(&big, &mut out).unwrap();
        assert_eq!(decoder.push(&big, &mut out), Err(SseError::TooLong));
    }
}
