//! The batch APIs on the wire: OpenAI files + batches (validating → in_progress → completed,
//! output and error files in the Batch API's line shape) and Anthropic Message Batches
//! (in_progress → ended, request counts, JSONL results at `results_url`).

use super::*;

async fn upload_jsonl(m: &MockUpstream, jsonl: &str) -> Value {
    let boundary = "wire-batch-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{jsonl}\r\n--{boundary}--\r\n"
    );
    let response = client()
        .post(format!("{}/files", m.openai_base()))
        .bearer_auth("sk-test")
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn get_json(url: String, anthropic: bool) -> Value {
    let request = client().get(url);
    let request = if anthropic { request.header("x-api-key", "sk-ant").header("anthropic-version", "2023-06-01") } else { request.bearer_auth("sk-test") };
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn get_text(url: String, anthropic: bool) -> String {
    let request = client().get(url);
    let request = if anthropic { request.header("x-api-key", "sk-ant").header("anthropic-version", "2023-06-01") } else { request.bearer_auth("sk-test") };
    request.send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn openai_batches_go_from_validating_to_completed_with_output_and_error_files() {
    let m = MockUpstream::start().await.unwrap();
    m.set_scenario(Scenario { batch_delay_ms: 400, ..Scenario::default() });
    let good = json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}});
    let bad = json!({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-x", "messages": []}});
    let file = upload_jsonl(&m, &format!("{good}\n{bad}")).await;
    assert_eq!((file["object"].as_str(), file["purpose"].as_str()), (Some("file"), Some("batch")));
    let created = openai_post(&m, "/batches", json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    let created: Value = created.json().await.unwrap();
    assert_eq!((created["object"].as_str(), created["status"].as_str()), (Some("batch"), Some("validating")));
    let id = created["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    let done = loop {
        let batch = get_json(format!("{}/batches/{id}", m.openai_base()), false).await;
        if batch["status"] == "completed" {
            break batch;
        }
        assert!(matches!(batch["status"].as_str(), Some("validating" | "in_progress")), "{batch}");
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done["request_counts"], json!({"total": 2, "completed": 1, "failed": 1}));
    let output = get_text(format!("{}/files/{}/content", m.openai_base(), done["output_file_id"].as_str().unwrap()), false).await;
    let line: Value = serde_json::from_str(output.trim()).unwrap();
    assert_eq!((line["custom_id"].as_str(), line["response"]["status_code"].as_u64()), (Some("a"), Some(200)));
    assert!(line["response"]["request_id"].is_string() && line["error"].is_null(), "{line}");
    assert_eq!(line["response"]["body"]["object"], "chat.completion");
    let errors = get_text(format!("{}/files/{}/content", m.openai_base(), done["error_file_id"].as_str().unwrap()), false).await;
    let line: Value = serde_json::from_str(errors.trim()).unwrap();
    assert_eq!((line["custom_id"].as_str(), line["response"]["status_code"].as_u64()), (Some("b"), Some(400)));
    assert_eq!(m.batches_created(), 1);
}

#[tokio::test]
async fn anthropic_message_batches_end_with_jsonl_results() {
    let m = MockUpstream::start().await.unwrap();
    let params = json!({"model": "claude-x", "max_tokens": 32, "messages": [{"role": "user", "content": "hello"}]});
    let body = json!({"requests": [{"custom_id": "one", "params": params}, {"custom_id": "two", "params": {"model": "claude-x", "messages": []}}]});
    let created: Value = client()
        .post(format!("{}/messages/batches", m.anthropic_base()))
        .header("x-api-key", "sk-ant")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((created["type"].as_str(), created["processing_status"].as_str()), (Some("message_batch"), Some("in_progress")));
    assert_eq!(created["request_counts"]["processing"], 2);
    let id = created["id"].as_str().unwrap();
    let ended = get_json(format!("{}/messages/batches/{id}", m.anthropic_base()), true).await;
    assert_eq!(ended["processing_status"], "ended");
    assert!(ended["ended_at"].as_str().is_some_and(|t| t.ends_with('Z') && t.contains('T')), "RFC 3339: {ended}");
    assert_eq!((ended["request_counts"]["succeeded"].as_u64(), ended["request_counts"]["errored"].as_u64()), (Some(1), Some(1)));
    let results = get_text(ended["results_url"].as_str().unwrap().to_owned(), true).await;
    let lines: Vec<Value> = results.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!((lines[0]["custom_id"].as_str(), lines[0]["result"]["type"].as_str()), (Some("one"), Some("succeeded")));
    assert_eq!(lines[0]["result"]["message"]["type"], "message");
    assert_eq!((lines[1]["result"]["type"].as_str(), lines[1]["result"]["error"]["error"]["type"].as_str()), (Some("errored"), Some("invalid_request_error")));
    // Custom ids follow Anthropic's rule; refused without the key.
    let bad = json!({"requests": [{"custom_id": "no spaces!", "params": params}]});
    let refused = client().post(format!("{}/messages/batches", m.anthropic_base())).header("x-api-key", "sk").header("anthropic-version", "2023-06-01").json(&bad).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let anonymous = client().get(format!("{}/messages/batches/{id}", m.anthropic_base())).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
}
