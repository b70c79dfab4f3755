//! Gemini wire format: generateContent, streaming (SSE and JSON array),
//! function calls, embeddings and auth.

use super::*;

#[tokio::test]
async fn gemini_generate_and_auth() {
    let m = MockUpstream::start().await.unwrap();
    let v: Value = gemini_post(&m, "generateContent", gemini_body("hello there"))
        .await
        .json()
        .await
        .unwrap();
    let cand = &v["candidates"][0];
    assert_eq!(
        cand["content"],
        json!({ "role": "model", "parts": [{ "text": "Mock reply to: hello there" }] })
    );
    assert_eq!(cand["finishReason"], "STOP");
    assert_eq!(cand["index"], 0);
    assert_eq!(
        v["usageMetadata"],
        json!({ "promptTokenCount": 6, "candidatesTokenCount": 5, "totalTokenCount": 11 })
    );
    assert_eq!(v["modelVersion"], "gemini-test");
    assert!(v["responseId"].is_string());

    let url = format!("{}/models/gemini-test:generateContent", m.gemini_base());
    let resp = client()
        .post(format!("{url}?key=abc"))
        .json(&gemini_body("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client()
        .post(&url)
        .json(&gemini_body("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], 403);
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
    assert_eq!(m.last_request().unwrap().query, None);

    let mut body = gemini_body("one two three");
    body["generationConfig"] = json!({ "maxOutputTokens": 2 });
    let v: Value = gemini_post(&m, "generateContent", body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
}

#[tokio::test]
async fn gemini_stream_sse_and_array() {
    let m = MockUpstream::start().await.unwrap();
    let resp = gemini_post(
        &m,
        "streamGenerateContent?alt=sse",
        gemini_body("hello there"),
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.unwrap();
    assert!(body.contains("\r\n\r\n"));
    let chunks: Vec<Value> = sse_data(&body)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks.len(), 5);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["candidates"][0]["content"]["parts"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "Mock reply to: hello there");
    assert!(chunks[..4]
        .iter()
        .all(|c| c["candidates"][0].get("finishReason").is_none()));
    let last = chunks.last().unwrap();
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert_eq!(last["usageMetadata"]["candidatesTokenCount"], 5);
    assert_eq!(last["usageMetadata"]["totalTokenCount"], 11);

    let resp = gemini_post(&m, "streamGenerateContent", gemini_body("hello there")).await;
    assert_eq!(resp.headers()["content-type"], "application/json");
    let array: Vec<Value> = resp.json().await.unwrap();
    assert_eq!(array.len(), 5);
    assert_eq!(array[4]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(m.requests_for(":streamGenerateContent"), 2);
    assert_eq!(m.requests_for(":generateContent"), 0);
}

#[tokio::test]
async fn gemini_function_call_paths() {
    let m = MockUpstream::start().await.unwrap();
    let mut body = gemini_body("weather?");
    body["tools"] = json!([{ "functionDeclarations": [{ "name": "get_weather", "description": "d", "parameters": {} }] }]);
    let v: Value = gemini_post(&m, "generateContent", body.clone())
        .await
        .json()
        .await
        .unwrap();
    let call =
        json!({ "functionCall": { "name": "get_weather", "args": { "location": "Paris" } } });
    assert_eq!(v["candidates"][0]["content"]["parts"], json!([call]));
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");

    let data = sse_data(
        &gemini_post(&m, "streamGenerateContent?alt=sse", body.clone())
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(data.len(), 1);
    let chunk: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(chunk["candidates"][0]["content"]["parts"][0], call);

    let contents = body["contents"].as_array_mut().unwrap();
    contents.push(json!({ "role": "model", "parts": [call] }));
    contents.push(json!({ "role": "user", "parts": [
        { "functionResponse": { "name": "get_weather", "response": { "content": "Rainy" } } },
    ]}));
    let v: Value = gemini_post(&m, "generateContent", body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["candidates"][0]["content"]["parts"][0]["text"],
        "Tool said: Rainy"
    );
}

#[tokio::test]
async fn gemini_embeddings() {
    let m = MockUpstream::start().await.unwrap();
    let body = json!({ "content": { "parts": [{ "text": "hello" }] }, "outputDimensionality": 4 });
    let v: Value = gemini_post(&m, "embedContent", body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["embedding"]["values"].as_array().unwrap().len(), 4);
    let body = json!({ "requests": [
        { "model": "models/gemini-test", "content": { "parts": [{ "text": "a" }] } },
        { "model": "models/gemini-test", "content": { "parts": [{ "text": "b" }] } },
    ]});
    let v: Value = gemini_post(&m, "batchEmbedContents", body)
        .await
        .json()
        .await
        .unwrap();
    let embeddings = v["embeddings"].as_array().unwrap();
    assert_eq!(embeddings.len(), 2);
    assert_eq!(embeddings[0]["values"].as_array().unwrap().len(), 8);
    assert_ne!(embeddings[0], embeddings[1]);
}
