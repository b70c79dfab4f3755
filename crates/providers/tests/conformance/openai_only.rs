//! What only the OpenAI-compatible kind promises: the client's body goes out as sent (unknown
//! parameters included) with the upstream model written in, `stream_options.include_usage`
//! is injected only where the upstream supports it, auth header variants and static headers,
//! and in-band stream errors in any of the shapes OpenAI-compatible upstreams use.

use std::sync::Arc;

use marga_protocol::answer::ChatAnswer;
use marga_protocol::openai::{ChatCompletionChunk, FinishReason};
use marga_providers::{ErrorKind, Provider, ProviderError, ProviderKind, ProviderSettings};
use mock_upstream::{MockUpstream, Scenario};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::support::*;

async fn setup(configure: impl FnOnce(&mut ProviderSettings)) -> (MockUpstream, Arc<dyn Provider>) {
    let mock = MockUpstream::start().await.unwrap();
    let mut settings = settings(ProviderKind::Openai, mock.openai_base(), Some(KEY));
    configure(&mut settings);
    (mock, marga_providers::build(settings).unwrap())
}

fn sent_body(mock: &MockUpstream) -> Value {
    mock.last_request().unwrap().body
}

fn hello(extra: Value) -> marga_protocol::openai::ChatCompletionRequest {
    let mut body = json!({"model": PUBLIC_MODEL, "messages": [{"role": "user", "content": USER_TEXT}]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    chat_request(body)
}

#[tokio::test]
async fn unknown_parameters_reach_the_upstream_untouched() {
    let (mock, provider) = setup(|_| {}).await;
    let extra = json!({
        "logit_bias": {"50256": -100, "1734": 5},
        "custom_vendor_flag": true,
        "vendor_options": {"nested": [1, 2.5, {"x": null}], "mode": "fast"},
        "temperature": 0.25,
        "seed": 7,
        "user": "end-user-1",
    });
    let request = hello(extra.clone());
    let answer = provider.chat(call(&request)).await.unwrap();
    assert!(matches!(answer, ChatAnswer::Relayed(_)), "an answer with usage is relayed as its text");
    let response = answer.into_parsed().unwrap();
    assert_eq!(response.model, UPSTREAM_MODEL);
    let body = sent_body(&mock);
    for (name, value) in extra.as_object().unwrap() {
        assert_eq!(&body[name], value, "{name}");
    }
    assert_eq!(body["model"], UPSTREAM_MODEL, "the upstream model replaces the public one");
    assert_eq!(body["messages"], json!([{"role": "user", "content": USER_TEXT}]));
    assert!(body.get("stream").is_none() && body.get("stream_options").is_none(), "{body}");

    all_ok(collect_chat(provider.chat_stream(call(&request)).await.unwrap()).await);
    let body = sent_body(&mock);
    for (name, value) in extra.as_object().unwrap() {
        assert_eq!(&body[name], value, "{name}");
    }
    assert_eq!(body["model"], UPSTREAM_MODEL);
    assert_eq!(body["stream"], true);
}

#[tokio::test]
async fn a_client_stream_flag_or_options_never_reach_a_non_stream_call() {
    let (mock, provider) = setup(|_| {}).await;
    let request = hello(json!({"stream": true, "stream_options": {"include_usage": true}}));
    provider.chat(call(&request)).await.unwrap();
    let body = sent_body(&mock);
    assert!(body.get("stream").is_none() && body.get("stream_options").is_none(), "{body}");
}

#[tokio::test]
async fn include_usage_is_injected_when_the_upstream_supports_it() {
    let (mock, provider) = setup(|s| s.supports_stream_usage = true).await;
    let chunks = all_ok(collect_chat(provider.chat_stream(call(&hello(json!({})))).await.unwrap()).await);
    assert_eq!(sent_body(&mock)["stream_options"], json!({"include_usage": true}));
    assert_complete_stream(&chunks, FinishReason::Stop);
}

#[tokio::test]
async fn include_usage_is_not_injected_when_unsupported() {
    let (mock, provider) = setup(|s| s.supports_stream_usage = false).await;
    let items = collect_chat(provider.chat_stream(call(&hello(json!({})))).await.unwrap()).await;
    let chunks = all_ok(items);
    assert!(sent_body(&mock).get("stream_options").is_none(), "{}", sent_body(&mock));
    assert_eq!(content(&chunks), expected_reply(USER_TEXT));
    assert_eq!(finish_reasons(&chunks), [FinishReason::Stop]);
    assert!(chunks.iter().all(|c| c.usage.is_none()), "no usage chunk was asked for");
    assert_eq!(mock.streams_cancelled(), 0);
}

#[tokio::test]
async fn an_upstream_that_ignores_include_usage_still_ends_cleanly() {
    let (mock, provider) = setup(|s| s.supports_stream_usage = true).await;
    mock.set_scenario(Scenario { omit_stream_usage: true, ..Scenario::default() });
    let chunks = all_ok(collect_chat(provider.chat_stream(call(&hello(json!({})))).await.unwrap()).await);
    assert_eq!(content(&chunks), expected_reply(USER_TEXT));
    assert_eq!(finish_reasons(&chunks), [FinishReason::Stop]);
    assert!(chunks.iter().all(|c| c.usage.is_none()));
}

#[tokio::test]
async fn client_stream_options_are_kept() {
    let options = json!({"stream_options": {"include_usage": false, "include_obfuscation": false, "x_vendor": 1}});
    let request = hello(options);

    let (mock, provider) = setup(|s| s.supports_stream_usage = true).await;
    let chunks = all_ok(collect_chat(provider.chat_stream(call(&request)).await.unwrap()).await);
    let sent = sent_body(&mock)["stream_options"].clone();
    assert_eq!(sent, json!({"include_usage": true, "include_obfuscation": false, "x_vendor": 1}));
    assert!(chunks.last().unwrap().usage.is_some());

    let (mock, provider) = setup(|s| s.supports_stream_usage = false).await;
    all_ok(collect_chat(provider.chat_stream(call(&request)).await.unwrap()).await);
    let sent = sent_body(&mock)["stream_options"].clone();
    assert_eq!(sent, json!({"include_usage": false, "include_obfuscation": false, "x_vendor": 1}));
}

#[tokio::test]
async fn a_custom_auth_header_carries_the_raw_key() {
    let (mock, provider) = setup(|s| s.auth_header = Some("api-subscription-key".to_owned())).await;
    // The mock only accepts `Authorization: Bearer`, so it refuses; what matters is what it got.
    let error = provider.chat(call(&hello(json!({})))).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Auth);
    let sent = mock.last_request().unwrap();
    assert_eq!(sent.header("api-subscription-key"), Some(KEY));
    assert_eq!(sent.header("authorization"), None);

    let request = hello(json!({}));
    let byok = marga_providers::Call { api_key: Some(OVERRIDE_KEY), ..call(&request) };
    assert!(provider.chat_stream(byok).await.is_err());
    let sent = mock.last_request().unwrap();
    assert_eq!(sent.header("api-subscription-key"), Some(OVERRIDE_KEY));
    assert_eq!(sent.header("authorization"), None);
}

#[tokio::test]
async fn an_invalid_auth_header_name_is_refused_when_the_provider_is_built() {
    let mock = MockUpstream::start().await.unwrap();
    let mut settings = settings(ProviderKind::Openai, mock.openai_base(), Some(KEY));
    settings.auth_header = Some("bad header\n".to_owned());
    let error = marga_providers::build(settings).err().expect("an invalid header name is refused");
    assert_eq!(error.kind, ErrorKind::InvalidRequest);
    assert_eq!(mock.requests(), 0);
}

#[tokio::test]
async fn static_headers_are_sent_on_every_call() {
    let headers = vec![
        ("X-Tenant".to_owned(), "acme".to_owned()),
        ("OpenAI-Organization".to_owned(), "org-123".to_owned()),
    ];
    let (mock, provider) = setup(|s| s.headers = headers).await;
    let check = |mock: &MockUpstream| {
        let sent = mock.last_request().unwrap();
        assert_eq!(sent.header("x-tenant"), Some("acme"));
        assert_eq!(sent.header("openai-organization"), Some("org-123"));
        assert_eq!(sent.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
    };
    provider.chat(call(&hello(json!({})))).await.unwrap();
    check(&mock);
    all_ok(collect_chat(provider.chat_stream(call(&hello(json!({})))).await.unwrap()).await);
    check(&mock);
    provider.embeddings(call(&embedding_request(json!({"input": "x"})))).await.unwrap();
    check(&mock);
}

#[tokio::test]
async fn a_trailing_slash_in_the_base_url_is_ignored() {
    let mock = MockUpstream::start().await.unwrap();
    let settings = settings(ProviderKind::Openai, format!("{}/", mock.openai_base()), Some(KEY));
    let provider = marga_providers::build(settings).unwrap();
    provider.chat(call(&hello(json!({})))).await.unwrap();
    assert_eq!(mock.last_request().unwrap().path, "/v1/chat/completions");
}

#[tokio::test]
async fn legacy_completions_pass_through_and_get_stream_usage() {
    let (mock, provider) = setup(|s| s.supports_stream_usage = true).await;
    let request = completion_request(json!({"prompt": "Say this", "echo": false, "suffix": "!", "best_of": 1}));
    provider.completions(call(&request)).await.unwrap();
    let body = sent_body(&mock);
    assert_eq!(mock.last_request().unwrap().path, "/v1/completions");
    assert_eq!((&body["model"], &body["suffix"], &body["best_of"]), (&json!(UPSTREAM_MODEL), &json!("!"), &json!(1)));
    assert!(body.get("stream").is_none());

    all_ok(collect(provider.completions_stream(call(&request)).await.unwrap()).await);
    let body = sent_body(&mock);
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn base64_embeddings_pass_through() {
    let (mock, provider) = setup(|_| {}).await;
    let request = embedding_request(json!({"input": ["a", "b"], "encoding_format": "base64", "dimensions": 4}));
    let response = provider.embeddings(call(&request)).await.unwrap();
    assert_eq!(sent_body(&mock)["encoding_format"], "base64");
    assert_eq!(response.data.len(), 2);
    let encoded = response.data[0].embedding.to_base64().expect("base64 is kept as a string");
    assert_eq!(encoded.len(), 24, "4 little-endian f32s, base64: {encoded}");
}

/// A one-trick upstream: answers every request with `200 text/event-stream` and `body`, then
/// closes the connection. Returns its OpenAI base URL.
async fn raw_sse_upstream(body: String) -> String {
    let body: Arc<str> = body.into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = Arc::clone(&body);
            tokio::spawn(async move {
                read_request(&mut socket).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{addr}/v1")
}

/// Reads one request (head and `content-length` body) so that closing does not reset it.
async fn read_request(socket: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = socket.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + length {
            return;
        }
    }
}

/// One SSE `data:` event.
fn data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// One `chat.completion.chunk` event.
fn chunk(delta: Value, finish: Option<&str>) -> String {
    data(&json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
}

fn first_chunk() -> String {
    chunk(json!({"role": "assistant", "content": "Hel"}), None)
}

const DONE: &str = "data: [DONE]\n\n";

async fn raw_provider(body: String) -> Arc<dyn Provider> {
    let base = raw_sse_upstream(body).await;
    marga_providers::build(settings(ProviderKind::Openai, base, Some(KEY))).unwrap()
}

/// A stream from a raw upstream that must end in one error: the chunks before it, and the error.
async fn in_band_error(body: String) -> (Vec<ChatCompletionChunk>, ProviderError) {
    let provider = raw_provider(body).await;
    let items = collect_chat(provider.chat_stream(call(&hello(json!({})))).await.unwrap()).await;
    assert_eq!(items.iter().filter(|i| i.is_err()).count(), 1, "exactly one error: {items:?}");
    ending_in_error(items)
}

#[tokio::test]
async fn a_gemini_style_in_band_error_ends_the_stream() {
    let error = json!({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}});
    let body = [first_chunk(), data(&error), chunk(json!({"content": "lo"}), Some("stop")), DONE.to_owned()];
    let (chunks, error) = in_band_error(body.concat()).await;
    assert_eq!(content(&chunks), "Hel", "nothing after the error");
    assert_eq!(error.kind, ErrorKind::StreamInterrupted);
    assert_eq!(error.message, "The model is overloaded.");
}

#[tokio::test]
async fn other_in_band_error_shapes_end_the_stream() {
    // `event: error` with a bare message.
    let event = "event: error\ndata: {\"message\":\"upstream worker crashed\"}\n\n";
    let (chunks, error) = in_band_error([first_chunk(), event.to_owned(), DONE.to_owned()].concat()).await;
    assert_eq!(content(&chunks), "Hel");
    assert_eq!((error.kind, error.message.as_str()), (ErrorKind::StreamInterrupted, "upstream worker crashed"));

    // An error object that is not the first key.
    let error = data(&json!({"id": "c1", "error": {"message": "rate limited mid-stream", "code": 429}}));
    let (chunks, error) = in_band_error([first_chunk(), error, DONE.to_owned()].concat()).await;
    assert_eq!(content(&chunks), "Hel");
    assert_eq!((error.kind, error.message.as_str()), (ErrorKind::StreamInterrupted, "rate limited mid-stream"));
}

#[tokio::test]
async fn a_null_error_field_is_not_an_error_and_done_ends_the_stream() {
    let with_null_error = data(&json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "error": null, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]}));
    let body = [
        with_null_error,
        ": keep-alive comment\n\n".to_owned(),
        chunk(json!({"content": "lo"}), Some("stop")),
        DONE.to_owned(),
        data(&json!({"error": {"message": "after the end"}})),
    ];
    let provider = raw_provider(body.concat()).await;
    let chunks = all_ok(collect_chat(provider.chat_stream(call(&hello(json!({})))).await.unwrap()).await);
    assert_eq!(content(&chunks), "Hello");
    assert_eq!(finish_reasons(&chunks), [FinishReason::Stop]);
}

#[tokio::test]
async fn a_stream_closed_before_it_finished_is_an_error() {
    // A 2xx answer to a stream request that is not SSE at all (the upstream ignored `stream`).
    let not_sse = json!({"id": "c1", "object": "chat.completion", "choices": []}).to_string();
    // Content, then a clean close with neither a finish reason nor `[DONE]`.
    for body in [not_sse.clone(), first_chunk()] {
        let provider = raw_provider(body).await;
        let items = collect_chat(provider.chat_stream(call(&hello(json!({})))).await.unwrap()).await;
        assert_eq!(items.iter().filter(|i| i.is_err()).count(), 1, "{items:?}");
        let (_, error) = ending_in_error(items);
        assert_eq!(error.kind, ErrorKind::StreamInterrupted, "{error:?}");
    }
    let provider = raw_provider(not_sse).await;
    let legacy = completion_request(json!({"prompt": "Say this"}));
    let items = collect(provider.completions_stream(call(&legacy)).await.unwrap()).await;
    assert_eq!(ending_in_error(items).1.kind, ErrorKind::StreamInterrupted);
}

#[tokio::test]
async fn a_finished_stream_without_done_ends_cleanly() {
    let body = [chunk(json!({"role": "assistant", "content": "Hi"}), None), chunk(json!({}), Some("stop"))];
    let provider = raw_provider(body.concat()).await;
    let chunks = all_ok(collect_chat(provider.chat_stream(call(&hello(json!({})))).await.unwrap()).await);
    assert_eq!((content(&chunks).as_str(), finish_reasons(&chunks)), ("Hi", vec![FinishReason::Stop]));
}
