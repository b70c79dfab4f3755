//! The cache's refresh against a real SQLite store: it reads the accounts when, and only
//! when, the store's accounts version moved.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::http::{header, HeaderMap, HeaderValue};
use marga_store::{KeyRecord, OrgRecord};

use super::{Accounts, DEFAULT_ORG};
use crate::keys::KeyHash;

fn bearer(key: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {key}")).unwrap());
    headers
}

#[tokio::test]
async fn a_refresh_reads_the_accounts_only_when_they_changed() {
    let dir = tempfile::tempdir().unwrap();
    let repos = marga_store::open(None, dir.path()).await.unwrap();
    let accounts = Accounts::start(Arc::clone(&repos), KeyHash::of("master"), "USD").await.unwrap();
    let loaded = || accounts.read().loaded;

    let at_start = loaded();
    accounts.refresh().await.unwrap();
    accounts.refresh().await.unwrap();
    assert_eq!(loaded(), at_start, "nothing changed, so nothing was read again");

    // Another instance (here: the store itself) adds an org and a key to it.
    let secret = "marga_sk_written_elsewhere";
    let org = OrgRecord { id: "elsewhere".into(), name: "E".into(), currency: "INR".into(), timezone: "Asia/Kolkata".into(), created_at_ms: 1 };
    repos.create_org(&org).await.unwrap();
    let key = KeyRecord {
        id: KeyHash::of(secret).hex().as_str().to_owned(),
        org_id: org.id.clone(),
        kind: "inference".into(),
        name: "k".into(),
        label: "marga_sk_wri…".into(),
        created_at_ms: 2,
        updated_at_ms: 2,
        ..KeyRecord::default()
    };
    repos.create_key(&key).await.unwrap();
    assert!(accounts.authenticate(&bearer(secret)).is_err(), "not seen before a refresh");
    accounts.refresh().await.unwrap();
    assert!(loaded() > at_start, "the version moved, so the accounts were read again");
    let principal = accounts.authenticate(&bearer(secret)).unwrap();
    assert_eq!((principal.org.id.as_str(), principal.key.id.as_str()), ("elsewhere", key.id.as_str()));

    let after_change = loaded();
    accounts.refresh().await.unwrap();
    assert_eq!(loaded(), after_change);
    assert!(accounts.org(DEFAULT_ORG).is_some());
}
