//! Who is calling: organisations and API keys, cached in memory so that authenticating a
//! request is one SHA-256 and one hash-map lookup — no database on the hot path.
//!
//! The cache is filled at start and kept fresh by a task that asks the store for keys changed
//! since its last look, every [`REFRESH_EVERY`]. A key revoked or changed on any instance (they
//! share the database) takes effect everywhere within that interval.

mod model;
pub mod timezone;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::HeaderMap;
use marga_store::{AccountRepo, GuardrailRecord, KeyRecord, OrgRecord, StoreError, WorkspaceRecord};

pub use model::{KeyInfo, KeyKind, OrgInfo, Principal};

use crate::error::ApiError;
use crate::keys::KeyHash;

/// How often the key and org caches ask the store for changes.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);
/// How far back each refresh looks past the newest change it has seen.
const CURSOR_OVERLAP_MS: i64 = 5_000;
/// The organisation the master key acts for.
pub const DEFAULT_ORG: &str = "default";
/// Prefix of management keys.
pub const MANAGEMENT_PREFIX: &str = "marga_mg";
/// Prefix of inference keys.
pub const INFERENCE_PREFIX: &str = "marga_sk";

#[derive(Default)]
struct Cache {
    keys: HashMap<String, Arc<KeyInfo>>,
    orgs: HashMap<String, Arc<OrgInfo>>,
    /// Revoked key id → when, so that a stale read can never bring a key back.
    revoked: HashMap<String, i64>,
    /// Key id → the guardrail assigned to it.
    guardrails: HashMap<String, Arc<GuardrailRecord>>,
    /// Workspace id → its record (for monthly budgets).
    workspaces: HashMap<String, Arc<WorkspaceRecord>>,
    /// The newest `updated_at_ms` seen.
    cursor: i64,
}

pub struct Accounts {
    repo: Arc<dyn AccountRepo>,
    master: KeyHash,
    master_principal: Principal,
    cache: RwLock<Cache>,
}

impl Accounts {
    /// Makes sure the default organisation exists and loads every org and key.
    pub async fn start(repo: Arc<dyn AccountRepo>, master: KeyHash, default_currency: &str) -> Result<Accounts, StoreError> {
        let default = match repo.get_org(DEFAULT_ORG).await? {
            Some(org) => org,
            None => {
                let org = OrgRecord {
                    id: DEFAULT_ORG.to_owned(),
                    name: "Default organisation".to_owned(),
                    currency: default_currency.to_owned(),
                    timezone: timezone::default_for(default_currency).to_owned(),
                    created_at_ms: crate::pipeline::unix_now_ms(),
                };
                repo.create_org(&org).await?;
                org
            }
        };
        let default = Arc::new(OrgInfo::from_record(&default));
        let master_principal = Principal { org: default, key: Arc::new(KeyInfo::master()) };
        let accounts = Accounts { repo, master, master_principal, cache: RwLock::new(Cache::default()) };
        accounts.refresh().await?;
        Ok(accounts)
    }

    /// Reads every org and the keys changed since the last refresh (with an overlap, so that
    /// a change committed late, or in the same millisecond as the last look, is not missed;
    /// re-reading a version already applied is harmless).
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let cursor = self.read().cursor.saturating_sub(CURSOR_OVERLAP_MS);
        let orgs = self.repo.list_orgs().await?;
        let changed = self.repo.keys_changed_since(cursor).await?;
        let guardrails = self.guardrails_by_key().await?;
        let workspaces = self.repo.all_workspaces().await?;
        let mut cache = self.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.workspaces = workspaces.into_iter().map(|w| (w.id.clone(), Arc::new(w))).collect();
        // Merged, never replaced: a refresh that read the list just before a local write must
        // not drop what that write added (organisations are never deleted).
        for org in &orgs {
            cache.orgs.insert(org.id.clone(), Arc::new(OrgInfo::from_record(org)));
        }
        cache.guardrails = guardrails;
        for record in changed {
            cache.cursor = cache.cursor.max(record.updated_at_ms);
            apply_change(&mut cache, record);
        }
        Ok(())
    }

    async fn guardrails_by_key(&self) -> Result<HashMap<String, Arc<GuardrailRecord>>, StoreError> {
        let all: HashMap<String, Arc<GuardrailRecord>> =
            self.repo.all_guardrails().await?.into_iter().map(|g| (g.id.clone(), Arc::new(g))).collect();
        let assignments = self.repo.all_guardrail_keys().await?;
        Ok(assignments.into_iter().filter_map(|(gid, key)| Some((key, all.get(&gid)?.clone()))).collect())
    }

    /// Reloads guardrails at once after a local change.
    pub async fn refresh_guardrails(&self) -> Result<(), StoreError> {
        let guardrails = self.guardrails_by_key().await?;
        self.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner).guardrails = guardrails;
        Ok(())
    }

    /// A workspace, from the cache.
    pub fn workspace(&self, id: &str) -> Option<Arc<WorkspaceRecord>> {
        self.read().workspaces.get(id).cloned()
    }

    /// Updates the cache at once after a local write.
    pub fn note_workspace(&self, record: Option<WorkspaceRecord>, deleted_id: Option<&str>) {
        let mut cache = self.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(record) = record {
            cache.workspaces.insert(record.id.clone(), Arc::new(record));
        }
        if let Some(id) = deleted_id {
            cache.workspaces.remove(id);
        }
    }

    /// The guardrail assigned to a key.
    pub fn guardrail_of(&self, key_id: &str) -> Option<Arc<GuardrailRecord>> {
        self.read().guardrails.get(key_id).cloned()
    }

    /// Keeps the cache fresh until the returned task is aborted.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let accounts = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = accounts.refresh().await {
                    tracing::warn!(error = %e, "key cache refresh failed; serving from the last known state");
                }
            }
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The caller of a request, from `Authorization: Bearer` or `x-api-key`.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let presented = bearer(headers).ok_or(ApiError::InvalidApiKey)?;
        let hash = KeyHash::of(presented);
        if self.master.matches(&hash) {
            return Ok(self.master_principal.clone());
        }
        let shaped = crate::keys::is_well_formed(presented, INFERENCE_PREFIX)
            || crate::keys::is_well_formed(presented, MANAGEMENT_PREFIX);
        if !shaped {
            return Err(ApiError::InvalidApiKey);
        }
        let cache = self.read();
        let key = cache.keys.get(&hash.to_hex()).ok_or(ApiError::InvalidApiKey)?;
        if !key.usable_at(crate::pipeline::unix_now_ms()) {
            return Err(ApiError::InvalidApiKey);
        }
        let org = cache.orgs.get(&key.org_id).ok_or(ApiError::InvalidApiKey)?;
        Ok(Principal { org: org.clone(), key: key.clone() })
    }

    /// The principal of key `key_id` of organisation `org_id`, for work done later on its
    /// behalf (batch items); `None` once the key is gone, disabled or expired.
    pub fn principal_of(&self, org_id: &str, key_id: &str) -> Option<Principal> {
        if key_id == self.master_principal.key.id && org_id == self.master_principal.org.id {
            return Some(self.master_principal.clone());
        }
        let cache = self.read();
        let key = cache.keys.get(key_id).filter(|k| k.org_id == org_id && k.usable_at(crate::pipeline::unix_now_ms()))?;
        let org = cache.orgs.get(org_id)?;
        Some(Principal { org: org.clone(), key: key.clone() })
    }

    /// An organisation by id, from the cache.
    pub fn org(&self, id: &str) -> Option<Arc<OrgInfo>> {
        self.read().orgs.get(id).cloned()
    }

    /// Updates the cache at once after a local write (other instances see it on their next
    /// refresh).
    pub fn note_key(&self, record: KeyRecord) {
        let mut cache = self.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        apply_change(&mut cache, record);
    }

    pub fn note_org(&self, record: &OrgRecord) {
        let mut cache = self.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.orgs.insert(record.id.clone(), Arc::new(OrgInfo::from_record(record)));
    }

    pub fn repo(&self) -> &dyn AccountRepo {
        self.repo.as_ref()
    }
}

/// Applies a key's newer state; an older one (a refresh that raced a local write) is ignored.
fn apply_change(cache: &mut Cache, record: KeyRecord) {
    let newer_known = cache.keys.get(&record.id).is_some_and(|k| k.updated_at_ms > record.updated_at_ms)
        || cache.revoked.contains_key(&record.id);
    if newer_known {
        return;
    }
    if let Some(at) = record.revoked_at_ms {
        cache.keys.remove(&record.id);
        cache.revoked.insert(record.id, at);
    } else {
        cache.keys.insert(record.id.clone(), Arc::new(KeyInfo::from_record(&record)));
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim).filter(|t| !t.is_empty())
}
