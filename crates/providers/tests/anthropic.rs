//! The Anthropic provider against the in-repo fake upstream (`mock-upstream`): text and tool
//! calls, streamed and not, error classification, broken streams, and what goes on the wire.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures::StreamExt;
use marga_protocol::openai::{ChatCompletionChunk, ChatCompletionRequest, FinishReason};
use marga_providers::{
    anthropic::AnthropicProvider, Call, ErrorKind, Provider, ProviderError, ProviderKind, ProviderSettings,
};
use mock_upstream::{MockUpstream, Scenario};
use serde_json::{json, Value};

const MODEL: &str = "claude-test";
const KEY: &str = "sk-ant-test";

async fn setup(api_key: Option<&str>) -> (MockUpstream, AnthropicProvider) {
    let mock = MockUpstream::start().await.unwrap();
    let settings = ProviderSettings {
        kind: ProviderKind::Anthropic,
        base_url: mock.anthropic_base(),
        api_key: api_key.map(str::to_owned),
        auth_header: None,
        headers: Vec::new(),
        supports_stream_usage: false,
        connect_timeout: Duration::from_secs(5),
        max_idle_connections: 16,
    };
    (mock, AnthropicProvider::new(settings).unwrap())
}

fn text_request() -> ChatCompletionRequest {
    serde_json::from_value(json!({
        "model": "alias",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
        "seed": 7, "frequency_penalty": 0.2, "logit_bias": {"1": 1}, "logprobs": true, "service_tier": "flex",
    }))
    .unwrap()
}

fn tool_request() -> ChatCompletionRequest {
    serde_json::from_value(json!({
        "model": "alias",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}],
    }))
    .unwrap()
}

fn call(request: &ChatCompletionRequest) -> Call<'_, ChatCompletionRequest> {
    Call { request, upstream_model: MODEL, api_key: None }
}

/// Every item of a stream, errors included.
async fn collect(
    provider: &AnthropicProvider,
    request: &ChatCompletionRequest,
) -> Vec<Result<ChatCompletionChunk, ProviderError>> {
    let items: Vec<_> = provider.chat_stream(call(request)).await.unwrap().collect().await;
    items.into_iter().map(|item| item.map(|chunk| chunk.into_parsed().unwrap())).collect()
}

fn ok_chunks(items: Vec<Result<ChatCompletionChunk, ProviderError>>) -> Vec<ChatCompletionChunk> {
    items.into_iter().map(|c| c.unwrap()).collect()
}

fn content_of(chunks: &[ChatCompletionChunk]) -> String {
    chunks.iter().flat_map(|c| &c.choices).filter_map(|c| c.delta.content.as_deref()).collect()
}

#[tokio::test]
async fn chat_text_and_wire_request() {
    let (mock, provider) = setup(Some(KEY)).await;
    mock.set_scenario(Scenario { reply: Some("Hello from the mock".into()), ..Scenario::default() });
    let response = provider.chat(call(&text_request())).await.unwrap().into_parsed().unwrap();
    let choice = &response.choices[0];
    assert_eq!(choice.message.content.as_deref(), Some("Hello from the mock"));
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    assert!(response.id.starts_with("msg_"), "{}", response.id);
    assert_eq!(response.model, MODEL);
    assert!(response.created > 1_600_000_000);
    let usage = response.usage.unwrap();
    assert_eq!(usage.completion_tokens, 4);
    assert_eq!(usage.total_tokens, usage.prompt_tokens + 4);

    let sent = mock.last_request().unwrap();
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.header("x-api-key"), Some(KEY));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent.header("authorization"), None);
    let body = sent.body.as_object().unwrap();
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["max_tokens", "messages", "model", "system"]);
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["max_tokens"], 4096);
    assert_eq!(body["system"], "Be brief.");
}

#[tokio::test]
async fn chat_stream_text() {
    let (mock, provider) = setup(Some(KEY)).await;
    mock.set_scenario(Scenario { reply: Some("one two three four five".into()), ..Scenario::default() });
    let chunks = ok_chunks(collect(&provider, &text_request()).await);
    assert_eq!(mock.last_request().unwrap().body["stream"], json!(true));
    assert_eq!(chunks[0].choices[0].delta.role, Some(marga_protocol::openai::Role::Assistant));
    assert_eq!(content_of(&chunks), "one two three four five");
    let finish: Vec<&FinishReason> =
        chunks.iter().flat_map(|c| &c.choices).filter_map(|c| c.finish_reason.as_ref()).collect();
    assert_eq!(finish, [&FinishReason::Stop]);
    let last = chunks.last().unwrap();
    assert!(last.choices.is_empty());
    assert_eq!(last.usage.as_ref().unwrap().completion_tokens, 5);
    assert!(chunks.iter().all(|c| c.id == chunks[0].id && c.model == MODEL));
}

#[tokio::test]
async fn chat_tool_call() {
    let (_mock, provider) = setup(Some(KEY)).await;
    let response = provider.chat(call(&tool_request())).await.unwrap().into_parsed().unwrap();
    let choice = &response.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    let calls = choice.message.tool_calls.as_ref().unwrap();
    assert_eq!(calls[0].function.name, "get_weather");
    assert_eq!(calls[0].kind, "function");
    let arguments: Value = serde_json::from_str(&calls[0].function.arguments).unwrap();
    assert_eq!(arguments, json!({"location": "Paris"}));
}

#[tokio::test]
async fn chat_stream_tool_call() {
    let (_mock, provider) = setup(Some(KEY)).await;
    let chunks = ok_chunks(collect(&provider, &tool_request()).await);
    let deltas: Vec<_> =
        chunks.iter().flat_map(|c| &c.choices).flat_map(|c| c.delta.tool_calls.iter().flatten()).collect();
    assert!(deltas.iter().all(|d| d.index == 0));
    assert_eq!(deltas[0].id.as_deref(), Some("toolu_mock_1"));
    assert_eq!(deltas[0].function.as_ref().unwrap().name.as_deref(), Some("get_weather"));
    let arguments: String = deltas.iter().filter_map(|d| d.function.as_ref()?.arguments.as_deref()).collect();
    assert_eq!(serde_json::from_str::<Value>(&arguments).unwrap(), json!({"location": "Paris"}));
    let finish = chunks.iter().flat_map(|c| &c.choices).find_map(|c| c.finish_reason.clone());
    assert_eq!(finish, Some(FinishReason::ToolCalls));
}

async fn failure(scenario: Scenario, stream: bool) -> ProviderError {
    let (mock, provider) = setup(Some(KEY)).await;
    mock.set_scenario(scenario);
    let request = text_request();
    match stream {
        true => provider.chat_stream(call(&request)).await.err().unwrap(),
        false => provider.chat(call(&request)).await.unwrap_err(),
    }
}

#[tokio::test]
async fn upstream_statuses_are_classified() {
    for (status, stream) in [(529, false), (503, true), (500, false)] {
        let err = failure(Scenario { fail_first: 1, fail_status: status, ..Scenario::default() }, stream).await;
        assert_eq!((err.kind, err.status), (ErrorKind::Server, Some(status)), "{err}");
    }
    let err = failure(Scenario { fail_first: 1, fail_status: 401, ..Scenario::default() }, true).await;
    assert_eq!(err.kind, ErrorKind::Auth);
    let err =
        failure(Scenario { fail_first: 1, fail_status: 429, retry_after_s: Some(7), ..Scenario::default() }, false)
            .await;
    assert_eq!(err.kind, ErrorKind::RateLimited);
    assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
    assert!(err.message.contains("injected failure"), "{}", err.message);
}

#[tokio::test]
async fn missing_key_is_an_auth_error() {
    let (_mock, provider) = setup(None).await;
    let err = provider.chat(call(&text_request())).await.unwrap_err();
    assert_eq!((err.kind, err.status), (ErrorKind::Auth, Some(401)));
    assert!(err.message.contains("x-api-key"), "{}", err.message);
}

#[tokio::test]
async fn per_call_key_wins() {
    let (mock, provider) = setup(Some(KEY)).await;
    let request = text_request();
    provider.chat(Call { request: &request, upstream_model: MODEL, api_key: Some("sk-byok") }).await.unwrap();
    assert_eq!(mock.last_request().unwrap().header("x-api-key"), Some("sk-byok"));
}

#[tokio::test]
async fn stream_cut_mid_way_is_interrupted() {
    let (mock, provider) = setup(Some(KEY)).await;
    mock.set_scenario(Scenario { reply: Some("a b c d e f".into()), cut_after_chunks: Some(2), ..Scenario::default() });
    let items = collect(&provider, &text_request()).await;
    let (last, head) = items.split_last().unwrap();
    assert!(head.iter().all(Result::is_ok));
    let err = last.as_ref().unwrap_err();
    assert_eq!(err.kind, ErrorKind::StreamInterrupted, "{err}");
}

#[tokio::test]
async fn in_band_error_event_ends_the_stream() {
    let (mock, provider) = setup(Some(KEY)).await;
    mock.set_scenario(Scenario {
        reply: Some("a b c d".into()),
        stream_error_after_chunks: Some(1),
        ..Scenario::default()
    });
    let items = collect(&provider, &text_request()).await;
    let (last, head) = items.split_last().unwrap();
    let head: Vec<ChatCompletionChunk> = head.iter().map(|r| r.as_ref().unwrap().clone()).collect();
    let partial = content_of(&head);
    assert!(!partial.is_empty() && "a b c d".starts_with(&partial), "{partial:?}");
    let err = last.as_ref().unwrap_err();
    assert_eq!(err.kind, ErrorKind::StreamInterrupted);
    assert_eq!(err.message, "Overloaded");
}

#[tokio::test]
async fn malformed_bodies() {
    let err = failure(Scenario { malformed: true, ..Scenario::default() }, false).await;
    assert_eq!(err.kind, ErrorKind::Malformed);
    let (mock, provider) = setup(Some(KEY)).await;
    mock.set_scenario(Scenario { malformed: true, ..Scenario::default() });
    let items = collect(&provider, &text_request()).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].as_ref().unwrap_err().kind, ErrorKind::Malformed);
}

#[tokio::test]
async fn conversion_errors_are_not_sent() {
    let (mock, provider) = setup(Some(KEY)).await;
    let mut request = text_request();
    request.n = Some(2);
    let err = provider.chat(call(&request)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unsupported);
    let request: ChatCompletionRequest = serde_json::from_value(json!({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]}))
    .unwrap();
    let err = provider.chat_stream(call(&request)).await.err().unwrap();
    assert_eq!(err.kind, ErrorKind::InvalidRequest);
    assert!(err.message.contains("messages[0].content[0]"), "{}", err.message);
    assert_eq!(mock.requests(), 0);
}

#[tokio::test]
async fn embeddings_are_unsupported() {
    let (_mock, provider) = setup(Some(KEY)).await;
    let request = serde_json::from_value(json!({"model": "m", "input": "hi"})).unwrap();
    let err = provider.embeddings(Call { request: &request, upstream_model: MODEL, api_key: None }).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unsupported);
}

#[tokio::test]
async fn legacy_completions_go_through_chat() {
    let (mock, provider) = setup(Some(KEY)).await;
    mock.set_scenario(Scenario { reply: Some("done".into()), ..Scenario::default() });
    let request = serde_json::from_value(json!({"model": "m", "prompt": "Finish this", "max_tokens": 5})).unwrap();
    let response =
        provider.completions(Call { request: &request, upstream_model: MODEL, api_key: None }).await.unwrap();
    assert_eq!(response.choices[0].text, "done");
    assert_eq!(mock.last_request().unwrap().body["max_tokens"], 5);
}
