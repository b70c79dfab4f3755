//! Records shared by the cases: orgs, keys, ledger lines, charges, leases, generations and rate
//! claims, each with the fields a case does not care about filled in.

use std::time::{SystemTime, UNIX_EPOCH};

use marga_store::{Charge, GenerationRecord, KeyRecord, LeaseRecord, LedgerEntry, OrgRecord, RateClaim, Repos};

pub(crate) fn now_ms() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

pub(crate) fn org(id: &str) -> OrgRecord {
    OrgRecord {
        id: id.into(),
        name: format!("Org {id}"),
        currency: "INR".into(),
        timezone: "Asia/Kolkata".into(),
        created_at_ms: 1_000,
    }
}

pub(crate) fn key(id: &str, org_id: &str, created_at_ms: i64) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        org_id: org_id.into(),
        kind: "inference".into(),
        name: format!("key {id}"),
        label: format!("marga_sk_{id}…"),
        created_at_ms,
        updated_at_ms: created_at_ms,
        ..KeyRecord::default()
    }
}

pub(crate) fn line(org_id: &str, kind: &str, reference: &str, amount_nanos: i64, created_at_ms: i64) -> LedgerEntry {
    LedgerEntry {
        id: 0,
        org_id: org_id.into(),
        amount_nanos,
        currency: "INR".into(),
        kind: kind.into(),
        reference: reference.into(),
        key_id: None,
        workspace_id: None,
        note: None,
        created_at_ms,
    }
}

pub(crate) fn charge(org_id: &str, reference: &str, cost_nanos: i64, lease_id: Option<&str>) -> Charge {
    Charge {
        entry: line(org_id, "charge", reference, -cost_nanos, 5_000),
        lease_id: lease_id.map(str::to_owned),
    }
}

pub(crate) fn lease(id: &str, org_id: &str, amount_nanos: i64, created_at_ms: i64, expires_at_ms: i64) -> LeaseRecord {
    LeaseRecord {
        id: id.into(),
        org_id: org_id.into(),
        amount_nanos,
        used_nanos: 0,
        holder: "instance-1".into(),
        expires_at_ms,
        closed: false,
        created_at_ms,
    }
}

/// An org with `balance` nanos granted.
pub(crate) async fn funded_org(repos: &dyn Repos, id: &str, balance: i64) {
    repos.create_org(&org(id)).await.unwrap();
    repos
        .append(&[line(id, "grant", "welcome", balance, 1_000)])
        .await
        .unwrap();
}

pub(crate) fn generation(id: &str) -> GenerationRecord {
    GenerationRecord {
        id: id.to_owned(),
        endpoint: "chat".into(),
        model: "m".into(),
        status: "success".into(),
        cost: "0.00042".into(),
        currency: "USD".into(),
        attempts: "[]".into(),
        streamed: true,
        ttft_ms: Some(12),
        ..GenerationRecord::default()
    }
}

pub(crate) fn claim(scope: &str, window: i64, limit: i64, want: i64) -> RateClaim {
    RateClaim { scope: scope.into(), window_start_ms: window, previous_start_ms: Some(window - 60_000), carry_ppm: 0, limit, want }
}
