//! Anthropic Messages SSE events → OpenAI `chat.completion.chunk`s, one event at a time.
//!
//! `message_start` gives the role chunk; text, tool input and thinking deltas give content,
//! tool call and `reasoning` chunks; `message_delta` gives the finish reason; `message_stop`
//! gives a final usage chunk (`choices: []`) and finishes the translator.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::response::{finish_reason, openai_usage};
use super::types::{BlockDelta, ContentBlock, DeltaUsage, MessageDeltaBody, MessagesResponse, StreamEvent};
use crate::openai::{
    ChatCompletionChunk, ChunkChoice, ChunkDelta, Extra, FinishReason, FunctionCallDelta, Role, ToolCallDelta,
};

/// The event names of the Messages stream; any other named event is ignored unread.
const KNOWN_EVENTS: [&str; 8] = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
];

/// What one upstream event means downstream.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamStep {
    /// Zero or more chunks to pass on.
    Chunks(Vec<ChatCompletionChunk>),
    /// The stream is over (returned for every event after `message_stop`).
    Done,
    /// The upstream reported an error (`kind` is its error type, e.g. `overloaded_error`), or
    /// sent an event that could not be parsed (`kind` is `malformed`).
    Error { message: String, kind: String },
}

/// Translates one Anthropic stream into OpenAI chunks. One per stream; feed it every SSE event
/// in order with [`push`](Self::push).
#[derive(Clone, Debug, Default)]
pub struct StreamTranslator {
    created: u64,
    id: String,
    model: String,
    input_tokens: u64,
    output_tokens: u64,
    cache_creation_tokens: u64,
    cache_read_tokens: u64,
    /// Anthropic content block index → OpenAI tool call index.
    tool_calls: HashMap<u32, u32>,
    next_tool_call: u32,
    finished: bool,
}

impl StreamTranslator {
    /// A translator whose chunks carry `created` (unix seconds).
    pub fn new(created: u64) -> Self {
        StreamTranslator { created, ..StreamTranslator::default() }
    }

    /// True once `message_stop` was seen: the usage chunk has been emitted.
    pub fn is_done(&self) -> bool {
        self.finished
    }

    /// Translates one SSE event: `event` is its name (empty or `message` when the upstream sent
    /// none; the data's `type` then decides), `data` its JSON.
    pub fn push(&mut self, event: &str, data: &str) -> StreamStep {
        if self.finished {
            return StreamStep::Done;
        }
        let named = !(event.is_empty() || event == "message");
        if named && !KNOWN_EVENTS.contains(&event) || event == "ping" {
            return StreamStep::Chunks(Vec::new());
        }
        if event == "error" {
            return error_step(data);
        }
        match parse_event(event, data) {
            Ok(parsed) => self.apply(parsed),
            Err(e) => StreamStep::Error {
                message: format!("malformed Anthropic stream event: {e}"),
                kind: "malformed".to_owned(),
            },
        }
    }

    fn apply(&mut self, event: StreamEvent) -> StreamStep {
        let chunks = match event {
            StreamEvent::MessageStart { message } => self.start(message),
            StreamEvent::ContentBlockStart { index, content_block } => self.block_start(index, content_block),
            StreamEvent::ContentBlockDelta { index, delta } => self.block_delta(index, delta),
            StreamEvent::MessageDelta { delta, usage } => self.message_delta(delta, usage),
            StreamEvent::MessageStop => self.stop(),
            StreamEvent::Error { error } => {
                return StreamStep::Error { message: error.message, kind: error.kind };
            }
            StreamEvent::ContentBlockStop { .. } | StreamEvent::Ping | StreamEvent::Unknown => None,
        };
        StreamStep::Chunks(chunks.into_iter().collect())
    }

    fn start(&mut self, message: MessagesResponse) -> Option<ChatCompletionChunk> {
        self.id = message.id;
        self.model = message.model;
        self.input_tokens = message.usage.input_tokens;
        self.output_tokens = message.usage.output_tokens;
        self.cache_creation_tokens = message.usage.cache_creation_input_tokens.unwrap_or(0);
        self.cache_read_tokens = message.usage.cache_read_input_tokens.unwrap_or(0);
        let delta = ChunkDelta { role: Some(Role::Assistant), content: Some(String::new()), ..ChunkDelta::default() };
        Some(self.chunk(delta, None))
    }

    fn block_start(&mut self, index: u32, block: ContentBlock) -> Option<ChatCompletionChunk> {
        match block {
            ContentBlock::Text { text } => self.text(text),
            ContentBlock::Thinking { thinking, .. } => self.reasoning(thinking),
            ContentBlock::ToolUse { id, name, .. } => {
                let ordinal = self.next_tool_call;
                self.next_tool_call = self.next_tool_call.saturating_add(1);
                self.tool_calls.insert(index, ordinal);
                let call = ToolCallDelta {
                    index: ordinal,
                    id: Some(id),
                    kind: Some("function".to_owned()),
                    function: Some(FunctionCallDelta { name: Some(name), arguments: Some(String::new()) }),
                };
                Some(self.tool_call(call))
            }
            _ => None,
        }
    }

    fn block_delta(&mut self, index: u32, delta: BlockDelta) -> Option<ChatCompletionChunk> {
        match delta {
            BlockDelta::TextDelta { text } => self.text(text),
            BlockDelta::ThinkingDelta { thinking } => self.reasoning(thinking),
            BlockDelta::InputJsonDelta { partial_json } if !partial_json.is_empty() => {
                let ordinal = *self.tool_calls.get(&index)?;
                let function = FunctionCallDelta { name: None, arguments: Some(partial_json) };
                let call = ToolCallDelta { index: ordinal, function: Some(function), ..ToolCallDelta::default() };
                Some(self.tool_call(call))
            }
            _ => None,
        }
    }

    fn message_delta(&mut self, delta: MessageDeltaBody, usage: Option<DeltaUsage>) -> Option<ChatCompletionChunk> {
        if let Some(usage) = usage {
            self.input_tokens = usage.input_tokens.unwrap_or(self.input_tokens);
            self.output_tokens = usage.output_tokens.unwrap_or(self.output_tokens);
            self.cache_creation_tokens = usage.cache_creation_input_tokens.unwrap_or(self.cache_creation_tokens);
            self.cache_read_tokens = usage.cache_read_input_tokens.unwrap_or(self.cache_read_tokens);
        }
        let reason = finish_reason(delta.stop_reason.as_ref()?);
        Some(self.chunk(ChunkDelta::default(), Some(reason)))
    }

    fn stop(&mut self) -> Option<ChatCompletionChunk> {
        self.finished = true;
        let usage =
            openai_usage(self.input_tokens, self.output_tokens, self.cache_creation_tokens, self.cache_read_tokens);
        let mut chunk = self.chunk(ChunkDelta::default(), None);
        chunk.choices.clear();
        chunk.usage = Some(usage);
        Some(chunk)
    }

    fn text(&self, text: String) -> Option<ChatCompletionChunk> {
        (!text.is_empty()).then(|| self.chunk(ChunkDelta { content: Some(text), ..ChunkDelta::default() }, None))
    }

    fn reasoning(&self, thinking: String) -> Option<ChatCompletionChunk> {
        if thinking.is_empty() {
            return None;
        }
        let mut delta = ChunkDelta::default();
        delta.extra.insert("reasoning".to_owned(), Value::String(thinking));
        Some(self.chunk(delta, None))
    }

    fn tool_call(&self, call: ToolCallDelta) -> ChatCompletionChunk {
        self.chunk(ChunkDelta { tool_calls: Some(vec![call]), ..ChunkDelta::default() }, None)
    }

    fn chunk(&self, delta: ChunkDelta, finish_reason: Option<FinishReason>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".to_owned(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice { index: 0, delta, finish_reason, logprobs: None, extra: Extra::new() }],
            usage: None,
            extra: Extra::new(),
        }
    }
}

/// Reads an event's data. A `content_block_delta` (the bulk of every stream) is read into plain
/// structs first: the internally tagged [`StreamEvent`] and [`BlockDelta`] buffer every field
/// before they choose a variant, which cost about as much as the rest of the event's
/// translation. Whatever the plain reading does not take (another event or delta type, a field
/// of the wrong type) goes through the enums as before, so the result is the same.
fn parse_event(event: &str, data: &str) -> Result<StreamEvent, serde_json::Error> {
    if event == "content_block_delta" {
        if let Some(delta) = serde_json::from_str::<PlainDelta<'_>>(data).ok().and_then(PlainDelta::into_event) {
            return Ok(delta);
        }
    }
    serde_json::from_str(data)
}

/// A `content_block_delta` event's data, without the enums' buffering (see [`parse_event`]).
#[derive(Deserialize)]
struct PlainDelta<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    index: u32,
    #[serde(borrow)]
    delta: PlainBlockDelta<'a>,
}

#[derive(Deserialize)]
struct PlainBlockDelta<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
}

impl PlainDelta<'_> {
    /// The event, when it is one of the delta types read here with its field.
    fn into_event(self) -> Option<StreamEvent> {
        if self.kind != "content_block_delta" {
            return None;
        }
        let fields = self.delta;
        let delta = match &*fields.kind {
            "text_delta" => BlockDelta::TextDelta { text: fields.text? },
            "input_json_delta" => BlockDelta::InputJsonDelta { partial_json: fields.partial_json? },
            "thinking_delta" => BlockDelta::ThinkingDelta { thinking: fields.thinking? },
            _ => return None,
        };
        Some(StreamEvent::ContentBlockDelta { index: self.index, delta })
    }
}

/// An `error` event: the upstream's message and error type, read leniently.
fn error_step(data: &str) -> StreamStep {
    let parsed: Option<Value> = serde_json::from_str(data).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    StreamStep::Error {
        message: field("message").unwrap_or_else(|| "the upstream stream reported an error".to_owned()),
        kind: field("type").unwrap_or_else(|| "error".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_delta_event_reads_as_the_enums_read_it() {
        let cases = [
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            r#"{"index":2,"delta":{"text":"a\"b\u00e9","type":"text_delta"},"type":"content_block_delta"}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\":"}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hm"}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"s"}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"citations_delta","citation":{}}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x","extra":[1]}}"#,
            // The data's type decides, whatever the event's name says.
            r#"{"type":"content_block_stop","index":0}"#,
            r#"{"type":"ping"}"#,
        ];
        for data in cases {
            let enums: StreamEvent = serde_json::from_str(data).unwrap();
            assert_eq!(parse_event("content_block_delta", data).unwrap(), enums, "{data}");
        }
    }

    use proptest::prelude::Strategy;

    fn arb_value() -> impl Strategy<Value = Value> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            "[a-z\"\\\\é]{0,6}".prop_map(Value::from),
            Just(serde_json::json!({"a": [1]})),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        #[test]
        fn the_plain_reading_agrees_with_the_enums_on_any_delta_event(
            kind in proptest::sample::select(vec!["content_block_delta", "content_block_stop", "ping", "x"]),
            delta_kind in proptest::sample::select(vec!["text_delta", "input_json_delta", "thinking_delta", "signature_delta", "y"]),
            index in proptest::prop_oneof![3 => (0..4_u32).prop_map(Value::from), 1 => arb_value()],
            fields in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["text", "partial_json", "thinking", "signature", "other"]),
                    proptest::prop_oneof![3 => "[a-z\"é]{0,4}".prop_map(Value::from), 1 => arb_value()],
                ),
                0..4,
            ),
        ) {
            let mut delta = serde_json::Map::new();
            delta.insert("type".to_owned(), Value::from(delta_kind));
            for (name, value) in fields {
                delta.insert(name.to_owned(), value);
            }
            let data = serde_json::json!({"type": kind, "index": index, "delta": delta}).to_string();
            let enums = serde_json::from_str::<StreamEvent>(&data).ok();
            proptest::prop_assert_eq!(parse_event("content_block_delta", &data).ok(), enums, "{}", data);
        }
    }

    #[test]
    fn a_delta_event_the_enums_refuse_is_refused() {
        for data in [
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":null}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta"}}"#,
            r#"{"type":"content_block_delta","index":-1,"delta":{"type":"text_delta","text":"x"}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x","text":"y"}}"#,
            r#"{"type":"content_block_delta","index":0"#,
        ] {
            assert!(serde_json::from_str::<StreamEvent>(data).is_err(), "{data}");
            assert!(parse_event("content_block_delta", data).is_err(), "{data}");
        }
    }
}
