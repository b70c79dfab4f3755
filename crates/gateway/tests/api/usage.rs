//! Usage analytics end to end: real requests through the mock upstreams (streamed, whole,
//! refused, failed over, cancelled, BYOK), then every usage endpoint's counts and sums checked
//! against the requests made and their records; two organisations that never see each other's
//! data; the public rankings and model stats, anonymous and cached.

use std::collections::HashSet;
use std::time::Duration;

use mock_upstream::Scenario;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::accounts::{get, grant, new_key, new_org, number, Answer};
use crate::helpers::{failing, spawn_app, user_chat, user_chat_stream, Stream, TestApp};

/// A request made: its generation id, tokens and exact cost (from its record).
struct Made {
    id: String,
    tokens: i64,
    cost: Decimal,
}

async fn made(app: &TestApp, id: &str) -> Made {
    let r = app.record(id).await;
    Made { id: id.to_owned(), tokens: r.prompt_tokens + r.completion_tokens, cost: r.cost.parse().unwrap() }
}

/// Waits until the org's `/me/activity` counts `n` requests (the rollup is written with the
/// request log, a few milliseconds after the answers).
async fn activity_with(app: &TestApp, key: &str, n: i64) -> Value {
    for _ in 0..200 {
        let answer = get(app, key, "/me/activity").await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        if answer.body["totals"]["requests"].as_i64() == Some(n) {
            return answer.body;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("/me/activity never counted {n} requests");
}

fn sum_tokens(made: &[&Made]) -> i64 {
    made.iter().map(|m| m.tokens).sum()
}

fn sum_cost(made: &[&Made]) -> Decimal {
    made.iter().map(|m| m.cost).sum()
}

fn assert_bad_param(answer: &Answer, param: &str) {
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.body["error"]["param"], param, "{}", answer.body);
}

/// Four requests of the default organisation: whole, streamed, refused, failed over.
async fn four_requests(app: &TestApp) -> [Made; 4] {
    let whole = app.post_chat(&user_chat("test/openai-chat", "count me in the activity")).await;
    assert_eq!(whole.status, 200, "{}", whole.text);
    let whole = made(app, whole.json()["id"].as_str().unwrap()).await;
    let streamed = app.post_chat(&user_chat_stream("test/anthropic-chat", "stream me into the report")).await;
    Stream::parse(&streamed).assert_usage_then_done();
    let streamed = made(app, streamed.header("x-generation-id").unwrap()).await;
    app.mock.set_scenario(failing(400));
    let refused = app.post_chat(&user_chat("test/openai-chat", "refused")).await;
    assert_eq!(refused.status, 400);
    app.mock.set_scenario(failing(503));
    let failed_over = app.post_chat(&user_chat("test/failover", "fail over and count once")).await;
    assert_eq!(failed_over.provider(), "backup");
    let failed_over = made(app, failed_over.json()["id"].as_str().unwrap()).await;
    app.mock.set_scenario(Scenario::default());
    // The writer keeps order: the refused request's record is in once the last one is.
    let events = get(app, &app.master_key, "/me/activity/events?limit=10").await.body;
    let refused = events["events"].as_array().unwrap().iter().find(|e| e["status"] == "error").unwrap();
    let refused = made(app, refused["id"].as_str().unwrap()).await;
    [whole, streamed, refused, failed_over]
}

#[tokio::test]
async fn every_usage_endpoint_counts_and_sums_the_requests_made() {
    let app = spawn_app().await;
    let [whole, streamed, refused, failed_over] = four_requests(&app).await;
    let all = [&whole, &streamed, &refused, &failed_over];
    assert_eq!(refused.cost, Decimal::ZERO);
    let key = app.master_key.clone();

    // /me/activity: totals, the day series, top models and keys, cost per provider.
    let activity = activity_with(&app, &key, 4).await;
    let totals = &activity["totals"];
    assert_eq!(totals["errors"], 1);
    assert_eq!(totals["total_tokens"].as_i64().unwrap(), sum_tokens(&all));
    assert_eq!(number(&totals["cost"]), sum_cost(&all));
    assert_eq!(activity["currency"], "USD");
    assert_eq!(activity["days"].as_array().unwrap().len(), 30);
    let today = activity["days"].as_array().unwrap().last().unwrap();
    assert_eq!((today["date"].clone(), today["requests"].clone()), (activity["to"].clone(), json!(4)));
    let models = activity["top_models"].as_array().unwrap();
    let openai = models.iter().find(|m| m["model"] == "test/openai-chat").unwrap();
    assert_eq!((openai["requests"].as_i64(), openai["errors"].as_i64()), (Some(2), Some(1)));
    assert_eq!(number(&openai["cost"]), whole.cost);
    assert_eq!(activity["top_keys"][0]["key_id"], "master");
    assert_eq!(activity["top_keys"][0]["requests"], 4);
    let providers = activity["providers"].as_array().unwrap();
    let backup = providers.iter().find(|p| p["provider"] == "backup").unwrap();
    assert_eq!((backup["requests"].as_i64(), number(&backup["cost"])), (Some(1), failed_over.cost));
    let provider_cost: Decimal = providers.iter().map(|p| number(&p["cost"])).sum();
    assert_eq!(provider_cost, sum_cost(&all));
    let filtered = get(&app, &key, "/me/activity?model=test/failover").await.body;
    assert_eq!(filtered["totals"]["requests"], 1);
    assert_eq!(get(&app, &key, "/me/activity?key_id=nobody").await.body["totals"]["requests"], 0);

    // /me/usage and /me/usage/daily agree.
    let usage = get(&app, &key, "/me/usage").await.body;
    let master = usage["keys"].as_array().unwrap().iter().find(|k| k["key_id"] == "master").unwrap();
    assert_eq!((master["today"]["requests"].as_i64(), master["last_30_days"]["requests"].as_i64()), (Some(4), Some(4)));
    assert_eq!(master["key_name"], "master key");
    assert_eq!(number(&usage["totals"]["today"]["cost"]), sum_cost(&all));
    let daily = get(&app, &key, "/me/usage/daily").await.body;
    let days = daily["days"].as_array().unwrap();
    assert_eq!(days.iter().map(|d| d["requests"].as_i64().unwrap()).sum::<i64>(), 4);
    assert_eq!(days.iter().map(|d| d["total_tokens"].as_i64().unwrap()).sum::<i64>(), sum_tokens(&all));

    // OpenRouter's /v1/activity: one row per day × model × provider.
    let or = get(&app, &key, "/api/v1/activity").await.body;
    let rows = or["data"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["requests"].as_i64().unwrap()).sum::<i64>(), 4);
    let usage_sum: Decimal = rows.iter().map(|r| number(&r["usage"])).sum();
    assert_eq!(usage_sum, sum_cost(&all));
    let one_day = get(&app, &key, &format!("/v1/activity?date={}", activity["to"].as_str().unwrap())).await;
    assert_eq!(one_day.body["data"].as_array().unwrap().len(), rows.len());
    assert_bad_param(&get(&app, &key, "/v1/activity?date=2001-01-01").await, "date");

    // /v1/generation in OpenRouter's names.
    let g = get(&app, &key, &format!("/v1/generation?id={}", streamed.id)).await;
    assert_eq!(g.status, 200, "{}", g.body);
    let data = &g.body["data"];
    assert_eq!((data["id"].as_str(), data["model"].as_str()), (Some(streamed.id.as_str()), Some("test/anthropic-chat")));
    assert_eq!(data["streamed"], true);
    assert_eq!(data["cancelled"], false);
    assert_eq!(data["provider"], "anthropic-main");
    assert_eq!(number(&data["total_cost"]), streamed.cost);
    let tokens = data["tokens_prompt"].as_i64().unwrap() + data["tokens_completion"].as_i64().unwrap();
    assert_eq!(tokens, streamed.tokens);
    assert!(data["latency"].as_i64().unwrap() >= data["generation_time"].as_i64().unwrap());
    assert!(data["time_to_first_token"].is_i64());
    assert_eq!(data["finish_reason"], "stop");
    let g = get(&app, &key, &format!("/v1/generation?id={}", failed_over.id)).await.body;
    let tries: Vec<&str> = g["data"]["provider_responses"].as_array().unwrap().iter().map(|p| p["status"].as_str().unwrap()).collect();
    assert_eq!(tries.len(), 2, "{g}");
    assert_eq!(tries[1], "success");
    assert_eq!(g["data"]["streamed"], false);
    let g = get(&app, &key, &format!("/v1/generation?id={}", refused.id)).await.body;
    assert_eq!((g["data"]["status"].as_str(), g["data"]["generation_time"].is_null()), (Some("error"), true));
    assert_eq!(get(&app, &key, "/v1/generation?id=gen-nope").await.status, 404);
    assert_bad_param(&get(&app, &key, "/v1/generation").await, "id");

    // Events: newest first, in pages, every request exactly once.
    let mut seen = Vec::new();
    let mut path = "/me/activity/events?limit=3".to_owned();
    loop {
        let page = get(&app, &key, &path).await.body;
        seen.extend(page["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        match page["next_before"].as_str() {
            Some(next) => path = format!("/me/activity/events?limit=3&before={next}"),
            None => break,
        }
    }
    let expected: Vec<String> = [&failed_over, &refused, &streamed, &whole].iter().map(|m| m.id.clone()).collect();
    assert_eq!(seen, expected);

    // Bounded inputs, each refusal naming its parameter.
    for (path, param) in [
        ("/me/activity/events?limit=0", "limit"),
        ("/me/activity/events?limit=201", "limit"),
        ("/me/activity/events?before=gen-unknown", "before"),
        ("/me/activity?from=2026-02-30", "from"),
        ("/me/activity?to=tomorrow", "to"),
        ("/me/activity?from=2020-01-01&to=2021-06-01", "from"),
        ("/me/activity?from=2026-02-02&to=2026-02-01", "from"),
    ] {
        assert_bad_param(&get(&app, &key, path).await, param);
    }
    assert_eq!(get(&app, &key, "/me/activity?from=2025-01-01&to=2026-01-01").await.status, 200, "366 days");
}

#[tokio::test]
async fn organisations_never_see_each_others_usage() {
    let app = spawn_app().await;
    let (org, management) = new_org(&app, "INR").await;
    grant(&app, &org, "1000").await;
    let (inference, key_hash) = new_key(&app, &management, json!({"name": "worker"})).await;
    let mut theirs = Vec::new();
    for text in ["first", "second"] {
        let reply = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&inference)
            .json(&json!({"model": "sandbox/echo", "messages": [{"role": "user", "content": text}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
        theirs.push(reply.headers()["x-generation-id"].to_str().unwrap().to_owned());
    }
    let mine = app.post_chat(&user_chat("test/openai-chat", "the default org's")).await.json()["id"].as_str().unwrap().to_owned();
    let theirs_made = [made(&app, &theirs[0]).await, made(&app, &theirs[1]).await];
    made(&app, &mine).await;

    let activity = activity_with(&app, &management, 2).await;
    assert_eq!(activity["currency"], "INR");
    // An INR organisation reckons days in IST (+05:30), whatever the server's zone.
    let ist_today = (time::OffsetDateTime::now_utc() + time::Duration::minutes(330)).date().to_string();
    assert_eq!((activity["to"].as_str(), activity["timezone"].as_str()), (Some(ist_today.as_str()), Some("+05:30")));
    let today = activity["days"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((today["date"].as_str(), today["requests"].as_i64()), (Some(ist_today.as_str()), Some(2)));
    assert_eq!(number(&activity["totals"]["cost"]), sum_cost(&[&theirs_made[0], &theirs_made[1]]));
    assert!(number(&activity["totals"]["cost"]) > Decimal::ZERO);
    assert_eq!(activity["keys"], json!([key_hash]));
    assert_eq!(activity["top_keys"][0]["key_name"], "worker");
    activity_with(&app, &app.master_key, 1).await;

    // Another organisation's generation is not found, by either kind of key, nor a cursor.
    assert_eq!(get(&app, &management, &format!("/v1/generation?id={mine}")).await.status, 404);
    assert_eq!(get(&app, &inference, &format!("/v1/generation?id={mine}")).await.status, 404);
    assert_eq!(get(&app, &app.master_key, &format!("/v1/generation?id={}", theirs[0])).await.status, 404);
    let own = get(&app, &inference, &format!("/v1/generation?id={}", theirs[0])).await;
    assert_eq!((own.status, own.body["data"]["currency"].as_str()), (200, Some("INR")));
    assert_bad_param(&get(&app, &management, &format!("/me/activity/events?before={mine}")).await, "before");
    let events = get(&app, &management, "/me/activity/events").await.body;
    let ids: HashSet<&str> = events["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, theirs.iter().map(String::as_str).collect());
    assert!(events["events"][0]["cost_inr"].is_number());
    let usage = get(&app, &management, "/me/usage").await.body;
    assert!(usage["keys"].as_array().unwrap().iter().all(|k| k["key_id"] != "master"));
    assert_eq!(usage["totals"]["today"]["requests"], 2);
    assert_eq!(usage["timezone"], "+05:30");

    // Usage is for managers: an inference key is refused, no key is 401.
    assert_eq!(get(&app, &inference, "/me/activity").await.status, 403);
    assert_eq!(get(&app, "nope", "/me/usage").await.status, 401);
}

async fn anonymous(app: &TestApp, path: &str) -> (u16, Value) {
    let response = app.client.get(app.url(path)).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn rankings_and_model_stats_are_public_cached_and_leave_byok_out() {
    let app = spawn_app().await;
    let mut openai_tokens = 0;
    for text in ["rank me", "rank me again"] {
        let id = app.post_chat(&user_chat("test/openai-chat", text)).await.json()["id"].as_str().unwrap().to_owned();
        openai_tokens += made(&app, &id).await.tokens;
    }
    let mut byok = user_chat("test/anthropic-chat", "my own key");
    byok["upstream_key"] = json!("sk-my-own");
    let byok_id = app.post_chat(&byok).await.json()["id"].as_str().unwrap().to_owned();
    app.mock.set_scenario(failing(503));
    let failed_over = app.post_chat(&user_chat("test/failover", "fail over")).await;
    assert_eq!(failed_over.provider(), "backup");
    app.mock.set_scenario(Scenario { chunk_delay_ms: 150, ..Scenario::default() });
    let mut stream = app.open("/v1/chat/completions", &user_chat_stream("test/openai-chat", "one two three four five six")).await;
    let cancelled_id = stream.headers()["x-generation-id"].to_str().unwrap().to_owned();
    stream.chunk().await.unwrap();
    drop(stream);
    assert!(app.record(&cancelled_id).await.cancelled);
    app.mock.set_scenario(Scenario::default());
    activity_with(&app, &app.master_key, 5).await;

    let g = get(&app, &app.master_key, &format!("/v1/generation?id={byok_id}")).await.body;
    assert_eq!(g["data"]["is_byok"], true);
    let g = get(&app, &app.master_key, &format!("/v1/generation?id={cancelled_id}")).await.body;
    assert_eq!(g["data"]["cancelled"], true);
    let cancelled_tokens = app.record(&cancelled_id).await;
    let cancelled_tokens = cancelled_tokens.prompt_tokens + cancelled_tokens.completion_tokens;

    let (status, rankings) = anonymous(&app, "/v1/rankings").await;
    assert_eq!(status, 200, "{rankings}");
    let week = rankings["windows"]["7d"].as_array().unwrap();
    assert_eq!(week[0]["rank"], 1);
    let openai = week.iter().find(|m| m["model"] == "test/openai-chat").unwrap();
    assert_eq!(openai["tokens"].as_i64().unwrap(), openai_tokens + cancelled_tokens);
    assert_eq!(openai["requests"], 3);
    assert!(week.iter().all(|m| m["model"] != "test/anthropic-chat"), "BYOK traffic is not ranked: {rankings}");
    assert_eq!(rankings["windows"]["30d"], rankings["windows"]["7d"]);
    let (_, month) = anonymous(&app, "/api/v1/rankings?period=30d").await;
    assert_eq!((month["period"].as_str(), &month["data"]), (Some("30d"), &rankings["windows"]["30d"]));
    let (status, bad) = anonymous(&app, "/v1/rankings?period=1y").await;
    assert_eq!((status, bad["error"]["param"].as_str()), (400, Some("period")));

    let (status, stats) = anonymous(&app, "/v1/models/test/failover/stats").await;
    assert_eq!(status, 200, "{stats}");
    let data = &stats["data"];
    assert_eq!((data["window"].as_str(), data["requests"].as_i64(), data["success_rate"].as_f64()), (Some("7d"), Some(1), Some(1.0)));
    let routes = data["routes"].as_array().unwrap();
    let openai_route = routes.iter().find(|r| r["provider"] == "openai-main").unwrap();
    assert_eq!((openai_route["attempts"].as_i64(), openai_route["attempt_success_rate"].as_f64()), (Some(1), Some(0.0)));
    let backup = routes.iter().find(|r| r["provider"] == "backup").unwrap();
    assert_eq!((backup["successes"].as_i64(), backup["attempt_success_rate"].as_f64()), (Some(1), Some(1.0)));
    assert!(backup["latency_ms"]["p50"].is_i64() && backup["latency_ms"]["p95"].is_i64());
    let (_, chat_stats) = anonymous(&app, "/api/v1/models/test/openai-chat/stats").await;
    assert_eq!(chat_stats["data"]["requests"], 3);
    assert_eq!(anonymous(&app, "/v1/models/test/nothing/stats").await.0, 404);
    assert_eq!(anonymous(&app, "/v1/models/test/openai-chat").await.1["id"], "test/openai-chat", "the model itself");

    // Cached: a new request does not move the public figures within the minute.
    let id = app.post_chat(&user_chat("test/failover", "after the cache")).await.json()["id"].as_str().unwrap().to_owned();
    made(&app, &id).await;
    activity_with(&app, &app.master_key, 6).await;
    assert_eq!(anonymous(&app, "/v1/models/test/failover/stats").await.1, stats);
    assert_eq!(anonymous(&app, "/v1/rankings").await.1, rankings);
}
