//! The built-in sandbox: no network, deterministic answers in the same shapes as the real
//! providers (role first and usage last in streams, tool calls, unit-norm embeddings).

use std::sync::Arc;

use marga_protocol::openai::{ChatCompletionRequest, FinishReason, Role};
use marga_providers::{Provider, ProviderKind};
use serde_json::{json, Value};

use super::support::*;

fn sandbox() -> Arc<dyn Provider> {
    let provider = marga_providers::build(settings(ProviderKind::Sandbox, String::new(), None)).unwrap();
    assert_eq!(provider.kind(), ProviderKind::Sandbox);
    provider
}

fn hello() -> ChatCompletionRequest {
    let messages = json!([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello sandbox"}]);
    chat_request(json!({ "messages": messages }))
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    ])
}

#[tokio::test]
async fn chat() {
    let response = sandbox().chat(call(&hello())).await.unwrap().into_parsed().unwrap();
    assert_eq!(response.model, UPSTREAM_MODEL);
    assert_eq!(response.object, "chat.completion");
    let choice = &response.choices[0];
    assert_eq!(choice.message.role, Role::Assistant);
    let text = choice.message.content.as_deref().unwrap();
    assert!(text.starts_with("[sandbox") && text.ends_with("You said: Hello sandbox"), "{text}");
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    assert_usage(response.usage.as_ref().unwrap());
}

#[tokio::test]
async fn stream_matches_chat() {
    let provider = sandbox();
    let full = provider.chat(call(&hello())).await.unwrap().into_parsed().unwrap();
    let chunks = all_ok(collect_chat(provider.chat_stream(call(&hello())).await.unwrap()).await);
    assert_eq!(content(&chunks), full.choices[0].message.content.clone().unwrap());
    assert_complete_stream(&chunks, FinishReason::Stop);
    assert_eq!(chunks.last().unwrap().usage, full.usage);
}

#[tokio::test]
async fn tool_call_when_tools_are_declared() {
    let provider = sandbox();
    let request = chat_request(json!({"messages": [{"role": "user", "content": "Weather?"}], "tools": tools()}));
    let response = provider.chat(call(&request)).await.unwrap().into_parsed().unwrap();
    let choice = &response.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    let calls = choice.message.tool_calls.as_ref().unwrap();
    assert_eq!(calls[0].function.name, "get_weather");
    assert!(serde_json::from_str::<Value>(&calls[0].function.arguments).unwrap().is_object());

    let chunks = all_ok(collect_chat(provider.chat_stream(call(&request)).await.unwrap()).await);
    let (name, arguments) = streamed_tool_call(&chunks);
    assert_eq!(name, "get_weather");
    assert!(serde_json::from_str::<Value>(&arguments).unwrap().is_object());
    assert_complete_stream(&chunks, FinishReason::ToolCalls);
    assert!(chunks.iter().flat_map(|c| &c.choices).all(|c| c.delta.content.as_deref().unwrap_or_default().is_empty()));
}

#[tokio::test]
async fn tool_choice_is_honoured() {
    let provider = sandbox();
    let none = chat_request(json!({
        "messages": [{"role": "user", "content": "Weather?"}], "tools": tools(), "tool_choice": "none",
    }));
    let response = provider.chat(call(&none)).await.unwrap().into_parsed().unwrap();
    assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Stop));
    assert!(response.choices[0].message.tool_calls.is_none());

    let named = chat_request(json!({
        "messages": [{"role": "user", "content": "Time?"}], "tools": tools(),
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
    }));
    let response = provider.chat(call(&named)).await.unwrap().into_parsed().unwrap();
    assert_eq!(response.choices[0].message.tool_calls.as_ref().unwrap()[0].function.name, "get_time");
}

#[tokio::test]
async fn tool_result_gets_a_text_answer() {
    let request = chat_request(json!({
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}
        ],
        "tools": tools(),
    }));
    let response = sandbox().chat(call(&request)).await.unwrap().into_parsed().unwrap();
    assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Stop));
    assert!(response.choices[0].message.content.as_deref().unwrap().contains("Sunny"));
}

#[tokio::test]
async fn json_mode_replies_with_json() {
    let request = chat_request(json!({
        "messages": [{"role": "user", "content": "Hello sandbox"}], "response_format": {"type": "json_object"},
    }));
    let response = sandbox().chat(call(&request)).await.unwrap().into_parsed().unwrap();
    let parsed: Value = serde_json::from_str(response.choices[0].message.content.as_deref().unwrap()).unwrap();
    assert_eq!(parsed["echo"], "Hello sandbox");
}

fn vectors(response: &marga_protocol::openai::EmbeddingResponse) -> Vec<Vec<f64>> {
    response
        .data
        .iter()
        .map(|e| e.embedding.to_floats().unwrap())
        .collect()
}

#[tokio::test]
async fn embeddings_are_deterministic_unit_vectors() {
    let provider = sandbox();
    let request = embedding_request(json!({"input": ["same text", "other text", "same text"]}));
    let response = provider.embeddings(call(&request)).await.unwrap();
    assert_eq!(response.model, UPSTREAM_MODEL);
    let v = vectors(&response);
    assert_eq!(v.len(), 3);
    assert!(response.data.iter().enumerate().all(|(i, e)| e.index as usize == i));
    assert!(v.iter().all(|x| x.len() == 256), "256 dimensions by default");
    assert_eq!(v[0], v[2]);
    assert_ne!(v[0], v[1]);
    for x in &v {
        let norm = x.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "norm {norm}");
    }
    let again = provider.embeddings(call(&embedding_request(json!({"input": "same text"})))).await.unwrap();
    assert_eq!(vectors(&again)[0], v[0], "same text, same vector across calls");
    assert!(response.usage.as_ref().unwrap().prompt_tokens > 0);

    let small = provider.embeddings(call(&embedding_request(json!({"input": "same text", "dimensions": 64})))).await;
    let small = vectors(&small.unwrap());
    assert_eq!(small[0].len(), 64);
    let norm = small[0].iter().map(|a| a * a).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "norm {norm}");
}

#[tokio::test]
async fn completions_go_through_the_default_trait_methods() {
    let provider = sandbox();
    let request = completion_request(json!({"prompt": "Hello sandbox"}));
    let response = provider.completions(call(&request)).await.unwrap();
    assert_eq!(response.object, "text_completion");
    let text = &response.choices[0].text;
    assert!(text.ends_with("You said: Hello sandbox"), "{text}");
    assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Stop));
    assert_usage(response.usage.as_ref().unwrap());

    let chunks = all_ok(collect(provider.completions_stream(call(&request)).await.unwrap()).await);
    let streamed: String = chunks.iter().flat_map(|c| &c.choices).map(|c| c.text.as_str()).collect();
    assert_eq!(&streamed, text);
    assert!(chunks.last().unwrap().usage.is_some());
}
