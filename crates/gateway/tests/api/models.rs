//! `GET /v1/models` and `GET /v1/models/{id}`: the configured catalog.

use crate::helpers::{spawn_app, OPENAI_INPUT, OPENAI_OUTPUT};

#[tokio::test]
async fn the_model_list_has_the_configured_models_with_string_prices() {
    let app = spawn_app().await;
    let reply = app.get("/v1/models").await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("content-type").unwrap().starts_with("application/json"));
    let body = reply.json();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    for id in ["test/openai-chat", "test/anthropic-chat", "test/gemini-chat", "test/failover", "test/openai-embed", "sandbox/echo"] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    assert!(!ids.iter().any(|id| id.starts_with("openai/")), "catalog models without a key stay hidden: {ids:?}");
    for model in data {
        let prompt = &model["pricing"]["prompt"];
        assert!(prompt.is_string(), "pricing.prompt must be a string: {model}");
        assert!(model["pricing"]["completion"].is_string(), "{model}");
    }
    let openai = data.iter().find(|m| m["id"] == "test/openai-chat").unwrap();
    // 0.15 USD per million tokens is 0.00000015 per token.
    let per_token = |per_mtok: &str| {
        (crate::helpers::decimal(per_mtok) / rust_decimal::Decimal::from(1_000_000)).normalize().to_string()
    };
    assert_eq!(openai["pricing"]["prompt"], per_token(OPENAI_INPUT));
    assert_eq!(openai["pricing"]["completion"], per_token(OPENAI_OUTPUT));
    assert_eq!(openai["routes"][0]["provider"], "openai-main");
    let failover = data.iter().find(|m| m["id"] == "test/failover").unwrap();
    let providers: Vec<&str> = failover["routes"].as_array().unwrap().iter().map(|r| r["provider"].as_str().unwrap()).collect();
    assert_eq!(providers, ["openai-main", "backup"]);
    let embed = data.iter().find(|m| m["id"] == "test/openai-embed").unwrap();
    assert_eq!(embed["type"], "embedding");
    assert_eq!(app.mock.requests(), 0);
}

#[tokio::test]
async fn one_model_by_an_id_with_slashes() {
    let app = spawn_app().await;
    let reply = app.get("/v1/models/test/openai-chat").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["id"], "test/openai-chat");
    assert!(body["pricing"]["prompt"].is_string());

    let reply = app.get("/v1/models/test/nope").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.error()["code"], "model_not_found");
}
