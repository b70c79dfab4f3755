//! The Gemini provider against the in-repo fake upstream (`mock-upstream`): URL layout, key
//! header, chat, streams (role first, finish, trailing usage, cuts and in-band errors), tool
//! calls, embeddings (float and base64) and error classification.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use marga_protocol::openai::{
    ChatCompletionChunk, ChatCompletionRequest, EmbeddingRequest, EmbeddingResponse, FinishReason, Role,
};
use marga_providers::gemini::GeminiProvider;
use marga_providers::{Call, ErrorKind, Provider, ProviderError, ProviderKind, ProviderSettings};
use mock_upstream::{MockUpstream, Scenario};
use serde_json::{json, Value};

const KEY: &str = "gm-test-key-123";
const MODEL: &str = "gemini-2.0-flash";
const REPLY: &str = "Bonjour from the mock upstream.";

async fn setup() -> (MockUpstream, GeminiProvider) {
    let mock = MockUpstream::start().await.unwrap();
    let settings = ProviderSettings {
        kind: ProviderKind::Gemini,
        base_url: format!("{}/", mock.gemini_base()),
        api_key: Some(KEY.to_owned()),
        auth_header: None,
        headers: Vec::new(),
        supports_stream_usage: false,
        connect_timeout: Duration::from_secs(5),
        max_idle_connections: 16,
    };
    (mock, GeminiProvider::new(settings).unwrap())
}

fn reply_scenario() -> Scenario {
    Scenario { reply: Some(REPLY.to_owned()), ..Scenario::default() }
}

fn chat_request(body: Value) -> ChatCompletionRequest {
    serde_json::from_value(body).unwrap()
}

fn hello() -> ChatCompletionRequest {
    chat_request(json!({
        "model": "client-model",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    }))
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "additionalProperties": false}
    }}])
}

fn call(request: &ChatCompletionRequest) -> Call<'_, ChatCompletionRequest> {
    Call { request, upstream_model: MODEL, api_key: None }
}

/// The key went in `x-goog-api-key` and nowhere in the URL.
fn assert_key_in_header(mock: &MockUpstream, path_suffix: &str) {
    let recorded = mock.last_request().unwrap();
    assert_eq!(recorded.path, format!("/v1beta/models/{MODEL}{path_suffix}"));
    assert_eq!(recorded.header("x-goog-api-key"), Some(KEY));
    assert!(!recorded.query.as_deref().unwrap_or_default().contains(KEY), "key leaked into the query string");
    assert!(recorded.header("authorization").is_none());
}

async fn collect(
    provider: &GeminiProvider,
    request: &ChatCompletionRequest,
) -> Vec<Result<ChatCompletionChunk, ProviderError>> {
    let items: Vec<_> = provider.chat_stream(call(request)).await.unwrap().collect().await;
    items.into_iter().map(|item| item.map(|chunk| chunk.into_parsed().unwrap())).collect()
}

fn ok_chunks(items: Vec<Result<ChatCompletionChunk, ProviderError>>) -> Vec<ChatCompletionChunk> {
    items.into_iter().map(|item| item.unwrap()).collect()
}

fn content_of(chunks: &[ChatCompletionChunk]) -> String {
    chunks.iter().flat_map(|c| &c.choices).filter_map(|c| c.delta.content.as_deref()).collect()
}

fn finishes(chunks: &[ChatCompletionChunk]) -> Vec<FinishReason> {
    chunks.iter().flat_map(|c| &c.choices).filter_map(|c| c.finish_reason.clone()).collect()
}

/// The stream's shape: role on the first chunk, usage only on the last (which has no choices).
fn assert_stream_shape(chunks: &[ChatCompletionChunk]) {
    assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
    let last = chunks.last().unwrap();
    assert!(last.choices.is_empty());
    assert!(last.usage.as_ref().is_some_and(|u| u.prompt_tokens > 0));
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c.usage.is_none()));
    assert!(chunks.iter().all(|c| c.id == chunks[0].id && c.id.starts_with("chatcmpl-")));
}

#[tokio::test]
async fn chat_text() {
    let (mock, provider) = setup().await;
    mock.set_scenario(reply_scenario());
    let response = provider.chat(call(&hello())).await.unwrap().into_parsed().unwrap();
    assert_eq!(response.choices[0].message.content.as_deref(), Some(REPLY));
    assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Stop));
    assert!(response.id.starts_with("chatcmpl-"), "{}", response.id);
    assert!(response.usage.unwrap().completion_tokens > 0);
    assert_key_in_header(&mock, ":generateContent");
    let body = mock.last_request().unwrap().body;
    assert_eq!(body["systemInstruction"]["parts"][0]["text"], "Be brief.");
    assert_eq!(body["contents"][0]["role"], "user");
}

#[tokio::test]
async fn byok_key_replaces_the_configured_one() {
    let (mock, provider) = setup().await;
    let request = hello();
    let byok = Call { request: &request, upstream_model: MODEL, api_key: Some("byok-key") };
    provider.chat(byok).await.unwrap();
    assert_eq!(mock.last_request().unwrap().header("x-goog-api-key"), Some("byok-key"));
}

#[tokio::test]
async fn stream_text() {
    let (mock, provider) = setup().await;
    mock.set_scenario(reply_scenario());
    let chunks = ok_chunks(collect(&provider, &hello()).await);
    assert_stream_shape(&chunks);
    assert_eq!(content_of(&chunks), REPLY);
    assert_eq!(finishes(&chunks), vec![FinishReason::Stop]);
    assert!(chunks.len() > 3, "the reply came in several chunks");
    assert_key_in_header(&mock, ":streamGenerateContent");
    assert_eq!(mock.last_request().unwrap().query.as_deref(), Some("alt=sse"));
}

#[tokio::test]
async fn tool_call_round_trip() {
    let (mock, provider) = setup().await;
    let first = chat_request(json!({
        "model": "m", "tools": weather_tools(), "tool_choice": "required",
        "messages": [{"role": "user", "content": "Weather in Paris?"}]
    }));
    let response = provider.chat(call(&first)).await.unwrap().into_parsed().unwrap();
    let choice = &response.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    let tool_call = &choice.message.tool_calls.as_ref().unwrap()[0];
    assert_eq!(tool_call.function.name, "get_weather");
    assert_eq!(serde_json::from_str::<Value>(&tool_call.function.arguments).unwrap(), json!({"location": "Paris"}));
    let sent = mock.last_request().unwrap().body;
    assert_eq!(sent["toolConfig"]["functionCallingConfig"]["mode"], "ANY");
    assert!(sent["tools"][0]["functionDeclarations"][0]["parameters"].get("additionalProperties").is_none());

    let second = chat_request(json!({
        "model": "m", "tools": weather_tools(),
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [tool_call]},
            {"role": "tool", "tool_call_id": tool_call.id, "content": "21C and sunny"}
        ]
    }));
    let answer = provider.chat(call(&second)).await.unwrap().into_parsed().unwrap();
    assert_eq!(answer.choices[0].message.content.as_deref(), Some("Tool said: 21C and sunny"));
    let sent = mock.last_request().unwrap().body;
    assert_eq!(sent["contents"][2]["parts"][0]["functionResponse"]["name"], "get_weather");
}

#[tokio::test]
async fn stream_tool_call() {
    let (_mock, provider) = setup().await;
    let request = chat_request(json!({
        "model": "m", "tools": weather_tools(),
        "messages": [{"role": "user", "content": "Weather in Paris?"}]
    }));
    let chunks = ok_chunks(collect(&provider, &request).await);
    assert_stream_shape(&chunks);
    let calls: Vec<_> =
        chunks.iter().flat_map(|c| &c.choices).filter_map(|c| c.delta.tool_calls.clone()).flatten().collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].index, 0);
    assert!(calls[0].id.is_some());
    let function = calls[0].function.as_ref().unwrap();
    assert_eq!(function.name.as_deref(), Some("get_weather"));
    assert_eq!(
        serde_json::from_str::<Value>(function.arguments.as_deref().unwrap()).unwrap(),
        json!({"location": "Paris"})
    );
    assert_eq!(finishes(&chunks), vec![FinishReason::ToolCalls]);
}

fn embedding_request(encoding_format: Option<&str>) -> EmbeddingRequest {
    serde_json::from_value(json!({
        "model": "client-embed", "input": ["alpha beta", "gamma"], "dimensions": 4, "encoding_format": encoding_format
    }))
    .unwrap()
}

async fn embed(provider: &GeminiProvider, request: &EmbeddingRequest) -> Result<EmbeddingResponse, ProviderError> {
    provider.embeddings(Call { request, upstream_model: "text-embedding-004", api_key: None }).await
}

#[tokio::test]
async fn embeddings_float_and_base64() {
    let (mock, provider) = setup().await;
    let floats = embed(&provider, &embedding_request(None)).await.unwrap();
    let recorded = mock.last_request().unwrap();
    assert_eq!(recorded.path, "/v1beta/models/text-embedding-004:batchEmbedContents");
    assert_eq!(recorded.header("x-goog-api-key"), Some(KEY));
    assert_eq!(recorded.body["requests"][1]["model"], "models/text-embedding-004");
    assert_eq!(recorded.body["requests"][1]["outputDimensionality"], 4);
    assert_eq!(floats.data.len(), 2);
    assert!(floats.usage.is_none());
    let vector: Vec<f32> =
        floats.data[1].embedding.to_floats().unwrap().iter().map(|v| *v as f32).collect();
    assert_eq!(vector.len(), 4);

    let encoded = embed(&provider, &embedding_request(Some("base64"))).await.unwrap();
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded.data[1].embedding.to_base64().unwrap()).unwrap();
    let decoded: Vec<f32> = bytes.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(decoded, vector);
}

#[tokio::test]
async fn token_array_embeddings_are_refused_locally() {
    let (mock, provider) = setup().await;
    let request: EmbeddingRequest = serde_json::from_value(json!({"model": "e", "input": [1, 2, 3]})).unwrap();
    let error = embed(&provider, &request).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::InvalidRequest);
    assert_eq!(mock.requests(), 0);
}

#[tokio::test]
async fn unconvertible_request_is_refused_locally() {
    let (mock, provider) = setup().await;
    let request = chat_request(json!({
        "model": "m", "messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]
    }));
    let error = provider.chat(call(&request)).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::InvalidRequest);
    assert!(error.message.contains("messages[0].tool_call_id"), "{}", error.message);
    assert_eq!(mock.requests(), 0);
}

async fn failing_chat(status: u16, retry_after_s: Option<u64>) -> ProviderError {
    let (mock, provider) = setup().await;
    mock.set_scenario(Scenario { fail_first: u64::MAX, fail_status: status, retry_after_s, ..Scenario::default() });
    let error = provider.chat(call(&hello())).await.unwrap_err();
    let stream_error = provider.chat_stream(call(&hello())).await.err().unwrap();
    assert_eq!(stream_error.kind, error.kind, "stream and non-stream classify alike");
    assert_eq!(error.status, Some(status));
    error
}

#[tokio::test]
async fn upstream_503_is_a_server_error() {
    let error = failing_chat(503, None).await;
    assert_eq!(error.kind, ErrorKind::Server);
    assert!(error.message.contains("injected failure"), "{}", error.message);
}

#[tokio::test]
async fn upstream_429_is_rate_limited_with_retry_after() {
    let error = failing_chat(429, Some(7)).await;
    assert_eq!(error.kind, ErrorKind::RateLimited);
    assert_eq!(error.retry_after, Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn upstream_401_and_403_are_auth_errors() {
    assert_eq!(failing_chat(401, None).await.kind, ErrorKind::Auth);
    assert_eq!(failing_chat(403, None).await.kind, ErrorKind::Auth);
}

#[tokio::test]
async fn missing_key_is_an_auth_error() {
    let mock = MockUpstream::start().await.unwrap();
    let settings = ProviderSettings {
        kind: ProviderKind::Gemini,
        base_url: mock.gemini_base(),
        api_key: None,
        auth_header: None,
        headers: Vec::new(),
        supports_stream_usage: false,
        connect_timeout: Duration::from_secs(5),
        max_idle_connections: 16,
    };
    let provider = GeminiProvider::new(settings).unwrap();
    let error = provider.chat(call(&hello())).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Auth);
}

/// Ok chunks, then exactly one error, which is the last item.
fn split_at_error(items: Vec<Result<ChatCompletionChunk, ProviderError>>) -> (Vec<ChatCompletionChunk>, ProviderError) {
    let mut items = items;
    let last = items.pop().unwrap().expect_err("the stream ends with its error");
    let chunks = ok_chunks(items);
    assert!(chunks.iter().all(|c| c.usage.is_none()), "no usage chunk in a broken stream");
    assert!(finishes(&chunks).is_empty(), "no finish chunk in a broken stream");
    (chunks, last)
}

#[tokio::test]
async fn mid_stream_cut_ends_with_stream_interrupted() {
    let (mock, provider) = setup().await;
    mock.set_scenario(Scenario { cut_after_chunks: Some(2), ..reply_scenario() });
    let (chunks, error) = split_at_error(collect(&provider, &hello()).await);
    assert_eq!(error.kind, ErrorKind::StreamInterrupted);
    assert_eq!(content_of(&chunks), "Bonjour from");
}

#[tokio::test]
async fn in_band_error_ends_the_stream() {
    let (mock, provider) = setup().await;
    mock.set_scenario(Scenario { stream_error_after_chunks: Some(1), ..reply_scenario() });
    let (chunks, error) = split_at_error(collect(&provider, &hello()).await);
    assert_eq!(error.kind, ErrorKind::StreamInterrupted);
    assert!(error.message.contains("overloaded"), "{}", error.message);
    assert_eq!(content_of(&chunks), "Bonjour");
}

#[tokio::test]
async fn malformed_stream_is_malformed() {
    let (mock, provider) = setup().await;
    mock.set_scenario(Scenario { malformed: true, ..Scenario::default() });
    let (chunks, error) = split_at_error(collect(&provider, &hello()).await);
    assert!(chunks.is_empty());
    assert_eq!(error.kind, ErrorKind::Malformed);
    let error = provider.chat(call(&hello())).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Malformed);
}
