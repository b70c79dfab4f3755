//! Whole (non-streamed) chat answers as the gateway relays them: the counterpart of
//! [`crate::relayed`] for answers. An answer translated from another protocol is a
//! [`ChatCompletionResponse`]; an OpenAI-compatible upstream's answer is kept as its JSON text
//! ([`RelayedAnswer`]), read only for what the gateway needs (usage and the first finish
//! reason; the rest is checked for the types the typed answer requires, not built), and
//! written out as it came with Marga's `id`, `model` and `usage` (which carries the cost) put
//! in place of the upstream's. Every other field and digit passes as the upstream wrote it.
//!
//! An answer without usage (the gateway then counts tokens from the text), or missing a field
//! the typed answer would add (`object`, a choice's `message`), is parsed whole instead, so it
//! behaves exactly as before.

use std::ops::Range;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::openai::{ChatCompletionResponse, FinishReason, Role, Usage};
use crate::relayed::{span_in, splice, Identity, View};

/// A whole chat answer.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatAnswer {
    /// A typed answer: translated from another protocol, or an upstream answer parsed whole.
    Parsed(ChatCompletionResponse),
    /// An OpenAI-compatible upstream's answer, kept as its text.
    Relayed(RelayedAnswer),
}

impl From<ChatCompletionResponse> for ChatAnswer {
    fn from(answer: ChatCompletionResponse) -> Self {
        ChatAnswer::Parsed(answer)
    }
}

impl ChatAnswer {
    /// An upstream's `chat.completion` JSON: kept as text when it carries usage and has every
    /// field the typed answer requires, else parsed whole (so an answer the typed parse
    /// refuses is still refused).
    pub fn from_upstream_json(json: Vec<u8>) -> Result<Self, serde_json::Error> {
        let json = match String::from_utf8(json) {
            Ok(json) => json,
            Err(e) => return serde_json::from_slice(e.as_bytes()).map(ChatAnswer::Parsed),
        };
        match RelayedAnswer::read(json) {
            Ok(relayed) => Ok(ChatAnswer::Relayed(relayed)),
            Err(json) => serde_json::from_str(&json).map(ChatAnswer::Parsed),
        }
    }

    /// The typed answer, with the identity and usage set on this one.
    pub fn into_parsed(self) -> Result<ChatCompletionResponse, serde_json::Error> {
        match self {
            ChatAnswer::Parsed(answer) => Ok(answer),
            ChatAnswer::Relayed(relayed) => {
                let mut answer: ChatCompletionResponse = serde_json::from_str(&relayed.json)?;
                if let Some(identity) = relayed.identity {
                    identity.id().clone_into(&mut answer.id);
                    identity.model().clone_into(&mut answer.model);
                }
                answer.usage = relayed.usage;
                Ok(answer)
            }
        }
    }

    /// The usage the answer reports (the gateway replaces it with its own, cost included).
    pub fn usage_mut(&mut self) -> &mut Option<Usage> {
        match self {
            ChatAnswer::Parsed(answer) => &mut answer.usage,
            ChatAnswer::Relayed(relayed) => &mut relayed.usage,
        }
    }

    /// The first choice's finish reason.
    pub fn finish_reason(&self) -> Option<&FinishReason> {
        match self {
            ChatAnswer::Parsed(answer) => answer.choices.first().and_then(|c| c.finish_reason.as_ref()),
            ChatAnswer::Relayed(relayed) => relayed.finish_reason.as_ref(),
        }
    }

    /// The text of every choice, concatenated (what the gateway counts when the upstream
    /// reported no usage).
    pub fn text(&self) -> String {
        let parsed;
        let answer = match self {
            ChatAnswer::Parsed(answer) => answer,
            ChatAnswer::Relayed(relayed) => match serde_json::from_str::<ChatCompletionResponse>(&relayed.json) {
                Ok(answer) => {
                    parsed = answer;
                    &parsed
                }
                Err(_) => return String::new(),
            },
        };
        answer.choices.iter().filter_map(|c| c.message.content.as_deref()).collect()
    }

    /// Puts the gateway's `id` and `model` in place of the upstream's.
    pub fn set_identity(&mut self, id: &str, model: &str) {
        match self {
            ChatAnswer::Parsed(answer) => {
                id.clone_into(&mut answer.id);
                model.clone_into(&mut answer.model);
            }
            ChatAnswer::Relayed(relayed) => relayed.identity = Some(Identity::new(id, model)),
        }
    }

    /// The answer's JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        match self {
            ChatAnswer::Parsed(answer) => serde_json::to_vec(answer),
            ChatAnswer::Relayed(relayed) => relayed.to_json(),
        }
    }
}

/// An upstream answer's JSON text and what the gateway reads from it.
#[derive(Clone, Debug, PartialEq)]
pub struct RelayedAnswer {
    json: String,
    /// Where the values of the top-level `id`, `model` and `usage` are.
    id: Range<usize>,
    model: Range<usize>,
    usage_at: Range<usize>,
    usage: Option<Usage>,
    finish_reason: Option<FinishReason>,
    /// The gateway's `id` and `model`, once set; the upstream's until then.
    identity: Option<Identity>,
}

/// A choice of an answer as the relay reads it (see [`View`]): its finish reason; the message
/// is type-checked, not built.
#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(rename = "index")]
    _index: u32,
    #[serde(rename = "message", borrow)]
    _message: MessageView<'a>,
    #[serde(default)]
    finish_reason: Option<FinishReason>,
}

#[derive(Deserialize)]
struct MessageView<'a> {
    #[serde(rename = "role")]
    _role: Role,
    #[serde(rename = "content", default)]
    _content: Option<AnyString>,
    #[serde(rename = "refusal", default)]
    _refusal: Option<AnyString>,
    #[serde(rename = "tool_calls", default, borrow)]
    _tool_calls: Option<Vec<&'a RawValue>>,
}

/// A JSON string, checked and dropped (no copy, escaped or not).
struct AnyString;

impl<'de> Deserialize<'de> for AnyString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Check;
        impl Visitor<'_> for Check {
            type Value = AnyString;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<AnyString, E> {
                Ok(AnyString)
            }
        }
        deserializer.deserialize_str(Check)
    }
}

impl RelayedAnswer {
    /// Reads an answer with usage; gives the text back when it has none, its `id` or `model`
    /// is not a string, or it does not have the fields and types the typed answer requires.
    fn read(json: String) -> Result<Self, String> {
        let Ok(view) = serde_json::from_str::<View<'_, ChoiceView<'_>>>(&json) else { return Err(json) };
        let is_string = |raw: &RawValue| raw.get().starts_with('"');
        let Some(usage_raw) = view.usage.filter(|_| is_string(view.id) && is_string(view.model)) else {
            return Err(json);
        };
        let Ok(usage) = serde_json::from_str::<Usage>(usage_raw.get()) else { return Err(json) };
        let span = |part: &str| span_in(&json, part);
        let (id, model, usage_at) = (span(view.id.get()), span(view.model.get()), span(usage_raw.get()));
        let finish_reason = view.choices.into_iter().next().and_then(|c| c.finish_reason);
        Ok(RelayedAnswer { json, id, model, usage_at, usage: Some(usage), finish_reason, identity: None })
    }

    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let usage = match &self.usage {
            Some(usage) => serde_json::to_vec(usage)?,
            None => b"null".to_vec(),
        };
        let mut out = Vec::with_capacity(self.json.len() + 64);
        let (json, usage) = (self.json.as_bytes(), (self.usage_at.clone(), usage.as_slice()));
        match &self.identity {
            Some(identity) => {
                let id = (self.id.clone(), identity.id_json().as_bytes());
                let model = (self.model.clone(), identity.model_json().as_bytes());
                splice(json, &mut [usage, id, model], &mut out);
            }
            None => splice(json, &mut [usage], &mut out),
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::{json, Value};

    const ANSWER: &str = r#"{"id":"chatcmpl-9","object":"chat.completion","created":7,"model":"gpt-x","system_fingerprint":"fp","choices":[{"index":0,"message":{"role":"assistant","content":"Hel\"lo\n","annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"vendor_detail":{"x":2.50}},"service_tier":"default","vendor":1e400}"#;

    fn gateway_side(mut answer: ChatAnswer) -> ChatAnswer {
        answer.set_identity("gen-1", "team/model");
        let usage = answer.usage_mut().as_mut().unwrap();
        usage.completion_tokens += 1;
        answer
    }

    #[test]
    fn an_answer_with_usage_is_relayed_as_written_with_marga_identity_and_usage() {
        let answer = ChatAnswer::from_upstream_json(ANSWER.as_bytes().to_vec()).unwrap();
        assert!(matches!(answer, ChatAnswer::Relayed(_)));
        assert_eq!(answer.finish_reason(), Some(&FinishReason::Stop));
        // `1e400` is out of a float's range: the typed parse refuses it, the relay passes it on.
        assert!(answer.clone().into_parsed().is_err());
        let out = String::from_utf8(gateway_side(answer).to_json().unwrap()).unwrap();
        let expected = ANSWER
            .replace("\"chatcmpl-9\"", "\"gen-1\"")
            .replace("\"gpt-x\"", "\"team/model\"")
            .replace("\"completion_tokens\":4", "\"completion_tokens\":5")
            // The usage is the gateway's, written again (as a parsed answer's is).
            .replace("2.50}}", "2.5}}");
        assert_eq!(out, expected);
    }

    #[test]
    fn relayed_and_parsed_answers_read_alike_and_write_the_same_values() {
        let cases = [
            json!({"id": "a", "object": "chat.completion", "created": 1, "model": "m",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": null, "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                             "prompt_tokens_details": {"cached_tokens": 1}}}),
            json!({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, "model": "m",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                       {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                       "logprobs": null, "finish_reason": "tool_calls"}],
                   "created": 1, "object": "chat.completion", "id": "a"}),
            json!({"id": "a", "object": "chat.completion", "created": 1, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}}),
        ];
        for case in cases {
            let relayed = ChatAnswer::from_upstream_json(case.to_string().into_bytes()).unwrap();
            assert!(matches!(relayed, ChatAnswer::Relayed(_)), "{case}");
            let parsed = ChatAnswer::Parsed(serde_json::from_value(case.clone()).unwrap());
            assert_eq!(relayed.finish_reason(), parsed.finish_reason(), "{case}");
            assert_eq!(relayed.text(), parsed.text(), "{case}");
            let (relayed, parsed) = (gateway_side(relayed), gateway_side(parsed));
            let written = |a: &ChatAnswer| serde_json::from_slice::<Value>(&a.to_json().unwrap()).unwrap();
            assert_eq!(written(&relayed), written(&parsed), "{case}");
            assert_eq!(relayed.into_parsed().unwrap(), parsed.into_parsed().unwrap(), "{case}");
        }
    }

    #[test]
    fn answers_without_usage_or_of_another_shape_are_parsed_whole() {
        let parsed = |v: &Value| ChatAnswer::from_upstream_json(v.to_string().into_bytes());
        let choice = json!({"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"});
        let no_usage = json!({"id": "a", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice]});
        assert!(matches!(parsed(&no_usage).unwrap(), ChatAnswer::Parsed(_)));
        let null_usage = json!({"id": "a", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice], "usage": null});
        assert!(matches!(parsed(&null_usage).unwrap(), ChatAnswer::Parsed(_)));
        let usage = json!({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2});
        let no_object = json!({"id": "a", "created": 1, "model": "m", "choices": [choice], "usage": usage});
        assert!(matches!(parsed(&no_object).unwrap(), ChatAnswer::Parsed(_)));
        for refused in [
            json!({"id": 5, "object": "chat.completion", "created": 1, "model": "m", "choices": [choice], "usage": usage}),
            json!({"id": "a", "object": "chat.completion", "model": "m", "choices": [choice], "usage": usage}),
            json!({"id": "a", "object": "chat.completion", "created": 1, "model": "m", "usage": usage,
                   "choices": [{"index": 0, "message": {"role": "robot", "content": "x"}}]}),
            json!({"id": "a", "object": "chat.completion", "created": 1, "model": "m", "usage": usage,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": 5}}]}),
            json!({"id": "a", "object": "chat.completion", "created": 1, "model": "m", "usage": usage, "choices": [{"index": 0}]}),
        ] {
            assert!(parsed(&refused).is_err(), "{refused}");
        }
        assert!(ChatAnswer::from_upstream_json(b"{\"id\": \"\xff\"}".to_vec()).is_err());
    }
}
