//! Settings, chains and the request log (generations) with its usage analytics (rollups, events,
//! rankings, route statistics); and `Repos` upcasting to each repository trait.

use std::sync::Arc;

use marga_store::{
    AccountRepo, ChainRecord, ChainRepo, GenerationRecord, GenerationRepo, LedgerRepo, SettingsRepo, UsageGroup,
    UsageQuery,
};

use crate::backend::Ctx;
use crate::fixtures::{generation, org};

pub(crate) async fn settings_generations_and_chains_round_trip(ctx: &Ctx) {
    let store = &*ctx.repos;
    assert_eq!(store.get_setting("k").await.unwrap(), None);
    store.put_setting("k", "v1").await.unwrap();
    store.put_setting("k", "v2").await.unwrap();
    assert_eq!(store.get_setting("k").await.unwrap().as_deref(), Some("v2"));

    let records: Vec<_> = (0..1200).map(|i| generation(&format!("gen-{i}"))).collect();
    store.insert_generations(&records).await.unwrap();
    store.insert_generations(&records[..10]).await.unwrap();
    store.insert_generations(&[]).await.unwrap();
    assert_eq!(store.count_generations().await.unwrap(), 1200);
    assert_eq!(store.get_generation("gen-7").await.unwrap(), Some(generation("gen-7")));
    assert_eq!(store.get_generation("nope").await.unwrap(), None);

    let chain = ChainRecord {
        org_id: "o".into(),
        model: "m".into(),
        steps: "[]".into(),
        updated_at_ms: 1,
    };
    store.put_chain(&chain).await.unwrap();
    store
        .put_chain(&ChainRecord {
            updated_at_ms: 2,
            ..chain.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        store.list_chains().await.unwrap(),
        vec![ChainRecord {
            updated_at_ms: 2,
            ..chain.clone()
        }]
    );
    assert!(store.delete_chain("o", "m").await.unwrap());
    assert!(!store.delete_chain("o", "m").await.unwrap());

    let reopened = ctx.reopen().await;
    assert_eq!(reopened.count_generations().await.unwrap(), 1200);
    assert_eq!(reopened.get_setting("k").await.unwrap().as_deref(), Some("v2"));
}

/// `Arc<dyn Repos>` coerces to each repository trait object (trait upcasting).
pub(crate) async fn repos_upcast_to_each_repository(ctx: &Ctx) {
    let settings: Arc<dyn SettingsRepo> = ctx.repos.clone();
    let generations: Arc<dyn GenerationRepo> = ctx.repos.clone();
    let chains: Arc<dyn ChainRepo> = ctx.repos.clone();
    let accounts: Arc<dyn AccountRepo> = ctx.repos.clone();
    let ledger: Arc<dyn LedgerRepo> = ctx.repos.clone();
    settings.put_setting("k", "v").await.unwrap();
    assert_eq!(generations.count_generations().await.unwrap(), 0);
    assert!(chains.list_chains().await.unwrap().is_empty());
    accounts.create_org(&org("a")).await.unwrap();
    assert_eq!(ledger.balance("a").await.unwrap(), 0);
}

// Usage analytics

const DAY: i64 = 86_400_000;

/// A generation of `org` by `key` on `model`/`provider`, at `t` ms, on local day `t / DAY`.
fn used(id: &str, org: &str, key: &str, model: &str, provider: &str, t: i64) -> GenerationRecord {
    GenerationRecord {
        id: id.into(),
        created_at_ms: t,
        org_id: Some(org.into()),
        key_id: Some(key.into()),
        model: model.into(),
        provider: Some(provider.into()),
        prompt_tokens: 100,
        completion_tokens: 40,
        reasoning_tokens: 3,
        cached_tokens: 10,
        cost_nanos: 123_456_789,
        cost: "0.123456789".into(),
        currency: "INR".into(),
        latency_ms: 200,
        generation_time_ms: Some(100),
        local_day: t / DAY,
        attempts: format!(r#"[{{"provider":"{provider}","model":"u","outcome":"success","status":null,"latency_ms":5}}]"#),
        ..generation(id)
    }
}

pub(crate) async fn usage_rollups_events_and_route_stats(ctx: &Ctx) {
    let store = &*ctx.repos;
    let t0 = 20_000 * DAY + 1_000;
    let mut records = vec![
        used("g1", "a", "k1", "m1", "p1", t0),
        used("g2", "a", "k1", "m1", "p1", t0 + 1),
        used("g3", "a", "k2", "m2", "p2", t0 + 2),
        used("g4", "a", "k1", "m1", "p2", t0 + DAY),
        used("g5", "b", "k9", "m1", "p1", t0 + 3),
    ];
    records[1].status = "error".into();
    records[1].cost_nanos = 0;
    records[1].generation_time_ms = None;
    records[1].attempts = r#"[{"provider":"p2","outcome":"timeout"},{"provider":"p1","outcome":"http_error"}]"#.into();
    records[2].byok = true;
    records[3].status = "cancelled".into();
    records[3].cancelled = true;
    store.insert_generations(&records).await.unwrap();
    // A batch written again (a retried flush) is counted once.
    store.insert_generations(&records[..2]).await.unwrap();

    let all = UsageQuery { org_id: "a", from_day: 20_000, to_day: 20_001, model: None, key_id: None, group: UsageGroup::ALL };
    let rows = store.usage_rows(&all).await.unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r.org_id == "a"));
    let requests: i64 = rows.iter().map(|r| r.requests).sum();
    let cost: i64 = rows.iter().map(|r| r.cost_nanos).sum();
    let errors: i64 = rows.iter().map(|r| r.errors).sum();
    assert_eq!((requests, cost, errors), (4, 3 * 123_456_789, 1));
    assert_eq!(rows.iter().map(|r| r.cancelled).sum::<i64>(), 1);
    assert_eq!(rows.iter().map(|r| r.byok_requests).sum::<i64>(), 1);
    assert_eq!(rows.iter().map(|r| r.prompt_tokens).sum::<i64>(), 400);
    let first = rows.iter().find(|r| r.day == 20_000 && r.key_id == "k1").unwrap();
    assert_eq!((first.requests, first.model.as_str(), first.provider.as_str()), (2, "m1", "p1"));
    let filtered = UsageQuery { model: Some("m1"), key_id: Some("k1"), ..all.clone() };
    assert_eq!(store.usage_rows(&filtered).await.unwrap().len(), 2);
    let one_day = UsageQuery { from_day: 20_001, ..all.clone() };
    assert_eq!(store.usage_rows(&one_day).await.unwrap().len(), 1);
    // Summed by the store over the dimensions left out.
    let by_model = UsageQuery { group: UsageGroup { model: true, ..UsageGroup::default() }, ..all.clone() };
    let models: Vec<(String, i64, i64, i64)> =
        store.usage_rows(&by_model).await.unwrap().into_iter().map(|r| (r.model, r.requests, r.cost_nanos, r.day)).collect();
    assert_eq!(models, [("m1".into(), 3, 2 * 123_456_789, -1), ("m2".into(), 1, 123_456_789, -1)]);
    let totals = store.usage_rows(&UsageQuery { group: UsageGroup::default(), ..all.clone() }).await.unwrap();
    assert_eq!((totals.len(), totals[0].requests, totals[0].key_id.as_str()), (1, 4, ""));
    let by_day_key = UsageQuery { group: UsageGroup { day: true, key: true, ..UsageGroup::default() }, ..all.clone() };
    let days: Vec<(i64, String, i64)> =
        store.usage_rows(&by_day_key).await.unwrap().into_iter().map(|r| (r.day, r.key_id, r.requests)).collect();
    assert_eq!(days, [(20_000, "k1".into(), 2), (20_000, "k2".into(), 1), (20_001, "k1".into(), 1)]);

    // Generations are scoped to their organisation.
    assert_eq!(store.org_generation("a", "g1").await.unwrap().unwrap().cost_nanos, 123_456_789);
    assert_eq!(store.org_generation("b", "g1").await.unwrap(), None);
    let g4 = store.org_generation("a", "g4").await.unwrap().unwrap();
    assert!(g4.cancelled && g4.generation_time_ms == Some(100) && g4.local_day == 20_001);

    // Events: newest first, keyset pages, scoped.
    let page = store.generation_events("a", None, 3).await.unwrap().unwrap();
    let ids: Vec<&str> = page.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["g4", "g3", "g2"]);
    let next = store.generation_events("a", Some("g2"), 3).await.unwrap().unwrap();
    assert_eq!(next.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["g1"]);
    assert_eq!(store.generation_events("a", Some("g5"), 3).await.unwrap(), None, "another org's cursor");
    assert_eq!(store.generation_events("a", Some("nope"), 3).await.unwrap(), None);

    // Rankings leave BYOK out and count every organisation.
    let mut tokens = store.model_tokens(20_000).await.unwrap();
    tokens.sort_by(|a, b| a.model.cmp(&b.model));
    let summary: Vec<(&str, i64, i64)> = tokens.iter().map(|t| (t.model.as_str(), t.requests, t.tokens)).collect();
    assert_eq!(summary, [("m1", 4, 560), ("m2", 0, 0)]);
    assert!(store.model_tokens(20_002).await.unwrap().is_empty());

    // Route stats: records per provider, and every attempt (failed over ones too).
    let stats = store.route_stats("m1", 20_000).await.unwrap();
    assert!(store.route_stats("m1", 20_001).await.unwrap().iter().all(|s| s.provider == "p2"));
    let p1 = stats.iter().find(|s| s.provider == "p1").unwrap();
    assert_eq!((p1.requests, p1.successes, p1.errors), (3, 2, 1));
    assert_eq!((p1.completion_tokens, p1.generation_ms), (80, 200));
    assert_eq!((p1.attempts, p1.attempt_failures), (3, 1));
    let p2 = stats.iter().find(|s| s.provider == "p2").unwrap();
    assert_eq!((p2.requests, p2.successes, p2.attempts, p2.attempt_failures), (1, 0, 2, 1));
    let latencies = store.route_latencies("m1", t0 - 1, 10).await.unwrap();
    assert_eq!(latencies, vec![("p1".to_owned(), 200), ("p1".to_owned(), 200)]);
    assert_eq!(store.route_latencies("m1", t0 - 1, 1).await.unwrap().len(), 1);
}
