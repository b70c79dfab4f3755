//! Streamed chat: framing (role chunk first, usage chunk, `[DONE]`), identity, usage counted
//! when the upstream sends none, tool calls, legacy completions and client disconnects.

use std::time::Duration;

use mock_upstream::Scenario;
use serde_json::{json, Value};

use crate::helpers::{mock_reply, spawn_app, user_chat_stream, Reply, Stream};

async fn stream_through(model: &str, provider: &str) {
    let app = spawn_app().await;
    let text = "Tell me a story about a brave little toaster in the snow";
    let reply = app.post_chat(&user_chat_stream(model, text)).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(reply.header("content-type").unwrap().starts_with("text/event-stream"));
    assert_eq!(reply.provider(), provider);
    let id = reply.header("x-generation-id").unwrap().to_owned();
    assert!(id.starts_with("gen-"));

    let stream = Stream::parse(&reply);
    let first = &stream.chunks[0];
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant", "role chunk first: {first}");
    assert_eq!(stream.role_chunks(), 1);
    for chunk in &stream.chunks {
        assert_eq!(chunk["id"], id.as_str(), "{chunk}");
        assert_eq!(chunk["model"], model, "{chunk}");
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
    }
    assert_eq!(stream.content(), mock_reply(text));
    let finish: Vec<&Value> = stream.chunks.iter().filter_map(|c| c.pointer("/choices/0/finish_reason")).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, vec![&json!("stop")]);
    let usage = stream.assert_usage_then_done();
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0);

    let record = app.record(&id).await;
    assert_eq!(record.status, "success");
    assert!(record.streamed);
    assert_eq!(record.provider.as_deref(), Some(provider));
    assert_eq!(record.completion_tokens, usage["completion_tokens"].as_i64().unwrap());
    assert_eq!(record.finish_reason.as_deref(), Some("stop"));
}

#[tokio::test]
async fn stream_through_the_openai_adapter() {
    stream_through("test/openai-chat", "openai-main").await;
}

#[tokio::test]
async fn stream_through_the_anthropic_adapter() {
    stream_through("test/anthropic-chat", "anthropic-main").await;
}

#[tokio::test]
async fn stream_through_the_gemini_adapter() {
    stream_through("test/gemini-chat", "gemini-main").await;
}

#[tokio::test]
async fn stream_through_the_sandbox() {
    let app = spawn_app().await;
    let reply = app.post_chat(&user_chat_stream("sandbox/echo", "hello stream")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.provider(), "sandbox");
    let stream = Stream::parse(&reply);
    assert_eq!(stream.chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(stream.content().contains("hello stream"), "{}", stream.content());
    stream.assert_usage_then_done();
    assert_eq!(app.mock.requests(), 0);
}

#[tokio::test]
async fn the_openai_adapter_asks_for_stream_usage_when_the_upstream_supports_it() {
    let app = spawn_app().await;
    let reply = app.post_chat(&user_chat_stream("test/openai-chat", "hi")).await;
    Stream::parse(&reply).assert_usage_then_done();
    let seen = app.mock.last_request().unwrap();
    assert_eq!(seen.body["stream"], true);
    assert_eq!(seen.body["stream_options"]["include_usage"], true);
    let record = app.record(reply.header("x-generation-id").unwrap()).await;
    assert!(!record.usage_estimated, "the upstream reported usage");
}

#[tokio::test]
async fn a_stream_without_upstream_usage_ends_with_counted_usage() {
    let app = spawn_app().await;
    app.mock.set_scenario(Scenario { omit_stream_usage: true, ..Scenario::default() });
    let text = "count these words for me please";
    let reply = app.post_chat(&user_chat_stream("test/nousage", text)).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.provider(), "nousage");
    let seen = app.mock.last_request().unwrap();
    assert!(seen.body.get("stream_options").is_none(), "not asked of an upstream without support: {}", seen.body);

    let stream = Stream::parse(&reply);
    assert_eq!(stream.content(), mock_reply(text));
    let usage = stream.assert_usage_then_done();
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    let record = app.record(reply.header("x-generation-id").unwrap()).await;
    assert!(record.usage_estimated);
    assert_eq!(record.status, "success");
    assert_eq!(record.completion_tokens, usage["completion_tokens"].as_i64().unwrap());
}

/// Reassembles streamed tool-call deltas: `(name, arguments)` per tool-call index.
fn tool_calls(stream: &Stream) -> Vec<(String, String)> {
    let mut calls: Vec<(String, String)> = Vec::new();
    for chunk in &stream.chunks {
        let Some(deltas) = chunk.pointer("/choices/0/delta/tool_calls").and_then(Value::as_array) else { continue };
        for delta in deltas {
            let index = delta["index"].as_u64().expect("tool call delta has an index") as usize;
            if calls.len() <= index {
                calls.resize(index + 1, (String::new(), String::new()));
            }
            if let Some(name) = delta.pointer("/function/name").and_then(Value::as_str) {
                calls[index].0.push_str(name);
            }
            if let Some(args) = delta.pointer("/function/arguments").and_then(Value::as_str) {
                calls[index].1.push_str(args);
            }
        }
    }
    calls
}

#[tokio::test]
async fn streamed_tool_calls_reassemble_into_valid_json_through_each_adapter() {
    let app = spawn_app().await;
    for model in ["test/openai-chat", "test/anthropic-chat", "test/gemini-chat"] {
        let request = json!({
            "model": model,
            "stream": true,
            "messages": [{ "role": "user", "content": "weather in Paris?" }],
            "tools": [{ "type": "function", "function": {
                "name": "get_weather",
                "parameters": { "type": "object", "properties": { "location": { "type": "string" } } }
            } }],
        });
        let reply = app.post_chat(&request).await;
        assert_eq!(reply.status, 200, "{model}: {}", reply.text);
        let stream = Stream::parse(&reply);
        let calls = tool_calls(&stream);
        assert_eq!(calls.len(), 1, "{model}: {}", reply.text);
        assert_eq!(calls[0].0, "get_weather", "{model}");
        let args: Value = serde_json::from_str(&calls[0].1).unwrap_or_else(|e| panic!("{model}: {e}: {}", calls[0].1));
        assert_eq!(args, json!({ "location": "Paris" }), "{model}");
        let finish: Vec<&Value> =
            stream.chunks.iter().filter_map(|c| c.pointer("/choices/0/finish_reason")).filter(|f| !f.is_null()).collect();
        assert_eq!(finish, vec![&json!("tool_calls")], "{model}");
        stream.assert_usage_then_done();
    }
}

#[tokio::test]
async fn legacy_completions_stream_openai_native_and_anthropic_through_chat() {
    let app = spawn_app().await;
    for (model, provider) in [("test/openai-chat", "openai-main"), ("test/anthropic-chat", "anthropic-main")] {
        let request = json!({ "model": model, "prompt": "Say hi", "stream": true });
        let reply: Reply = app.post_json("/v1/completions", &request).await;
        assert_eq!(reply.status, 200, "{model}: {}", reply.text);
        assert_eq!(reply.provider(), provider);
        let stream = Stream::parse(&reply);
        assert_eq!(stream.completion_text(), mock_reply("Say hi"), "{model}");
        for chunk in &stream.chunks {
            assert_eq!(chunk["object"], "text_completion", "{chunk}");
            assert_eq!(chunk["model"], model);
        }
        stream.assert_usage_then_done();
    }
    assert_eq!(app.mock.requests_for("/v1/completions"), 1);
    assert_eq!(app.mock.requests_for("/messages"), 1);
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_stream() {
    let app = spawn_app().await;
    app.mock.set_scenario(Scenario { chunk_delay_ms: 150, ..Scenario::default() });
    let request = user_chat_stream("test/openai-chat", "one two three four five six seven eight nine ten");
    let mut response = app.open("/v1/chat/completions", &request).await;
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-generation-id"].to_str().unwrap().to_owned();
    let first = response.chunk().await.unwrap().expect("a first chunk");
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(response);

    let mut cancelled = 0;
    for _ in 0..100 {
        cancelled = app.mock.streams_cancelled();
        if cancelled > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cancelled, 1, "the upstream stream must be cancelled within 1 s");
    let record = app.record(&id).await;
    assert_eq!(record.status, "cancelled");
    assert!(record.usage_estimated);
    assert_eq!(record.provider.as_deref(), Some("openai-main"));
}
