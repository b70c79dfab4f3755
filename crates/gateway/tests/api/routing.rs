//! Route planning end to end: strategies (`optimize`, `provider.sort`, `:floor`, `:nitro`,
//! the configured default), the `provider` controls, data-policy filters, `x-br-route`,
//! `POST /v1/route/explain`, `GET /v1/providers`, exploration of unmeasured routes, and the
//! timeouts (including a total timeout that cuts a stream already relaying). Each provider is
//! a mock of its own, so which provider served is which mock counted the request.

use std::time::{Duration, Instant};

use mock_upstream::Scenario;
use serde_json::{json, Value};

use crate::helpers::{
    assert_served, attempts, decimal, failing, mock_reply, provider, route, spawn_app_with, user_chat, user_chat_stream,
    Options, ProviderSpec, Reply, Stream, TestApp,
};

/// Three US providers `a`, `b`, `c`.
fn abc() -> Vec<ProviderSpec> {
    vec![provider("a", "US"), provider("b", "US"), provider("c", "US")]
}

/// `[models."<id>"]` with the given inline routes.
fn model(id: &str, routes: &[String]) -> String {
    format!("\n[models.\"{id}\"]\nroutes = [{}]\n", routes.join(", "))
}

/// The `strategy=…; route=…` head of `x-br-route`.
fn strategy_and_route(reply: &Reply) -> String {
    reply.route().split("; ").take(2).collect::<Vec<_>>().join("; ")
}

fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

/// `rt/price`: `b` costs 1 + 2 USD, `a` 100 + 100 INR — written first `b`, then `a`.
async fn price_app(inr_per_usd: &str) -> TestApp {
    let models = model(
        "rt/price",
        &[route("b", "m-b", "1", "2", "USD"), route("a", "m-a", "100", "100", "INR"), route("c", "m-c", "5", "5", "USD")],
    );
    spawn_app_with(Options {
        routing: "default_strategy = \"ordered\"".into(),
        providers: abc(),
        extra_toml: format!("{models}\n[fx]\ninr_per_usd = \"{inr_per_usd}\"\nas_of = \"2026-01-01\"\n"),
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn optimize_price_compares_prices_in_one_currency_at_the_fx_rate() {
    let (app, dearer_rupee) = tokio::join!(price_app("100"), price_app("50"));

    // The configured default is `ordered`: the config's first route.
    let reply = app.post_chat(&user_chat("rt/price", "no strategy named")).await;
    assert_served(&reply, "rt/price", "b");
    assert_eq!(strategy_and_route(&reply), "strategy=ordered; route=b/m-b");

    // At 100 INR/USD, `a` costs 2 USD against `b`'s 3: cheapest first, though its numbers are bigger.
    let reply = app.post_chat(&with(user_chat("rt/price", "cheapest"), "optimize", json!("price"))).await;
    assert_served(&reply, "rt/price", "a");
    assert_eq!(strategy_and_route(&reply), "strategy=price; route=a/m-a");
    assert_eq!(app.calls(), [("a", 1), ("b", 1), ("c", 0)]);

    // At 50 INR/USD the same rupee prices are 4 USD: `b` is cheaper.
    let reply = dearer_rupee.post_chat(&with(user_chat("rt/price", "cheapest"), "optimize", json!("price"))).await;
    assert_served(&reply, "rt/price", "b");
    assert_eq!(strategy_and_route(&reply), "strategy=price; route=b/m-b");
    assert_eq!(dearer_rupee.calls(), [("a", 0), ("b", 1), ("c", 0)]);
}

#[tokio::test]
async fn provider_sort_and_the_floor_suffix_rank_by_price() {
    let app = price_app("100").await;
    for sort in [json!("price"), json!({ "by": "price" })] {
        let reply = app.post_chat(&with(user_chat("rt/price", "sorted"), "provider", json!({ "sort": sort }))).await;
        assert_served(&reply, "rt/price", "a");
        assert_eq!(strategy_and_route(&reply), "strategy=price; route=a/m-a", "sort {sort}");
    }
    let reply = app.post_chat(&user_chat("rt/price:floor", "floor")).await;
    assert_served(&reply, "rt/price", "a");
    assert_eq!(strategy_and_route(&reply), "strategy=price; route=a/m-a");
    assert_eq!(reply.header("x-br-model"), Some("rt/price"));
    // The price ranking covers the whole list: `c` (10 USD) is the last candidate.
    let explained = app.post_json("/v1/route/explain", &user_chat("rt/price:floor", "x")).await.json();
    let order: Vec<&str> = explained["candidates"].as_array().unwrap().iter().map(|c| c["route"].as_str().unwrap()).collect();
    assert_eq!(order, ["a/m-a", "b/m-b", "c/m-c"]);
    assert_eq!(app.calls(), [("a", 3), ("b", 0), ("c", 0)]);
}

/// `rt/speed` with `a` first in the config (and cheaper), `b` second.
async fn speed_app() -> TestApp {
    let models = model("rt/speed", &[route("a", "m-a", "1", "1", "USD"), route("b", "m-b", "2", "2", "USD")]);
    spawn_app_with(Options { providers: abc(), extra_toml: models, ..Options::default() }).await
}

#[tokio::test]
async fn optimize_latency_picks_the_route_measured_faster() {
    let app = speed_app().await;
    app.upstream("a").set_scenario(Scenario { delay_ms: 60, ..Scenario::default() });
    // Warm up: each route measured twice (pinned).
    for pin in ["a", "b", "a", "b"] {
        let reply = app.post_chat(&with(user_chat("rt/speed", "warm up"), "provider", json!(pin))).await;
        assert_served(&reply, "rt/speed", pin);
    }
    let reply = app.post_chat(&with(user_chat("rt/speed", "fastest"), "optimize", json!("latency"))).await;
    assert_served(&reply, "rt/speed", "b");
    assert_eq!(strategy_and_route(&reply), "strategy=latency; route=b/m-b");
    // Without a strategy, balanced ranks by price: `a`.
    let reply = app.post_chat(&user_chat("rt/speed", "cheapest")).await;
    assert_served(&reply, "rt/speed", "a");
    assert_eq!(strategy_and_route(&reply), "strategy=balanced; route=a/m-a");
    assert_eq!(app.calls(), [("a", 3), ("b", 3), ("c", 0)]);
}

#[tokio::test]
async fn nitro_and_optimize_throughput_pick_the_route_streaming_faster() {
    let app = speed_app().await;
    app.upstream("a").set_scenario(Scenario { chunk_delay_ms: 15, ..Scenario::default() });
    for pin in ["a", "b", "a", "b"] {
        let body = with(user_chat_stream("rt/speed", "warm up the stream with a few words"), "provider", json!(pin));
        let reply = app.post_chat(&body).await;
        assert_eq!(reply.provider(), pin);
        Stream::parse(&reply).assert_usage_then_done();
    }
    let reply = app.post_chat(&user_chat_stream("rt/speed:nitro", "fast please")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.provider(), "b");
    assert_eq!(strategy_and_route(&reply), "strategy=throughput; route=b/m-b");
    assert_eq!(Stream::parse(&reply).content(), mock_reply("fast please"));

    let reply = app.post_chat(&with(user_chat("rt/speed", "fast please"), "optimize", json!("throughput"))).await;
    assert_served(&reply, "rt/speed", "b");
    assert_eq!(strategy_and_route(&reply), "strategy=throughput; route=b/m-b");
    assert_eq!(app.calls(), [("a", 2), ("b", 4), ("c", 0)]);
}

#[tokio::test]
async fn uptime_and_the_balanced_default_move_a_route_that_failed_behind_a_healthy_one() {
    let app = speed_app().await;
    app.upstream("a").set_scenario(Scenario { fail_first: 1, fail_status: 503, ..Scenario::default() });
    let reply = app.post_chat(&user_chat("rt/speed", "first")).await;
    assert_served(&reply, "rt/speed", "b");
    assert_eq!(reply.route(), "strategy=balanced; route=b/m-b; failed=a/m-a:server");

    // `a` failed once (failure rate 0.2): balanced weighs its price ×3 — 6 against `b`'s 4.
    let reply = app.post_chat(&user_chat("rt/speed", "balanced")).await;
    assert_served(&reply, "rt/speed", "b");
    assert_eq!(reply.route(), "strategy=balanced; route=b/m-b");
    let reply = app.post_chat(&with(user_chat("rt/speed", "uptime"), "optimize", json!("uptime"))).await;
    assert_served(&reply, "rt/speed", "b");
    assert_eq!(strategy_and_route(&reply), "strategy=uptime; route=b/m-b");
    assert_eq!(app.upstream("a").requests(), 1, "the failed route was not tried again while `b` is healthy");

    // Price alone still puts `a` first (and it has recovered).
    let reply = app.post_chat(&with(user_chat("rt/speed", "price"), "optimize", json!("price"))).await;
    assert_served(&reply, "rt/speed", "a");
    assert_eq!(app.calls(), [("a", 2), ("b", 3), ("c", 0)]);
}

/// `rt/abc`: routes `a`, `b`, `c` at rising prices, in that order.
async fn abc_app() -> TestApp {
    let models = model(
        "rt/abc",
        &[route("a", "m-a", "1", "1", "USD"), route("b", "m-b", "2", "2", "USD"), route("c", "m-c", "3", "3", "USD")],
    );
    spawn_app_with(Options { providers: abc(), extra_toml: models, ..Options::default() }).await
}

#[tokio::test]
async fn provider_order_only_ignore_and_pin_choose_and_explain_the_routes() {
    let app = abc_app().await;
    let ask = |provider: Value| with(user_chat("rt/abc", "which one"), "provider", provider);

    let reply = app.post_chat(&ask(json!({ "order": ["c", "b"] }))).await;
    assert_served(&reply, "rt/abc", "c");
    let explained = app.post_json("/v1/route/explain", &ask(json!({ "order": ["c", "b"] }))).await.json();
    let order: Vec<&str> = explained["candidates"].as_array().unwrap().iter().map(|c| c["route"].as_str().unwrap()).collect();
    assert_eq!(order, ["c/m-c", "b/m-b", "a/m-a"], "named first in order, then the rest");

    let reply = app.post_chat(&ask(json!({ "only": ["b"] }))).await;
    assert_served(&reply, "rt/abc", "b");
    assert_eq!(reply.route(), "strategy=balanced; route=b/m-b; skipped=a/m-a:not_in_only,c/m-c:not_in_only");

    let reply = app.post_chat(&ask(json!({ "ignore": ["a"] }))).await;
    assert_served(&reply, "rt/abc", "b");
    assert_eq!(reply.route(), "strategy=balanced; route=b/m-b; skipped=a/m-a:ignored");

    let reply = app.post_chat(&ask(json!("c"))).await;
    assert_served(&reply, "rt/abc", "c");
    assert_eq!(reply.route(), "strategy=balanced; route=c/m-c; skipped=a/m-a:not_pinned,b/m-b:not_pinned");

    let reply = app.post_chat(&ask(json!({ "only": ["a"], "ignore": ["a"] }))).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.error()["code"], "no_route");
    assert_eq!(app.calls(), [("a", 0), ("b", 2), ("c", 2)]);
}

#[tokio::test]
async fn allow_fallbacks_false_makes_a_single_attempt() {
    let app = abc_app().await;
    app.upstream("a").set_scenario(failing(503));
    let reply = app.post_chat(&with(user_chat("rt/abc", "once"), "provider", json!({ "allow_fallbacks": false }))).await;
    assert_eq!(reply.status, 502, "{}", reply.text);
    let error = reply.error();
    assert_eq!(error["code"], "all_routes_failed");
    assert!(error["message"].as_str().unwrap().contains("mock-upstream injected failure (503)"), "{error}");
    assert_eq!(app.calls(), [("a", 1), ("b", 0), ("c", 0)]);

    // `a` failed once: balanced now ranks `b` first (see the uptime test); the rest is dropped.
    let explained = app
        .post_json("/v1/route/explain", &with(user_chat("rt/abc", "x"), "provider", json!({ "allow_fallbacks": false })))
        .await
        .json();
    let candidates: Vec<&str> = explained["candidates"].as_array().unwrap().iter().map(|c| c["route"].as_str().unwrap()).collect();
    assert_eq!(candidates, ["b/m-b"], "{explained}");
    assert_eq!(
        explained["skipped"],
        json!([{ "route": "a/m-a", "reason": "fallbacks_disabled" }, { "route": "c/m-c", "reason": "fallbacks_disabled" }])
    );

    // Allowed to fall back, the same request in config order fails over to `b`.
    let reply = app.post_chat(&with(user_chat("rt/abc", "again"), "optimize", json!("ordered"))).await;
    assert_served(&reply, "rt/abc", "b");
    assert_eq!(reply.route(), "strategy=ordered; route=b/m-b; failed=a/m-a:server");
    assert_eq!(app.calls(), [("a", 2), ("b", 1), ("c", 0)]);
}

#[tokio::test]
async fn max_price_skips_routes_over_the_cap_in_usd() {
    let models = model(
        "rt/capped",
        &[
            route("a", "m-a", "5", "1", "USD"),
            route("c", "m-c", "300", "10", "INR"),
            route("b", "m-b", "1.5", "1", "USD"),
        ],
    );
    let app = spawn_app_with(Options {
        providers: abc(),
        extra_toml: format!("{models}\n[fx]\ninr_per_usd = \"100\"\nas_of = \"2026-01-01\"\n"),
        ..Options::default()
    })
    .await;
    let body = with(user_chat("rt/capped", "cheap only"), "provider", json!({ "max_price": { "prompt": 2 } }));
    let reply = app.post_chat(&body).await;
    assert_served(&reply, "rt/capped", "b");
    // `c` costs 300 INR = 3 USD per million prompt tokens: over the cap as well.
    assert_eq!(reply.route(), "strategy=balanced; route=b/m-b; skipped=a/m-a:price_cap,c/m-c:price_cap");

    let body = with(user_chat("rt/capped", "x"), "provider", json!({ "max_price": { "prompt": "0.5", "completion": 9 } }));
    let reply = app.post_chat(&body).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.error()["code"], "no_route");

    let body = with(user_chat("rt/capped", "x"), "provider", json!({ "max_price": { "prompt": "cheap" } }));
    let reply = app.post_chat(&body).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.error()["param"], "provider.max_price.prompt");
    assert_eq!(app.calls(), [("a", 0), ("b", 1), ("c", 0)]);
}

#[tokio::test]
async fn zdr_and_no_training_filter_routes_by_provider_metadata() {
    let providers = vec![provider("trainer", "US").trains_on_data(), provider("plain", "US"), provider("zero", "US").zdr()];
    let models = model(
        "rt/data",
        &[
            route("trainer", "m-t", "1", "1", "USD"),
            route("plain", "m-p", "2", "2", "USD"),
            route("zero", "m-z", "3", "3", "USD"),
        ],
    ) + &model("rt/trainer-only", &[route("trainer", "m-t", "1", "1", "USD")]);
    let app = spawn_app_with(Options { providers, extra_toml: models, ..Options::default() }).await;
    let ask = |key: &str, value: Value| with(user_chat("rt/data", "private"), key, value);

    for body in [ask("data_policy", json!("zdr")), ask("provider", json!({ "zdr": true }))] {
        let reply = app.post_chat(&body).await;
        assert_served(&reply, "rt/data", "zero");
        assert_eq!(reply.route(), "strategy=balanced; route=zero/m-z; skipped=trainer/m-t:zdr,plain/m-p:zdr");
    }
    for body in [ask("data_policy", json!("no_training")), ask("provider", json!({ "data_collection": "deny" }))] {
        let reply = app.post_chat(&body).await;
        assert_served(&reply, "rt/data", "plain");
        assert_eq!(reply.route(), "strategy=balanced; route=plain/m-p; skipped=trainer/m-t:trains_on_data");
    }
    let reply = app.post_chat(&ask("provider", json!({ "data_collection": "allow" }))).await;
    assert_served(&reply, "rt/data", "trainer");

    let reply = app.post_chat(&with(user_chat("rt/trainer-only", "x"), "data_policy", json!(["no_training"]))).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.error()["code"], "no_route");
    assert_eq!(app.calls(), [("trainer", 1), ("plain", 2), ("zero", 2)]);
}

#[tokio::test]
async fn explain_returns_the_full_plan_without_calling_any_provider() {
    let app = abc_app().await;
    let body = json!({
        "model": "rt/abc",
        "messages": [{ "role": "user", "content": "explain" }],
        "optimize": "price",
        "provider": { "ignore": ["b"] },
        "fallbacks": [{ "model": "test/openai-chat" }],
    });
    for base in ["/v1", "/api/v1"] {
        let reply = app.post_json(&format!("{base}/route/explain"), &body).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let plan = reply.json();
        assert_eq!(plan["model"], "rt/abc");
        assert_eq!(plan["strategy"], "price");
        let candidates = plan["candidates"].as_array().unwrap();
        let order: Vec<(&str, &str)> =
            candidates.iter().map(|c| (c["model"].as_str().unwrap(), c["route"].as_str().unwrap())).collect();
        assert_eq!(order, [("rt/abc", "a/m-a"), ("rt/abc", "c/m-c"), ("test/openai-chat", "openai-main/gpt-mock")]);
        let first = &candidates[0];
        assert_eq!(first["provider"], "a");
        assert_eq!(first["region"], "US");
        assert_eq!(first["health"]["breaker"], "closed");
        assert_eq!(first["health"]["deferred"], false);
        assert_eq!(first["price"]["combined_usd_per_mtok"], "2");
        assert_eq!(plan["skipped"], json!([{ "route": "b/m-b", "reason": "ignored" }]));
    }
    // A body without messages is fine: only the model and the routing controls matter.
    let reply = app.post_json("/v1/route/explain", &json!({ "model": "rt/abc" })).await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    let reply = app.post_json("/v1/route/explain", &json!({ "model": "rt/nope" })).await;
    assert_eq!(reply.status, 404, "{}", reply.text);
    assert_eq!(reply.error()["code"], "model_not_found");

    let reply = app.post_json("/v1/route/explain", &json!({ "model": "rt/abc", "optimize": "vibes" })).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.error()["param"], "optimize");
    let reply = app.post_json("/v1/route/explain", &json!({ "model": "rt/abc", "provider": { "sort": "vibes" } })).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.error()["param"], "provider.sort");

    let reply = app.post_json("/v1/route/explain", &json!({ "model": "rt/abc", "data_policy": "india_only" })).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.error()["code"], "no_route");

    let unauthenticated = app.client.post(app.url("/v1/route/explain")).json(&body).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    assert_eq!(app.calls(), [("a", 0), ("b", 0), ("c", 0)]);
    assert_eq!((app.mock.requests(), app.backup.requests()), (0, 0));
}

#[tokio::test]
async fn a_bad_strategy_on_a_chat_request_is_a_400_naming_it_and_calls_nothing() {
    let app = abc_app().await;
    let reply = app.post_chat(&with(user_chat("rt/abc", "x"), "optimize", json!("fastest-please"))).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    let error = reply.error();
    assert_eq!(error["param"], "optimize");
    assert!(error["message"].as_str().unwrap().contains("fastest-please"), "{error}");
    assert_eq!(app.calls(), [("a", 0), ("b", 0), ("c", 0)]);
}

#[tokio::test]
async fn providers_lists_region_zdr_and_the_health_of_each_route() {
    let providers = vec![provider("a", "US"), provider("home", "IN").zdr()];
    let models = model("rt/two", &[route("a", "m-a", "1", "1", "USD"), route("home", "m-h", "2000", "2000", "INR")]);
    let app = spawn_app_with(Options { providers, extra_toml: models, ..Options::default() }).await;
    app.upstream("a").set_scenario(Scenario { fail_first: 1, fail_status: 500, ..Scenario::default() });
    assert_served(&app.post_chat(&user_chat("rt/two", "x")).await, "rt/two", "home");

    for base in ["/v1", "/api/v1"] {
        let reply = app.get(&format!("{base}/providers")).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let body = reply.json();
        let data = body["data"].as_array().unwrap();
        let find = |id: &str| data.iter().find(|p| p["id"] == id).unwrap_or_else(|| panic!("no {id}: {body}")).clone();
        let home = find("home");
        assert_eq!((home["region"].as_str(), home["zdr"].as_bool()), (Some("IN"), Some(true)));
        assert_eq!(home["trains_on_data"], false);
        assert_eq!(home["routes"], json!([{ "model": "rt/two", "upstream_model": "m-h", "health": home["routes"][0]["health"] }]));
        assert_eq!(home["routes"][0]["health"]["successes"], 1);
        let a = find("a");
        assert_eq!((a["region"].as_str(), a["zdr"].as_bool()), (Some("US"), Some(false)));
        let route = &a["routes"][0];
        assert_eq!((route["model"].as_str(), route["health"]["breaker"].as_str()), (Some("rt/two"), Some("closed")));
        assert_eq!(route["health"]["failures"], 1);
        assert!(route["health"]["failure_rate"].as_f64().unwrap() > 0.0, "{route}");
        // The base config's providers are listed too.
        assert_eq!(find("backup")["region"], "IN");
    }
}

#[tokio::test]
async fn a_stream_silent_past_the_idle_timeout_ends_with_an_error_event_and_no_done() {
    let providers = vec![provider("a", "US"), provider("b", "US")];
    let models = model("rt/idle", &[route("a", "m-a", "1", "1", "USD"), route("b", "m-b", "2", "2", "USD")]);
    let app = spawn_app_with(Options {
        routing: "stream_idle_timeout_ms = 300".into(),
        providers,
        extra_toml: models,
        ..Options::default()
    })
    .await;
    app.upstream("a").set_scenario(Scenario { chunk_delay_ms: 1_000, ..Scenario::default() });
    let started = Instant::now();
    let reply = app.post_chat(&user_chat_stream("rt/idle", "a slow answer")).await;
    assert!(started.elapsed() < Duration::from_millis(1_900), "gave up at the idle timeout: {:?}", started.elapsed());
    assert_eq!(reply.status, 200);
    assert_eq!(reply.provider(), "a");
    let stream = Stream::parse(&reply);
    assert!(!stream.done, "no [DONE] after an idle timeout: {}", reply.text);
    assert_eq!(stream.content(), "Mock", "the first content chunk came through");
    let errors: Vec<&Value> = stream.chunks.iter().filter(|c| c.get("error").is_some()).collect();
    assert_eq!(errors.len(), 1, "{}", reply.text);
    let error = &stream.last()["error"];
    assert_eq!(error["code"], "stream_interrupted");
    assert!(error["message"].as_str().unwrap().contains("no chunk for 300ms"), "{error}");
    assert_eq!(app.upstream("b").requests(), 0, "no switch after content");
    let record = app.record(reply.header("x-generation-id").unwrap()).await;
    assert_eq!(record.status, "error_midstream");
    assert!(record.error.as_deref().unwrap().contains("interrupted"), "{:?}", record.error);
}

#[tokio::test]
async fn the_total_timeout_bounds_every_attempt_together() {
    let providers = vec![provider("a", "US"), provider("b", "US")];
    let models = model("rt/slow", &[route("a", "m-a", "1", "1", "USD"), route("b", "m-b", "2", "2", "USD")]);
    let app = spawn_app_with(Options {
        routing: "total_timeout_ms = 400".into(),
        providers,
        extra_toml: models,
        ..Options::default()
    })
    .await;
    for (_, mock) in &app.upstreams {
        mock.set_scenario(Scenario { delay_ms: 1_500, ..Scenario::default() });
    }
    let started = Instant::now();
    let reply = app.post_chat(&user_chat("rt/slow", "too slow")).await;
    assert!(started.elapsed() < Duration::from_millis(1_200), "stopped at the total timeout: {:?}", started.elapsed());
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert!(reply.error()["message"].as_str().unwrap().contains("timeout") || reply.text.contains("no answer within"), "{}", reply.text);
    assert_eq!(app.calls(), [("a", 1), ("b", 0)], "no time left for a second attempt");
}

#[tokio::test]
async fn the_first_token_timeout_fails_over_and_x_br_route_names_the_failure() {
    let providers = vec![provider("a", "US"), provider("b", "US")];
    let models = model("rt/ttft", &[route("a", "m-a", "1", "1", "USD"), route("b", "m-b", "2", "2", "USD")]);
    let app = spawn_app_with(Options {
        first_token_timeout_ms: 300,
        providers,
        extra_toml: models,
        ..Options::default()
    })
    .await;
    app.upstream("a").set_scenario(Scenario { delay_ms: 1_500, ..Scenario::default() });
    // `ordered`: after its first failure, balanced would no longer try `a` first.
    for body in [user_chat("rt/ttft", "late"), user_chat_stream("rt/ttft", "late")] {
        let started = Instant::now();
        let reply = app.post_chat(&with(body, "optimize", json!("ordered"))).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert!(started.elapsed() < Duration::from_millis(1_200));
        assert_eq!(reply.provider(), "b");
        assert_eq!(reply.route(), "strategy=ordered; route=b/m-b; failed=a/m-a:timeout");
        let record = app.record(reply.header("x-generation-id").unwrap()).await;
        assert_eq!(attempts(&record), [("a".to_owned(), "timeout".to_owned()), ("b".to_owned(), "success".to_owned())]);
    }
}

#[tokio::test]
async fn the_connect_timeout_fails_over_from_a_route_that_never_accepts() {
    // A listener with a full accept queue: the kernel drops further SYNs, so connecting hangs.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let _listener = socket.listen(0).unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        match tokio::time::timeout(Duration::from_millis(100), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            _ => break,
        }
    }
    let extra = format!(
        "\n[providers.hang]\nkind = \"openai\"\nbase_url = \"http://{addr}/v1\"\napi_key = \"k\"\nregion = \"US\"\n{}",
        model("rt/hang", &[route("hang", "m-h", "1", "1", "USD"), route("b", "m-b", "2", "2", "USD")])
    );
    let app = spawn_app_with(Options {
        first_token_timeout_ms: 5_000,
        routing: "connect_timeout_ms = 200".into(),
        providers: vec![provider("b", "US")],
        extra_toml: extra,
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let reply = app.post_chat(&user_chat("rt/hang", "anyone there")).await;
    assert_served(&reply, "rt/hang", "b");
    assert!(started.elapsed() < Duration::from_millis(2_000), "gave up at the connect timeout: {:?}", started.elapsed());
    let record = app.record(reply.header("x-generation-id").unwrap()).await;
    let tried = attempts(&record);
    assert_eq!(tried[0].0, "hang");
    assert!(["connect", "timeout"].contains(&tried[0].1.as_str()), "{tried:?}");
    // Given up at the connect timeout (200 ms), not the first-token timeout (5 s).
    let first: Value = serde_json::from_str::<Vec<Value>>(&record.attempts).unwrap().remove(0);
    let waited = first["latency_ms"].as_u64().unwrap();
    assert!((150..1_000).contains(&waited), "{first}");
}

#[tokio::test]
async fn latency_explores_a_route_without_recent_numbers_on_every_nth_request() {
    let models = model("rt/explore", &[route("a", "m-a", "1", "1", "USD"), route("b", "m-b", "2", "2", "USD")]);
    let app = spawn_app_with(Options {
        routing: "explore_every = 3".into(),
        providers: abc(),
        extra_toml: models,
        ..Options::default()
    })
    .await;
    // `b` answers more slowly: once measured, latency ranks it last.
    app.upstream("b").set_scenario(Scenario { delay_ms: 80, ..Scenario::default() });
    // `a` measured three times (pinned, balanced: such requests do not count for exploration).
    for _ in 0..3 {
        assert_served(&app.post_chat(&with(user_chat("rt/explore", "warm up"), "provider", json!("a"))).await, "rt/explore", "a");
    }
    let latency = || with(user_chat("rt/explore", "fastest"), "optimize", json!("latency"));
    let explained = app.post_json("/v1/route/explain", &latency()).await.json();
    let cold: Vec<(&str, bool)> = explained["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["route"].as_str().unwrap(), c["cold"].as_bool().unwrap()))
        .collect();
    assert_eq!(cold, [("a/m-a", false), ("b/m-b", true)], "explain flags the unmeasured route and does not count");

    let mut served = Vec::new();
    for i in 1..=12 {
        let reply = app.post_chat(&latency()).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let exploring = i % 3 == 0 && i < 12;
        let expected = if exploring { "strategy=latency; route=b/m-b; explored=b/m-b" } else { "strategy=latency; route=a/m-a" };
        assert_eq!(reply.route(), expected, "request {i}");
        served.push(reply.provider().to_owned());
    }
    // Every third request measures `b` until it has three recent samples; then it is ranked
    // by them (slower: last) and the 12th request has nothing left to explore.
    assert_eq!(served.join(""), "aabaabaabaaa");
    assert_eq!(app.calls(), [("a", 12), ("b", 3), ("c", 0)]);
    let explained = app.post_json("/v1/route/explain", &latency()).await.json();
    assert_eq!(explained["candidates"][1]["route"], "b/m-b");
    assert_eq!(explained["candidates"][1]["cold"], false, "{explained}");
}

#[tokio::test]
async fn the_total_timeout_cuts_a_stream_that_is_already_relaying() {
    let providers = vec![provider("a", "US"), provider("b", "US")];
    let models = model("rt/long", &[route("a", "m-a", "1", "1", "USD"), route("b", "m-b", "2", "2", "USD")]);
    let app = spawn_app_with(Options {
        routing: "total_timeout_ms = 600".into(),
        providers,
        extra_toml: models,
        ..Options::default()
    })
    .await;
    // One word every 150 ms: content starts at once, the whole answer would take ~2 s.
    app.upstream("a").set_scenario(Scenario { chunk_delay_ms: 150, ..Scenario::default() });
    let started = Instant::now();
    let reply = app.post_chat(&user_chat_stream("rt/long", "please write a long and slow answer for me")).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(550) && took < Duration::from_millis(1_300), "cut at the total timeout: {took:?}");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.provider(), "a");
    let stream = Stream::parse(&reply);
    assert!(!stream.done, "no [DONE] after the total timeout: {}", reply.text);
    let sent = stream.content();
    assert!(sent.starts_with("Mock") && sent.len() < mock_reply("please write a long and slow answer for me").len(), "{sent:?}");
    let errors: Vec<&Value> = stream.chunks.iter().filter(|c| c.get("error").is_some()).collect();
    assert_eq!(errors.len(), 1, "{}", reply.text);
    let error = &stream.last()["error"];
    assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("timeout_error"), Some("timeout")), "{error}");
    assert!(error["message"].as_str().unwrap().contains("timed out after 600ms"), "{error}");
    assert_eq!(error["metadata"]["provider_name"], "a");
    assert_eq!(app.upstream("b").requests(), 0, "no switch after content");

    // Recorded as a mid-stream error, what was sent billed, the failure counted.
    let record = app.record(reply.header("x-generation-id").unwrap()).await;
    assert_eq!(record.status, "error_midstream");
    assert!(record.error.as_deref().unwrap().contains("timed out"), "{:?}", record.error);
    assert!(record.usage_estimated);
    assert!(record.completion_tokens > 0, "what was sent is billed");
    assert!(decimal(&record.cost) > decimal("0"), "billed: {}", record.cost);
    let labels = [("model", "rt/long"), ("route", "a/m-a"), ("status", "error_midstream")];
    assert_eq!(app.metric("marga_requests_total", &labels).await, Some(1.0));
    let providers = app.get("/v1/providers").await.json();
    let a = providers["data"].as_array().unwrap().iter().find(|p| p["id"] == "a").unwrap().clone();
    assert_eq!(a["routes"][0]["health"]["failures"], 1, "{a}");
    // And the upstream request was cancelled, not left running.
    for _ in 0..50 {
        if app.upstream("a").streams_cancelled() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.upstream("a").streams_cancelled(), 1);
}
