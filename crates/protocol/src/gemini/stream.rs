//! Gemini `streamGenerateContent?alt=sse` → OpenAI `chat.completion.chunk`s.
//!
//! Each SSE `data:` holds a whole [`GenerateContentResponse`] carrying the next slice of each
//! candidate: text parts become content deltas, reasoning parts `reasoning` deltas, and each
//! `functionCall` part (Gemini sends calls whole) one complete `tool_calls` delta whose `index`
//! counts the candidate's calls. A `finishReason` becomes a chunk of its own, and the latest
//! `usageMetadata` is kept for the end. The first chunk of each choice carries
//! `role: "assistant"`.
//!
//! Gemini sends no terminator: the stream simply ends. The caller then calls
//! [`StreamTranslator::finish`], which returns the finish chunk of every choice that has not
//! had one and the usage chunk (`choices: []`).

use std::collections::BTreeMap;

use serde_json::Value;

use super::response::{finish_reason, is_blocked, usage, Pieces};
use super::types::{Candidate, GenerateContentResponse, UsageMetadata};
use crate::openai::{
    ChatCompletionChunk, ChunkChoice, ChunkDelta, Extra, FinishReason, FunctionCallDelta, Role, ToolCallDelta,
};

/// What one upstream event means.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamStep {
    /// Chunks to pass on (possibly none).
    Chunks(Vec<ChatCompletionChunk>),
    /// The stream failed: an in-band error (`kind` is Gemini's status, e.g. `UNAVAILABLE`) or
    /// an event that could not be parsed (`kind` is `malformed`). The stream should end.
    Error { message: String, kind: String },
}

/// Translates one Gemini stream; feed it every event's data, then call
/// [`finish`](Self::finish) when the upstream ends cleanly.
#[derive(Debug)]
pub struct StreamTranslator {
    model: String,
    created: u64,
    id: String,
    /// Per candidate index.
    choices: BTreeMap<u32, ChoiceState>,
    usage: Option<UsageMetadata>,
    finished: bool,
}

#[derive(Debug, Default)]
struct ChoiceState {
    role_sent: bool,
    tool_calls: u32,
    finish_sent: bool,
}

impl ChoiceState {
    /// The role, the first time the choice says anything.
    fn role(&mut self) -> Option<Role> {
        (!std::mem::replace(&mut self.role_sent, true)).then_some(Role::Assistant)
    }

    fn finish_choice(&mut self, index: u32, reason: FinishReason) -> ChunkChoice {
        self.finish_sent = true;
        let delta = ChunkDelta { role: self.role(), ..ChunkDelta::default() };
        ChunkChoice { index, delta, finish_reason: Some(reason), logprobs: None, extra: Extra::new() }
    }
}

impl StreamTranslator {
    /// `model`, `created` and `id` are written on every chunk.
    pub fn new(model: &str, created: u64, id: String) -> Self {
        StreamTranslator {
            model: model.to_owned(),
            created,
            id,
            choices: BTreeMap::new(),
            usage: None,
            finished: false,
        }
    }

    /// Translates one SSE event's data.
    pub fn push(&mut self, data: &str) -> StreamStep {
        let data = data.trim();
        if data.is_empty() {
            return StreamStep::Chunks(Vec::new());
        }
        // Read straight into the typed response (an in-band `error` lands in its `extra`):
        // through a `Value` first, every event cost about twice as much.
        match serde_json::from_str::<GenerateContentResponse>(data) {
            Ok(mut response) => match response.extra.remove("error").filter(|e| !e.is_null()) {
                Some(error) => in_band_error(&error),
                None => StreamStep::Chunks(self.translate(response)),
            },
            Err(typed) => in_band_error_or_malformed(data, &typed),
        }
    }

    /// The chunks owed at the end of the stream: a finish chunk for every choice that had none
    /// (`stop`, or `tool_calls` after function calls), then the usage chunk if Gemini sent usage.
    /// Returns nothing when called again.
    pub fn finish(&mut self) -> Vec<ChatCompletionChunk> {
        if std::mem::replace(&mut self.finished, true) {
            return Vec::new();
        }
        if self.choices.is_empty() {
            self.choices.insert(0, ChoiceState::default());
        }
        let pending: Vec<ChunkChoice> = self
            .choices
            .iter_mut()
            .filter(|(_, state)| !state.finish_sent)
            .map(|(index, state)| {
                let reason = if state.tool_calls > 0 { FinishReason::ToolCalls } else { FinishReason::Stop };
                state.finish_choice(*index, reason)
            })
            .collect();
        let mut chunks: Vec<ChatCompletionChunk> = pending.into_iter().map(|c| self.chunk(vec![c])).collect();
        if let Some(meta) = self.usage.take() {
            let mut last = self.chunk(Vec::new());
            last.usage = Some(usage(&meta));
            chunks.push(last);
        }
        chunks
    }

    fn translate(&mut self, response: GenerateContentResponse) -> Vec<ChatCompletionChunk> {
        if response.usage_metadata.is_some() {
            self.usage = response.usage_metadata;
        }
        let mut choices = Vec::new();
        if response.candidates.is_empty() && is_blocked(response.prompt_feedback.as_ref()) {
            let state = self.choices.entry(0).or_default();
            if !state.finish_sent {
                choices.push(state.finish_choice(0, FinishReason::ContentFilter));
            }
        }
        for (position, candidate) in response.candidates.into_iter().enumerate() {
            let index = candidate.index.unwrap_or(u32::try_from(position).unwrap_or(u32::MAX));
            let state = self.choices.entry(index).or_default();
            choices.extend(candidate_choices(state, index, candidate));
        }
        choices.into_iter().map(|c| self.chunk(vec![c])).collect()
    }

    fn chunk(&self, choices: Vec<ChunkChoice>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".to_owned(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: None,
            extra: Extra::new(),
        }
    }
}

/// The delta (if the candidate said anything) and the finish (if it finished) of one candidate.
fn candidate_choices(state: &mut ChoiceState, index: u32, candidate: Candidate) -> Vec<ChunkChoice> {
    let pieces = Pieces::split(candidate.content.map(|c| c.parts).unwrap_or_default(), state.tool_calls);
    let mut delta = ChunkDelta::default();
    if !pieces.text.is_empty() {
        delta.content = Some(pieces.text);
    }
    if !pieces.reasoning.is_empty() {
        delta.extra.insert("reasoning".to_owned(), Value::String(pieces.reasoning));
    }
    if !pieces.tool_calls.is_empty() {
        let deltas = pieces.tool_calls.into_iter().map(|call| {
            let delta = ToolCallDelta {
                index: state.tool_calls,
                id: Some(call.id),
                kind: Some(call.kind),
                function: Some(FunctionCallDelta {
                    name: Some(call.function.name),
                    arguments: Some(call.function.arguments),
                }),
            };
            state.tool_calls = state.tool_calls.saturating_add(1);
            delta
        });
        delta.tool_calls = Some(deltas.collect());
    }
    let mut choices = Vec::new();
    if delta != ChunkDelta::default() {
        delta.role = state.role();
        choices.push(ChunkChoice { index, delta, finish_reason: None, logprobs: None, extra: Extra::new() });
    }
    if let Some(reason) = candidate.finish_reason.filter(|_| !state.finish_sent) {
        let reason = finish_reason(&reason, state.tool_calls > 0);
        choices.push(state.finish_choice(index, reason));
    }
    choices
}

fn malformed(error: &serde_json::Error) -> StreamStep {
    StreamStep::Error { message: format!("malformed Gemini stream event: {error}"), kind: "malformed".to_owned() }
}

/// An event that is not a response: an in-band error whose other fields do not fit the
/// response either, else malformed (with the JSON error when it is not JSON at all).
fn in_band_error_or_malformed(data: &str, typed: &serde_json::Error) -> StreamStep {
    match serde_json::from_str::<Value>(data) {
        Ok(value) => match value.get("error").filter(|e| !e.is_null()) {
            Some(error) => in_band_error(error),
            None => malformed(typed),
        },
        Err(e) => malformed(&e),
    }
}

/// `{"error": {"code", "message", "status"}}` sent in the stream.
fn in_band_error(error: &Value) -> StreamStep {
    let message = match error {
        Value::String(message) => message.clone(),
        other => other.get("message").and_then(Value::as_str).unwrap_or("upstream stream error").to_owned(),
    };
    let kind = error.get("status").and_then(Value::as_str).unwrap_or("error").to_owned();
    StreamStep::Error { message, kind }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    fn push(data: &str) -> StreamStep {
        StreamTranslator::new("m", 0, "id".to_owned()).push(data)
    }

    #[test]
    fn an_error_event_is_an_error_whatever_else_it_carries() {
        let error = r#"{"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}"#;
        let expected = StreamStep::Error { message: "overloaded".to_owned(), kind: "UNAVAILABLE".to_owned() };
        assert_eq!(push(&format!(r#"{{"error": {error}}}"#)), expected);
        assert_eq!(push(&format!(r#"{{"candidates": [], "error": {error}}}"#)), expected);
        // Fields that do not fit a response do not hide the error.
        assert_eq!(push(&format!(r#"{{"candidates": "none", "error": {error}}}"#)), expected);
    }

    #[test]
    fn a_null_error_is_no_error() {
        let step = push(r#"{"error": null, "candidates": [{"content": {"parts": [{"text": "Hi"}]}, "index": 0}]}"#);
        let StreamStep::Chunks(chunks) = step else { panic!("{step:?}") };
        assert_eq!(chunks[0].choices[0].delta.content.as_deref(), Some("Hi"));
    }

    #[test]
    fn json_that_is_not_a_response_is_malformed() {
        for data in [r#"[1, 2]"#, r#"{"candidates": "none"}"#, r#"{"candidates": ["#] {
            let step = push(data);
            assert!(matches!(&step, StreamStep::Error { kind, .. } if kind == "malformed"), "{data}: {step:?}");
        }
    }
}
