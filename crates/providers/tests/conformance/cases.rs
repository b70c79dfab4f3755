//! The cases every provider kind must pass against the mock upstream. Each takes a fresh
//! [`Fixture`]; `conformance_suite!` turns each into one `#[tokio::test]` per kind.

use futures::StreamExt;
use marga_protocol::openai::{ChatCompletionRequest, FinishReason, Role};
use marga_providers::{Call, ErrorKind};
use mock_upstream::Scenario;
use serde_json::{json, Value};

use super::support::*;

fn hello() -> ChatCompletionRequest {
    chat_request(json!({"messages": [{"role": "user", "content": USER_TEXT}]}))
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
    }}])
}

fn tool_request() -> ChatCompletionRequest {
    chat_request(json!({
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": weather_tools(),
    }))
}

fn tool_round_trip_request() -> ChatCompletionRequest {
    chat_request(json!({
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}
        ],
        "tools": weather_tools(),
    }))
}

fn always_fail(status: u16) -> Scenario {
    Scenario { fail_first: u64::MAX, fail_status: status, ..Scenario::default() }
}

pub async fn chat_text(f: &Fixture) {
    let response = f.provider.chat(call(&hello())).await.unwrap().into_parsed().unwrap();
    assert_eq!(response.object, "chat.completion");
    assert!(!response.id.is_empty());
    assert_eq!(response.model, UPSTREAM_MODEL);
    assert_eq!(response.choices.len(), 1);
    let choice = &response.choices[0];
    assert_eq!(choice.message.role, Role::Assistant);
    assert_eq!(choice.message.content.as_deref(), Some(expected_reply(USER_TEXT).as_str()));
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    assert!(choice.message.tool_calls.as_ref().is_none_or(Vec::is_empty));
    assert_usage(response.usage.as_ref().unwrap());
    assert_eq!(f.mock.requests(), 1);
    f.assert_sent_key(KEY);
}

pub async fn chat_stream_text(f: &Fixture) {
    let chunks = all_ok(collect_chat(f.provider.chat_stream(call(&hello())).await.unwrap()).await);
    assert_eq!(content(&chunks), expected_reply(USER_TEXT));
    assert_complete_stream(&chunks, FinishReason::Stop);
    assert!(chunks.iter().all(|c| c.model == UPSTREAM_MODEL), "{chunks:?}");
    assert_eq!(f.mock.requests(), 1);
    assert_eq!(f.mock.streams_cancelled(), 0);
}

pub async fn tool_call(f: &Fixture) {
    let response = f.provider.chat(call(&tool_request())).await.unwrap().into_parsed().unwrap();
    let choice = &response.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    let calls = choice.message.tool_calls.as_ref().expect("a tool call");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].kind, "function");
    assert!(!calls[0].id.is_empty());
    assert_eq!(calls[0].function.name, "get_weather");
    let arguments: Value = serde_json::from_str(&calls[0].function.arguments).unwrap();
    assert_eq!(arguments, json!({"location": "Paris"}));
    assert!(choice.message.content.as_deref().unwrap_or_default().is_empty());
    assert_usage(response.usage.as_ref().unwrap());
}

pub async fn tool_call_stream(f: &Fixture) {
    let chunks = all_ok(collect_chat(f.provider.chat_stream(call(&tool_request())).await.unwrap()).await);
    let (name, arguments) = streamed_tool_call(&chunks);
    assert_eq!(name, "get_weather");
    assert_eq!(serde_json::from_str::<Value>(&arguments).unwrap(), json!({"location": "Paris"}));
    assert_eq!(content(&chunks), "");
    assert_complete_stream(&chunks, FinishReason::ToolCalls);
}

pub async fn tool_round_trip(f: &Fixture) {
    let request = tool_round_trip_request();
    let response = f.provider.chat(call(&request)).await.unwrap().into_parsed().unwrap();
    let choice = &response.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    let text = choice.message.content.as_deref().unwrap_or_default();
    assert!(text.starts_with("Tool said:"), "{text}");
    assert!(text.contains("Sunny, 21 C"), "{text}");

    let chunks = all_ok(collect_chat(f.provider.chat_stream(call(&request)).await.unwrap()).await);
    assert_eq!(content(&chunks), text);
    assert_complete_stream(&chunks, FinishReason::Stop);
}

pub async fn system_and_multi_turn(f: &Fixture) {
    let request = chat_request(json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": USER_TEXT}
    ]}));
    let response = f.provider.chat(call(&request)).await.unwrap().into_parsed().unwrap();
    assert_eq!(response.choices[0].message.content.as_deref(), Some(expected_reply(USER_TEXT).as_str()));
    let usage = response.usage.unwrap();
    let single = f.provider.chat(call(&hello())).await.unwrap().into_parsed().unwrap().usage.unwrap();
    assert!(usage.prompt_tokens > single.prompt_tokens, "the whole conversation was counted");
}

pub async fn stop_and_max_tokens(f: &Fixture) {
    let capped = chat_request(json!({"messages": [{"role": "user", "content": USER_TEXT}], "max_tokens": 2}));
    let response = f.provider.chat(call(&capped)).await.unwrap().into_parsed().unwrap();
    assert_eq!(response.choices[0].message.content.as_deref(), Some("Mock reply"));
    assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Length));

    let stopped = chat_request(json!({"messages": [{"role": "user", "content": USER_TEXT}], "stop": ["to:"]}));
    let response = f.provider.chat(call(&stopped)).await.unwrap().into_parsed().unwrap();
    let text = response.choices[0].message.content.clone().unwrap_or_default();
    assert_eq!(text.trim_end(), "Mock reply");
    assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Stop));

    let chunks = all_ok(collect_chat(f.provider.chat_stream(call(&capped)).await.unwrap()).await);
    assert_eq!(content(&chunks), "Mock reply");
    assert_complete_stream(&chunks, FinishReason::Length);
}

pub async fn json_mode(f: &Fixture) {
    let request = chat_request(json!({
        "messages": [{"role": "user", "content": USER_TEXT}],
        "response_format": {"type": "json_object"},
    }));
    let response = f.provider.chat(call(&request)).await.unwrap().into_parsed().unwrap();
    let text = response.choices[0].message.content.clone().unwrap_or_default();
    assert!(!text.is_empty());
    if f.caps.json_mode {
        let parsed: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
        assert_eq!(parsed, json!({"reply": expected_reply(USER_TEXT)}));
    }
}

pub async fn error_server(f: &Fixture) {
    f.mock.set_scenario(always_fail(503));
    let error = f.provider.chat(call(&hello())).await.unwrap_err();
    assert_error(&error, ErrorKind::Server, &[503]);
    assert!(error.is_retryable() && error.is_upstream_fault());
    assert!(error.message.contains("injected failure"), "the upstream's message is kept: {}", error.message);
    let error = stream_open_error(f.provider.as_ref(), &hello()).await;
    assert_error(&error, ErrorKind::Server, &[503]);

    f.mock.set_scenario(always_fail(500));
    assert_error(&f.provider.chat(call(&hello())).await.unwrap_err(), ErrorKind::Server, &[500]);
}

pub async fn error_rate_limited(f: &Fixture) {
    f.mock.set_scenario(Scenario { retry_after_s: Some(7), ..always_fail(429) });
    let error = f.provider.chat(call(&hello())).await.unwrap_err();
    assert_error(&error, ErrorKind::RateLimited, &[429]);
    assert_eq!(error.retry_after, Some(std::time::Duration::from_secs(7)));
    assert!(error.is_retryable() && !error.is_upstream_fault());
    let error = stream_open_error(f.provider.as_ref(), &hello()).await;
    assert_error(&error, ErrorKind::RateLimited, &[429]);
    assert_eq!(error.retry_after, Some(std::time::Duration::from_secs(7)));
}

pub async fn error_auth(f: &Fixture) {
    let keyless = f.provider_with_key(None);
    let error = keyless.chat(call(&hello())).await.unwrap_err();
    // Gemini refuses keyless callers with 403 PERMISSION_DENIED.
    assert_error(&error, ErrorKind::Auth, &[401, 403]);
    assert!(!error.is_upstream_fault());
    let error = stream_open_error(keyless.as_ref(), &hello()).await;
    assert_error(&error, ErrorKind::Auth, &[401, 403]);
    f.mock.set_scenario(always_fail(401));
    assert_error(&f.provider.chat(call(&hello())).await.unwrap_err(), ErrorKind::Auth, &[401]);
}

pub async fn error_invalid_request(f: &Fixture) {
    f.mock.set_scenario(always_fail(400));
    let error = f.provider.chat(call(&hello())).await.unwrap_err();
    assert_error(&error, ErrorKind::InvalidRequest, &[400]);
    assert!(!error.is_retryable() && !error.is_upstream_fault());
    let error = stream_open_error(f.provider.as_ref(), &hello()).await;
    assert_error(&error, ErrorKind::InvalidRequest, &[400]);
}

pub async fn error_malformed(f: &Fixture) {
    f.mock.set_scenario(Scenario { malformed: true, ..Scenario::default() });
    let error = f.provider.chat(call(&hello())).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Malformed, "{error:?}");
    assert!(error.is_retryable() && error.is_upstream_fault());
    let items = collect_chat(f.provider.chat_stream(call(&hello())).await.unwrap()).await;
    let (chunks, error) = ending_in_error(items);
    assert!(finish_reasons(&chunks).is_empty() && chunks.iter().all(|c| c.usage.is_none()), "{chunks:?}");
    assert_eq!(error.kind, ErrorKind::Malformed, "{error:?}");
}

pub async fn error_connect_refused(f: &Fixture) {
    let provider = f.unreachable_provider();
    let error = provider.chat(call(&hello())).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Connect, "{error:?}");
    assert_eq!(error.status, None);
    assert!(error.is_retryable() && error.is_upstream_fault());
    assert!(!error.to_string().contains("127.0.0.1"), "no URL in the message: {error}");
    assert_eq!(stream_open_error(provider.as_ref(), &hello()).await.kind, ErrorKind::Connect);
    let legacy = completion_request(json!({"prompt": "Say this"}));
    assert_eq!(provider.completions(call(&legacy)).await.unwrap_err().kind, ErrorKind::Connect);
    if f.caps.embeddings {
        let embed = embedding_request(json!({"input": "hello"}));
        assert_eq!(provider.embeddings(call(&embed)).await.unwrap_err().kind, ErrorKind::Connect);
    }
}

pub async fn stream_cut(f: &Fixture) {
    f.mock.set_scenario(Scenario { cut_after_chunks: Some(2), ..Scenario::default() });
    let items = collect_chat(f.provider.chat_stream(call(&hello())).await.unwrap()).await;
    assert_eq!(items.iter().filter(|i| i.is_err()).count(), 1, "exactly one error: {items:?}");
    let (chunks, error) = ending_in_error(items);
    assert!(!chunks.is_empty(), "chunks came before the cut");
    assert_eq!(error.kind, ErrorKind::StreamInterrupted, "{error:?}");
    assert!(error.is_retryable() && error.is_upstream_fault());
    let text = content(&chunks);
    assert!(!text.is_empty() && expected_reply(USER_TEXT).starts_with(&text), "{text:?}");
    assert!(text.len() < expected_reply(USER_TEXT).len());
    assert!(finish_reasons(&chunks).is_empty(), "a broken stream has no finish reason");
    assert!(chunks.iter().all(|c| c.usage.is_none()), "a broken stream has no usage");
}

pub async fn stream_in_band_error(f: &Fixture) {
    f.mock.set_scenario(Scenario { stream_error_after_chunks: Some(2), ..Scenario::default() });
    let items = collect_chat(f.provider.chat_stream(call(&hello())).await.unwrap()).await;
    assert_eq!(items.iter().filter(|i| i.is_err()).count(), 1, "exactly one error: {items:?}");
    let (chunks, error) = ending_in_error(items);
    assert_eq!(error.kind, ErrorKind::StreamInterrupted, "{error:?}");
    assert!(error.message.to_lowercase().contains("overloaded"), "the upstream's message: {}", error.message);
    assert!(expected_reply(USER_TEXT).starts_with(&content(&chunks)));
    assert!(finish_reasons(&chunks).is_empty() && chunks.iter().all(|c| c.usage.is_none()), "{chunks:?}");
}

pub async fn stream_drop_cancels_upstream(f: &Fixture) {
    let long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen";
    f.mock.set_scenario(Scenario { chunk_delay_ms: 25, reply: Some(long.to_owned()), ..Scenario::default() });
    let mut stream = f.provider.chat_stream(call(&hello())).await.unwrap();
    let first = stream.next().await.expect("a first chunk");
    assert!(first.is_ok(), "{first:?}");
    drop(stream);
    assert!(eventually(|| f.mock.streams_cancelled() == 1).await, "the upstream saw no cancellation");
}

pub async fn api_key_override(f: &Fixture) {
    f.provider.chat(call(&hello())).await.unwrap();
    f.assert_sent_key(KEY);
    let request = hello();
    f.provider.chat(byok(&request)).await.unwrap();
    f.assert_sent_key(OVERRIDE_KEY);
    all_ok(collect_chat(f.provider.chat_stream(byok(&request)).await.unwrap()).await);
    f.assert_sent_key(OVERRIDE_KEY);
    let legacy = completion_request(json!({"prompt": "Say this"}));
    f.provider.completions(byok(&legacy)).await.unwrap();
    f.assert_sent_key(OVERRIDE_KEY);
    // A keyless provider works with a per-call key alone.
    f.provider_with_key(None).chat(byok(&request)).await.unwrap().into_parsed().unwrap();
    f.assert_sent_key(OVERRIDE_KEY);
    if f.caps.embeddings {
        let embed = embedding_request(json!({"input": "hello"}));
        f.provider.embeddings(byok(&embed)).await.unwrap();
        f.assert_sent_key(OVERRIDE_KEY);
    }
}

fn byok<T>(request: &T) -> Call<'_, T> {
    Call { api_key: Some(OVERRIDE_KEY), ..call(request) }
}

pub async fn embeddings(f: &Fixture) {
    let one = embedding_request(json!({"input": "hello world", "dimensions": 16}));
    if !f.caps.embeddings {
        let error = f.provider.embeddings(call(&one)).await.unwrap_err();
        assert_eq!(error.kind, ErrorKind::Unsupported, "{error:?}");
        assert!(error.is_retryable() && !error.is_upstream_fault(), "another route may serve it");
        assert_eq!(f.mock.requests(), 0, "nothing was sent");
        return;
    }
    let response = f.provider.embeddings(call(&one)).await.unwrap();
    assert_eq!(response.model, UPSTREAM_MODEL);
    assert_eq!(response.data.len(), 1);
    assert_eq!(response.data[0].index, 0);
    assert_eq!(vector(&response.data[0].embedding).len(), 16);

    let several = embedding_request(json!({"input": ["alpha", "beta", "gamma"], "dimensions": 12}));
    let response = f.provider.embeddings(call(&several)).await.unwrap();
    assert_eq!(response.data.len(), 3);
    let vectors: Vec<Vec<f64>> = response.data.iter().map(|e| vector(&e.embedding)).collect();
    for (i, (item, v)) in response.data.iter().zip(&vectors).enumerate() {
        assert_eq!(item.index as usize, i);
        assert_eq!(v.len(), 12);
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "norm {norm}");
    }
    assert_ne!(vectors[0], vectors[1]);
    assert_ne!(vectors[1], vectors[2]);

    let default_dims = embedding_request(json!({"input": "hello world"}));
    let response = f.provider.embeddings(call(&default_dims)).await.unwrap();
    assert!(!vector(&response.data[0].embedding).is_empty());
}

fn vector(value: &marga_protocol::openai::EmbeddingVector) -> Vec<f64> {
    value.to_floats().expect("a float array")
}

pub async fn completions(f: &Fixture) {
    let prompt = "Complete this sentence for the conformance suite, please";
    let request = completion_request(json!({"prompt": prompt}));
    let response = f.provider.completions(call(&request)).await.unwrap();
    assert_eq!(response.object, "text_completion");
    assert_eq!(response.choices.len(), 1);
    assert_eq!(response.choices[0].text, expected_reply(prompt));
    assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Stop));
    assert_usage(response.usage.as_ref().unwrap());
    let native = f.mock.requests_for("/v1/completions");
    assert_eq!(native, u64::from(f.caps.native_completions), "native completions: {native}");
    assert_eq!(f.mock.requests(), 1);
}

pub async fn completions_stream(f: &Fixture) {
    let prompt = "Complete this sentence for the conformance suite, please";
    let request = completion_request(json!({"prompt": prompt, "stream": true}));
    let chunks = all_ok(collect(f.provider.completions_stream(call(&request)).await.unwrap()).await);
    let text: String = chunks.iter().flat_map(|c| &c.choices).map(|c| c.text.as_str()).collect();
    assert_eq!(text, expected_reply(prompt));
    let finishes: Vec<_> = chunks.iter().flat_map(|c| &c.choices).filter_map(|c| c.finish_reason.clone()).collect();
    assert_eq!(finishes, [FinishReason::Stop]);
    let (last, rest) = chunks.split_last().unwrap();
    assert_usage(last.usage.as_ref().expect("the last chunk carries usage"));
    assert!(rest.iter().all(|c| c.usage.is_none()));
    assert!(chunks.iter().all(|c| c.object == "text_completion"));
    let native = f.mock.requests_for("/v1/completions");
    assert_eq!(native, u64::from(f.caps.native_completions));
}
