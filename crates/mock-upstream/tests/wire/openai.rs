//! OpenAI wire format: chat completions (plain, streamed, tools, JSON
//! mode, limits), legacy completions, embeddings, models and auth.

use super::*;

#[tokio::test]
async fn openai_chat_non_stream_shape() {
    let m = MockUpstream::start().await.unwrap();
    let resp = openai_post(&m, "/chat/completions", chat_body("hello there")).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-mock"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-test");
    assert_eq!(v["system_fingerprint"], "fp_mock");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Mock reply to: hello there");
    assert_eq!(choice["message"]["refusal"], Value::Null);
    assert_eq!(choice["finish_reason"], "stop");
    // "Be brief" + "hello there" = 4 words + 2 messages.
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 11);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
}

#[tokio::test]
async fn openai_chat_stream_with_usage() {
    let m = MockUpstream::start().await.unwrap();
    let mut body = chat_body("hello there");
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    let resp = openai_post(&m, "/chat/completions", body).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({ "role": "assistant", "content": "", "refusal": null })
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Mock reply to: hello there");
    assert_eq!(chunks.len(), 1 + 5 + 2);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
    }
}

#[tokio::test]
async fn openai_stream_usage_only_when_asked() {
    let m = MockUpstream::start().await.unwrap();
    let mut body = chat_body("hi");
    body["stream"] = json!(true);
    let plain = sse_data(
        &openai_post(&m, "/chat/completions", body.clone())
            .await
            .text()
            .await
            .unwrap(),
    );
    assert!(plain.iter().all(|d| !d.contains("\"usage\"")));
    m.set_scenario(Scenario {
        omit_stream_usage: true,
        ..Scenario::default()
    });
    body["stream_options"] = json!({ "include_usage": true });
    let omitted = sse_data(
        &openai_post(&m, "/chat/completions", body)
            .await
            .text()
            .await
            .unwrap(),
    );
    assert!(omitted.iter().all(|d| !d.contains("prompt_tokens")));
    assert_eq!(omitted.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn openai_tool_call_paths() {
    let m = MockUpstream::start().await.unwrap();
    let mut body = chat_body("weather?");
    body["tools"] = weather_tool();
    let v: Value = openai_post(&m, "/chat/completions", body.clone())
        .await
        .json()
        .await
        .unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["id"], "call_mock_1");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], r#"{"location":"Paris"}"#);

    body["stream"] = json!(true);
    let data = sse_data(
        &openai_post(&m, "/chat/completions", body.clone())
            .await
            .text()
            .await
            .unwrap(),
    );
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let head = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(head["id"], "call_mock_1");
    assert_eq!(head["function"]["name"], "get_weather");
    let fragments: Vec<&str> = chunks[1..]
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert!(fragments.len() >= 2);
    assert_eq!(fragments.concat(), r#"{"location":"Paris"}"#);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    body["stream"] = json!(false);
    let messages = body["messages"].as_array_mut().unwrap();
    messages.push(json!({ "role": "assistant", "content": null, "tool_calls": [call] }));
    messages
        .push(json!({ "role": "tool", "tool_call_id": "call_mock_1", "content": "Sunny, 22C" }));
    let v: Value = openai_post(&m, "/chat/completions", body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Tool said: Sunny, 22C"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn openai_json_mode_and_limits() {
    let m = MockUpstream::start().await.unwrap();
    let mut body = chat_body("hi");
    body["response_format"] = json!({ "type": "json_object" });
    let v: Value = openai_post(&m, "/chat/completions", body)
        .await
        .json()
        .await
        .unwrap();
    let content: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(content, json!({ "reply": "Mock reply to: hi" }));

    let mut body = chat_body("one two three");
    body["max_tokens"] = json!(2);
    let v: Value = openai_post(&m, "/chat/completions", body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Mock reply");
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    m.set_scenario(Scenario {
        reply: Some("custom answer".into()),
        ..Scenario::default()
    });
    let v: Value = openai_post(&m, "/chat/completions", chat_body("x"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "custom answer");
}

#[tokio::test]
async fn openai_auth_refused() {
    let m = MockUpstream::start().await.unwrap();
    let url = format!("{}/chat/completions", m.openai_base());
    for req in [
        client().post(&url),
        client().post(&url).header("authorization", "Bearer "),
    ] {
        let resp = req.json(&chat_body("hi")).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["param"], Value::Null);
    }
    assert_eq!(m.requests(), 2);
}

#[tokio::test]
async fn openai_legacy_completions() {
    let m = MockUpstream::start().await.unwrap();
    let v: Value = openai_post(
        &m,
        "/completions",
        json!({ "model": "inst", "prompt": "Say this" }),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-mock"));
    assert_eq!(v["choices"][0]["text"], "Mock reply to: Say this");
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 3);

    let body = json!({ "model": "inst", "prompt": ["Say this"], "stream": true, "stream_options": { "include_usage": true } });
    let data = sse_data(
        &openai_post(&m, "/completions", body)
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "Mock reply to: Say this");
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn openai_embeddings_float_and_base64() {
    let m = MockUpstream::start().await.unwrap();
    let v: Value = openai_post(
        &m,
        "/embeddings",
        json!({ "model": "emb", "input": ["hello world", "bye"] }),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "emb");
    assert_eq!(v["usage"], json!({ "prompt_tokens": 3, "total_tokens": 3 }));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["object"], "embedding");
    let floats: Vec<f32> = data[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(floats.len(), 8);
    assert!((floats.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-3);

    let body = json!({ "model": "emb", "input": "hello world", "encoding_format": "base64", "dimensions": 4 });
    let v: Value = openai_post(&m, "/embeddings", body)
        .await
        .json()
        .await
        .unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw.len(), 16);
    let decoded: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!((decoded.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-3);

    let v: Value = openai_post(
        &m,
        "/embeddings",
        json!({ "model": "emb", "input": [[1, 2, 3], [4]] }),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(
        openai_post(&m, "/embeddings", json!({ "model": "emb", "input": [] }))
            .await
            .status(),
        400
    );
}

#[tokio::test]
async fn openai_models() {
    let m = MockUpstream::start().await.unwrap();
    let v: Value = client()
        .get(format!("{}/models", m.openai_base()))
        .bearer_auth("k")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "mock");
    assert_eq!(m.requests_for("/models"), 1);
}
