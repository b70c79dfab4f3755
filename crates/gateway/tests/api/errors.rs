//! Client errors: every one in the OpenAI envelope `{"error": {message, type, code, param}}`,
//! with the right status, and none of them reaching an upstream.

use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with, user_chat, Options};

#[tokio::test]
async fn malformed_json_is_a_400() {
    let app = spawn_app().await;
    let reply = app.post_raw("/v1/chat/completions", r#"{"model": "test/openai-chat", "messages": ["#).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    let error = reply.error();
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "invalid_request");
    assert!(error["message"].as_str().unwrap().contains("not valid JSON"), "{error}");
    // A syntax error before any field: no `param` to point at (not serde's "?").
    let reply = app.post_raw("/v1/chat/completions", "{bad").await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.error()["param"], serde_json::Value::Null, "{}", reply.text);
    let reply = app.post_raw("/v1/chat/completions", "{} trailing").await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    reply.error();
    assert_eq!(app.mock.requests(), 0);
}

#[tokio::test]
async fn wrong_types_are_a_400_naming_the_field() {
    let app = spawn_app().await;
    let cases = [
        ("temperature", json!("hot")),
        ("messages", json!("x")),
        ("max_tokens", json!(-1)),
        ("top_p", json!(3.0)),
        ("temperature", json!(9)),
        ("n", json!(0)),
    ];
    for (field, value) in cases {
        let mut request = user_chat("test/openai-chat", "x");
        request[field] = value.clone();
        let reply = app.post_chat(&request).await;
        assert_eq!(reply.status, 400, "{field}={value}: {}", reply.text);
        let error = reply.error();
        assert_eq!(error["param"], field, "{field}={value}: {error}");
        assert_eq!(error["type"], "invalid_request_error");
    }
    let reply = app.post_chat(&json!({ "model": "test/openai-chat", "messages": [{ "role": "wizard", "content": "x" }] })).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert!(reply.error()["param"].as_str().unwrap().starts_with("messages[0]"), "{}", reply.text);
    let reply = app.post_chat(&json!({ "messages": [{ "role": "user", "content": "x" }] })).await;
    assert_eq!(reply.status, 400, "missing model: {}", reply.text);
    reply.error();
    assert_eq!(app.mock.requests(), 0);
}

#[tokio::test]
async fn empty_messages_are_a_400() {
    let app = spawn_app().await;
    let reply = app.post_chat(&json!({ "model": "test/openai-chat", "messages": [] })).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.error()["param"], "messages");
    assert_eq!(app.mock.requests(), 0);
}

#[tokio::test]
async fn an_unknown_model_is_a_404() {
    let app = spawn_app().await;
    let reply = app.post_chat(&user_chat("test/no-such-model", "x")).await;
    assert_eq!(reply.status, 404);
    let error = reply.error();
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["param"], "model");
    assert!(error["message"].as_str().unwrap().contains("test/no-such-model"));
    let reply = app.post_chat(&user_chat("test/openai-embed", "x")).await;
    assert_eq!(reply.status, 400, "an embedding model cannot chat: {}", reply.text);
    assert_eq!(reply.error()["param"], "model");
    assert_eq!(app.mock.requests(), 0);
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_a_401_that_does_not_echo_the_key() {
    let app = spawn_app().await;
    let body = user_chat("test/openai-chat", "x");
    let url = app.url("/v1/chat/completions");
    let missing = app.client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let envelope: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(envelope["error"]["code"], "invalid_api_key");
    assert_eq!(envelope["error"]["type"], "authentication_error");

    let wrong_key = "marga_mk_wrong_SECRET_0123456789";
    for request in [
        app.client.post(&url).bearer_auth(wrong_key),
        app.client.post(&url).header("x-api-key", wrong_key),
        app.client.post(app.url("/v1/embeddings")).bearer_auth(wrong_key),
    ] {
        let response = request.json(&body).send().await.unwrap();
        assert_eq!(response.status(), 401);
        let text = response.text().await.unwrap();
        assert!(!text.contains(wrong_key) && !text.contains("SECRET"), "the key was echoed: {text}");
        let envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(envelope["error"]["code"], "invalid_api_key");
    }
    // The key works through x-api-key too (Anthropic SDKs send it there).
    let ok = app.client.post(&url).header("x-api-key", &app.master_key).json(&body).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(app.mock.requests(), 1);
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413() {
    let app = spawn_app_with(Options { max_body_bytes: 64 * 1024, ..Options::default() }).await;
    let big = "x".repeat(70 * 1024);
    let reply = app.post_chat(&user_chat("test/openai-chat", &big)).await;
    assert_eq!(reply.status, 413, "{}", &reply.text[..reply.text.len().min(300)]);
    assert_eq!(reply.error()["code"], "request_too_large");
    // Just under the limit is fine.
    let reply = app.post_chat(&user_chat("test/openai-chat", &"x".repeat(60 * 1024))).await;
    assert_eq!(reply.status, 200);
    assert_eq!(app.mock.requests(), 1);
}

#[tokio::test]
async fn an_unknown_path_is_a_404_envelope() {
    let app = spawn_app().await;
    for path in ["/v1/nope", "/v2/chat/completions", "/"] {
        let reply = app.get(path).await;
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(reply.error()["code"], "not_found", "{path}");
    }
    let reply = app.post_chat(&user_chat("test/openai-chat", "x")).await;
    assert_eq!(reply.status, 200);
    let reply = app.post_json("/v1/chat/completion", &user_chat("test/openai-chat", "x")).await;
    assert_eq!(reply.status, 404);
    reply.error();
}

#[tokio::test]
async fn a_wrong_method_is_an_error_envelope() {
    let app = spawn_app().await;
    let reply = app.get("/v1/chat/completions").await;
    assert_eq!(reply.status, 405, "{}", reply.text);
    reply.error();
}
