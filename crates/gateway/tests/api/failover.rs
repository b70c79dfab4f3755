//! Failover: which upstream failures move to the next route, what the client sees when they
//! do (nothing) and when they cannot (one error), and what the request log keeps.

use mock_upstream::Scenario;

use crate::helpers::{
    assert_served, attempts, failing, mock_reply, spawn_app, spawn_app_with, user_chat, user_chat_stream, Options,
    Stream, TestApp,
};

/// `test/failover` with the primary mock in `scenario`: served by `backup`, both attempts kept.
async fn fails_over(app: &TestApp, model: &str, first_provider: &str, first_outcome: &str) {
    let reply = app.post_chat(&user_chat(model, "fail over please")).await;
    let body = assert_served(&reply, model, "backup");
    assert_eq!(body["choices"][0]["message"]["content"], mock_reply("fail over please"));
    assert_eq!(app.backup.requests(), 1);
    let record = app.record(body["id"].as_str().unwrap()).await;
    assert_eq!(record.status, "success");
    assert_eq!(record.provider.as_deref(), Some("backup"));
    assert_eq!(
        attempts(&record),
        vec![(first_provider.to_owned(), first_outcome.to_owned()), ("backup".to_owned(), "success".to_owned())]
    );
}

#[tokio::test]
async fn a_503_fails_over() {
    let app = spawn_app().await;
    app.mock.set_scenario(failing(503));
    fails_over(&app, "test/failover", "openai-main", "server").await;
    assert_eq!(app.mock.requests(), 1);
}

#[tokio::test]
async fn a_500_fails_over() {
    let app = spawn_app().await;
    app.mock.set_scenario(failing(500));
    fails_over(&app, "test/failover", "openai-main", "server").await;
}

#[tokio::test]
async fn a_429_fails_over() {
    let app = spawn_app().await;
    app.mock.set_scenario(Scenario { retry_after_s: Some(30), ..failing(429) });
    fails_over(&app, "test/failover", "openai-main", "rate_limited").await;
}

#[tokio::test]
async fn a_refused_connection_fails_over() {
    let app = spawn_app().await;
    fails_over(&app, "test/dead-first", "dead", "connect").await;
}

#[tokio::test]
async fn a_timeout_fails_over() {
    let app = spawn_app_with(Options { first_token_timeout_ms: 300, ..Options::default() }).await;
    app.mock.set_scenario(Scenario { delay_ms: 1_500, ..Scenario::default() });
    let started = std::time::Instant::now();
    fails_over(&app, "test/failover", "openai-main", "timeout").await;
    assert!(started.elapsed() < std::time::Duration::from_millis(1_400), "gave up at the first-token timeout");
}

#[tokio::test]
async fn a_malformed_answer_fails_over() {
    let app = spawn_app().await;
    app.mock.set_scenario(Scenario { malformed: true, ..Scenario::default() });
    fails_over(&app, "test/failover", "openai-main", "malformed").await;
}

#[tokio::test]
async fn a_stream_that_fails_before_content_fails_over_invisibly() {
    let app = spawn_app().await;
    // The first route sends its role chunk, then breaks before any content.
    app.mock.set_scenario(Scenario { cut_after_chunks: Some(0), ..Scenario::default() });
    let reply = app.post_chat(&user_chat_stream("test/failover", "stream over")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.provider(), "backup");
    let stream = Stream::parse(&reply);
    assert_eq!(stream.role_chunks(), 1, "{}", reply.text);
    assert_eq!(reply.events().iter().filter(|e| *e == "[DONE]").count(), 1);
    assert!(stream.chunks.iter().all(|c| c.get("error").is_none()), "{}", reply.text);
    assert_eq!(stream.content(), mock_reply("stream over"));
    stream.assert_usage_then_done();
    assert_eq!((app.mock.requests(), app.backup.requests()), (1, 1));

    let record = app.record(reply.header("x-generation-id").unwrap()).await;
    assert_eq!(record.status, "success");
    let tried: Vec<String> = attempts(&record).into_iter().map(|(p, _)| p).collect();
    assert_eq!(tried, ["openai-main", "backup"]);
}

#[tokio::test]
async fn a_stream_that_fails_with_a_status_fails_over_invisibly() {
    let app = spawn_app().await;
    app.mock.set_scenario(failing(502));
    let reply = app.post_chat(&user_chat_stream("test/failover", "stream over")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.provider(), "backup");
    let stream = Stream::parse(&reply);
    assert_eq!(stream.role_chunks(), 1);
    assert_eq!(stream.content(), mock_reply("stream over"));
    stream.assert_usage_then_done();
}

#[tokio::test]
async fn a_stream_cut_after_content_ends_with_one_error_event_and_no_done() {
    let app = spawn_app().await;
    app.mock.set_scenario(Scenario { cut_after_chunks: Some(3), ..Scenario::default() });
    let reply = app.post_chat(&user_chat_stream("test/failover", "a long answer that will be cut")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.provider(), "openai-main");
    let stream = Stream::parse(&reply);
    assert!(!stream.done, "no [DONE] after an interrupted stream: {}", reply.text);
    assert_eq!(stream.content(), "Mock reply to:", "the content sent before the cut");
    let errors: Vec<_> = stream.chunks.iter().filter(|c| c.get("error").is_some()).collect();
    assert_eq!(errors.len(), 1, "{}", reply.text);
    assert!(stream.last().get("error").is_some(), "the error event is last");
    let error = &stream.last()["error"];
    assert!(error["message"].as_str().unwrap().contains("openai-main"), "{error}");
    assert_eq!(app.backup.requests(), 0, "no silent switch after content");

    let record = app.record(reply.header("x-generation-id").unwrap()).await;
    assert_eq!(record.status, "error_midstream");
    assert!(record.error.is_some());
}

#[tokio::test]
async fn an_upstream_400_does_not_fail_over() {
    let app = spawn_app().await;
    app.mock.set_scenario(failing(400));
    let reply = app.post_chat(&user_chat("test/failover", "bad")).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    let error = reply.error();
    assert!(error["message"].as_str().unwrap().contains("mock-upstream injected failure (400)"), "{error}");
    assert_eq!(app.backup.requests(), 0);
    assert_eq!(app.mock.requests(), 1);
}

#[tokio::test]
async fn when_every_route_fails_the_client_gets_502_naming_the_last_error() {
    let app = spawn_app().await;
    app.mock.set_scenario(failing(503));
    app.backup.set_scenario(failing(500));
    let reply = app.post_chat(&user_chat("test/failover", "doomed")).await;
    assert_eq!(reply.status, 502, "{}", reply.text);
    let error = reply.error();
    assert_eq!(error["code"], "all_routes_failed");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("backup") && message.contains("mock-upstream injected failure (500)"), "{message}");
    assert_eq!((app.mock.requests(), app.backup.requests()), (1, 1));

    assert_eq!(app.wait_for_records(1).await, 1, "the failed request is recorded");
}

#[tokio::test]
async fn every_route_failing_a_stream_gives_502_before_any_byte() {
    let app = spawn_app().await;
    app.mock.set_scenario(failing(503));
    app.backup.set_scenario(failing(503));
    let reply = app.post_chat(&user_chat_stream("test/failover", "doomed")).await;
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert_eq!(reply.error()["code"], "all_routes_failed");
}

#[tokio::test]
async fn a_single_route_rate_limited_passes_on_429_and_retry_after() {
    let app = spawn_app().await;
    app.mock.set_scenario(Scenario { retry_after_s: Some(7), ..failing(429) });
    let reply = app.post_chat(&user_chat("test/openai-chat", "slow down")).await;
    assert_eq!(reply.status, 429, "{}", reply.text);
    assert_eq!(reply.header("retry-after"), Some("7"));
    assert_eq!(reply.error()["code"], "rate_limit_exceeded");
}
