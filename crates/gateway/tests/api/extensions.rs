//! Marga's request extensions (`optimize`, `provider`, `data_policy`, `upstream_key`,
//! `models`, `fallbacks`): consumed by the gateway, never forwarded; unknown OpenAI
//! parameters pass through untouched, and so do the fields of an OpenAI-compatible
//! upstream's answer.

use serde_json::json;

use crate::helpers::{assert_served, mock_reply, spawn_app, user_chat};

const EXTENSIONS: [&str; 6] = ["optimize", "provider", "data_policy", "upstream_key", "models", "fallbacks"];

#[tokio::test]
async fn extensions_are_consumed_and_unknown_parameters_pass_through() {
    let app = spawn_app().await;
    let request = json!({
        "model": "test/openai-chat",
        "messages": [{ "role": "user", "content": "hello" }],
        "optimize": "price",
        "provider": { "order": ["openai-main"] },
        "data_policy": "no_training",
        "upstream_key": "sk-byok-per-request",
        "models": ["test/anthropic-chat"],
        "fallbacks": [{ "model": "test/gemini-chat" }],
        "logit_bias": { "50256": -100 },
        "custom_flag": true,
    });
    let reply = app.post_chat(&request).await;
    let body = assert_served(&reply, "test/openai-chat", "openai-main");
    assert_eq!(body["choices"][0]["message"]["content"], mock_reply("hello"));
    // The upstream's answer comes back as it wrote it, with Marga's id, model and usage.
    assert_eq!((&body["system_fingerprint"], &body["service_tier"]), (&json!("fp_mock"), &json!("default")));
    let seen = app.mock.last_request().unwrap();
    for key in EXTENSIONS {
        assert!(seen.body.get(key).is_none(), "`{key}` reached the upstream: {}", seen.body);
    }
    assert_eq!(seen.body["logit_bias"], json!({ "50256": -100 }));
    assert_eq!(seen.body["custom_flag"], true);
    assert_eq!(seen.header("authorization"), Some("Bearer sk-byok-per-request"), "upstream_key replaces the configured key");
}

#[tokio::test]
async fn extensions_never_reach_anthropic_or_gemini_either() {
    let app = spawn_app().await;
    for model in ["test/anthropic-chat", "test/gemini-chat"] {
        let request = json!({
            "model": model,
            "messages": [{ "role": "user", "content": "hello" }],
            "optimize": "latency",
            "provider": { "order": ["x"] },
            "upstream_key": "byok-key",
            "models": ["test/openai-chat"],
        });
        let reply = app.post_chat(&request).await;
        assert_eq!(reply.status, 200, "{model}: {}", reply.text);
        let seen = app.mock.last_request().unwrap();
        let text = seen.body.to_string();
        for key in EXTENSIONS {
            assert!(!text.contains(&format!("\"{key}\"")), "`{key}` reached {model}: {text}");
        }
        let key_header = if model.contains("anthropic") { "x-api-key" } else { "x-goog-api-key" };
        assert_eq!(seen.header(key_header), Some("byok-key"), "{model}");
    }
}

#[tokio::test]
async fn provider_pins_a_route() {
    let app = spawn_app().await;
    let mut request = user_chat("test/failover", "pinned");
    request["provider"] = json!("backup");
    let reply = app.post_chat(&request).await;
    assert_served(&reply, "test/failover", "backup");
    assert_eq!((app.mock.requests(), app.backup.requests()), (0, 1));
}

#[tokio::test]
async fn provider_order_reorders_routes() {
    let app = spawn_app().await;
    let mut request = user_chat("test/failover", "ordered");
    request["provider"] = json!({ "order": ["backup"] });
    let reply = app.post_chat(&request).await;
    assert_served(&reply, "test/failover", "backup");
    assert_eq!(app.mock.requests(), 0);
}

#[tokio::test]
async fn pinning_an_unknown_provider_is_a_400_no_route() {
    let app = spawn_app().await;
    let mut request = user_chat("test/openai-chat", "pinned");
    request["provider"] = json!("nope");
    let reply = app.post_chat(&request).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.error()["code"], "no_route");
    assert_eq!(app.mock.requests(), 0);
}

#[tokio::test]
async fn india_only_without_an_indian_route_is_a_400_and_calls_nothing() {
    let app = spawn_app().await;
    let mut request = user_chat("test/openai-chat", "data stays home");
    request["data_policy"] = json!("india_only");
    let reply = app.post_chat(&request).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    let error = reply.error();
    assert_eq!(error["code"], "no_route");
    assert!(error["message"].as_str().unwrap().contains("india_only"), "{error}");
    assert_eq!(app.mock.requests(), 0);

    // With an IN route, india_only keeps only that one.
    request["model"] = json!("test/failover");
    let reply = app.post_chat(&request).await;
    assert_served(&reply, "test/failover", "backup");
    assert_eq!(app.mock.requests(), 0);
}

#[tokio::test]
async fn models_falls_back_to_the_next_model_and_names_it() {
    let app = spawn_app().await;
    app.mock.set_scenario(mock_upstream::Scenario { fail_first: 1, fail_status: 503, ..Default::default() });
    let mut request = user_chat("test/openai-chat", "fall back");
    request["models"] = json!(["test/anthropic-chat"]);
    let reply = app.post_chat(&request).await;
    let body = assert_served(&reply, "test/anthropic-chat", "anthropic-main");
    assert_eq!(body["choices"][0]["message"]["content"], mock_reply("fall back"));
    assert_eq!(reply.header("x-br-model"), Some("test/anthropic-chat"));
    assert_eq!(app.mock.requests_for("/chat/completions"), 1);
    assert_eq!(app.mock.requests_for("/messages"), 1);
}

#[tokio::test]
async fn fallbacks_chain_is_followed_too() {
    let app = spawn_app().await;
    app.mock.set_scenario(mock_upstream::Scenario { fail_first: 1, fail_status: 500, ..Default::default() });
    let mut request = user_chat("test/openai-chat", "fall back");
    request["fallbacks"] = json!([{ "model": "test/gemini-chat" }]);
    let reply = app.post_chat(&request).await;
    assert_served(&reply, "test/gemini-chat", "gemini-main");
}

#[tokio::test]
async fn a_fallback_model_that_does_not_exist_is_a_404_naming_the_parameter() {
    let app = spawn_app().await;
    let mut request = user_chat("test/openai-chat", "x");
    request["models"] = json!(["test/nope"]);
    let reply = app.post_chat(&request).await;
    assert_eq!(reply.status, 404, "{}", reply.text);
    let error = reply.error();
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["param"], "models[0]");
    assert_eq!(app.mock.requests(), 0);
}

#[tokio::test]
async fn a_malformed_extension_is_a_400_naming_it() {
    let app = spawn_app().await;
    let mut request = user_chat("test/openai-chat", "x");
    request["models"] = json!("not-a-list");
    let reply = app.post_chat(&request).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.error()["param"], "models");
    assert_eq!(app.mock.requests(), 0);
}
