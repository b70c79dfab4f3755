//! Route health end to end: circuit breakers (closed → open → half-open → closed/open) as
//! `/health`, `/metrics`, explain and the routing order show them; 429 `retry-after` parking;
//! the retry budget in a full outage. The clock is real (the server runs on its own), so the
//! cooldown is 1 s; `routing::health`'s unit tests drive the clock precisely.

use std::time::Duration;

use mock_upstream::Scenario;
use serde_json::{json, Value};

use crate::helpers::{assert_served, failing, provider, route, spawn_app_with, user_chat, Options, Reply, TestApp};

/// `model` served by `a` (cheaper, first) then `b`, with breakers opening after 2 faults for 1 s.
async fn breaker_app(model: &str) -> TestApp {
    let extra = format!(
        "\n[models.\"{model}\"]\nroutes = [{}, {}]\n",
        route("a", "m-a", "1", "1", "USD"),
        route("b", "m-b", "2", "2", "USD")
    );
    spawn_app_with(Options {
        routing: "breaker_threshold = 2\nbreaker_cooldown_s = 1".into(),
        providers: vec![provider("a", "US"), provider("b", "US")],
        extra_toml: extra,
        ..Options::default()
    })
    .await
}

/// A chat request in the config's order, so that only health (not price or failure rate)
/// can move a route.
fn ordered(model: &str, text: &str) -> serde_json::Value {
    let mut body = user_chat(model, text);
    body["optimize"] = json!("ordered");
    body
}

async fn breaker_metric(app: &TestApp, model: &str, route: &str) -> f64 {
    app.metric("marga_breaker_state", &[("model", model), ("route", route)])
        .await
        .unwrap_or_else(|| panic!("no marga_breaker_state sample for {model} {route}"))
}

async fn served_by(app: &TestApp, body: &Value, model: &str, provider: &str) -> Reply {
    let reply = app.post_chat(body).await;
    assert_served(&reply, model, provider);
    reply
}

/// Fails `a` twice: its breaker opens.
async fn open_a(app: &TestApp, model: &str) {
    app.upstream("a").set_scenario(failing(503));
    let reply = served_by(app, &ordered(model, "one"), model, "b").await;
    assert_eq!(reply.route(), "strategy=ordered; route=b/m-b; failed=a/m-a:server");
    assert_eq!(app.breaker(model, "a/m-a").await, "closed", "one fault is below the threshold");
    served_by(app, &ordered(model, "two"), model, "b").await;
    assert_eq!(app.breaker(model, "a/m-a").await, "open");
    assert_eq!(app.calls(), [("a", 2), ("b", 2)]);
}

#[tokio::test]
async fn two_faults_open_the_breaker_and_a_successful_probe_after_the_cooldown_closes_it() {
    let model = "brk/probe-closes";
    let app = breaker_app(model).await;
    open_a(&app, model).await;
    assert_eq!(breaker_metric(&app, model, "a/m-a").await, 2.0);
    assert_eq!(breaker_metric(&app, model, "b/m-b").await, 0.0);
    assert_eq!(app.breaker(model, "b/m-b").await, "closed");

    // Open: `b` first, and `a` gets nothing while `b` answers.
    for _ in 0..3 {
        let reply = served_by(&app, &ordered(model, "while open"), model, "b").await;
        assert_eq!(reply.route(), "strategy=ordered; route=b/m-b");
    }
    assert_eq!(app.upstream("a").requests(), 2);
    let plan = app.post_json("/v1/route/explain", &ordered(model, "x")).await.json();
    let order: Vec<(&str, &str)> = plan["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["route"].as_str().unwrap(), c["health"]["breaker"].as_str().unwrap()))
        .collect();
    assert_eq!(order, [("b/m-b", "closed"), ("a/m-a", "open")], "an open route is last, not dropped");

    // After the cooldown: half-open, and the next request probes `a`.
    app.upstream("a").set_scenario(Scenario::default());
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(app.breaker(model, "a/m-a").await, "half_open");
    assert_eq!(breaker_metric(&app, model, "a/m-a").await, 1.0);
    let reply = served_by(&app, &ordered(model, "probe"), model, "a").await;
    assert_eq!(reply.route(), "strategy=ordered; route=a/m-a");
    assert_eq!(app.breaker(model, "a/m-a").await, "closed", "a successful probe closes the breaker");
    assert_eq!(breaker_metric(&app, model, "a/m-a").await, 0.0);
    served_by(&app, &ordered(model, "closed again"), model, "a").await;
    assert_eq!(app.calls(), [("a", 4), ("b", 5)]);
}

#[tokio::test]
async fn a_failed_probe_opens_the_breaker_again() {
    let model = "brk/probe-fails";
    let app = breaker_app(model).await;
    open_a(&app, model).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(app.breaker(model, "a/m-a").await, "half_open");
    let reply = served_by(&app, &ordered(model, "probe"), model, "b").await;
    assert_eq!(reply.route(), "strategy=ordered; route=b/m-b; failed=a/m-a:server");
    assert_eq!(app.breaker(model, "a/m-a").await, "open", "the failed probe reopens it");
    assert_eq!(breaker_metric(&app, model, "a/m-a").await, 2.0);
    served_by(&app, &ordered(model, "reopened"), model, "b").await;
    assert_eq!(app.calls(), [("a", 3), ("b", 4)]);
}

#[tokio::test]
async fn an_open_route_is_tried_last_when_every_healthy_route_fails() {
    let model = "brk/last-resort";
    let app = breaker_app(model).await;
    open_a(&app, model).await;
    // `a` has recovered but its breaker is still open; `b` now fails.
    app.upstream("a").set_scenario(Scenario::default());
    app.upstream("b").set_scenario(failing(500));
    let reply = served_by(&app, &ordered(model, "last resort"), model, "a").await;
    assert_eq!(reply.route(), "strategy=ordered; route=a/m-a; failed=b/m-b:server");
    assert_eq!(app.breaker(model, "a/m-a").await, "closed", "a success closes it");
}

#[tokio::test]
async fn provider_order_does_not_put_an_open_route_first() {
    let model = "brk/order";
    let app = breaker_app(model).await;
    open_a(&app, model).await;
    let mut body = user_chat(model, "a first please");
    body["provider"] = json!({ "order": ["a", "b"] });
    let reply = served_by(&app, &body, model, "b").await;
    assert_eq!(reply.route(), "strategy=balanced; route=b/m-b");
    assert_eq!(app.upstream("a").requests(), 2, "the open route was not tried first");
    // Pinned, it is the only candidate: tried (and failing) rather than refused.
    let mut pinned = user_chat(model, "only a");
    pinned["provider"] = json!("a");
    let reply = app.post_chat(&pinned).await;
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert_eq!(app.upstream("a").requests(), 3);
}

#[tokio::test]
async fn a_429_with_retry_after_parks_the_route_until_then_without_opening_its_breaker() {
    let model = "brk/parked";
    let app = breaker_app(model).await;
    app.upstream("a").set_scenario(Scenario { fail_first: 1, retry_after_s: Some(1), ..failing(429) });
    let reply = served_by(&app, &ordered(model, "limited"), model, "b").await;
    assert_eq!(reply.route(), "strategy=ordered; route=b/m-b; failed=a/m-a:rate_limited");
    assert_eq!(app.breaker(model, "a/m-a").await, "closed", "a 429 is not a fault");

    // Parked: tried after the healthy route while the retry-after lasts.
    let reply = served_by(&app, &ordered(model, "parked"), model, "b").await;
    assert_eq!(reply.route(), "strategy=ordered; route=b/m-b");
    let plan = app.post_json("/v1/route/explain", &ordered(model, "x")).await.json();
    assert_eq!(plan["candidates"][1]["route"], "a/m-a");
    assert_eq!(plan["candidates"][1]["health"]["deferred"], true);
    assert_eq!(app.calls(), [("a", 1), ("b", 2)]);

    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let reply = served_by(&app, &ordered(model, "rested"), model, "a").await;
    assert_eq!(reply.route(), "strategy=ordered; route=a/m-a");
    assert_eq!(app.calls(), [("a", 2), ("b", 2)]);
}

#[tokio::test]
async fn the_retry_budget_keeps_a_full_outage_from_multiplying_traffic() {
    let routes: Vec<String> =
        ["p1", "p2", "p3"].iter().enumerate().map(|(i, p)| route(p, "m", &format!("{}", i + 1), "1", "USD")).collect();
    let app = spawn_app_with(Options {
        routing: "retry_budget_percent = 20\nretry_budget_min_per_s = 1".into(),
        providers: vec![provider("p1", "US"), provider("p2", "US"), provider("p3", "US")],
        extra_toml: format!("\n[models.\"brk/outage\"]\nroutes = [{}]\n", routes.join(", ")),
        ..Options::default()
    })
    .await;
    for (_, mock) in &app.upstreams {
        mock.set_scenario(failing(503));
    }
    const REQUESTS: u64 = 50;
    let bodies: Vec<Value> = (0..REQUESTS).map(|i| user_chat("brk/outage", &format!("outage {i}"))).collect();
    let replies = futures::future::join_all(bodies.iter().map(|body| app.post_chat(body))).await;
    for reply in &replies {
        assert_eq!(reply.status, 502, "{}", reply.text);
        assert_eq!(reply.error()["code"], "all_routes_failed");
    }
    let upstream: u64 = app.calls().iter().map(|(_, n)| n).sum();
    // First attempts, plus at most 20% of them, plus the floor over the 10 s window (1/s × 10).
    let bound = REQUESTS + REQUESTS * 20 / 100 + 10;
    assert!(upstream >= REQUESTS, "every request made its first attempt: {upstream}");
    assert!(upstream <= bound, "{upstream} upstream calls for {REQUESTS} requests (bound {bound})");
    assert!(upstream > REQUESTS, "the floor still allows some retries: {upstream}");
    assert!(upstream < REQUESTS * 3 / 2, "far below the {} calls of unbudgeted retries", REQUESTS * 3);
    let exhausted = app.metric("marga_retry_budget_exhausted_total", &[]).await.unwrap_or(0.0);
    assert!(exhausted >= 1.0, "the exhaustion is counted");
}
