//! Anthropic Messages wire format: `POST /v1/messages`, non-streaming and
//! SSE streaming (`event:` + `data:` framing), tool use, stop reasons and
//! Anthropic error envelopes.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::respond::{self, Admitted, Dialect, Plan};
use crate::text::{self, Answer, Finish};
use crate::{Kind, Shared};

/// In-band error event (stream_error_after_chunks).
const STREAM_ERROR: &[u8] =
    b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
/// Text delta event, around the JSON string of the piece.
const DELTA_HEAD: &str =
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":";
const DELTA_TAIL: &str = "}}\n\n";

pub(crate) struct Anthropic;

impl Dialect for Anthropic {
    fn authorized(headers: &HeaderMap, _uri: &Uri) -> bool {
        let key = headers
            .get("x-api-key")
            .is_some_and(|v| !v.as_bytes().trim_ascii().is_empty());
        key && headers.contains_key("anthropic-version")
    }

    fn auth_error() -> Response {
        let message = "x-api-key and anthropic-version headers are required";
        error_with(StatusCode::UNAUTHORIZED, "authentication_error", message)
    }

    fn error(status: StatusCode, message: &str) -> Response {
        let kind = match status.as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        };
        error_with(status, kind, message)
    }
}

fn error_with(status: StatusCode, kind: &str, message: &str) -> Response {
    respond::json(
        status,
        &json!({ "type": "error", "error": { "type": kind, "message": message } }),
    )
}

fn bad_request(message: &str) -> Response {
    Anthropic::error(StatusCode::BAD_REQUEST, message)
}

/// Text of a content value: a string, or its text / tool_result blocks.
fn content_text(content: &Value) -> Cow<'_, str> {
    match content {
        Value::String(s) => Cow::Borrowed(s),
        Value::Array(blocks) => {
            let texts: Vec<Cow<'_, str>> = blocks.iter().filter_map(block_text).collect();
            match texts.len() {
                0 => Cow::Borrowed(""),
                1 => texts.into_iter().next().unwrap_or_default(),
                _ => Cow::Owned(texts.join(" ")),
            }
        }
        _ => Cow::Borrowed(""),
    }
}

fn block_text(block: &Value) -> Option<Cow<'_, str>> {
    match block.get("type").and_then(Value::as_str)? {
        "text" => block.get("text").and_then(Value::as_str).map(Cow::Borrowed),
        "tool_result" => Some(content_text(block.get("content").unwrap_or(&Value::Null))),
        _ => None,
    }
}

/// Text of the last tool_result block of a message, if it has one.
fn tool_result_text(msg: &Value) -> Option<Cow<'_, str>> {
    let blocks = msg.get("content")?.as_array()?;
    let block = blocks
        .iter()
        .rev()
        .find(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))?;
    Some(content_text(block.get("content").unwrap_or(&Value::Null)))
}

fn role(msg: &Value) -> &str {
    msg.get("role").and_then(Value::as_str).unwrap_or("")
}

/// Name of the first declared tool, unless `tool_choice` is `none`.
fn first_tool(req: &Value) -> Option<&str> {
    if req.pointer("/tool_choice/type").and_then(Value::as_str) == Some("none") {
        return None;
    }
    req.get("tools")?.as_array()?.first()?.get("name")?.as_str()
}

/// Decides the answer and counts input tokens.
fn decide(
    req: &Value,
    messages: &[Value],
    max_tokens: u64,
    reply: Option<&String>,
) -> (Answer, u64) {
    let system = req.get("system").map(content_text);
    let texts: Vec<Cow<'_, str>> = messages
        .iter()
        .map(|m| content_text(m.get("content").unwrap_or(&Value::Null)))
        .collect();
    let all = system.iter().chain(texts.iter()).map(|t| t.as_ref());
    let prompt = text::prompt_tokens(all, messages.len() + usize::from(system.is_some()));
    let last = messages.last().unwrap_or(&Value::Null);
    let tool_result = if role(last) == "user" {
        tool_result_text(last)
    } else {
        None
    };
    if let (None, "user", Some(name)) = (&tool_result, role(last), first_tool(req)) {
        return (
            Answer::Tool {
                name: name.to_owned(),
            },
            prompt,
        );
    }
    let body = match (reply, tool_result) {
        (Some(r), _) => r.clone(),
        (None, Some(result)) => text::tool_reply_text(&result),
        (None, None) => {
            let user = messages
                .iter()
                .zip(&texts)
                .rev()
                .find(|(m, _)| role(m) == "user");
            text::reply_text(user.map_or("", |(_, t)| t.as_ref()))
        }
    };
    let stops: Vec<&str> = match req.get("stop_sequences").and_then(Value::as_array) {
        Some(a) => a.iter().filter_map(Value::as_str).collect(),
        None => Vec::new(),
    };
    (text::shape(body, Some(max_tokens), &stops), prompt)
}

/// `(stop_reason, stop_sequence)` of an answer.
fn stop_reason(answer: &Answer) -> (&'static str, Value) {
    match answer {
        Answer::Tool { .. } => ("tool_use", Value::Null),
        Answer::Text {
            finish: Finish::Stop,
            ..
        } => ("end_turn", Value::Null),
        Answer::Text {
            finish: Finish::Length,
            ..
        } => ("max_tokens", Value::Null),
        Answer::Text {
            finish: Finish::StopSequence(s),
            ..
        } => ("stop_sequence", json!(s)),
    }
}

fn usage(input: u64, output: u64) -> Value {
    json!({
        "input_tokens": input, "output_tokens": output,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
    })
}

/// `POST /v1/messages`.
pub(crate) async fn messages(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let adm = match respond::admit::<Anthropic>(&shared, Kind::Messages, uri, headers, body).await {
        Ok(adm) => adm,
        Err(resp) => return resp,
    };
    let req = &adm.body;
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if adm.scenario().malformed {
        return respond::malformed(stream);
    }
    let Some(model) = req.get("model").and_then(Value::as_str) else {
        return bad_request("model: Field required");
    };
    let Some(max_tokens) = req.get("max_tokens").and_then(Value::as_u64) else {
        return bad_request("max_tokens: Field required");
    };
    let messages = match req.get("messages").and_then(Value::as_array) {
        Some(m) if !m.is_empty() => m.as_slice(),
        _ => return bad_request("messages: at least one message is required"),
    };
    let (answer, input) = decide(req, messages, max_tokens, adm.scenario().reply.as_ref());
    let id = text::next_id("msg_mock_");
    if stream {
        return stream_response(&shared, &adm, &id, model, &answer, input);
    }
    respond::json(StatusCode::OK, &message_body(&id, model, &answer, input))
}

/// A whole `message` body.
fn message_body(id: &str, model: &str, answer: &Answer, input: u64) -> Value {
    let content = match answer {
        Answer::Text { text, .. } => json!([{ "type": "text", "text": text }]),
        Answer::Tool { name } => json!([{
            "type": "tool_use", "id": text::ANTHROPIC_TOOL_ID, "name": name, "input": { "location": "Paris" },
        }]),
    };
    let (reason, sequence) = stop_reason(answer);
    json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": reason, "stop_sequence": sequence,
        "usage": usage(input, answer.completion_tokens()),
    })
}

/// The answer to one `params` of a message batch (a `message`), or why it is refused (the
/// message of an `invalid_request_error`).
pub(crate) fn batch_message(req: &Value, reply: Option<&String>) -> Result<Value, String> {
    let Some(model) = req.get("model").and_then(Value::as_str) else {
        return Err("model: Field required".to_owned());
    };
    let Some(max_tokens) = req.get("max_tokens").and_then(Value::as_u64) else {
        return Err("max_tokens: Field required".to_owned());
    };
    let messages = match req.get("messages").and_then(Value::as_array) {
        Some(m) if !m.is_empty() => m.as_slice(),
        _ => return Err("messages: at least one message is required".to_owned()),
    };
    let (answer, input) = decide(req, messages, max_tokens, reply);
    Ok(message_body(&text::next_id("msg_mock_"), model, &answer, input))
}

/// One `event: <name>\ndata: <json>\n\n` event.
fn event(name: &str, data: &Value) -> Bytes {
    let mut buf = Vec::with_capacity(160);
    buf.extend_from_slice(b"event: ");
    buf.extend_from_slice(name.as_bytes());
    buf.push(b'\n');
    buf.extend_from_slice(&respond::sse_data(data, "\n\n"));
    Bytes::from(buf)
}

fn text_delta(piece: &str) -> Bytes {
    let quoted = serde_json::to_string(piece).unwrap_or_default();
    Bytes::from([DELTA_HEAD, &quoted, DELTA_TAIL].concat())
}

fn stream_head(id: &str, model: &str, answer: &Answer, input: u64) -> Vec<Bytes> {
    let message = json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null, "usage": usage(input, 1),
    });
    let block = match answer {
        Answer::Text { .. } => json!({ "type": "text", "text": "" }),
        Answer::Tool { name } => {
            json!({ "type": "tool_use", "id": text::ANTHROPIC_TOOL_ID, "name": name, "input": {} })
        }
    };
    vec![
        event(
            "message_start",
            &json!({ "type": "message_start", "message": message }),
        ),
        event(
            "content_block_start",
            &json!({ "type": "content_block_start", "index": 0, "content_block": block }),
        ),
        event("ping", &json!({ "type": "ping" })),
    ]
}

fn stream_tail(answer: &Answer) -> Vec<Bytes> {
    let (reason, sequence) = stop_reason(answer);
    let delta = json!({
        "type": "message_delta", "delta": { "stop_reason": reason, "stop_sequence": sequence },
        "usage": { "output_tokens": answer.completion_tokens() },
    });
    vec![
        event(
            "content_block_stop",
            &json!({ "type": "content_block_stop", "index": 0 }),
        ),
        event("message_delta", &delta),
        event("message_stop", &json!({ "type": "message_stop" })),
    ]
}

fn stream_response(
    shared: &Arc<Shared>,
    adm: &Admitted,
    id: &str,
    model: &str,
    answer: &Answer,
    input: u64,
) -> Response {
    let sc = adm.scenario();
    let (pieces, is_tool) = match answer {
        Answer::Text { text, .. } => (text::stream_pieces(text), false),
        Answer::Tool { .. } => (text::TOOL_ARG_FRAGMENTS.to_vec(), true),
    };
    let plan = Plan::new(sc, pieces.len());
    let events = respond::assemble(
        plan,
        stream_head(id, model, answer, input),
        |i| match is_tool {
            true => event(
                "content_block_delta",
                &json!({ "type": "content_block_delta", "index": 0,
                         "delta": { "type": "input_json_delta", "partial_json": pieces[i] } }),
            ),
            false => text_delta(pieces[i]),
        },
        || stream_tail(answer),
        || Bytes::from_static(STREAM_ERROR),
    );
    respond::stream(shared, sc, "text/event-stream", events, plan)
}
