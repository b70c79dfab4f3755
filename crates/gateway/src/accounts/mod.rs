//! Who is calling: organisations and API keys, cached in memory so that authenticating a
//! request is one SHA-256 and one hash-map lookup — no database on the hot path.
//!
//! The cache is filled at start and kept fresh by a task that looks at the store's accounts
//! version every [`REFRESH_EVERY`]; when it moved (any write to orgs, keys, workspaces,
//! members or guardrails, by any instance, moves it), the task reads every org, the keys
//! changed since its last look, and reloads workspaces, member roles and guardrail assignments
//! whole (at most 50 members per org). A key revoked or changed on any instance (they share
//! the database) thus takes effect everywhere within that interval, and a gateway whose
//! accounts do not change reads one row per interval.

mod model;
pub mod roles;
pub mod timezone;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::HeaderMap;
use marga_store::{
    AccountRepo, GuardrailRecord, KeyRecord, MemberChange, MemberRecord, MemberRepo, OrgRecord, Repos, StoreError,
    WorkspaceRecord,
};

pub use model::{KeyInfo, KeyKind, OrgInfo, Principal};
pub use roles::{Action, Role};

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
/// The member of the default organisation the master key acts as (an owner).
pub const OPERATOR_MEMBER: &str = "operator";

/// Org id → member user id → value.
type ByMember<T> = HashMap<String, HashMap<String, T>>;
/// Every guardrail by id, and key id → its guardrail.
type Guardrails = (HashMap<String, Arc<GuardrailRecord>>, HashMap<String, Arc<GuardrailRecord>>);

/// The role a key acts with: `Some(None)` for keys without one (inference, master),
/// `Some(Some(role))` for a management key (its member's), `None` for a management key whose
/// member is gone, which is refused.
fn role_of(cache: &Cache, key: &KeyInfo) -> Option<Option<Role>> {
    match key.kind {
        KeyKind::Management => {
            let member = key.member_id.as_deref()?;
            Some(Some(*cache.roles.get(&key.org_id)?.get(member)?))
        }
        _ => Some(None),
    }
}

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
    /// Workspaces written here since the last load applied (`None`: deleted), replayed over
    /// the next load so that a load that read before the write does not undo it.
    noted_workspaces: Vec<(String, Option<Arc<WorkspaceRecord>>)>,
    /// Every member's role: a management key acts with its member's.
    roles: ByMember<Role>,
    /// The guardrail assigned to a member (it applies to the member's keys).
    member_guardrails: ByMember<Arc<GuardrailRecord>>,
    /// The newest `updated_at_ms` seen.
    cursor: i64,
    /// Which load the replaced-whole parts (guardrails, assignments, roles, workspaces) come
    /// from: a load that started before one already applied is stale and is not applied.
    loaded: u64,
    /// The store's accounts version read before the load applied last: while the store says
    /// the same, there is nothing new to read.
    version: Option<i64>,
}

pub struct Accounts {
    repo: Arc<dyn Repos>,
    master: KeyHash,
    master_principal: Principal,
    cache: RwLock<Cache>,
    /// Numbers the loads of the replaced-whole parts, in the order they start.
    loads: std::sync::atomic::AtomicU64,
}

impl Accounts {
    /// Makes sure the default organisation exists and loads every org and key.
    pub async fn start(repo: Arc<dyn Repos>, master: KeyHash, default_currency: &str) -> Result<Accounts, StoreError> {
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
        let operator = MemberRecord {
            org_id: DEFAULT_ORG.to_owned(),
            user_id: OPERATOR_MEMBER.to_owned(),
            email: String::new(),
            role: Role::Owner.as_str().to_owned(),
            created_at_ms: crate::pipeline::unix_now_ms(),
        };
        // `Duplicate` when it exists already (or another instance just made it).
        let _: MemberChange = repo.add_member(&operator).await?;
        let default = Arc::new(OrgInfo::from_record(&default));
        let master_principal = Principal { org: default, key: Arc::new(KeyInfo::master()), role: Some(Role::Owner) };
        let accounts = Accounts {
            repo,
            master,
            master_principal,
            cache: RwLock::new(Cache::default()),
            loads: std::sync::atomic::AtomicU64::new(1),
        };
        accounts.refresh().await?;
        Ok(accounts)
    }

    /// Unless the store's accounts version is the one already loaded, reads every org and
    /// the keys changed since the last refresh (with an overlap, so that a change committed
    /// late, or in the same millisecond as the last look, is not missed; re-reading a version
    /// already applied is harmless). The version is read first, so what is read after it is
    /// at least that new.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let version = self.repo.accounts_version().await?;
        if self.read().version == Some(version) {
            return Ok(());
        }
        let cursor = self.read().cursor.saturating_sub(CURSOR_OVERLAP_MS);
        let orgs = self.repo.list_orgs().await?;
        let changed = self.repo.keys_changed_since(cursor).await?;
        let load = self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (all, guardrails) = self.guardrails_by_key().await?;
        let workspaces = self.repo.all_workspaces().await?;
        let (roles, member_guardrails) = self.load_members(&all).await?;
        let mut cache = self.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Replaced whole, unless a load that started later (after a local write) is applied.
        if load > cache.loaded {
            cache.loaded = load;
            cache.version = Some(version);
            cache.roles = roles;
            cache.member_guardrails = member_guardrails;
            cache.guardrails = guardrails;
            let mut workspaces: HashMap<String, Arc<WorkspaceRecord>> =
                workspaces.into_iter().map(|w| (w.id.clone(), Arc::new(w))).collect();
            // Workspaces noted locally since the load began are kept.
            for (id, ws) in std::mem::take(&mut cache.noted_workspaces) {
                match ws {
                    Some(ws) => workspaces.insert(id, ws),
                    None => workspaces.remove(&id),
                };
            }
            cache.workspaces = workspaces;
        }
        // Merged, never replaced: a refresh that read the list just before a local write must
        // not drop what that write added (organisations are never deleted).
        for org in &orgs {
            cache.orgs.insert(org.id.clone(), Arc::new(OrgInfo::from_record(org)));
        }
        for record in changed {
            cache.cursor = cache.cursor.max(record.updated_at_ms);
            apply_change(&mut cache, record);
        }
        Ok(())
    }

    /// Every guardrail by id, and the one assigned to each key.
    async fn guardrails_by_key(&self) -> Result<Guardrails, StoreError> {
        let all: HashMap<String, Arc<GuardrailRecord>> =
            self.repo.all_guardrails().await?.into_iter().map(|g| (g.id.clone(), Arc::new(g))).collect();
        let assignments = self.repo.all_guardrail_keys().await?;
        let by_key = assignments.into_iter().filter_map(|(gid, key)| Some((key, all.get(&gid)?.clone()))).collect();
        Ok((all, by_key))
    }

    /// Every member's role and every member's guardrail (`all`: every guardrail by id).
    async fn load_members(
        &self,
        all: &HashMap<String, Arc<GuardrailRecord>>,
    ) -> Result<(ByMember<Role>, ByMember<Arc<GuardrailRecord>>), StoreError> {
        let mut roles: ByMember<Role> = HashMap::new();
        for m in self.repo.all_members().await? {
            if let Some(role) = Role::parse(&m.role) {
                roles.entry(m.org_id).or_default().insert(m.user_id, role);
            }
        }
        let mut guardrails: ByMember<Arc<GuardrailRecord>> = HashMap::new();
        for a in self.repo.all_guardrail_members().await? {
            if let Some(g) = all.get(&a.guardrail_id).filter(|g| g.org_id == a.org_id) {
                guardrails.entry(a.org_id).or_default().insert(a.user_id, Arc::clone(g));
            }
        }
        Ok((roles, guardrails))
    }

    /// Reloads members' roles at once after a local change.
    pub async fn refresh_members(&self) -> Result<(), StoreError> {
        self.refresh_guardrails().await
    }

    /// Reloads guardrails, their assignments and members' roles at once after a local change
    /// (other instances see it on their next refresh).
    pub async fn refresh_guardrails(&self) -> Result<(), StoreError> {
        let load = self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (all, guardrails) = self.guardrails_by_key().await?;
        let (roles, member_guardrails) = self.load_members(&all).await?;
        let mut cache = self.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if load > cache.loaded {
            cache.loaded = load;
            cache.guardrails = guardrails;
            cache.roles = roles;
            cache.member_guardrails = member_guardrails;
        }
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
            let record = Arc::new(record);
            cache.workspaces.insert(record.id.clone(), Arc::clone(&record));
            cache.noted_workspaces.push((record.id.clone(), Some(record)));
        }
        if let Some(id) = deleted_id {
            cache.workspaces.remove(id);
            cache.noted_workspaces.push((id.to_owned(), None));
        }
    }

    /// The guardrails that apply to a key: its own and its member's (both are enforced).
    pub fn guardrails_of(&self, key: &KeyInfo) -> Vec<Arc<GuardrailRecord>> {
        self.guardrails_with_member(key).into_iter().map(|(g, _)| g).collect()
    }

    /// [`Accounts::guardrails_of`], each with the member it was assigned to (`None`: assigned
    /// to the key itself). One guardrail assigned both ways counts as the member's, whose
    /// spend caps are the wider scope.
    pub fn guardrails_with_member(&self, key: &KeyInfo) -> Vec<(Arc<GuardrailRecord>, Option<String>)> {
        let cache = self.read();
        let own = cache.guardrails.get(&key.id);
        let member = key
            .member_id
            .as_deref()
            .and_then(|m| Some((cache.member_guardrails.get(&key.org_id)?.get(m)?, m)));
        let mut out = Vec::with_capacity(2);
        if let Some(g) = own.filter(|g| member.is_none_or(|(m, _)| m.id != g.id)) {
            out.push((Arc::clone(g), None));
        }
        if let Some((g, m)) = member {
            out.push((Arc::clone(g), Some(m.to_owned())));
        }
        out
    }

    /// A member's role, from the cache.
    pub fn role_of(&self, org_id: &str, user_id: &str) -> Option<Role> {
        self.read().roles.get(org_id)?.get(user_id).copied()
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
        // Every usable key is in the cache, so a lookup settles it; the format and checksum are
        // checked only to say, at debug level, why a key was refused.
        let cache = self.read();
        let Some(key) = cache.keys.get(hash.hex().as_str()) else {
            let well_formed = crate::keys::is_well_formed(presented, INFERENCE_PREFIX)
                || crate::keys::is_well_formed(presented, MANAGEMENT_PREFIX);
            tracing::debug!(well_formed, "refused an API key that is not known here");
            return Err(ApiError::InvalidApiKey);
        };
        if !key.usable_at(crate::pipeline::unix_now_ms()) {
            return Err(ApiError::InvalidApiKey);
        }
        let org = cache.orgs.get(&key.org_id).ok_or(ApiError::InvalidApiKey)?;
        let role = role_of(&cache, key).ok_or(ApiError::InvalidApiKey)?;
        Ok(Principal { org: org.clone(), key: key.clone(), role })
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
        let role = role_of(&cache, key)?;
        Some(Principal { org: org.clone(), key: key.clone(), role })
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

    pub fn members(&self) -> &dyn MemberRepo {
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

#[cfg(test)]
mod tests;
