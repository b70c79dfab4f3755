//! Gemini (Generative Language API, v1beta) wire format:
//! `models/{model}:generateContent`, `:streamGenerateContent` (SSE with
//! `?alt=sse`, else a streamed JSON array), `:embedContent` and
//! `:batchEmbedContents`, with Google error envelopes.

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

/// Gemini separates SSE events with CRLF pairs.
const SEP: &str = "\r\n\r\n";
/// Body of the in-band stream error.
const STREAM_ERROR: &str = r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;

struct Gemini;

/// Value of query parameter `name` (not percent-decoded).
fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

impl Dialect for Gemini {
    fn authorized(headers: &HeaderMap, uri: &Uri) -> bool {
        let header = headers
            .get("x-goog-api-key")
            .is_some_and(|v| !v.as_bytes().trim_ascii().is_empty());
        header || query_param(uri, "key").is_some_and(|k| !k.is_empty())
    }

    fn auth_error() -> Response {
        let message = "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.";
        Gemini::error(StatusCode::FORBIDDEN, message)
    }

    fn error(status: StatusCode, message: &str) -> Response {
        respond::json(status, &error_body(status.as_u16(), message))
    }
}

fn error_body(code: u16, message: &str) -> Value {
    let status = match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        500 => "INTERNAL",
        503 | 529 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    };
    json!({ "error": { "code": code, "message": message, "status": status } })
}

fn bad_request(message: &str) -> Response {
    Gemini::error(StatusCode::BAD_REQUEST, message)
}

/// Field by its JSON (camelCase) name, or the proto (snake_case) name.
fn field<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    v.get(camel).or_else(|| v.get(snake))
}

/// `POST /v1beta/models/{model}:{method}`.
pub(crate) async fn dispatch(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let rest = uri.path().strip_prefix("/v1beta/models/").unwrap_or("");
    let Some((model, method)) = rest.rsplit_once(':') else {
        return Gemini::error(StatusCode::NOT_FOUND, "expected models/{model}:{method}");
    };
    let kind = match method {
        "generateContent" => Kind::GenerateContent,
        "streamGenerateContent" => Kind::StreamGenerateContent,
        "embedContent" => Kind::EmbedContent,
        "batchEmbedContents" => Kind::BatchEmbedContents,
        _ => return Gemini::error(StatusCode::NOT_FOUND, &format!("unknown method {method}")),
    };
    let model = model.to_owned();
    let sse = query_param(&uri, "alt") == Some("sse");
    let adm = match respond::admit::<Gemini>(&shared, kind, uri, headers, body).await {
        Ok(adm) => adm,
        Err(resp) => return resp,
    };
    let stream = matches!(kind, Kind::StreamGenerateContent);
    if adm.scenario().malformed {
        return respond::malformed(stream);
    }
    match kind {
        Kind::EmbedContent => embed(&adm.body),
        Kind::BatchEmbedContents => batch_embed(&adm.body),
        _ => generate(&shared, &adm, &model, stream.then_some(sse)),
    }
}

/// Text of a part: `text`, or a `functionResponse` rendered as text.
fn part_text(part: &Value) -> Option<Cow<'_, str>> {
    if let Some(t) = part.get("text").and_then(Value::as_str) {
        return Some(Cow::Borrowed(t));
    }
    field(part, "functionResponse", "function_response").map(function_response_text)
}

fn function_response_text(fr: &Value) -> Cow<'_, str> {
    let response = fr.get("response").unwrap_or(&Value::Null);
    let direct = ["content", "result", "output"]
        .iter()
        .find_map(|k| response.get(*k).and_then(Value::as_str));
    match direct {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(response.to_string()),
    }
}

fn parts(content: &Value) -> &[Value] {
    content
        .get("parts")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn content_text(content: &Value) -> Cow<'_, str> {
    let texts: Vec<Cow<'_, str>> = parts(content).iter().filter_map(part_text).collect();
    match texts.len() {
        0 => Cow::Borrowed(""),
        1 => texts.into_iter().next().unwrap_or_default(),
        _ => Cow::Owned(texts.join(" ")),
    }
}

/// Name of the first function declaration, unless calling mode is NONE.
fn first_function(req: &Value) -> Option<&str> {
    let mode = field(req, "toolConfig", "tool_config")
        .and_then(|c| field(c, "functionCallingConfig", "function_calling_config"))
        .and_then(|c| c.get("mode"))
        .and_then(Value::as_str);
    if mode == Some("NONE") {
        return None;
    }
    req.get("tools")?.as_array()?.iter().find_map(|tool| {
        let decls = field(tool, "functionDeclarations", "function_declarations")?.as_array()?;
        decls.first()?.get("name")?.as_str()
    })
}

fn role(content: &Value) -> &str {
    content
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or("user")
}

/// Decides the answer and counts prompt tokens.
fn decide(req: &Value, contents: &[Value], reply: Option<&String>) -> (Answer, u64) {
    let system = field(req, "systemInstruction", "system_instruction").map(content_text);
    let texts: Vec<Cow<'_, str>> = contents.iter().map(content_text).collect();
    let all = system.iter().chain(texts.iter()).map(|t| t.as_ref());
    let prompt = text::prompt_tokens(all, contents.len() + usize::from(system.is_some()));
    let last = contents.last().unwrap_or(&Value::Null);
    let function_response = parts(last)
        .iter()
        .rev()
        .find_map(|p| field(p, "functionResponse", "function_response"));
    let has_text = parts(last).iter().any(|p| p.get("text").is_some());
    if let (None, "user", true, Some(name)) =
        (function_response, role(last), has_text, first_function(req))
    {
        return (
            Answer::Tool {
                name: name.to_owned(),
            },
            prompt,
        );
    }
    let mut body = match (reply, function_response) {
        (Some(r), _) => r.clone(),
        (None, Some(fr)) => text::tool_reply_text(&function_response_text(fr)),
        (None, None) => {
            let user = contents
                .iter()
                .zip(&texts)
                .rev()
                .find(|(c, _)| role(c) == "user");
            text::reply_text(user.map_or("", |(_, t)| t.as_ref()))
        }
    };
    let config = field(req, "generationConfig", "generation_config").unwrap_or(&Value::Null);
    if field(config, "responseMimeType", "response_mime_type").and_then(Value::as_str)
        == Some("application/json")
    {
        body = text::json_object_reply(&body);
    }
    let max = field(config, "maxOutputTokens", "max_output_tokens").and_then(Value::as_u64);
    let stops: Vec<&str> =
        match field(config, "stopSequences", "stop_sequences").and_then(Value::as_array) {
            Some(a) => a.iter().filter_map(Value::as_str).collect(),
            None => Vec::new(),
        };
    (text::shape(body, max, &stops), prompt)
}

fn finish_reason(answer: &Answer) -> &'static str {
    match answer {
        Answer::Text {
            finish: Finish::Length,
            ..
        } => "MAX_TOKENS",
        _ => "STOP",
    }
}

fn usage(prompt: u64, candidates: u64) -> Value {
    json!({ "promptTokenCount": prompt, "candidatesTokenCount": candidates, "totalTokenCount": prompt + candidates })
}

/// Response identity shared by every chunk.
struct Meta<'a> {
    model: &'a str,
    id: String,
    prompt: u64,
}

/// One GenerateContentResponse with a single candidate.
fn response(meta: &Meta<'_>, part: Value, finish: Option<&str>, candidates_tokens: u64) -> Value {
    let mut candidate = json!({ "content": { "role": "model", "parts": [part] }, "index": 0 });
    if let Some(reason) = finish {
        candidate["finishReason"] = json!(reason);
    }
    json!({
        "candidates": [candidate],
        "usageMetadata": usage(meta.prompt, candidates_tokens),
        "modelVersion": meta.model,
        "responseId": meta.id,
    })
}

fn function_call_part(name: &str) -> Value {
    json!({ "functionCall": { "name": name, "args": { "location": "Paris" } } })
}

/// generateContent (`stream == None`) or streamGenerateContent
/// (`Some(true)` = SSE, `Some(false)` = JSON array).
fn generate(shared: &Arc<Shared>, adm: &Admitted, model: &str, stream: Option<bool>) -> Response {
    let contents = match adm.body.get("contents").and_then(Value::as_array) {
        Some(c) if !c.is_empty() => c.as_slice(),
        _ => return bad_request("* GenerateContentRequest.contents: contents is not specified"),
    };
    let (answer, prompt) = decide(&adm.body, contents, adm.scenario().reply.as_ref());
    let meta = Meta {
        model,
        id: text::next_id("mock-resp-"),
        prompt,
    };
    match stream {
        Some(sse) => stream_response(shared, adm, &meta, &answer, sse),
        None => {
            let part = match &answer {
                Answer::Text { text, .. } => json!({ "text": text }),
                Answer::Tool { name } => function_call_part(name),
            };
            let body = response(
                &meta,
                part,
                Some(finish_reason(&answer)),
                answer.completion_tokens(),
            );
            respond::json(StatusCode::OK, &body)
        }
    }
}

/// Frames values as SSE events or as elements of a streamed JSON array.
#[derive(Clone, Copy)]
struct Framing {
    sse: bool,
}

impl Framing {
    fn frame(self, value: &str, first: bool) -> Bytes {
        match (self.sse, first) {
            (true, _) => Bytes::from(["data: ", value, SEP].concat()),
            (false, true) => Bytes::from(["[", value].concat()),
            (false, false) => Bytes::from([",\r\n", value].concat()),
        }
    }

    fn close(self) -> Vec<Bytes> {
        if self.sse {
            Vec::new()
        } else {
            vec![Bytes::from_static(b"]")]
        }
    }
}

fn stream_response(
    shared: &Arc<Shared>,
    adm: &Admitted,
    meta: &Meta<'_>,
    answer: &Answer,
    sse: bool,
) -> Response {
    let sc = adm.scenario();
    let framing = Framing { sse };
    let mut pieces = match answer {
        Answer::Text { text, .. } => text::stream_pieces(text),
        Answer::Tool { .. } => Vec::new(),
    };
    if pieces.is_empty() {
        pieces.push("");
    }
    let plan = Plan::new(sc, pieces.len());
    let mut so_far = 0;
    let events = respond::assemble(
        plan,
        Vec::new(),
        |i| {
            so_far += text::word_count(pieces[i]);
            let finish = plan.is_final(i).then(|| finish_reason(answer));
            let part = match answer {
                Answer::Tool { name } => function_call_part(name),
                Answer::Text { .. } => json!({ "text": pieces[i] }),
            };
            let tokens = if matches!(answer, Answer::Tool { .. }) {
                answer.completion_tokens()
            } else {
                so_far
            };
            framing.frame(&response(meta, part, finish, tokens).to_string(), i == 0)
        },
        || framing.close(),
        || {
            let mut ev = framing.frame(STREAM_ERROR, plan.emit == 0).to_vec();
            ev.extend(framing.close().iter().flat_map(|b| b.iter().copied()));
            Bytes::from(ev)
        },
    );
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/json"
    };
    respond::stream(shared, sc, content_type, events, plan)
}

/// `outputDimensionality` or the default.
fn dims(req: &Value) -> Result<usize, &'static str> {
    match field(req, "outputDimensionality", "output_dimensionality").map(Value::as_u64) {
        None => Ok(text::DEFAULT_DIMS),
        Some(Some(d)) if (1..=65_536).contains(&d) => Ok(d as usize),
        Some(_) => Err("outputDimensionality must be between 1 and 65536"),
    }
}

/// Values for one EmbedContentRequest, or a 400 message.
fn embed_values(req: &Value) -> Result<Value, &'static str> {
    let Some(content) = req.get("content") else {
        return Err("* EmbedContentRequest.content: content is not specified");
    };
    let values = text::embedding(&content_text(content), dims(req)?);
    Ok(json!({ "values": values }))
}

fn embed(req: &Value) -> Response {
    match embed_values(req) {
        Ok(embedding) => respond::json(StatusCode::OK, &json!({ "embedding": embedding })),
        Err(message) => bad_request(message),
    }
}

fn batch_embed(req: &Value) -> Response {
    let requests = match req.get("requests").and_then(Value::as_array) {
        Some(r) if !r.is_empty() => r,
        _ => return bad_request("* BatchEmbedContentsRequest.requests: requests is not specified"),
    };
    match requests
        .iter()
        .map(embed_values)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(embeddings) => respond::json(StatusCode::OK, &json!({ "embeddings": embeddings })),
        Err(message) => bad_request(message),
    }
}
