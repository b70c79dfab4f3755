//! Anthropic Messages wire format: shape, validation, stop reasons, auth,
//! stream event sequence and tool use.

use super::*;

#[tokio::test]
async fn anthropic_non_stream_and_validation() {
    let m = MockUpstream::start().await.unwrap();
    let v: Value = anthropic_post(&m, anthropic_body("hello there"))
        .await
        .json()
        .await
        .unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("msg_mock"));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-test");
    assert_eq!(
        v["content"],
        json!([{ "type": "text", "text": "Mock reply to: hello there" }])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["stop_sequence"], Value::Null);
    assert_eq!(
        v["usage"],
        json!({ "input_tokens": 6, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0 })
    );

    let mut body = anthropic_body("hello there");
    body.as_object_mut().unwrap().remove("max_tokens");
    let resp = anthropic_post(&m, body).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let mut body = anthropic_body("one two three");
    body["max_tokens"] = json!(3);
    let v: Value = anthropic_post(&m, body).await.json().await.unwrap();
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["content"][0]["text"], "Mock reply to:");

    let mut body = anthropic_body("one two three");
    body["stop_sequences"] = json!(["two"]);
    let v: Value = anthropic_post(&m, body).await.json().await.unwrap();
    assert_eq!(v["stop_reason"], "stop_sequence");
    assert_eq!(v["stop_sequence"], "two");
    assert_eq!(v["content"][0]["text"], "Mock reply to: one ");
}

#[tokio::test]
async fn anthropic_auth_refused() {
    let m = MockUpstream::start().await.unwrap();
    let url = format!("{}/messages", m.anthropic_base());
    let no_version = client().post(&url).header("x-api-key", "k");
    let no_key = client()
        .post(&url)
        .header("anthropic-version", "2023-06-01");
    for req in [no_version, no_key] {
        let resp = req.json(&anthropic_body("hi")).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "authentication_error");
    }
}

#[tokio::test]
async fn anthropic_stream_events() {
    let m = MockUpstream::start().await.unwrap();
    let mut body = anthropic_body("hello there");
    body["stream"] = json!(true);
    let resp = anthropic_post(&m, body).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_events(&resp.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(["content_block_delta"; 5]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str());
    }
    let start = &events[0].1["message"];
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["usage"]["input_tokens"], 6);
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert_eq!(
        events[1].1["content_block"],
        json!({ "type": "text", "text": "" })
    );
    let text: String = events[3..8]
        .iter()
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "Mock reply to: hello there");
    assert_eq!(events[3].1["delta"]["type"], "text_delta");
    let delta = &events[9].1;
    assert_eq!(
        delta["delta"],
        json!({ "stop_reason": "end_turn", "stop_sequence": null })
    );
    assert_eq!(delta["usage"]["output_tokens"], 5);
}

#[tokio::test]
async fn anthropic_tool_use_paths() {
    let m = MockUpstream::start().await.unwrap();
    let mut body = anthropic_body("weather?");
    body["tools"] = json!([{ "name": "get_weather", "description": "d", "input_schema": { "type": "object" } }]);
    let v: Value = anthropic_post(&m, body.clone()).await.json().await.unwrap();
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(
        v["content"],
        json!([{ "type": "tool_use", "id": "toolu_mock_1", "name": "get_weather", "input": { "location": "Paris" } }])
    );

    body["stream"] = json!(true);
    let events = sse_events(&anthropic_post(&m, body.clone()).await.text().await.unwrap());
    assert_eq!(
        events[1].1["content_block"],
        json!({ "type": "tool_use", "id": "toolu_mock_1", "name": "get_weather", "input": {} })
    );
    let partial: Vec<&str> = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"].as_str().unwrap()
        })
        .collect();
    assert!(partial.len() >= 2);
    assert_eq!(partial.concat(), r#"{"location":"Paris"}"#);
    let delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");

    body["stream"] = json!(false);
    let messages = body["messages"].as_array_mut().unwrap();
    messages.push(json!({ "role": "assistant", "content": v["content"] }));
    messages.push(json!({ "role": "user", "content": [
        { "type": "tool_result", "tool_use_id": "toolu_mock_1", "content": [{ "type": "text", "text": "Sunny" }] },
    ]}));
    let v: Value = anthropic_post(&m, body).await.json().await.unwrap();
    assert_eq!(v["content"][0]["text"], "Tool said: Sunny");
    assert_eq!(v["stop_reason"], "end_turn");
}
