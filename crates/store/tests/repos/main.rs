//! The repository suite, run against every backend: each case is an `async fn` over a
//! [`Ctx`] in the module of its repository, and `suite!` turns it into `sqlite::<case>` (a fresh
//! temp dir) and `postgres::<case>` (a fresh `marga_test_<uuid>` database, dropped at the end).
//!
//! Postgres: `MARGA_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! must let us create databases. When it cannot be reached the Postgres cases fail if
//! `MARGA_TEST_POSTGRES=1` (as CI sets it) and are skipped with a note otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod accounts;
mod backend;
mod batches;
mod fixtures;
mod generations;
mod ledger;
mod members;
mod rates;

use std::time::Instant;

use marga_store::StoreError;

use backend::{with_database, Ctx};
use fixtures::{charge, claim, funded_org, lease, now_ms};

/// `suite!(module::case, ...)`: each case as `sqlite::case` and `postgres::case`.
macro_rules! suite {
    ($($module:ident :: $case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let ctx = super::Ctx::sqlite().await;
                    super::$module::$case(&ctx).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let Some(ctx) = super::Ctx::postgres().await else { return };
                    super::$module::$case(&ctx).await;
                }
            )*
        }
    };
}

suite!(
    generations::settings_generations_and_chains_round_trip,
    accounts::orgs_and_keys,
    accounts::keys_are_isolated_between_orgs,
    accounts::workspaces_crud_isolation_and_key_detach,
    accounts::account_changes_move_the_version_and_nothing_else_does,
    members::members_upsert_list_delete,
    members::guardrails_crud_assignments_and_isolation,
    ledger::ledger_append_is_idempotent_and_balance_exact,
    ledger::ledger_entries_page_newest_first,
    ledger::charge_is_idempotent_and_bumps_lease_usage,
    ledger::open_lease_refuses_when_not_covered,
    ledger::open_lease_race_admits_exactly_the_balance,
    ledger::charges_and_lease_openings_interleave_safely,
    ledger::expired_and_closed_leases_release_their_unused_part,
    ledger::renew_lease_only_while_live,
    ledger::spend_since_per_org_and_per_key,
    ledger::spend_rollups_equal_the_ledger_sums,
    generations::repos_upcast_to_each_repository,
    members::members_keep_an_owner_a_cap_and_unique_emails,
    members::removing_a_member_revokes_their_management_keys_only,
    members::concurrent_demotions_never_leave_an_org_without_owner,
    members::guardrail_member_assignments_replace_and_stay_in_their_org,
    members::guardrail_key_assignment_replaces_the_keys_other_guardrail,
    rates::rate_claims_never_pass_the_limit_and_carry_the_previous_window,
    rates::concurrent_rate_claims_grant_exactly_the_limit,
    generations::usage_rollups_events_and_route_stats,
    batches::files_crud_paging_and_isolation,
    batches::batch_items_are_claimed_and_completed_exactly_once,
    batches::batch_status_cancel_and_finish,
    batches::native_lane_batches_are_leased_whole_and_completed_once,
    batches::webhook_deliveries_are_claimed_once_and_retried,
);

// ---------------------------------------------------------------------------------------------
// Backend selection (no database needed)

#[tokio::test]
async fn open_refuses_unknown_url_schemes_without_echoing_them() {
    let dir = tempfile::tempdir().unwrap();
    let err = marga_store::open(Some("mysql://root:hunter2@db/marga"), dir.path())
        .await
        .err()
        .unwrap();
    assert!(matches!(&err, StoreError::UnsupportedDatabaseUrl { scheme } if scheme == "mysql"));
    assert!(!err.to_string().contains("hunter2"));
    assert!(marga_store::open(Some("marga.db"), dir.path()).await.is_err());
}

#[tokio::test]
async fn open_without_url_is_sqlite_in_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let repos = marga_store::open(Some("  "), &dir.path().join("nested")).await.unwrap();
    repos.put_setting("k", "v").await.unwrap();
    assert!(dir.path().join("nested/marga.db").exists());
}

#[test]
fn test_database_urls_keep_credentials_and_options() {
    assert_eq!(
        with_database("postgres://u:p@h:1/postgres", "x"),
        "postgres://u:p@h:1/x"
    );
    assert_eq!(with_database("postgresql://h", "x"), "postgresql://h/x");
    assert_eq!(
        with_database("postgres://h/db?sslmode=disable", "x"),
        "postgres://h/x?sslmode=disable"
    );
}

// ---------------------------------------------------------------------------------------------
// Latency (run by hand: `cargo test -p marga-store --release --test repos -- --ignored --nocapture`)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn measure_open_lease_and_charge_latency() {
    let mut backends = vec![("sqlite", Ctx::sqlite().await)];
    if let Some(pg) = Ctx::postgres().await {
        backends.push(("postgres", pg));
    }
    for (name, ctx) in &backends {
        let repos = &*ctx.repos;
        funded_org(repos, "a", i64::MAX / 2).await;
        let now = now_ms();
        let mut open = Vec::new();
        let mut single = Vec::new();
        let mut batch = Vec::new();
        for i in 0..300 {
            let started = Instant::now();
            assert!(repos
                .open_lease(&lease(&format!("l{i}"), "a", 1_000, now, now + 600_000))
                .await
                .unwrap());
            open.push(started.elapsed());
            let started = Instant::now();
            repos
                .charge(&[charge("a", &format!("s{i}"), 3, Some("l0"))])
                .await
                .unwrap();
            single.push(started.elapsed());
            let charges: Vec<_> = (0..100)
                .map(|j| charge("a", &format!("b{i}-{j}"), 3, Some("l0")))
                .collect();
            let started = Instant::now();
            repos.charge(&charges).await.unwrap();
            batch.push(started.elapsed());
        }
        for (what, mut samples) in [("open_lease", open), ("charge x1", single), ("charge x100", batch)] {
            samples.sort();
            let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
            eprintln!("{name:>8} {what:<12} p50 {:>9.3?} p99 {:>9.3?}", p(0.5), p(0.99));
        }
    }
}

/// One rate-limit claim (what an instance pays once per chunk of allowance), sequentially and
/// with 8 concurrent claimers of one window (instances contending for one hot key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn measure_rate_claim_latency() {
    let mut backends = vec![("sqlite", Ctx::sqlite().await)];
    if let Some(pg) = Ctx::postgres().await {
        backends.push(("postgres", pg));
    }
    for (name, ctx) in &backends {
        let mut alone = Vec::new();
        for i in 0..300 {
            let started = Instant::now();
            ctx.repos.claim_rate(&claim(&format!("k:{i}:m"), 1_800_000_000_000, 1_000, 100)).await.unwrap();
            alone.push(started.elapsed());
        }
        let started = Instant::now();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let repos = ctx.repos.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        repos.claim_rate(&claim("k:hot:m", 1_800_000_000_000 + i * 60_000, 1_000_000, 1 + t)).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let contended = started.elapsed() / 400;
        alone.sort();
        let p = |q: f64| alone[((alone.len() as f64 * q) as usize).min(alone.len() - 1)];
        eprintln!("{name:>8} claim_rate     p50 {:>9.3?} p99 {:>9.3?}; 8 claimers of one key: {contended:>9.3?} per claim", p(0.5), p(0.99));
    }
}
