//! `POST /v1/embeddings` through the OpenAI and Gemini kinds, float and base64.

use serde_json::{json, Value};

use crate::helpers::{expected_cost, spawn_app, EMBED_INPUT};

fn vectors(body: &Value) -> Vec<Vec<f64>> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect()
}

async fn embeds_floats(model: &str, provider: &str, upstream_path: &str) {
    let app = spawn_app().await;
    let reply = app.post_json("/v1/embeddings", &json!({ "model": model, "input": ["hello world", "bye"] })).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.provider(), provider);
    let body = reply.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], model);
    let vectors = vectors(&body);
    assert_eq!(vectors.len(), 2);
    assert_ne!(vectors[0], vectors[1]);
    for v in &vectors {
        assert!(!v.is_empty());
        let norm: f64 = v.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-3, "the mock's vectors are unit length: {norm}");
    }
    assert_eq!(body["data"][1]["index"], 1);
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 0, "{body}");
    assert_eq!(app.mock.requests_for(upstream_path), 1);

    let id = reply.header("x-generation-id").unwrap();
    let record = app.record(id).await;
    assert_eq!(record.endpoint, "embeddings");
    assert_eq!(record.status, "success");
    assert_eq!(record.provider.as_deref(), Some(provider));
    assert_eq!(record.prompt_tokens, prompt as i64);
    assert_eq!(record.cost, expected_cost(prompt, 0, EMBED_INPUT, "0"));
}

#[tokio::test]
async fn embeddings_through_the_openai_kind() {
    embeds_floats("test/openai-embed", "openai-main", "/embeddings").await;
}

#[tokio::test]
async fn embeddings_through_the_gemini_kind() {
    embeds_floats("test/gemini-embed", "gemini-main", "Contents").await;
}

#[tokio::test]
async fn base64_embeddings_pass_through() {
    let app = spawn_app().await;
    for model in ["test/openai-embed", "test/gemini-embed"] {
        let request = json!({ "model": model, "input": "hello", "encoding_format": "base64" });
        let reply = app.post_json("/v1/embeddings", &request).await;
        assert_eq!(reply.status, 200, "{model}: {}", reply.text);
        let body = reply.json();
        let encoded = body["data"][0]["embedding"].as_str().unwrap_or_else(|| panic!("{model}: a base64 string: {body}"));
        assert!(!encoded.is_empty() && encoded.len() % 4 == 0, "{model}: {encoded}");
        if model == "test/openai-embed" {
            let seen = app.mock.last_request().unwrap();
            assert_eq!(seen.body["encoding_format"], "base64", "the OpenAI kind passes the format on");
        }
    }
}

#[tokio::test]
async fn embeddings_of_the_sandbox_and_bad_requests() {
    let app = spawn_app().await;
    let reply = app.post_json("/v1/embeddings", &json!({ "model": "sandbox/embed", "input": "x" })).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.provider(), "sandbox");

    let reply = app.post_json("/v1/embeddings", &json!({ "model": "test/openai-embed", "input": [] })).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.error()["param"], "input");
    let request = json!({ "model": "test/openai-embed", "input": "x", "encoding_format": "int8" });
    let reply = app.post_json("/v1/embeddings", &request).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.error()["param"], "encoding_format");
    let reply = app.post_json("/v1/embeddings", &json!({ "model": "test/openai-chat", "input": "x" })).await;
    assert_eq!(reply.status, 400, "a chat model cannot embed: {}", reply.text);
    assert_eq!(app.mock.requests(), 0);
}
