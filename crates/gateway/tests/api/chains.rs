//! Saved fallback chains: `GET`/`PUT`/`DELETE /me/routing/{model}` (1–10 steps of
//! `{model, provider?}`), plain requests following them, per-request `fallbacks` overriding
//! them, their survival across a restart, and a route named twice by a chain being tried once.

use serde_json::{json, Value};

use crate::helpers::{assert_served, failing, provider, route, spawn_app_with, user_chat, user_chat_stream, Options, TestApp};

/// Providers `a`, `b`, `c`; models `ch/main` = a, `ch/second` = b, `ch/multi` = b, c,
/// `ch/third` = c.
async fn chain_app() -> TestApp {
    let extra = format!(
        r#"
[models."ch/main"]
routes = [{a}]

[models."ch/second"]
routes = [{b}]

[models."ch/multi"]
routes = [{b}, {c}]

[models."ch/third"]
routes = [{c}]
"#,
        a = route("a", "m-a", "1", "1", "USD"),
        b = route("b", "m-b", "1", "1", "USD"),
        c = route("c", "m-c", "2", "2", "USD"),
    );
    spawn_app_with(Options {
        providers: vec![provider("a", "US"), provider("b", "US"), provider("c", "US")],
        extra_toml: extra,
        ..Options::default()
    })
    .await
}

const MAIN: &str = "/me/routing/ch/main";

#[tokio::test]
async fn put_get_and_delete_a_chain() {
    let app = chain_app().await;
    assert_eq!(app.get(MAIN).await.status, 404, "no chain yet");

    let reply = app.put_json(MAIN, &json!([{ "model": "ch/second" }])).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json(), json!({ "model": "ch/main", "steps": [{ "model": "ch/second" }] }));
    let reply = app.get(MAIN).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["steps"], json!([{ "model": "ch/second" }]));

    // `{"steps": [...]}` (and `{"fallbacks": [...]}`) replace it.
    let steps = json!([{ "model": "ch/multi", "provider": "c" }, { "model": "ch/third" }]);
    let reply = app.put_json(MAIN, &json!({ "steps": steps })).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(app.get(MAIN).await.json()["steps"], steps);
    let reply = app.put_json(MAIN, &json!({ "fallbacks": [{ "model": "ch/third" }] })).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(app.get(MAIN).await.json()["steps"], json!([{ "model": "ch/third" }]));

    let reply = app.delete(MAIN).await;
    assert_eq!(reply.status, 204, "{}", reply.text);
    assert!(reply.text.is_empty());
    assert_eq!(app.get(MAIN).await.status, 404);
    let reply = app.delete(MAIN).await;
    assert_eq!(reply.status, 404, "{}", reply.text);
    reply.error();

    let anonymous = app.client.get(app.url(MAIN)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let anonymous = app.client.put(app.url(MAIN)).json(&json!([{ "model": "ch/second" }])).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(app.calls(), [("a", 0), ("b", 0), ("c", 0)]);
}

#[tokio::test]
async fn invalid_chains_are_refused_naming_the_step() {
    let app = chain_app().await;
    let step = json!({ "model": "ch/second" });
    let cases: [(Value, u16, &str); 7] = [
        (json!([]), 400, "steps"),
        (Value::Array(vec![step.clone(); 11]), 400, "steps"),
        (json!([{ "model": "ch/second" }, { "model": "ch/nope" }]), 404, "steps[1].model"),
        (json!([{ "model": "ch/second", "provider": "c" }]), 400, "steps[0].provider"),
        (json!([{ "model": "ch/second", "provider": "nope" }]), 400, "steps[0].provider"),
        (json!([{ "model": "test/openai-embed" }]), 400, "steps[0].model"),
        (json!([{ "provider": "b" }]), 400, ""),
    ];
    for (body, status, param) in cases {
        let reply = app.put_json(MAIN, &body).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.text);
        let error = reply.error();
        if !param.is_empty() {
            assert_eq!(error["param"], param, "{body}: {error}");
        }
        if status == 404 {
            assert_eq!(error["code"], "model_not_found");
        }
    }
    let reply = app.put_json("/me/routing/ch/nope", &json!([step])).await;
    assert_eq!(reply.status, 404, "{}", reply.text);
    assert_eq!(reply.error()["code"], "model_not_found");
    assert_eq!(app.get(MAIN).await.status, 404, "nothing was saved");

    let reply = app.put_json(MAIN, &Value::Array(vec![step; 10])).await;
    assert_eq!(reply.status, 200, "ten steps are fine: {}", reply.text);
}

#[tokio::test]
async fn plain_requests_follow_the_saved_chain() {
    let app = chain_app().await;
    let steps = json!([{ "model": "ch/multi", "provider": "c" }, { "model": "ch/second" }]);
    assert_eq!(app.put_json(MAIN, &steps).await.status, 200);
    app.upstream("a").set_scenario(failing(503));
    for body in [user_chat("ch/main", "follow the chain"), user_chat_stream("ch/main", "follow the chain")] {
        let reply = app.post_chat(&body).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.provider(), "c", "the first step, restricted to `c`");
        assert_eq!(reply.header("x-br-model"), Some("ch/multi"));
        assert!(reply.route().contains("failed=a/m-a:server"), "{}", reply.route());
        assert!(reply.route().contains("skipped=b/m-b:not_pinned"), "{}", reply.route());
    }
    assert_eq!(app.calls(), [("a", 2), ("b", 0), ("c", 2)]);

    // First step failing: the second serves.
    app.upstream("c").set_scenario(failing(500));
    let reply = app.post_chat(&user_chat("ch/main", "second step")).await;
    assert_served(&reply, "ch/second", "b");
    assert_eq!(app.calls(), [("a", 3), ("b", 1), ("c", 3)]);

    // Explain shows the chain as the plan.
    let plan = app.post_json("/v1/route/explain", &user_chat("ch/main", "x")).await.json();
    let order: Vec<&str> = plan["candidates"].as_array().unwrap().iter().map(|c| c["route"].as_str().unwrap()).collect();
    assert_eq!(order, ["a/m-a", "c/m-c", "b/m-b"], "{plan}");

    // The chain applies to its own model only.
    let reply = app.post_chat(&user_chat("ch/third", "not chained")).await;
    assert_eq!(reply.status, 502, "{}", reply.text);
}

#[tokio::test]
async fn a_per_request_fallbacks_overrides_the_saved_chain() {
    let app = chain_app().await;
    assert_eq!(app.put_json(MAIN, &json!([{ "model": "ch/second" }])).await.status, 200);
    app.upstream("a").set_scenario(failing(503));
    let mut body = user_chat("ch/main", "override");
    body["fallbacks"] = json!([{ "model": "ch/third" }]);
    let reply = app.post_chat(&body).await;
    assert_served(&reply, "ch/third", "c");
    assert_eq!(app.calls(), [("a", 1), ("b", 0), ("c", 1)], "the saved chain's `b` was not used");

    // OpenRouter's `models` comes after the chain, it does not replace it.
    let mut body = user_chat("ch/main", "models too");
    body["models"] = json!(["ch/third"]);
    let reply = app.post_chat(&body).await;
    assert_served(&reply, "ch/second", "b");
}

#[tokio::test]
async fn a_saved_chain_survives_a_restart() {
    let app = chain_app().await;
    let steps = json!([{ "model": "ch/multi", "provider": "c" }]);
    assert_eq!(app.put_json(MAIN, &steps).await.status, 200);
    let old_url = app.base_url.clone();
    let app = app.restart().await;
    assert_ne!(app.base_url, old_url, "a new server");
    let reply = app.get(MAIN).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["steps"], steps);
    app.upstream("a").set_scenario(failing(503));
    let reply = app.post_chat(&user_chat("ch/main", "after restart")).await;
    assert_served(&reply, "ch/multi", "c");

    // A deletion persists as well.
    assert_eq!(app.delete(MAIN).await.status, 204);
    let app = app.restart().await;
    assert_eq!(app.get(MAIN).await.status, 404);
}

#[tokio::test]
async fn a_route_named_again_by_fallbacks_is_tried_once_at_its_first_position() {
    let app = chain_app().await;
    app.upstream("a").set_scenario(failing(503));
    // `a/m-a` again (the requested model pinned to `a`), and `b/m-b` again through `ch/second`.
    let fallbacks = json!([{ "model": "ch/main", "provider": "a" }, { "model": "ch/multi" }, { "model": "ch/second" }]);
    for mut body in [user_chat("ch/main", "once each"), user_chat_stream("ch/main", "once each")] {
        body["fallbacks"] = fallbacks.clone();
        let reply = app.post_chat(&body).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!((reply.provider(), reply.header("x-br-model")), ("b", Some("ch/multi")));
        assert_eq!(reply.route(), "strategy=balanced; route=b/m-b; failed=a/m-a:server; skipped=a/m-a:duplicate,b/m-b:duplicate");
    }
    assert_eq!(app.calls(), [("a", 2), ("b", 2), ("c", 0)], "the failing `a` was not tried a second time");

    let mut body = user_chat("ch/main", "x");
    body["fallbacks"] = fallbacks;
    let plan = app.post_json("/v1/route/explain", &body).await.json();
    let order: Vec<(&str, &str)> = plan["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["model"].as_str().unwrap(), c["route"].as_str().unwrap()))
        .collect();
    assert_eq!(order, [("ch/main", "a/m-a"), ("ch/multi", "b/m-b"), ("ch/multi", "c/m-c")], "{plan}");
    assert_eq!(
        plan["skipped"],
        json!([
            { "route": "a/m-a", "reason": "duplicate", "model": "ch/main" },
            { "route": "b/m-b", "reason": "duplicate", "model": "ch/second" },
        ])
    );
}

#[tokio::test]
async fn a_saved_chain_repeating_a_route_does_not_retry_it_when_everything_fails() {
    let app = chain_app().await;
    let steps = json!([{ "model": "ch/second" }, { "model": "ch/multi", "provider": "b" }]);
    assert_eq!(app.put_json(MAIN, &steps).await.status, 200);
    let plan = app.post_json("/v1/route/explain", &user_chat("ch/main", "x")).await.json();
    let order: Vec<&str> = plan["candidates"].as_array().unwrap().iter().map(|c| c["route"].as_str().unwrap()).collect();
    assert_eq!(order, ["a/m-a", "b/m-b"], "{plan}");
    assert_eq!(
        plan["skipped"],
        json!([{ "route": "b/m-b", "reason": "duplicate", "model": "ch/multi" }, { "route": "c/m-c", "reason": "not_pinned" }])
    );

    app.upstream("a").set_scenario(failing(503));
    app.upstream("b").set_scenario(failing(500));
    let reply = app.post_chat(&user_chat("ch/main", "all down")).await;
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert_eq!(reply.error()["code"], "all_routes_failed");
    assert_eq!(app.calls(), [("a", 1), ("b", 1), ("c", 0)], "each route tried once");
}
