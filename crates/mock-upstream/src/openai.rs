//! OpenAI wire format: `/v1/chat/completions` (with tools, JSON modes and
//! streaming), legacy `/v1/completions`, `/v1/embeddings` (float and
//! base64) and `/v1/models`, with OpenAI error envelopes.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::respond::{self, Admitted, Dialect, Plan};
use crate::text::{self, Answer, Finish};
use crate::{Kind, Shared};

/// SSE event separator.
const SEP: &str = "\n\n";
/// End of every successful OpenAI stream.
const DONE: &[u8] = b"data: [DONE]\n\n";
/// In-band error event (stream_error_after_chunks).
const STREAM_ERROR: &[u8] =
    b"data: {\"error\":{\"message\":\"mock overloaded\",\"type\":\"server_error\",\"code\":\"overloaded\"}}\n\n";

pub(crate) struct OpenAi;

impl Dialect for OpenAi {
    fn authorized(headers: &HeaderMap, _uri: &Uri) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|token| !token.trim().is_empty())
    }

    fn auth_error() -> Response {
        error_with(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            "invalid_request_error",
            Some("invalid_api_key"),
        )
    }

    fn error(status: StatusCode, message: &str) -> Response {
        let (kind, code) = match status.as_u16() {
            401 => ("invalid_request_error", Some("invalid_api_key")),
            403 => ("permission_error", None),
            404 => ("invalid_request_error", Some("not_found")),
            429 => ("rate_limit_error", Some("rate_limit_exceeded")),
            500 => ("server_error", Some("internal_error")),
            502 => ("server_error", Some("bad_gateway")),
            503 | 529 => ("server_error", Some("upstream_unavailable")),
            504 => ("server_error", Some("timeout")),
            s if s >= 500 => ("server_error", Some("server_error")),
            _ => ("invalid_request_error", None),
        };
        error_with(status, message, kind, code)
    }
}

fn error_with(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let body =
        json!({ "error": { "message": message, "type": kind, "param": null, "code": code } });
    respond::json(status, &body)
}

fn bad_request(message: &str) -> Response {
    OpenAi::error(StatusCode::BAD_REQUEST, message)
}

/// Text of a message `content`: a string, or the text parts joined.
fn content_text(content: &Value) -> Cow<'_, str> {
    match content {
        Value::String(s) => Cow::Borrowed(s),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            Cow::Owned(texts.join(" "))
        }
        _ => Cow::Borrowed(""),
    }
}

fn role(msg: &Value) -> &str {
    msg.get("role").and_then(Value::as_str).unwrap_or("")
}

fn is_stream(req: &Value) -> bool {
    req.get("stream").and_then(Value::as_bool).unwrap_or(false)
}

fn include_usage(req: &Value) -> bool {
    req.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn model(req: &Value) -> Option<&str> {
    req.get("model").and_then(Value::as_str)
}

/// `stop`: a string or an array of strings.
fn stops(req: &Value) -> Vec<&str> {
    match req.get("stop") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn max_tokens(req: &Value) -> Option<u64> {
    req.get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64)
}

fn finish_reason(answer: &Answer) -> &'static str {
    match answer {
        Answer::Tool { .. } => "tool_calls",
        Answer::Text {
            finish: Finish::Length,
            ..
        } => "length",
        Answer::Text { .. } => "stop",
    }
}

fn usage(prompt: u64, completion: u64, details: bool) -> Value {
    let mut u = json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion });
    if details {
        u["prompt_tokens_details"] = json!({ "cached_tokens": 0 });
        u["completion_tokens_details"] = json!({ "reasoning_tokens": 0 });
    }
    u
}

/// Name of the first declared tool, unless `tool_choice` is `"none"`.
fn first_tool(req: &Value) -> Option<&str> {
    if req.get("tool_choice").and_then(Value::as_str) == Some("none") {
        return None;
    }
    req.get("tools")?
        .as_array()?
        .first()?
        .pointer("/function/name")?
        .as_str()
}

/// Decides the answer and counts prompt tokens for a chat request.
fn decide_chat(req: &Value, messages: &[Value], reply: Option<&String>) -> (Answer, u64) {
    let texts: Vec<Cow<'_, str>> = messages
        .iter()
        .map(|m| content_text(m.get("content").unwrap_or(&Value::Null)))
        .collect();
    let prompt = text::prompt_tokens(texts.iter().map(|t| t.as_ref()), messages.len());
    let last = messages.last().unwrap_or(&Value::Null);
    if let (Some(name), "user") = (first_tool(req), role(last)) {
        return (
            Answer::Tool {
                name: name.to_owned(),
            },
            prompt,
        );
    }
    let mut body = match reply {
        Some(r) => r.clone(),
        None if role(last) == "tool" => {
            text::tool_reply_text(texts.last().map_or("", |t| t.as_ref()))
        }
        None => {
            let user = messages
                .iter()
                .zip(&texts)
                .rev()
                .find(|(m, _)| role(m) == "user");
            text::reply_text(user.map_or("", |(_, t)| t.as_ref()))
        }
    };
    let format = req.pointer("/response_format/type").and_then(Value::as_str);
    if matches!(format, Some("json_object" | "json_schema")) {
        body = text::json_object_reply(&body);
    }
    (text::shape(body, max_tokens(req), &stops(req)), prompt)
}

/// Stream identity shared by every chunk.
struct Meta<'a> {
    id: String,
    created: u64,
    model: &'a str,
    include_usage: bool,
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let adm =
        match respond::admit::<OpenAi>(&shared, Kind::ChatCompletions, uri, headers, body).await {
            Ok(adm) => adm,
            Err(resp) => return resp,
        };
    let sc = adm.scenario();
    if sc.malformed {
        return respond::malformed(is_stream(&adm.body));
    }
    let Some(model) = model(&adm.body) else {
        return bad_request("you must provide a model parameter");
    };
    let messages = match adm.body.get("messages").and_then(Value::as_array) {
        Some(m) if !m.is_empty() => m.as_slice(),
        _ => return bad_request("'messages' must be a non-empty array"),
    };
    let (answer, prompt) = decide_chat(&adm.body, messages, sc.reply.as_ref());
    let meta = Meta {
        id: text::next_id("chatcmpl-mock-"),
        created: text::now_secs(),
        model,
        include_usage: include_usage(&adm.body),
    };
    if is_stream(&adm.body) {
        return chat_stream(&shared, &adm, &meta, &answer, prompt);
    }
    respond::json(StatusCode::OK, &completion_body(&meta, &answer, prompt))
}

/// A whole `chat.completion` body.
fn completion_body(meta: &Meta<'_>, answer: &Answer, prompt: u64) -> Value {
    let message = match answer {
        Answer::Text { text, .. } => {
            json!({ "role": "assistant", "content": text, "refusal": null })
        }
        Answer::Tool { name } => json!({
            "role": "assistant", "content": null, "refusal": null,
            "tool_calls": [{ "id": text::OPENAI_TOOL_ID, "type": "function",
                             "function": { "name": name, "arguments": text::TOOL_ARGS } }],
        }),
    };
    json!({
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "system_fingerprint": "fp_mock", "service_tier": "default",
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason(answer) }],
        "usage": usage(prompt, answer.completion_tokens(), true),
    })
}

/// The answer to one chat request of a batch (a `/v1/chat/completions` body), or why it is
/// refused (the message of a 400).
pub(crate) fn batch_chat(req: &Value, reply: Option<&String>) -> Result<Value, String> {
    let Some(model) = model(req) else {
        return Err("you must provide a model parameter".to_owned());
    };
    let messages = match req.get("messages").and_then(Value::as_array) {
        Some(m) if !m.is_empty() => m.as_slice(),
        _ => return Err("'messages' must be a non-empty array".to_owned()),
    };
    let (answer, prompt) = decide_chat(req, messages, reply);
    let meta = Meta { id: text::next_id("chatcmpl-mock-"), created: text::now_secs(), model, include_usage: false };
    Ok(completion_body(&meta, &answer, prompt))
}

/// A `chat.completion.chunk` event with one choice.
fn chat_chunk(meta: &Meta<'_>, delta: Value, finish: Option<&str>) -> Bytes {
    let mut chunk = json!({
        "id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
        "system_fingerprint": "fp_mock",
        "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
    });
    if meta.include_usage {
        chunk["usage"] = Value::Null;
    }
    respond::sse_data(&chunk, SEP)
}

/// Prefix/suffix around the JSON string of a text delta, built once per
/// stream so each content chunk costs one small allocation.
struct ContentTemplate {
    head: String,
    tail: &'static str,
}

impl ContentTemplate {
    fn new(meta: &Meta<'_>) -> Self {
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
        let head = format!(
            "data: {{\"id\":{},\"object\":\"chat.completion.chunk\",\"created\":{},\"model\":{},\"system_fingerprint\":\"fp_mock\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":",
            quote(&meta.id), meta.created, quote(meta.model)
        );
        let tail = if meta.include_usage {
            "},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n"
        } else {
            "},\"logprobs\":null,\"finish_reason\":null}]}\n\n"
        };
        ContentTemplate { head, tail }
    }

    fn render(&self, piece: &str) -> Bytes {
        let quoted = serde_json::to_string(piece).unwrap_or_default();
        let mut out = String::with_capacity(self.head.len() + quoted.len() + self.tail.len());
        out.push_str(&self.head);
        out.push_str(&quoted);
        out.push_str(self.tail);
        Bytes::from(out)
    }
}

/// First delta of a chat stream and the content pieces that follow.
fn chat_stream_parts(answer: &Answer) -> (Value, Vec<&str>) {
    match answer {
        Answer::Text { text, .. } => (
            json!({ "role": "assistant", "content": "", "refusal": null }),
            text::stream_pieces(text),
        ),
        Answer::Tool { name } => (
            json!({ "role": "assistant", "content": null, "refusal": null, "tool_calls": [{
                "index": 0, "id": text::OPENAI_TOOL_ID, "type": "function",
                "function": { "name": name, "arguments": "" } }] }),
            text::TOOL_ARG_FRAGMENTS.to_vec(),
        ),
    }
}

fn chat_stream(
    shared: &Arc<Shared>,
    adm: &Admitted,
    meta: &Meta<'_>,
    answer: &Answer,
    prompt: u64,
) -> Response {
    let sc = adm.scenario();
    let (first_delta, pieces) = chat_stream_parts(answer);
    let is_tool = matches!(answer, Answer::Tool { .. });
    let template = ContentTemplate::new(meta);
    let plan = Plan::new(sc, pieces.len());
    let send_usage = meta.include_usage && !sc.omit_stream_usage;
    let events = respond::assemble(
        plan,
        vec![chat_chunk(meta, first_delta, None)],
        |i| match is_tool {
            true => chat_chunk(
                meta,
                json!({ "tool_calls": [{ "index": 0, "function": { "arguments": pieces[i] } }] }),
                None,
            ),
            false => template.render(pieces[i]),
        },
        || {
            let mut tail = vec![chat_chunk(meta, json!({}), Some(finish_reason(answer)))];
            if send_usage {
                tail.push(usage_chunk(
                    meta,
                    "chat.completion.chunk",
                    prompt,
                    answer.completion_tokens(),
                ));
            }
            tail.push(Bytes::from_static(DONE));
            tail
        },
        || Bytes::from_static(STREAM_ERROR),
    );
    respond::stream(shared, sc, "text/event-stream", events, plan)
}

/// Final `choices: []` chunk carrying usage.
fn usage_chunk(meta: &Meta<'_>, object: &str, prompt: u64, completion: u64) -> Bytes {
    let mut chunk = json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": [], "usage": usage(prompt, completion, true),
    });
    if object == "chat.completion.chunk" {
        chunk["system_fingerprint"] = json!("fp_mock");
    }
    respond::sse_data(&chunk, SEP)
}

/// `POST /v1/completions` (legacy).
pub(crate) async fn completions(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let adm = match respond::admit::<OpenAi>(&shared, Kind::Completions, uri, headers, body).await {
        Ok(adm) => adm,
        Err(resp) => return resp,
    };
    let sc = adm.scenario();
    if sc.malformed {
        return respond::malformed(is_stream(&adm.body));
    }
    let Some(model) = model(&adm.body) else {
        return bad_request("you must provide a model parameter");
    };
    let Some(prompts) = adm.body.get("prompt").and_then(text_inputs) else {
        return bad_request("'prompt' must be a string, an array of strings or token arrays");
    };
    let prompt = text::prompt_tokens(prompts.iter().map(|p| p.as_ref()), prompts.len());
    let reply = match &sc.reply {
        Some(r) => r.clone(),
        None => text::reply_text(prompts.last().map_or("", |p| p.as_ref())),
    };
    let answer = text::shape(reply, max_tokens(&adm.body), &stops(&adm.body));
    let meta = Meta {
        id: text::next_id("cmpl-mock-"),
        created: text::now_secs(),
        model,
        include_usage: include_usage(&adm.body),
    };
    if is_stream(&adm.body) {
        return completions_stream(&shared, &adm, &meta, &answer, prompt);
    }
    let text = match &answer {
        Answer::Text { text, .. } => text.as_str(),
        Answer::Tool { .. } => "",
    };
    let body = json!({
        "id": meta.id, "object": "text_completion", "created": meta.created, "model": model,
        "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason(&answer) }],
        "usage": usage(prompt, answer.completion_tokens(), false),
    });
    respond::json(StatusCode::OK, &body)
}

fn completion_chunk(meta: &Meta<'_>, text: &str, finish: Option<&str>) -> Bytes {
    let chunk = json!({
        "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
        "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }],
    });
    respond::sse_data(&chunk, SEP)
}

fn completions_stream(
    shared: &Arc<Shared>,
    adm: &Admitted,
    meta: &Meta<'_>,
    answer: &Answer,
    prompt: u64,
) -> Response {
    let sc = adm.scenario();
    let pieces = match answer {
        Answer::Text { text, .. } => text::stream_pieces(text),
        Answer::Tool { .. } => Vec::new(),
    };
    let plan = Plan::new(sc, pieces.len());
    let send_usage = meta.include_usage && !sc.omit_stream_usage;
    let events = respond::assemble(
        plan,
        Vec::new(),
        |i| completion_chunk(meta, pieces[i], None),
        || {
            let mut tail = vec![completion_chunk(meta, "", Some(finish_reason(answer)))];
            if send_usage {
                tail.push(usage_chunk(
                    meta,
                    "text_completion",
                    prompt,
                    answer.completion_tokens(),
                ));
            }
            tail.push(Bytes::from_static(DONE));
            tail
        },
        || Bytes::from_static(STREAM_ERROR),
    );
    respond::stream(shared, sc, "text/event-stream", events, plan)
}

/// One embedding input: a string, or a token array rendered as its ids.
fn input_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s.as_str())),
        Value::Array(tokens) if !tokens.is_empty() && tokens.iter().all(Value::is_u64) => {
            let ids: Vec<String> = tokens.iter().map(Value::to_string).collect();
            Some(Cow::Owned(ids.join(" ")))
        }
        _ => None,
    }
}

/// Embedding `input` / legacy `prompt`: a string, an array of strings, a
/// token array or token arrays.
fn text_inputs(input: &Value) -> Option<Vec<Cow<'_, str>>> {
    match input {
        Value::Array(items) if items.first().is_some_and(Value::is_u64) => {
            input_text(input).map(|t| vec![t])
        }
        Value::Array(items) if !items.is_empty() => items.iter().map(input_text).collect(),
        other => input_text(other).map(|t| vec![t]),
    }
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let adm = match respond::admit::<OpenAi>(&shared, Kind::Embeddings, uri, headers, body).await {
        Ok(adm) => adm,
        Err(resp) => return resp,
    };
    if adm.scenario().malformed {
        return respond::malformed(false);
    }
    let req = &adm.body;
    let Some(model) = model(req) else {
        return bad_request("you must provide a model parameter");
    };
    let Some(inputs) = req.get("input").and_then(text_inputs) else {
        return bad_request("'input' must be a non-empty string, array of strings or token arrays");
    };
    let dims = match req.get("dimensions").map(Value::as_u64) {
        None => text::DEFAULT_DIMS,
        Some(Some(d)) if (1..=65_536).contains(&d) => d as usize,
        Some(_) => return bad_request("'dimensions' must be an integer between 1 and 65536"),
    };
    let base64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let v = text::embedding(input, dims);
            let embedding = if base64 {
                json!(text::embedding_base64(&v))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    let tokens = inputs
        .iter()
        .map(|i| text::word_count(i))
        .sum::<u64>()
        .max(1);
    let body = json!({
        "object": "list", "data": data, "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    });
    respond::json(StatusCode::OK, &body)
}

/// `GET /v1/models`: a fixed list, serialized once.
pub(crate) async fn models(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    let adm =
        match respond::admit::<OpenAi>(&shared, Kind::Models, uri, headers, Bytes::new()).await {
            Ok(adm) => adm,
            Err(resp) => return resp,
        };
    if adm.scenario().malformed {
        return respond::malformed(false);
    }
    let body = BODY.get_or_init(|| {
        let ids = ["gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small", "mock-model"];
        let data: Vec<Value> = ids
            .iter()
            .map(|id| json!({ "id": id, "object": "model", "created": 1_700_000_000, "owned_by": "mock" }))
            .collect();
        Bytes::from(serde_json::to_vec(&json!({ "object": "list", "data": data })).unwrap_or_default())
    });
    respond::raw(StatusCode::OK, "application/json", body.clone())
}
