//! Residency fails closed: with `data_policy: "india_only"` only region-IN routes are
//! eligible — through failover, retries, breakers, `fallbacks`, `models`, saved chains, pins,
//! streams and every endpoint. The offshore provider `off` is the cheapest route of every mixed
//! model, so any leak would go to it first; every test ends by checking it received NOTHING.

use mock_upstream::Scenario;
use serde_json::{json, Value};

use crate::helpers::{
    assert_served, failing, mock_reply, provider, route, spawn_app_with, user_chat, user_chat_stream, Options, Reply,
    Stream, TestApp,
};

/// Providers `off` (US, cheapest), `in1` and `in2` (IN), and models over them:
/// `res/mixed` = off, in1; `res/two-in` = off, in1, in2; `res/offshore` = off only;
/// `res/embed` = off, in1 (embeddings).
async fn residency_app(options: Options) -> TestApp {
    let off = route("off", "m-off", "0.01", "0.01", "USD");
    let in1 = route("in1", "m-in1", "1", "1", "USD");
    let in2 = route("in2", "m-in2", "100", "100", "INR");
    let extra = format!(
        r#"
[models."res/mixed"]
routes = [{off}, {in1}]

[models."res/two-in"]
routes = [{off}, {in1}, {in2}]

[models."res/offshore"]
routes = [{off}]

[models."res/embed"]
type = "embedding"
routes = [{off_embed}, {in1_embed}]
"#,
        off_embed = route("off", "e-off", "0.01", "0", "USD"),
        in1_embed = route("in1", "e-in1", "1", "0", "USD"),
    );
    spawn_app_with(Options {
        providers: vec![provider("off", "US"), provider("in1", "IN"), provider("in2", "IN")],
        extra_toml: extra,
        ..options
    })
    .await
}

fn india_only(mut body: Value) -> Value {
    body["data_policy"] = json!("india_only");
    body
}

fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

/// The same request as JSON and as a stream.
fn both(model: &str, text: &str) -> [Value; 2] {
    [india_only(user_chat(model, text)), india_only(user_chat_stream(model, text))]
}

fn assert_offshore_untouched(app: &TestApp) {
    assert_eq!(app.upstream("off").requests(), 0, "the offshore provider was called: {:?}", app.calls());
}

/// A 502 `all_routes_failed` before any byte (streamed or not).
fn assert_all_failed(reply: &Reply) {
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert_eq!(reply.error()["code"], "all_routes_failed");
    assert!(!reply.error()["message"].as_str().unwrap().contains("off"), "{}", reply.text);
}

#[tokio::test]
async fn india_only_serves_from_the_indian_route_though_the_offshore_one_is_cheaper() {
    let app = residency_app(Options::default()).await;
    for body in both("res/mixed", "stay home") {
        let reply = app.post_chat(&body).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.provider(), "in1");
        assert_eq!(reply.route(), "strategy=balanced; route=in1/m-in1; skipped=off/m-off:residency");
    }
    // Without the policy the cheaper offshore route serves: the policy is what kept it out.
    let reply = app.post_chat(&user_chat("res/mixed", "anywhere")).await;
    assert_served(&reply, "res/mixed", "off");
    assert_eq!(app.calls(), [("off", 1), ("in1", 2), ("in2", 0)]);
}

#[tokio::test]
async fn india_only_in_a_list_of_policies_and_on_every_endpoint() {
    let app = residency_app(Options::default()).await;
    let mut body = user_chat("res/mixed", "listed");
    body["data_policy"] = json!(["no_training", "india_only"]);
    assert_served(&app.post_chat(&body).await, "res/mixed", "in1");

    let completion = json!({ "model": "res/mixed", "prompt": "legacy", "data_policy": "india_only" });
    let reply = app.post_json("/v1/completions", &completion).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.provider(), "in1");
    let mut stream = completion.clone();
    stream["stream"] = json!(true);
    let reply = app.post_json("/v1/completions", &stream).await;
    assert_eq!(reply.provider(), "in1");

    let embed = json!({ "model": "res/embed", "input": "vector", "data_policy": "india_only" });
    let reply = app.post_json("/v1/embeddings", &embed).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.provider(), "in1");
    app.upstream("in1").set_scenario(failing(503));
    assert_all_failed(&app.post_json("/v1/embeddings", &embed).await);
    assert_all_failed(&app.post_json("/v1/completions", &completion).await);
    assert_offshore_untouched(&app);
}

#[tokio::test]
async fn no_indian_route_is_a_400_no_route_and_calls_nothing() {
    let app = residency_app(Options::default()).await;
    for body in both("res/offshore", "nowhere to go") {
        let reply = app.post_chat(&body).await;
        assert_eq!(reply.status, 400, "{}", reply.text);
        let error = reply.error();
        assert_eq!(error["code"], "no_route");
        assert!(error["message"].as_str().unwrap().contains("india_only"), "{error}");
    }
    let reply = app.post_json("/v1/route/explain", &india_only(user_chat("res/offshore", "x"))).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(app.calls(), [("off", 0), ("in1", 0), ("in2", 0)]);
}

#[tokio::test]
async fn the_indian_route_failing_is_a_502_never_an_offshore_call_even_after_its_breaker_opens() {
    let app = residency_app(Options { routing: "breaker_threshold = 2".into(), ..Options::default() }).await;
    app.upstream("in1").set_scenario(failing(503));
    // Several rounds: the breaker of in1 opens along the way; open routes are still only Indian.
    for round in 0..3 {
        for body in both("res/mixed", "must stay") {
            assert_all_failed(&app.post_chat(&body).await);
        }
        assert_eq!(app.upstream("in1").requests(), 2 * (round + 1));
    }
    assert_eq!(app.breaker("res/mixed", "in1/m-in1").await, "open");
    for status in [500, 502, 504] {
        app.upstream("in1").set_scenario(failing(status));
        assert_all_failed(&app.post_chat(&india_only(user_chat("res/mixed", "again"))).await);
    }
    // A malformed answer and a refused connection-like failure: still no offshore call.
    app.upstream("in1").set_scenario(Scenario { malformed: true, ..Scenario::default() });
    for body in both("res/mixed", "garbled") {
        assert_all_failed(&app.post_chat(&body).await);
    }
    assert_offshore_untouched(&app);
}

#[tokio::test]
async fn a_failing_indian_route_fails_over_to_the_next_indian_route_only() {
    let app = residency_app(Options::default()).await;
    app.upstream("in1").set_scenario(failing(503));
    for body in both("res/two-in", "next indian") {
        let reply = app.post_chat(&body).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.provider(), "in2");
        assert!(reply.route().contains("skipped=off/m-off:residency"), "{}", reply.route());
    }
    app.upstream("in2").set_scenario(failing(500));
    for body in both("res/two-in", "both down") {
        assert_all_failed(&app.post_chat(&body).await);
    }
    assert_offshore_untouched(&app);
}

#[tokio::test]
async fn a_rate_limited_indian_route_passes_the_429_on_rather_than_going_offshore() {
    let app = residency_app(Options::default()).await;
    app.upstream("in1").set_scenario(Scenario { retry_after_s: Some(5), ..failing(429) });
    for body in both("res/mixed", "slow down") {
        let reply = app.post_chat(&body).await;
        assert_eq!(reply.status, 429, "{}", reply.text);
        assert_eq!(reply.header("retry-after"), Some("5"));
    }
    assert_offshore_untouched(&app);
}

#[tokio::test]
async fn the_indian_route_timing_out_is_a_502_never_an_offshore_call() {
    let app = residency_app(Options { first_token_timeout_ms: 300, ..Options::default() }).await;
    app.upstream("in1").set_scenario(Scenario { delay_ms: 1_000, ..Scenario::default() });
    for body in both("res/mixed", "too slow") {
        let reply = app.post_chat(&body).await;
        assert_all_failed(&reply);
        assert!(reply.error()["message"].as_str().unwrap().contains("in1"), "{}", reply.text);
    }
    assert_offshore_untouched(&app);
}

#[tokio::test]
async fn the_indian_stream_cut_before_or_after_content_never_continues_offshore() {
    let app = residency_app(Options::default()).await;
    // Cut after content: the one error event, no [DONE], no switch.
    app.upstream("in1").set_scenario(Scenario { cut_after_chunks: Some(2), ..Scenario::default() });
    let reply = app.post_chat(&india_only(user_chat_stream("res/mixed", "cut me off mid sentence"))).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.provider(), "in1");
    let stream = Stream::parse(&reply);
    assert!(!stream.done, "{}", reply.text);
    assert!(stream.last().get("error").is_some(), "{}", reply.text);
    assert_eq!(app.record(reply.header("x-generation-id").unwrap()).await.status, "error_midstream");

    // Cut before content: that failure may fail over, but only to Indian routes — none left.
    app.upstream("in1").set_scenario(Scenario { cut_after_chunks: Some(0), ..Scenario::default() });
    assert_all_failed(&app.post_chat(&india_only(user_chat_stream("res/mixed", "cut at once"))).await);
    // With a second Indian route, the stream is served there, invisibly.
    let reply = app.post_chat(&india_only(user_chat_stream("res/two-in", "cut at once"))).await;
    assert_eq!(reply.provider(), "in2");
    let stream = Stream::parse(&reply);
    assert_eq!(stream.content(), mock_reply("cut at once"));
    stream.assert_usage_then_done();
    assert_offshore_untouched(&app);
}

#[tokio::test]
async fn fallbacks_and_models_naming_offshore_models_are_filtered_too() {
    let app = residency_app(Options::default()).await;
    app.upstream("in1").set_scenario(failing(503));
    let routed = [
        ("fallbacks", json!([{ "model": "res/offshore" }])),
        ("fallbacks", json!([{ "model": "res/mixed", "provider": "off" }])),
        ("fallbacks", json!([{ "model": "res/offshore", "provider": "off" }, { "model": "res/mixed" }])),
        ("models", json!(["res/offshore"])),
        ("models", json!(["res/offshore", "res/mixed"])),
    ];
    for (key, value) in routed {
        for body in both("res/mixed", "fall back home") {
            let reply = app.post_chat(&with(body, key, value.clone())).await;
            assert_all_failed(&reply);
        }
        let plan = app.post_json("/v1/route/explain", &with(india_only(user_chat("res/mixed", "x")), key, value)).await.json();
        let regions: Vec<&str> = plan["candidates"].as_array().unwrap().iter().map(|c| c["region"].as_str().unwrap()).collect();
        assert!(regions.iter().all(|r| *r == "IN"), "{plan}");
    }
    // An offshore-only model may fall back to an Indian route: that is not a leak.
    app.upstream("in1").set_scenario(Scenario::default());
    let body = with(india_only(user_chat("res/offshore", "home via fallback")), "fallbacks", json!([{ "model": "res/mixed" }]));
    let reply = app.post_chat(&body).await;
    assert_served(&reply, "res/mixed", "in1");
    assert_offshore_untouched(&app);
}

#[tokio::test]
async fn a_saved_chain_pointing_offshore_is_filtered_too() {
    let app = residency_app(Options::default()).await;
    let saved = app.put_json("/me/routing/res/mixed", &json!([{ "model": "res/offshore" }])).await;
    assert_eq!(saved.status, 200, "{}", saved.text);
    app.upstream("in1").set_scenario(failing(503));
    for body in both("res/mixed", "chain home") {
        assert_all_failed(&app.post_chat(&body).await);
    }
    assert_offshore_untouched(&app);
    // The chain is live: without the policy it does lead offshore.
    let reply = app.post_chat(&user_chat("res/mixed", "anywhere")).await;
    assert_served(&reply, "res/mixed", "off");
    assert_eq!(app.upstream("off").requests(), 1);
}

#[tokio::test]
async fn pinning_or_preferring_an_offshore_provider_cannot_override_residency() {
    let app = residency_app(Options::default()).await;
    for body in both("res/mixed", "pinned abroad") {
        let reply = app.post_chat(&with(body, "provider", json!("off"))).await;
        assert_eq!(reply.status, 400, "{}", reply.text);
        assert_eq!(reply.error()["code"], "no_route");
    }
    let reply = app.post_chat(&with(india_only(user_chat("res/mixed", "x")), "provider", json!({ "only": ["off"] }))).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    let reply = app.post_chat(&with(india_only(user_chat("res/mixed", "x")), "provider", json!({ "order": ["off", "in1"] }))).await;
    assert_served(&reply, "res/mixed", "in1");
    let reply = app.post_chat(&with(india_only(user_chat("res/mixed", "x")), "optimize", json!("price"))).await;
    assert_served(&reply, "res/mixed", "in1");
    assert_offshore_untouched(&app);
}
