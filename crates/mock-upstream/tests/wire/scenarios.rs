//! Failure injection and control: fail_first, stream cuts and in-band
//! errors, malformed bodies, delays, cancellation, counters, the
//! `/__mock` endpoints and the binary.

use super::*;

#[tokio::test]
async fn fail_first_then_success() {
    let m = MockUpstream::start().await.unwrap();
    m.set_scenario(Scenario {
        fail_first: 2,
        fail_status: 429,
        retry_after_s: Some(7),
        ..Scenario::default()
    });
    for _ in 0..2 {
        let resp = openai_post(&m, "/chat/completions", chat_body("hi")).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "7");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    }
    assert_eq!(
        openai_post(&m, "/chat/completions", chat_body("hi"))
            .await
            .status(),
        200
    );

    m.set_scenario(Scenario {
        fail_first: 1,
        ..Scenario::default()
    });
    let resp = openai_post(&m, "/chat/completions", chat_body("hi")).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_none());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(v["error"]["code"], "upstream_unavailable");

    m.set_scenario(Scenario {
        fail_first: 1,
        fail_status: 529,
        ..Scenario::default()
    });
    let resp = anthropic_post(
        &m,
        json!({ "model": "c", "max_tokens": 9, "messages": [{ "role": "user", "content": "x" }] }),
    )
    .await;
    assert_eq!(resp.status(), 529);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({ "type": "error", "error": { "type": "overloaded_error", "message": v["error"]["message"] } })
    );
    assert_eq!(anthropic_post(&m, json!({ "model": "c", "max_tokens": 9, "messages": [{ "role": "user", "content": "x" }] })).await.status(), 200);

    m.set_scenario(Scenario {
        fail_first: u64::MAX,
        fail_status: 429,
        ..Scenario::default()
    });
    for _ in 0..3 {
        let resp = gemini_post(
            &m,
            "generateContent",
            json!({ "contents": [{ "parts": [{ "text": "x" }] }] }),
        )
        .await;
        assert_eq!(resp.status(), 429);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], 429);
        assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    }
}

#[tokio::test]
async fn cut_after_chunks_aborts_every_format() {
    let m = MockUpstream::start().await.unwrap();
    m.set_scenario(Scenario {
        cut_after_chunks: Some(2),
        ..Scenario::default()
    });
    let mut chat = chat_body("hello there");
    chat["stream"] = json!(true);
    let resp = openai_post(&m, "/chat/completions", chat).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.is_err(), "openai body must fail");

    let resp = anthropic_post(
        &m,
        json!({ "model": "c", "max_tokens": 99, "stream": true, "messages": [{ "role": "user", "content": "hello" }] }),
    )
    .await;
    assert!(resp.text().await.is_err(), "anthropic body must fail");

    let resp = gemini_post(
        &m,
        "streamGenerateContent?alt=sse",
        json!({ "contents": [{ "parts": [{ "text": "x" }] }] }),
    )
    .await;
    assert!(resp.text().await.is_err(), "gemini body must fail");

    // Reading chunk by chunk: the content before the cut arrives intact.
    let mut chat = chat_body("hello there");
    chat["stream"] = json!(true);
    let mut resp = openai_post(&m, "/chat/completions", chat).await;
    let mut seen = String::new();
    let err = loop {
        match resp.chunk().await {
            Ok(Some(bytes)) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            Ok(None) => panic!("stream ended cleanly"),
            Err(err) => break err,
        }
    };
    assert!(
        err.is_body() || err.is_decode() || err.is_request(),
        "{err:?}"
    );
    let text: String = sse_data(&seen)
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Mock reply");
    assert!(!seen.contains("[DONE]"));
    assert_eq!(m.streams_cancelled(), 0);
}

#[tokio::test]
async fn stream_error_after_chunks_in_band() {
    let m = MockUpstream::start().await.unwrap();
    m.set_scenario(Scenario {
        stream_error_after_chunks: Some(1),
        ..Scenario::default()
    });
    let mut chat = chat_body("hello there");
    chat["stream"] = json!(true);
    let data = sse_data(
        &openai_post(&m, "/chat/completions", chat)
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(data.len(), 3);
    let err: Value = serde_json::from_str(&data[2]).unwrap();
    assert_eq!(
        err,
        json!({ "error": { "message": "mock overloaded", "type": "server_error", "code": "overloaded" } })
    );

    let body = anthropic_post(
        &m,
        json!({ "model": "c", "max_tokens": 99, "stream": true, "messages": [{ "role": "user", "content": "hello" }] }),
    )
    .await
    .text()
    .await
    .unwrap();
    let events = sse_events(&body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(events[4].1["error"]["type"], "overloaded_error");

    let body = gemini_post(
        &m,
        "streamGenerateContent?alt=sse",
        json!({ "contents": [{ "parts": [{ "text": "x" }] }] }),
    )
    .await
    .text()
    .await
    .unwrap();
    let data = sse_data(&body);
    assert_eq!(data.len(), 2);
    let err: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(err["error"]["status"], "UNAVAILABLE");
}

#[tokio::test]
async fn malformed_bodies() {
    let m = MockUpstream::start().await.unwrap();
    m.set_scenario(Scenario {
        malformed: true,
        ..Scenario::default()
    });
    let resp = openai_post(&m, "/chat/completions", chat_body("hi")).await;
    assert_eq!(resp.status(), 200);
    assert!(serde_json::from_str::<Value>(&resp.text().await.unwrap()).is_err());
    let mut chat = chat_body("hi");
    chat["stream"] = json!(true);
    let body = openai_post(&m, "/chat/completions", chat)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(body, "data: {garbage\n\n");
    let body = gemini_post(&m, "generateContent", json!({ "contents": [] }))
        .await
        .text()
        .await
        .unwrap();
    assert!(serde_json::from_str::<Value>(&body).is_err());
}

#[tokio::test]
async fn counters_last_request_and_reset() {
    let m = MockUpstream::start().await.unwrap();
    assert!(m.last_request().is_none());
    openai_post(&m, "/chat/completions", chat_body("a")).await;
    openai_post(&m, "/chat/completions", chat_body("b")).await;
    openai_post(&m, "/embeddings", json!({ "model": "e", "input": "x" })).await;
    anthropic_post(&m, anthropic_body("c")).await;
    gemini_post(&m, "generateContent?foo=1", gemini_body("d")).await;
    assert_eq!(m.requests(), 5);
    assert_eq!(m.requests_for("/chat/completions"), 2);
    assert_eq!(m.requests_for("/embeddings"), 1);
    assert_eq!(m.requests_for("/messages"), 1);
    assert_eq!(m.requests_for(":generateContent"), 1);
    let last = m.last_request().unwrap();
    assert_eq!(last.path, "/v1beta/models/gemini-test:generateContent");
    assert_eq!(last.query.as_deref(), Some("foo=1"));
    assert_eq!(last.header("X-Goog-Api-Key"), Some("g-key"));
    assert!(last.headers.iter().all(|(k, _)| k == &k.to_lowercase()));
    assert_eq!(last.body["contents"][0]["parts"][0]["text"], "d");

    // Control routes are not counted.
    client()
        .get(format!("{}/__mock/stats", m.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(m.requests(), 5);
    m.set_scenario(Scenario {
        fail_first: u64::MAX,
        ..Scenario::default()
    });
    m.reset();
    assert_eq!(m.requests(), 0);
    assert!(m.last_request().is_none());
    assert_eq!(
        openai_post(&m, "/chat/completions", chat_body("a"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn control_endpoints() {
    let m = MockUpstream::start().await.unwrap();
    let base = m.base_url();
    let resp = client()
        .post(format!("{base}/__mock/scenario"))
        .json(&json!({ "fail_first": 1, "fail_status": 500 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        openai_post(&m, "/chat/completions", chat_body("a"))
            .await
            .status(),
        500
    );
    assert_eq!(
        openai_post(&m, "/chat/completions", chat_body("a"))
            .await
            .status(),
        200
    );
    let stats: Value = client()
        .get(format!("{base}/__mock/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["requests"], 2);
    assert_eq!(stats["by_path"]["/v1/chat/completions"], 2);
    assert_eq!(stats["last_request"]["path"], "/v1/chat/completions");
    assert_eq!(
        stats["last_request"]["headers"]["authorization"],
        "Bearer sk-test"
    );
    assert_eq!(stats["last_request"]["body"]["model"], "gpt-test");

    let bad = client()
        .post(format!("{base}/__mock/scenario"))
        .body("[1]")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    client()
        .post(format!("{base}/__mock/reset"))
        .send()
        .await
        .unwrap();
    let stats: Value = client()
        .get(format!("{base}/__mock/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["requests"], 0);
    assert_eq!(stats["last_request"], Value::Null);
}

#[tokio::test]
async fn delays_and_cancelled_streams() {
    let m = MockUpstream::start().await.unwrap();
    m.set_scenario(Scenario {
        delay_ms: 150,
        ..Scenario::default()
    });
    let t = Instant::now();
    openai_post(&m, "/chat/completions", chat_body("a")).await;
    assert!(t.elapsed() >= Duration::from_millis(150));

    m.set_scenario(Scenario {
        chunk_delay_ms: 40,
        ..Scenario::default()
    });
    let mut chat = chat_body("hello there");
    chat["stream"] = json!(true);
    let t = Instant::now();
    let full = openai_post(&m, "/chat/completions", chat.clone())
        .await
        .text()
        .await
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(40 * 7),
        "{:?}",
        t.elapsed()
    );
    assert!(full.ends_with("data: [DONE]\n\n"));
    assert_eq!(m.streams_cancelled(), 0);

    let mut resp = openai_post(&m, "/chat/completions", chat).await;
    assert!(resp.chunk().await.unwrap().is_some());
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(2);
    while m.streams_cancelled() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(m.streams_cancelled(), 1);
}

#[tokio::test]
async fn binary_prints_address_and_serves() {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
        .args(["--listen", "127.0.0.1:0", "--latency-ms", "1"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stdout);
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"));
    let resp = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth("k")
        .json(&chat_body("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let scenario: Value = client()
        .post(format!("{url}/__mock/scenario"))
        .json(&json!({ "fail_first": 1 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(scenario["delay_ms"], 1, "defaults from flags are kept");
    child.kill().await.unwrap();
}
