//! Shared fixture and helpers of the conformance suite.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use marga_protocol::openai::{
    ChatCompletionChunk, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, FinishReason, Usage,
};
use marga_protocol::relayed::ChatChunk;
use marga_providers::{Call, ChunkStream, ErrorKind, Provider, ProviderError, ProviderKind, ProviderSettings};
use mock_upstream::MockUpstream;
use serde_json::Value;

/// The key configured on the provider.
pub const KEY: &str = "sk-conformance-configured";
/// A per-call (BYOK) key.
pub const OVERRIDE_KEY: &str = "sk-conformance-override";
/// The model name the upstream knows.
pub const UPSTREAM_MODEL: &str = "upstream-model-x";
/// The model name the client asked for.
pub const PUBLIC_MODEL: &str = "public-alias";
/// A user message longer than the 40 characters the mock echoes.
pub const USER_TEXT: &str = "Hello there! This is the conformance suite, checking every provider.";

/// What a provider kind can do, so that the suite skips (or expects `Unsupported` for) the rest.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities {
    /// `/embeddings` works (else the call must fail with `Unsupported` without a request).
    pub embeddings: bool,
    /// Legacy completions go to a native `/completions` endpoint (else through chat).
    pub native_completions: bool,
    /// `response_format: json_object` is enforced upstream, so the reply parses as JSON.
    pub json_mode: bool,
}

/// Where a provider kind's base URL is on the mock.
pub type BaseUrl = fn(&MockUpstream) -> String;

/// A fresh mock upstream and a provider (built with [`KEY`]) pointed at it.
pub struct Fixture {
    pub kind: ProviderKind,
    pub caps: Capabilities,
    pub mock: MockUpstream,
    pub provider: Arc<dyn Provider>,
    base: BaseUrl,
}

impl Fixture {
    pub async fn start(kind: ProviderKind, caps: Capabilities, base: BaseUrl) -> Fixture {
        let mock = MockUpstream::start().await.unwrap();
        let provider = marga_providers::build(settings(kind, base(&mock), Some(KEY))).unwrap();
        assert_eq!(provider.kind(), kind);
        Fixture { kind, caps, mock, provider, base }
    }

    /// Another provider of the same kind against the same mock, with `api_key`.
    pub fn provider_with_key(&self, api_key: Option<&str>) -> Arc<dyn Provider> {
        marga_providers::build(settings(self.kind, (self.base)(&self.mock), api_key)).unwrap()
    }

    /// A provider of the same kind pointed at a port nobody listens on.
    pub fn unreachable_provider(&self) -> Arc<dyn Provider> {
        marga_providers::build(settings(self.kind, closed_port_url(), Some(KEY))).unwrap()
    }

    /// The header that carried `key` in the last recorded request, in this kind's scheme.
    pub fn assert_sent_key(&self, key: &str) {
        let sent = self.mock.last_request().unwrap();
        let (name, expected) = match self.kind {
            ProviderKind::Openai => ("authorization", format!("Bearer {key}")),
            ProviderKind::Anthropic => ("x-api-key", key.to_owned()),
            ProviderKind::Gemini => ("x-goog-api-key", key.to_owned()),
            ProviderKind::Sandbox => panic!("the sandbox sends nothing"),
        };
        assert_eq!(sent.header(name), Some(expected.as_str()), "{name} header of {sent:?}");
        let other = if key == KEY { OVERRIDE_KEY } else { KEY };
        let leaked = sent.headers.iter().any(|(_, v)| v.contains(other));
        assert!(!leaked, "the other key was sent too: {:?}", sent.headers);
        assert!(!sent.query.as_deref().unwrap_or_default().contains(key), "key in the query string");
    }
}

pub fn settings(kind: ProviderKind, base_url: String, api_key: Option<&str>) -> ProviderSettings {
    ProviderSettings {
        kind,
        base_url,
        api_key: api_key.map(str::to_owned),
        auth_header: None,
        headers: Vec::new(),
        supports_stream_usage: true,
        connect_timeout: Duration::from_secs(2),
        max_idle_connections: 16,
    }
}

/// A base URL on 127.0.0.1 whose port was free a moment ago (bound, then released).
pub fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/v1")
}

/// A chat request from its JSON body, with the public model name when the body has none.
pub fn chat_request(mut body: Value) -> ChatCompletionRequest {
    body.as_object_mut().unwrap().entry("model").or_insert_with(|| PUBLIC_MODEL.into());
    serde_json::from_value(body).unwrap()
}

pub fn completion_request(mut body: Value) -> CompletionRequest {
    body.as_object_mut().unwrap().entry("model").or_insert_with(|| PUBLIC_MODEL.into());
    serde_json::from_value(body).unwrap()
}

pub fn embedding_request(mut body: Value) -> EmbeddingRequest {
    body.as_object_mut().unwrap().entry("model").or_insert_with(|| PUBLIC_MODEL.into());
    serde_json::from_value(body).unwrap()
}

pub fn call<T>(request: &T) -> Call<'_, T> {
    Call { request, upstream_model: UPSTREAM_MODEL, api_key: None }
}

/// `"Mock reply to: "` and the first 40 characters of the last user text.
pub fn expected_reply(user_text: &str) -> String {
    format!("Mock reply to: {}", user_text.chars().take(40).collect::<String>())
}

/// Token counts are positive and add up.
pub fn assert_usage(usage: &Usage) {
    assert!(usage.prompt_tokens > 0, "{usage:?}");
    assert!(usage.completion_tokens > 0, "{usage:?}");
    assert_eq!(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens, "{usage:?}");
}

/// Every item of a stream, errors included, with a time limit.
pub async fn collect<T>(
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, ProviderError>> + Send>>,
) -> Vec<Result<T, ProviderError>> {
    tokio::time::timeout(Duration::from_secs(5), stream.collect()).await.expect("stream did not end")
}

/// Every item of a chat stream, chunks parsed whole (relayed ones are kept as text), with a
/// time limit.
pub async fn collect_chat(stream: ChunkStream) -> Vec<Result<ChatCompletionChunk, ProviderError>> {
    let parse = |item: Result<ChatChunk, ProviderError>| item.map(|chunk| chunk.into_parsed().unwrap());
    collect(stream).await.into_iter().map(parse).collect()
}

/// The error a stream fails to open with.
pub async fn stream_open_error(provider: &dyn Provider, request: &ChatCompletionRequest) -> ProviderError {
    match provider.chat_stream(call(request)).await {
        Ok(stream) => panic!("the stream opened; it yielded {:?}", collect_debug(stream).await),
        Err(e) => e,
    }
}

async fn collect_debug(stream: ChunkStream) -> Vec<String> {
    collect(stream).await.into_iter().map(|i| format!("{i:?}")).collect()
}

/// All items are `Ok`.
pub fn all_ok<T: std::fmt::Debug>(items: Vec<Result<T, ProviderError>>) -> Vec<T> {
    items.into_iter().map(|i| i.unwrap()).collect()
}

/// The chunks before the one error that ends the stream, and that error.
pub fn ending_in_error<T: std::fmt::Debug>(mut items: Vec<Result<T, ProviderError>>) -> (Vec<T>, ProviderError) {
    let last = items.pop().expect("the stream was empty");
    let Err(error) = last else { panic!("the stream ended with {last:?}, not an error") };
    (all_ok(items), error)
}

pub fn content(chunks: &[ChatCompletionChunk]) -> String {
    chunks.iter().flat_map(|c| &c.choices).filter_map(|c| c.delta.content.as_deref()).collect()
}

pub fn finish_reasons(chunks: &[ChatCompletionChunk]) -> Vec<FinishReason> {
    chunks.iter().flat_map(|c| &c.choices).filter_map(|c| c.finish_reason.clone()).collect()
}

/// The stream shape every kind promises: role first, exactly one `expected` finish reason, and
/// a last chunk (only that one) carrying usage.
pub fn assert_complete_stream(chunks: &[ChatCompletionChunk], expected: FinishReason) {
    assert!(!chunks.is_empty());
    let first = &chunks[0];
    assert_eq!(first.choices.first().and_then(|c| c.delta.role), Some(marga_protocol::openai::Role::Assistant));
    assert_eq!(finish_reasons(chunks), [expected]);
    let (last, rest) = chunks.split_last().unwrap();
    assert_usage(last.usage.as_ref().expect("the last chunk carries usage"));
    assert!(last.choices.is_empty(), "the usage chunk has no choices: {last:?}");
    assert!(rest.iter().all(|c| c.usage.is_none()), "usage before the end");
    assert!(chunks.iter().all(|c| c.id == first.id && c.object == "chat.completion.chunk"));
}

/// The streamed tool call: its name and its reassembled arguments.
pub fn streamed_tool_call(chunks: &[ChatCompletionChunk]) -> (String, String) {
    let deltas: Vec<_> =
        chunks.iter().flat_map(|c| &c.choices).flat_map(|c| c.delta.tool_calls.iter().flatten()).collect();
    assert!(!deltas.is_empty(), "no tool call deltas");
    assert!(deltas.iter().all(|d| d.index == 0));
    assert!(deltas[0].id.as_deref().is_some_and(|id| !id.is_empty()), "{:?}", deltas[0]);
    let name: String = deltas.iter().filter_map(|d| d.function.as_ref()?.name.as_deref()).collect();
    let arguments: String = deltas.iter().filter_map(|d| d.function.as_ref()?.arguments.as_deref()).collect();
    (name, arguments)
}

/// The error kind and status an upstream failure was classified with.
pub fn assert_error(error: &ProviderError, kind: ErrorKind, statuses: &[u16]) {
    assert_eq!(error.kind, kind, "{error:?}");
    let status = error.status.expect("an HTTP status");
    assert!(statuses.contains(&status), "status {status}, expected one of {statuses:?}");
}

/// Waits up to ~1 s for `condition`.
pub async fn eventually(condition: impl Fn() -> bool) -> bool {
    for _ in 0..100 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}
