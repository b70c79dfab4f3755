//! Chat stream chunks as the gateway relays them. A chunk translated from another protocol is
//! a [`ChatCompletionChunk`]; a chunk from an OpenAI-compatible upstream is kept as the
//! upstream's JSON text ([`RelayedChunk`]), read only for what the relay needs (content, the
//! finish reason, the text for counting) and written out as it came with Marga's `id` and
//! `model` put in place of the upstream's. Parsing every event into the typed chunk, with its
//! maps of unknown fields, and printing it again cost more than the rest of the per-event work;
//! relaying the text also passes on every field and digit as the upstream wrote it.
//!
//! A chunk that carries usage (the one the gateway writes the cost into) or that does not look
//! like a plain chunk is parsed whole instead, so it behaves exactly as before.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::openai::{ChatCompletionChunk, FinishReason, Usage};

/// One chunk of a chat stream.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatChunk {
    /// A typed chunk: translated from another protocol, or an upstream chunk parsed whole.
    Parsed(ChatCompletionChunk),
    /// An OpenAI-compatible upstream's chunk, kept as its text.
    Relayed(RelayedChunk),
}

impl From<ChatCompletionChunk> for ChatChunk {
    fn from(chunk: ChatCompletionChunk) -> Self {
        ChatChunk::Parsed(chunk)
    }
}

impl ChatChunk {
    /// An upstream's `chat.completion.chunk` JSON: kept as text when it is a plain chunk,
    /// else parsed whole (so a chunk the typed parse refuses is still refused).
    pub fn from_upstream_json(json: String) -> Result<Self, serde_json::Error> {
        match RelayedChunk::read(json) {
            Ok(relayed) => Ok(ChatChunk::Relayed(relayed)),
            Err(json) => serde_json::from_str(&json).map(ChatChunk::Parsed),
        }
    }

    /// The typed chunk (a relayed one is parsed whole).
    pub fn into_parsed(self) -> Result<ChatCompletionChunk, serde_json::Error> {
        match self {
            ChatChunk::Parsed(chunk) => Ok(chunk),
            ChatChunk::Relayed(relayed) => serde_json::from_str(&relayed.json),
        }
    }

    /// True when the chunk carries generated content: text, refusal, reasoning or a tool call.
    pub fn has_content(&self) -> bool {
        match self {
            ChatChunk::Parsed(chunk) => chunk.has_content(),
            ChatChunk::Relayed(relayed) => relayed.has_content,
        }
    }

    /// The usage the chunk reports (a relayed chunk never has any: see the module doc).
    pub fn usage(&self) -> Option<&Usage> {
        match self {
            ChatChunk::Parsed(chunk) => chunk.usage.as_ref(),
            ChatChunk::Relayed(_) => None,
        }
    }

    /// The first choice's text.
    pub fn text(&self) -> Option<&str> {
        match self {
            ChatChunk::Parsed(chunk) => chunk.choices.first().and_then(|c| c.delta.content.as_deref()),
            ChatChunk::Relayed(relayed) => match &relayed.text {
                Text::None => None,
                Text::At(range) => relayed.json.get(range.clone()),
                Text::Owned(text) => Some(text),
            },
        }
    }

    /// The first finish reason among the choices.
    pub fn finish_reason(&self) -> Option<&FinishReason> {
        match self {
            ChatChunk::Parsed(chunk) => chunk.choices.iter().find_map(|c| c.finish_reason.as_ref()),
            ChatChunk::Relayed(relayed) => relayed.finish_reason.as_ref(),
        }
    }

    /// Writes the chunk's JSON with the gateway's `id` and `model` in place of the upstream's.
    pub fn write_json(self, identity: &Identity, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        match self {
            ChatChunk::Relayed(relayed) => {
                relayed.write_json(identity, out);
                Ok(())
            }
            ChatChunk::Parsed(chunk) => write_parsed(&chunk, identity, out),
        }
    }
}

/// A typed chunk's JSON with the gateway's `id` and `model`, field for field as serde writes
/// the chunk with them set, but with the two strings (and the usual `object`) copied as they
/// are already written rather than escaped again for every chunk of a translated stream.
fn write_parsed(chunk: &ChatCompletionChunk, identity: &Identity, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    // Every field named: a field added to the chunk type fails to compile here, not to be sent.
    let ChatCompletionChunk { id: _, object, created, model: _, choices, usage, extra } = chunk;
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(identity.id_json.as_bytes());
    if object == CHUNK_OBJECT {
        out.extend_from_slice(b",\"object\":\"chat.completion.chunk\"");
    } else {
        out.extend_from_slice(b",\"object\":");
        serde_json::to_writer(&mut *out, object)?;
    }
    out.extend_from_slice(b",\"created\":");
    serde_json::to_writer(&mut *out, created)?;
    out.extend_from_slice(b",\"model\":");
    out.extend_from_slice(identity.model_json.as_bytes());
    out.extend_from_slice(b",\"choices\":");
    serde_json::to_writer(&mut *out, choices)?;
    if let Some(usage) = usage {
        out.extend_from_slice(b",\"usage\":");
        serde_json::to_writer(&mut *out, usage)?;
    }
    for (key, value) in extra {
        out.push(b',');
        serde_json::to_writer(&mut *out, key)?;
        out.push(b':');
        serde_json::to_writer(&mut *out, value)?;
    }
    out.push(b'}');
    Ok(())
}

const CHUNK_OBJECT: &str = "chat.completion.chunk";

/// The `id` and `model` every chunk of a relayed stream carries, also as JSON strings.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    id: String,
    model: String,
    id_json: String,
    model_json: String,
}

impl Identity {
    pub fn new(id: &str, model: &str) -> Self {
        // Printed straight from the `&str` (through a `Value` it cost ≈ 1,300 instructions
        // each, on every request).
        let json = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
        Identity { id: id.to_owned(), model: model.to_owned(), id_json: json(id), model_json: json(model) }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub(crate) fn id_json(&self) -> &str {
        &self.id_json
    }

    pub(crate) fn model_json(&self) -> &str {
        &self.model_json
    }
}

/// An upstream chunk's JSON text and what the relay reads from it.
#[derive(Clone, Debug, PartialEq)]
pub struct RelayedChunk {
    json: String,
    /// Where the values of the top-level `id` and `model` are (quotes included).
    id: Range<usize>,
    model: Range<usize>,
    has_content: bool,
    text: Text,
    finish_reason: Option<FinishReason>,
}

/// The first choice's text: none, where it is in the JSON (no escapes), or unescaped.
#[derive(Clone, Debug, PartialEq)]
enum Text {
    None,
    At(Range<usize>),
    Owned(String),
}

/// The top level of an upstream chunk or answer as the relay reads it: `id`, `model` and
/// `usage` as written, the choices as `C` reads them; everything else is skipped, not parsed.
#[derive(Deserialize)]
pub(crate) struct View<'a, C> {
    #[serde(borrow)]
    pub id: &'a RawValue,
    #[serde(rename = "object", borrow)]
    _object: &'a RawValue,
    #[serde(rename = "created")]
    _created: u64,
    #[serde(borrow)]
    pub model: &'a RawValue,
    pub choices: Vec<C>,
    #[serde(default, borrow)]
    pub usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(rename = "index")]
    _index: u32,
    #[serde(borrow)]
    delta: DeltaView<'a>,
    #[serde(default)]
    finish_reason: Option<FinishReason>,
}

#[derive(Default, Deserialize)]
struct DeltaView<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<&'a RawValue>>,
}

impl DeltaView<'_> {
    fn has_content(&self) -> bool {
        let some_text = |s: &Option<Cow<'_, str>>| s.as_deref().is_some_and(|s| !s.is_empty());
        some_text(&self.content)
            || some_text(&self.refusal)
            || some_text(&self.reasoning)
            || self.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
    }
}

impl RelayedChunk {
    /// Reads a plain chunk; gives the text back when it is not one: it carries usage, its `id`
    /// or `model` is not a string, it spans several lines (it could not be relayed as one SSE
    /// `data` line), it lacks a field the typed chunk would add (`object`, `choices`, a
    /// choice's `delta`), or its fields do not have the types the typed chunk requires.
    fn read(json: String) -> Result<Self, String> {
        if memchr::memchr2(b'\n', b'\r', json.as_bytes()).is_some() {
            return Err(json);
        }
        let Ok(view) = serde_json::from_str::<View<'_, ChoiceView<'_>>>(&json) else { return Err(json) };
        let is_string = |raw: &RawValue| raw.get().starts_with('"');
        if view.usage.is_some() || !is_string(view.id) || !is_string(view.model) {
            return Err(json);
        }
        let span = |part: &str| span_in(&json, part);
        let text = match view.choices.first().and_then(|c| c.delta.content.as_ref()) {
            None => Text::None,
            Some(Cow::Borrowed(text)) => Text::At(span(text)),
            Some(Cow::Owned(text)) => Text::Owned(text.clone()),
        };
        let (id, model) = (span(view.id.get()), span(view.model.get()));
        let has_content = view.choices.iter().any(|c| c.delta.has_content());
        let finish_reason = view.choices.iter().find_map(|c| c.finish_reason.clone());
        drop(view);
        Ok(RelayedChunk { json, id, model, has_content, text, finish_reason })
    }

    /// The JSON with `id` and `model` put in place of the upstream's.
    fn write_json(&self, identity: &Identity, out: &mut Vec<u8>) {
        let mut parts = [
            (self.id.clone(), identity.id_json.as_bytes()),
            (self.model.clone(), identity.model_json.as_bytes()),
        ];
        splice(self.json.as_bytes(), &mut parts, out);
    }
}

/// Writes `json` to `out` with each span replaced by its value (spans that do not overlap,
/// in any order).
pub(crate) fn splice(json: &[u8], parts: &mut [(Range<usize>, &[u8])], out: &mut Vec<u8>) {
    parts.sort_unstable_by_key(|(span, _)| span.start);
    let mut at = 0;
    for (span, value) in parts.iter() {
        out.extend_from_slice(&json[at..span.start]);
        out.extend_from_slice(value);
        at = span.end;
    }
    out.extend_from_slice(&json[at..]);
}

/// Where `part`, a slice of `whole`, lies in it.
pub(crate) fn span_in(whole: &str, part: &str) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::{json, Value};

    fn written(chunk: ChatChunk) -> Value {
        let mut out = Vec::new();
        chunk.write_json(&Identity::new("gen-1", "team/model"), &mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn upstream(value: &Value) -> ChatChunk {
        ChatChunk::from_upstream_json(value.to_string()).unwrap()
    }

    const CHUNK: &str = r#"{"id":"chatcmpl-9","object":"chat.completion.chunk","created":7,"model":"gpt-x","system_fingerprint":"fp","choices":[{"index":0,"delta":{"content":"Hel\"lo"},"logprobs":null,"finish_reason":null,"custom":{"a":[1,2.50]}}],"usage":null,"vendor":1e400}"#;

    #[test]
    fn a_plain_chunk_is_relayed_as_written_with_marga_identity() {
        let chunk = ChatChunk::from_upstream_json(CHUNK.to_owned()).unwrap();
        assert!(matches!(chunk, ChatChunk::Relayed(_)));
        assert!(chunk.has_content());
        assert_eq!(chunk.text(), Some("Hel\"lo"));
        assert_eq!(chunk.finish_reason(), None);
        let mut out = Vec::new();
        chunk.write_json(&Identity::new("gen-1", "team/model"), &mut out).unwrap();
        let expected = CHUNK.replace("\"chatcmpl-9\"", "\"gen-1\"").replace("\"gpt-x\"", "\"team/model\"");
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn relayed_and_parsed_chunks_read_and_write_the_same() {
        let cases = [
            json!({"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
            json!({"model": "m", "object": "chat.completion.chunk", "created": 1, "id": "a",
                   "choices": [{"index": 0, "delta": {"content": "plain"}, "finish_reason": null}]}),
            json!({"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            json!({"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", "type": "function",
                     "function": {"name": "f", "arguments": ""}}]}, "finish_reason": null}]}),
            json!({"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"reasoning": "hmm"}, "finish_reason": null}]}),
            json!({"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"refusal": "no"}, "finish_reason": null}]}),
            json!({"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"content": "caf\u{e9} \n"}, "finish_reason": null}]}),
        ];
        for case in cases {
            let relayed = upstream(&case);
            assert!(matches!(relayed, ChatChunk::Relayed(_)), "{case}");
            let parsed = ChatChunk::Parsed(serde_json::from_value(case.clone()).unwrap());
            assert_eq!(relayed.has_content(), parsed.has_content(), "{case}");
            assert_eq!(relayed.text(), parsed.text(), "{case}");
            assert_eq!(relayed.finish_reason(), parsed.finish_reason(), "{case}");
            assert_eq!(written(relayed), written(parsed), "{case}");
        }
    }

    #[test]
    fn a_typed_chunk_is_written_as_serde_writes_it_with_marga_identity() {
        let identity = Identity::new("gen-\"1\"", "team/m\u{e9}del");
        let cases = [
            json!({"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": "x\n"}, "finish_reason": null}]}),
            json!({"id": "a", "object": "chat.completion.chunk", "created": 17_000_000_000_u64, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, "vendor": {"z": 1}, "a": null}),
            json!({"id": "a", "object": "something.else", "created": 0, "model": "m",
                   "choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "c", "type": "function",
                     "function": {"name": "f", "arguments": "{}"}}], "reasoning": "r"}, "finish_reason": "tool_calls",
                     "logprobs": {"content": []}, "custom": 2}]}),
            json!({"id": "a", "created": 5, "model": "m"}),
        ];
        for case in cases {
            let mut chunk: ChatCompletionChunk = serde_json::from_value(case.clone()).unwrap();
            let mut out = Vec::new();
            ChatChunk::Parsed(chunk.clone()).write_json(&identity, &mut out).unwrap();
            chunk.id = identity.id().to_owned();
            chunk.model = identity.model().to_owned();
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&chunk).unwrap(), "{case}");
        }
    }

    #[test]
    fn chunks_with_usage_or_of_another_shape_are_parsed_whole() {
        let usage = json!({"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}});
        assert!(matches!(upstream(&usage), ChatChunk::Parsed(_)));
        assert_eq!(upstream(&usage).usage().unwrap().total_tokens, 7);
        let multi_line = "{\"id\": \"a\",\n\"created\": 1, \"model\": \"m\", \"choices\": []}".to_owned();
        assert!(matches!(ChatChunk::from_upstream_json(multi_line).unwrap(), ChatChunk::Parsed(_)));
        let numeric_id = json!({"id": 5, "created": 1, "model": "m", "choices": []});
        assert!(ChatChunk::from_upstream_json(numeric_id.to_string()).is_err());
        let no_created = json!({"id": "a", "object": "chat.completion.chunk", "model": "m", "choices": []});
        assert!(ChatChunk::from_upstream_json(no_created.to_string()).is_err());
        for sparse in [json!({"id": "a", "created": 1, "model": "m", "choices": []}),
                       json!({"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "m"}),
                       json!({"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "m",
                              "choices": [{"index": 0, "finish_reason": "stop"}]})] {
            assert!(matches!(upstream(&sparse), ChatChunk::Parsed(_)), "{sparse}");
        }
    }
}
