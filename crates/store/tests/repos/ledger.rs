//! The ledger: idempotent appends, exact balances, paging, charges under credit leases, lease
//! opening races and expiry, and spend per org and key.

use std::sync::Arc;

use marga_store::{KeyRecord, LedgerEntry, Repos};

use crate::backend::Ctx;
use crate::fixtures::{charge, funded_org, key, lease, line, now_ms, org};

/// The org's `(balance, charges)` summed from its ledger lines themselves, page by page: what
/// the running sums `balance` and `totals` read must always equal.
async fn ledger_sums(repos: &dyn Repos, org_id: &str) -> (i64, i64) {
    let (mut balance, mut charges, mut before) = (0, 0, None);
    loop {
        let page = repos.entries(org_id, before, 500).await.unwrap();
        let Some(last) = page.last() else { return (balance, charges) };
        before = Some(last.id);
        for e in &page {
            balance += e.amount_nanos;
            charges -= if e.kind == "charge" { e.amount_nanos } else { 0 };
        }
    }
}

/// The balance and totals the store reports are the sums of the org's ledger lines.
async fn assert_balance_is_the_ledger_sum(repos: &dyn Repos, org_id: &str) {
    let sums = ledger_sums(repos, org_id).await;
    assert_eq!(repos.totals(org_id).await.unwrap(), sums, "{org_id}: running sums against the ledger");
    assert_eq!(repos.balance(org_id).await.unwrap(), sums.0, "{org_id}");
}

pub(crate) async fn ledger_append_is_idempotent_and_balance_exact(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("a")).await.unwrap();
    repos.create_org(&org("b")).await.unwrap();
    assert_eq!(repos.balance("a").await.unwrap(), 0);
    assert_eq!(repos.append(&[]).await.unwrap(), 0);

    // 2^53 + 1 is not representable as an f64: a float anywhere on the way would show.
    let big = 9_007_199_254_740_993_i64;
    let lines = vec![
        line("a", "topup", "pay_1", big, 1_000),
        line("a", "grant", "welcome", 100_000_000, 1_001),
        line("a", "charge", "gen_1", -200_000_001, 1_002),
        line("a", "topup", "pay_1", big, 1_003), // the same line again, in the same batch
        line("a", "refund", "gen_1", 1, 1_004),  // same reference, another kind: a new line
        line("b", "topup", "pay_1", 5, 1_005),   // same reference, another org: a new line
    ];
    assert_eq!(repos.append(&lines).await.unwrap(), 5);
    assert_eq!(
        repos.append(&lines).await.unwrap(),
        0,
        "appending the same lines again is a no-op"
    );
    assert_eq!(repos.append(&lines[..1]).await.unwrap(), 0);
    assert_eq!(repos.balance("a").await.unwrap(), big + 100_000_000 - 200_000_001 + 1);
    assert_eq!(repos.balance("b").await.unwrap(), 5);
    assert_eq!(
        repos.totals("a").await.unwrap(),
        (big + 100_000_000 - 200_000_001 + 1, 200_000_001),
        "(balance, charges) together"
    );
    assert_eq!(repos.totals("b").await.unwrap(), (5, 0));
    assert_eq!(repos.totals("nobody").await.unwrap(), (0, 0));
    assert_eq!(
        repos.available("a", 2_000).await.unwrap(),
        big + 100_000_000 - 200_000_001 + 1
    );

    // Many lines in one call (more than one INSERT statement), and the balance is their sum.
    let many: Vec<_> = (0..1234)
        .map(|i| line("b", "charge", &format!("gen_{i}"), -(i * 1_000 + 7), 2_000 + i))
        .collect();
    assert_eq!(repos.append(&many).await.unwrap(), 1234);
    let expected = 5 - (0..1234).map(|i| i * 1_000 + 7).sum::<i64>();
    assert_eq!(repos.balance("b").await.unwrap(), expected);
    assert_eq!(ctx.reopen().await.balance("b").await.unwrap(), expected);
    for org_id in ["a", "b"] {
        assert_balance_is_the_ledger_sum(repos, org_id).await;
    }
}

pub(crate) async fn ledger_entries_page_newest_first(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("a")).await.unwrap();
    repos.create_org(&org("b")).await.unwrap();
    let lines: Vec<_> = (0..5)
        .map(|i| line("a", "charge", &format!("g{i}"), -i, 100 + i))
        .collect();
    repos.append(&lines).await.unwrap();
    repos.append(&[line("b", "charge", "x", -1, 1)]).await.unwrap();

    let first = repos.entries("a", None, 3).await.unwrap();
    let refs: Vec<_> = first.iter().map(|e| e.reference.as_str()).collect();
    assert_eq!(refs, ["g4", "g3", "g2"]);
    assert!(first[0].id > first[1].id);
    assert_eq!(
        first[0],
        LedgerEntry {
            id: first[0].id,
            ..lines[4].clone()
        }
    );
    let rest = repos.entries("a", Some(first[2].id), 10).await.unwrap();
    let refs: Vec<_> = rest.iter().map(|e| e.reference.as_str()).collect();
    assert_eq!(refs, ["g1", "g0"]);
    assert!(repos.entries("a", Some(rest[1].id), 10).await.unwrap().is_empty());
    assert_eq!(repos.entries("b", None, 10).await.unwrap().len(), 1);
}

pub(crate) async fn charge_is_idempotent_and_bumps_lease_usage(ctx: &Ctx) {
    let repos = &*ctx.repos;
    funded_org(repos, "a", 1_000).await;
    funded_org(repos, "b", 1_000).await;
    let now = now_ms();
    assert!(repos
        .open_lease(&lease("l1", "a", 500, now, now + 60_000))
        .await
        .unwrap());
    assert_eq!(repos.available("a", now).await.unwrap(), 500);

    let batch = vec![
        charge("a", "gen_1", 100, Some("l1")),
        charge("a", "gen_2", 50, Some("l1")),
        charge("a", "gen_2", 50, Some("l1")), // repeated within the batch: counted once
        charge("a", "gen_3", 25, None),       // outside any lease
        charge("b", "gen_4", 10, Some("l1")), // another org's line cannot bump A's lease
    ];
    assert_eq!(repos.charge(&batch).await.unwrap(), 4);
    assert_eq!(repos.get_lease("l1").await.unwrap().unwrap().used_nanos, 150);
    assert_eq!(repos.balance("a").await.unwrap(), 1_000 - 175);
    // Charged under the lease: already reserved, so only the unleased 25 lowers `available`.
    assert_eq!(repos.available("a", now).await.unwrap(), 1_000 - 175 - (500 - 150));

    // Retrying the whole batch (a flush that timed out but had committed) changes nothing.
    assert_eq!(repos.charge(&batch).await.unwrap(), 0);
    assert_eq!(repos.get_lease("l1").await.unwrap().unwrap().used_nanos, 150);
    assert_eq!(repos.balance("a").await.unwrap(), 1_000 - 175);
    assert_eq!(repos.charge(&[]).await.unwrap(), 0);

    // A lease overdrawn by its charges reserves nothing more (never a negative reservation).
    assert_eq!(repos.charge(&[charge("a", "gen_5", 400, Some("l1"))]).await.unwrap(), 1);
    assert_eq!(repos.get_lease("l1").await.unwrap().unwrap().used_nanos, 550);
    assert_eq!(repos.available("a", now).await.unwrap(), 1_000 - 575);
    for org_id in ["a", "b"] {
        assert_balance_is_the_ledger_sum(repos, org_id).await;
    }
}

pub(crate) async fn open_lease_refuses_when_not_covered(ctx: &Ctx) {
    let repos = &*ctx.repos;
    funded_org(repos, "a", 100).await;
    let (t, exp) = (10_000, 20_000);
    assert!(repos.open_lease(&lease("l1", "a", 60, t, exp)).await.unwrap());
    assert!(
        !repos.open_lease(&lease("l2", "a", 50, t, exp)).await.unwrap(),
        "only 40 left"
    );
    assert_eq!(repos.get_lease("l2").await.unwrap(), None);
    assert!(repos.open_lease(&lease("l3", "a", 40, t, exp)).await.unwrap());
    assert_eq!(repos.available("a", t).await.unwrap(), 0);
    assert!(!repos.open_lease(&lease("l4", "a", 1, t, exp)).await.unwrap());
    assert!(
        repos.open_lease(&lease("l5", "a", 0, t, exp)).await.unwrap(),
        "a zero lease is covered"
    );
    assert!(
        !repos.open_lease(&lease("l6", "a", -10, t, exp)).await.unwrap(),
        "negative amounts are refused"
    );
    assert!(
        !repos.open_lease(&lease("l7", "nobody", 0, t, exp)).await.unwrap(),
        "unknown org"
    );
    assert!(
        repos.open_lease(&lease("l1", "a", 0, t, exp)).await.is_err(),
        "duplicate lease id"
    );
    assert_eq!(repos.get_lease("l1").await.unwrap(), Some(lease("l1", "a", 60, t, exp)));

    // A top-up makes room again; a negative balance covers nothing.
    repos.append(&[line("a", "topup", "pay_1", 30, t)]).await.unwrap();
    assert!(repos.open_lease(&lease("l8", "a", 30, t, exp)).await.unwrap());
    funded_org(repos, "debtor", -5).await;
    assert!(!repos.open_lease(&lease("l9", "debtor", 0, t, exp)).await.unwrap());
}

/// 50 tasks race for a 10-unit lease each against a balance of 100, on as many connections as
/// the pool gives them: exactly 10 win.
pub(crate) async fn open_lease_race_admits_exactly_the_balance(ctx: &Ctx) {
    funded_org(&*ctx.repos, "a", 100).await;
    // A second store (another "instance", with its own pool) races the first one.
    let other = ctx.reopen().await;
    let now = now_ms();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let repos = if i % 2 == 0 {
                Arc::clone(&ctx.repos)
            } else {
                Arc::clone(&other)
            };
            tokio::spawn(async move {
                repos
                    .open_lease(&lease(&format!("l{i}"), "a", 10, now, now + 60_000))
                    .await
            })
        })
        .collect();
    let mut opened = 0;
    for task in tasks {
        if task.await.unwrap().unwrap() {
            opened += 1;
        }
    }
    assert_eq!(opened, 10);
    assert_eq!(ctx.repos.available("a", now).await.unwrap(), 0);
    assert_eq!(other.available("a", now).await.unwrap(), 0);
    assert_eq!(ctx.repos.balance("a").await.unwrap(), 100);
}

/// Charges (which insert ledger lines, hence reference the org row) and lease openings (which
/// lock it) run concurrently without deadlock or lost updates.
pub(crate) async fn charges_and_lease_openings_interleave_safely(ctx: &Ctx) {
    funded_org(&*ctx.repos, "a", 1_000_000).await;
    let now = now_ms();
    assert!(ctx
        .repos
        .open_lease(&lease("base", "a", 100_000, now, now + 60_000))
        .await
        .unwrap());
    let mut tasks = Vec::new();
    for i in 0..40 {
        let repos = Arc::clone(&ctx.repos);
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let charges: Vec<_> = (0..5)
                    .map(|j| charge("a", &format!("g{i}-{j}"), 7, Some("base")))
                    .collect();
                repos.charge(&charges).await.map(|n| n == 5)
            } else {
                repos
                    .open_lease(&lease(&format!("l{i}"), "a", 1_000, now, now + 60_000))
                    .await
            }
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().unwrap());
    }
    let repos = &*ctx.repos;
    assert_eq!(repos.get_lease("base").await.unwrap().unwrap().used_nanos, 20 * 5 * 7);
    assert_eq!(repos.balance("a").await.unwrap(), 1_000_000 - 700);
    assert_eq!(
        repos.available("a", now).await.unwrap(),
        1_000_000 - 700 - (100_000 - 700) - 20 * 1_000
    );
    assert_balance_is_the_ledger_sum(repos, "a").await;
}

pub(crate) async fn expired_and_closed_leases_release_their_unused_part(ctx: &Ctx) {
    let repos = &*ctx.repos;
    funded_org(repos, "a", 1_000).await;
    assert!(repos.open_lease(&lease("l1", "a", 600, 1_000, 2_000)).await.unwrap());
    assert!(repos.open_lease(&lease("l2", "a", 300, 1_000, 9_000)).await.unwrap());
    repos.charge(&[charge("a", "gen_1", 100, Some("l1"))]).await.unwrap();
    // Balance 900; live leases reserve 500 (l1) + 300 (l2).
    assert_eq!(repos.available("a", 1_500).await.unwrap(), 100);
    assert!(!repos.open_lease(&lease("l3", "a", 500, 1_500, 9_000)).await.unwrap());
    // At its expiry l1 stops reserving (its charges stay): its credit can be leased again.
    assert_eq!(repos.available("a", 2_000).await.unwrap(), 600);
    assert!(repos.open_lease(&lease("l3", "a", 500, 2_000, 9_000)).await.unwrap());
    assert_eq!(repos.available("a", 2_000).await.unwrap(), 100);
    // Closing releases too, and a closed lease stays closed.
    repos.close_lease("l2").await.unwrap();
    repos.close_lease("l2").await.unwrap();
    repos.close_lease("ghost").await.unwrap();
    assert!(repos.get_lease("l2").await.unwrap().unwrap().closed);
    assert_eq!(repos.available("a", 2_000).await.unwrap(), 400);
    assert_eq!(repos.balance("a").await.unwrap(), 900);
}

pub(crate) async fn renew_lease_only_while_live(ctx: &Ctx) {
    let repos = &*ctx.repos;
    funded_org(repos, "a", 1_000).await;
    let now = now_ms();
    assert!(repos
        .open_lease(&lease("live", "a", 100, now, now + 60_000))
        .await
        .unwrap());
    assert!(repos
        .open_lease(&lease("expired", "a", 100, now - 10_000, now - 1))
        .await
        .unwrap());
    assert!(repos.renew_lease("live", now + 120_000).await.unwrap());
    assert_eq!(
        repos.get_lease("live").await.unwrap().unwrap().expires_at_ms,
        now + 120_000
    );
    assert!(
        !repos.renew_lease("expired", now + 120_000).await.unwrap(),
        "its credit may be leased again"
    );
    assert!(!repos.renew_lease("ghost", now + 120_000).await.unwrap());
    repos.close_lease("live").await.unwrap();
    assert!(!repos.renew_lease("live", now + 180_000).await.unwrap());
    assert_eq!(repos.available("a", now).await.unwrap(), 1_000);
}

pub(crate) async fn spend_since_per_org_and_per_key(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("a")).await.unwrap();
    repos.create_org(&org("b")).await.unwrap();
    let with_key = |mut e: LedgerEntry, key: &str| {
        e.key_id = Some(key.into());
        e
    };
    repos
        .append(&[
            line("a", "topup", "pay", 1_000_000, 100),
            with_key(line("a", "charge", "g1", -10, 100), "k1"),
            with_key(line("a", "charge", "g2", -20, 200), "k1"),
            with_key(line("a", "charge", "g3", -40, 300), "k2"),
            with_key(line("a", "refund", "g3", 40, 300), "k2"),
            with_key(line("b", "charge", "g4", -80, 300), "k1"),
        ])
        .await
        .unwrap();
    assert_eq!(repos.spend_since("a", None, 0).await.unwrap(), 70);
    assert_eq!(
        repos.spend_since("a", None, 200).await.unwrap(),
        60,
        "since is inclusive"
    );
    assert_eq!(repos.spend_since("a", None, 301).await.unwrap(), 0);
    assert_eq!(repos.spend_since("a", Some("k1"), 0).await.unwrap(), 30);
    assert_eq!(repos.spend_since("a", Some("k1"), 150).await.unwrap(), 20);
    assert_eq!(
        repos.spend_since("a", Some("k2"), 0).await.unwrap(),
        40,
        "refunds are not netted"
    );
    assert_eq!(repos.spend_since("b", Some("k1"), 0).await.unwrap(), 80);
    assert_eq!(repos.spend_since("b", Some("k2"), 0).await.unwrap(), 0);
    assert_eq!(repos.spend_since("zz", None, 0).await.unwrap(), 0);
}

/// Spend read from the 15-minute rollup equals the sum of the charge lines, for the org, a
/// key, a workspace and a member, from windows that start on a bucket and inside one, after
/// lines written by `append` and by `charge`, some twice.
pub(crate) async fn spend_rollups_equal_the_ledger_sums(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("a")).await.unwrap();
    repos.create_org(&org("b")).await.unwrap();
    for (id, member) in [("k1", "m1"), ("k2", "m1"), ("k3", "m2")] {
        repos.create_key(&KeyRecord { member_id: Some(member.into()), ..key(id, "a", 1) }).await.unwrap();
    }
    const QUARTER: i64 = 15 * 60 * 1000;
    let day_start = 1_764_633_600_000; // a UTC midnight
    let keys = ["k1", "k2", "k3"];
    let lines: Vec<LedgerEntry> = (0..300_i64)
        .map(|i| {
            // Spread over about five hours, some on bucket edges.
            let at = day_start + i * 61_000 + if i % 7 == 0 { QUARTER - 61_000 * (i % 3) } else { 0 };
            let mut e = line(if i % 10 == 9 { "b" } else { "a" }, "charge", &format!("g{i}"), -(i * 13 + 1), at);
            e.key_id = Some(keys[(i % 3) as usize].into());
            e.workspace_id = (i % 4 == 0).then(|| "w1".into());
            e
        })
        .collect();
    repos.append(&lines[..100]).await.unwrap();
    repos.append(&lines[50..150]).await.unwrap(); // half of it again
    let charges: Vec<_> = lines[150..]
        .iter()
        .map(|e| marga_store::Charge { entry: e.clone(), lease_id: None })
        .collect();
    repos.charge(&charges).await.unwrap();
    repos.charge(&charges[..60]).await.unwrap(); // a replayed journal
    repos.append(&[line("a", "refund", "g3", 40, day_start + 5)]).await.unwrap(); // not spend

    let spent = |since: i64, keep: &dyn Fn(&LedgerEntry) -> bool| -> i64 {
        lines.iter().filter(|e| e.org_id == "a" && e.created_at_ms >= since && keep(e)).map(|e| -e.amount_nanos).sum()
    };
    let is_key = |k: &'static str| move |e: &LedgerEntry| e.key_id.as_deref() == Some(k);
    for since in [0, day_start, day_start + QUARTER, day_start + 3 * QUARTER + 1, day_start + 100 * 61_000 + 17, day_start + 10 * QUARTER * 4] {
        assert_eq!(repos.spend_since("a", None, since).await.unwrap(), spent(since, &|_| true), "org since {since}");
        for k in keys {
            assert_eq!(repos.spend_since("a", Some(k), since).await.unwrap(), spent(since, &is_key(k)), "{k} since {since}");
        }
        let in_w1 = |e: &LedgerEntry| e.workspace_id.as_deref() == Some("w1");
        assert_eq!(repos.workspace_spend_since("a", "w1", since).await.unwrap(), spent(since, &in_w1), "w1 since {since}");
        let of_m1 = |e: &LedgerEntry| matches!(e.key_id.as_deref(), Some("k1" | "k2"));
        assert_eq!(repos.member_spend_since("a", "m1", since).await.unwrap(), spent(since, &of_m1), "m1 since {since}");
    }
    assert_eq!(repos.spend_since("b", Some("k1"), 0).await.unwrap(), lines.iter().filter(|e| e.org_id == "b" && e.key_id.as_deref() == Some("k1")).map(|e| -e.amount_nanos).sum::<i64>());
    for org_id in ["a", "b"] {
        assert_balance_is_the_ledger_sum(repos, org_id).await;
    }
}
