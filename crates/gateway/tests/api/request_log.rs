//! The request log: one record per admitted request, with status, provider, tokens and the
//! exact decimal cost of the route that served it.

use mock_upstream::Scenario;

use rust_decimal::Decimal;

use crate::helpers::{
    decimal,
    expected_cost, failing, spawn_app, user_chat, user_chat_stream, Stream, ANTHROPIC_INPUT, ANTHROPIC_OUTPUT,
    BACKUP_INPUT, BACKUP_OUTPUT, GEMINI_INPUT, GEMINI_OUTPUT, OPENAI_INPUT, OPENAI_OUTPUT,
};

#[tokio::test]
async fn every_request_is_recorded_with_status_provider_tokens_and_exact_cost() {
    let app = spawn_app().await;

    // 1. Non-streamed success on a USD route.
    let reply = app.post_chat(&user_chat("test/openai-chat", "price this request exactly")).await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    let (prompt, completion) =
        (body["usage"]["prompt_tokens"].as_u64().unwrap(), body["usage"]["completion_tokens"].as_u64().unwrap());
    let record = app.record(body["id"].as_str().unwrap()).await;
    assert_eq!(record.status, "success");
    assert_eq!(record.http_status, 200);
    assert_eq!(record.endpoint, "chat");
    assert_eq!(record.model, "test/openai-chat");
    assert_eq!(record.provider.as_deref(), Some("openai-main"));
    assert_eq!(record.upstream_model.as_deref(), Some("gpt-mock"));
    assert!(!record.streamed && !record.usage_estimated);
    assert_eq!((record.prompt_tokens, record.completion_tokens), (prompt as i64, completion as i64));
    assert_eq!(record.cost, expected_cost(prompt, completion, OPENAI_INPUT, OPENAI_OUTPUT));
    assert_eq!(record.currency, "USD");
    assert_eq!(record.key_id.as_deref(), Some("master"));
    assert_eq!(record.finish_reason.as_deref(), Some("stop"));

    // 2. Streamed success on an INR route.
    let reply = app.post_chat(&user_chat_stream("test/gemini-chat", "stream and price")).await;
    let usage = Stream::parse(&reply).assert_usage_then_done();
    let record = app.record(reply.header("x-generation-id").unwrap()).await;
    let (prompt, completion) = (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap());
    assert_eq!(record.status, "success");
    assert!(record.streamed);
    assert!(record.ttft_ms.is_some());
    assert_eq!(record.provider.as_deref(), Some("gemini-main"));
    assert_eq!((record.prompt_tokens, record.completion_tokens), (prompt as i64, completion as i64));
    // The route is priced in INR; the master key's organisation pays in USD at the [fx] rate,
    // rounded up to the nano.
    let inr = decimal(&expected_cost(prompt, completion, GEMINI_INPUT, GEMINI_OUTPUT));
    let nanos = Decimal::from(1_000_000_000);
    let usd = (inr / decimal("88.50") * nanos).ceil() / nanos;
    assert_eq!(record.cost, usd.normalize().to_string());
    assert_eq!(record.currency, "USD");

    // 3. Anthropic, priced on its own route.
    let reply = app.post_chat(&user_chat("test/anthropic-chat", "and one more")).await;
    let body = reply.json();
    let record = app.record(body["id"].as_str().unwrap()).await;
    let (prompt, completion) =
        (body["usage"]["prompt_tokens"].as_u64().unwrap(), body["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(record.cost, expected_cost(prompt, completion, ANTHROPIC_INPUT, ANTHROPIC_OUTPUT));

    // 4. Failed over: billed at the route that served.
    app.mock.set_scenario(failing(503));
    let reply = app.post_chat(&user_chat("test/failover", "who pays")).await;
    let body = reply.json();
    let record = app.record(body["id"].as_str().unwrap()).await;
    let (prompt, completion) =
        (body["usage"]["prompt_tokens"].as_u64().unwrap(), body["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(record.provider.as_deref(), Some("backup"));
    assert_eq!(record.cost, expected_cost(prompt, completion, BACKUP_INPUT, BACKUP_OUTPUT));

    // 5. An upstream refusal, recorded as an error with no cost.
    app.mock.set_scenario(failing(400));
    let reply = app.post_chat(&user_chat("test/openai-chat", "refused")).await;
    assert_eq!(reply.status, 400);

    // 6. Refused before admission (unknown model): not a generation, not recorded.
    let reply = app.post_chat(&user_chat("test/unknown", "x")).await;
    assert_eq!(reply.status, 404);

    // 7. A mid-stream failure.
    app.mock.set_scenario(Scenario { cut_after_chunks: Some(2), ..Scenario::default() });
    let reply = app.post_chat(&user_chat_stream("test/openai-chat", "cut me off mid sentence please")).await;
    let record = app.record(reply.header("x-generation-id").unwrap()).await;
    assert_eq!(record.status, "error_midstream");
    assert!(record.usage_estimated);
    assert!(record.completion_tokens > 0, "what was sent is billed");

    assert_eq!(app.wait_for_records(6).await, 6);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(app.wait_for_records(6).await, 6, "exactly one record per admitted request");
}
