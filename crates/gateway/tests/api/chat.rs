//! Non-streamed chat completions through each adapter and the built-in sandbox.

use serde_json::json;

use crate::helpers::{assert_served, mock_reply, spawn_app, user_chat};

async fn chat_through(model: &str, provider: &str, upstream_path: &str) {
    let app = spawn_app().await;
    let text = "What is the capital of France, and why is it Paris of all places?";
    let reply = app.post_chat(&user_chat(model, text)).await;
    let body = assert_served(&reply, model, provider);
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], mock_reply(text));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["usage"]["completion_tokens"].as_u64().is_some_and(|n| n > 0), "{body}");
    assert_eq!(app.mock.requests_for(upstream_path), 1);
    assert_eq!(app.mock.requests(), 1);
}

#[tokio::test]
async fn chat_through_the_openai_adapter() {
    chat_through("test/openai-chat", "openai-main", "/chat/completions").await;
}

#[tokio::test]
async fn chat_through_the_anthropic_adapter() {
    chat_through("test/anthropic-chat", "anthropic-main", "/messages").await;
}

#[tokio::test]
async fn chat_through_the_gemini_adapter() {
    chat_through("test/gemini-chat", "gemini-main", ":generateContent").await;
}

#[tokio::test]
async fn chat_through_the_sandbox_needs_no_upstream() {
    let app = spawn_app().await;
    let reply = app.post_chat(&user_chat("sandbox/echo", "hello sandbox")).await;
    let body = assert_served(&reply, "sandbox/echo", "sandbox");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("hello sandbox"), "{content}");
    assert_eq!(app.mock.requests() + app.backup.requests(), 0);
}

#[tokio::test]
async fn the_upstream_gets_its_own_model_name_and_the_configured_key() {
    let app = spawn_app().await;
    app.post_chat(&user_chat("test/openai-chat", "hi")).await;
    let seen = app.mock.last_request().unwrap();
    assert_eq!(seen.body["model"], "gpt-mock");
    assert_eq!(seen.header("authorization"), Some("Bearer sk-openai-configured"));

    app.post_chat(&user_chat("test/anthropic-chat", "hi")).await;
    let seen = app.mock.last_request().unwrap();
    assert_eq!(seen.body["model"], "claude-mock");
    assert_eq!(seen.header("x-api-key"), Some("sk-ant-configured"));

    app.post_chat(&user_chat("test/gemini-chat", "hi")).await;
    let seen = app.mock.last_request().unwrap();
    assert!(seen.path.contains("gemini-mock"), "{}", seen.path);
    assert_eq!(seen.header("x-goog-api-key"), Some("gemini-configured"));
    assert_eq!(seen.query, None, "the Gemini key must not travel in the URL");
}

#[tokio::test]
async fn non_streamed_tool_calls_come_back_in_openai_shape_from_each_adapter() {
    let app = spawn_app().await;
    for model in ["test/openai-chat", "test/anthropic-chat", "test/gemini-chat"] {
        let request = json!({
            "model": model,
            "messages": [{ "role": "user", "content": "weather in Paris?" }],
            "tools": [{ "type": "function", "function": {
                "name": "get_weather",
                "parameters": { "type": "object", "properties": { "location": { "type": "string" } } }
            } }],
        });
        let reply = app.post_chat(&request).await;
        assert_eq!(reply.status, 200, "{model}: {}", reply.text);
        let body = reply.json();
        let call = &body["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather", "{model}: {body}");
        let args: serde_json::Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({ "location": "Paris" }), "{model}");
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls", "{model}: {body}");
    }
}

#[tokio::test]
async fn legacy_completions_openai_native_and_anthropic_through_chat() {
    let app = spawn_app().await;
    let reply = app.post_json("/v1/completions", &json!({ "model": "test/openai-chat", "prompt": "Say hi" })).await;
    let body = assert_served(&reply, "test/openai-chat", "openai-main");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], mock_reply("Say hi"));
    assert_eq!(app.mock.requests_for("/v1/completions"), 1, "legacy path, natively");
    assert_eq!(app.mock.requests_for("/chat/completions"), 0);

    let reply = app.post_json("/v1/completions", &json!({ "model": "test/anthropic-chat", "prompt": "Say hi" })).await;
    let body = assert_served(&reply, "test/anthropic-chat", "anthropic-main");
    assert_eq!(body["choices"][0]["text"], mock_reply("Say hi"));
    assert_eq!(app.mock.requests_for("/messages"), 1);
}

#[tokio::test]
async fn the_api_v1_prefix_serves_the_same_endpoints() {
    let app = spawn_app().await;
    let reply = app.post_json("/api/v1/chat/completions", &user_chat("test/openai-chat", "prefix")).await;
    let body = assert_served(&reply, "test/openai-chat", "openai-main");
    assert_eq!(body["choices"][0]["message"]["content"], mock_reply("prefix"));

    let a = app.get("/v1/models").await;
    let b = app.get("/api/v1/models").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json(), b.json());
    assert_eq!(app.get("/api/v1/models/test/openai-chat").await.json()["id"], "test/openai-chat");

    let reply = app
        .post_json("/api/v1/embeddings", &json!({ "model": "test/openai-embed", "input": "x" }))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
}
