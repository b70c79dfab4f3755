//! Accounts and money: organisations, workspaces, members, API keys, guardrails and the
//! append-only credit ledger — records and repository traits.
//!
//! Money is stored as signed integer **nano-units** of the organisation's currency
//! (1 INR = 1_000_000_000 nanos): exact in SQLite and Postgres alike, summable in SQL. The
//! gateway converts from and to `rust_decimal` at its edge.

use crate::{BoxFuture, StoreError};

/// An organisation: the tenant that owns keys, members and a balance.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct OrgRecord {
    pub id: String,
    pub name: String,
    /// `INR` or `USD`: every ledger amount of the org is in this currency.
    pub currency: String,
    /// IANA name (`Asia/Kolkata`, `UTC`) in which daily/monthly windows are reckoned.
    pub timezone: String,
    pub created_at_ms: i64,
}

/// An API key. The secret itself is never stored: `id` is the hex SHA-256 of the key (the
/// OpenRouter-style `hash` that identifies it in the API).
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyRecord {
    pub id: String,
    pub org_id: String,
    pub workspace_id: Option<String>,
    /// `management` (manages its org) or `inference` (calls models).
    pub kind: String,
    pub name: String,
    /// A display form such as `marga_sk_Ab3…x9Z`: never enough to use the key.
    pub label: String,
    /// Credit limit in nanos of the org currency, over `limit_reset` windows (or lifetime).
    pub limit_nanos: Option<i64>,
    /// `daily`, `weekly`, `monthly` or NULL (lifetime).
    pub limit_reset: Option<String>,
    pub rpm_limit: Option<i64>,
    /// Requests per day.
    pub daily_limit: Option<i64>,
    /// Monthly budget in nanos of the org currency.
    pub budget_nanos: Option<i64>,
    /// BharatRouter trial tier: free, capped at 60 req/min and 200 req/day.
    pub trial: bool,
    pub disabled: bool,
    pub expires_at_ms: Option<i64>,
    pub created_at_ms: i64,
    /// Bumped on every change; caches poll `keys_changed_since`.
    pub updated_at_ms: i64,
    /// Set when deleted (revoked); revoked keys stay for the record and are returned by
    /// `keys_changed_since` so that caches drop them.
    pub revoked_at_ms: Option<i64>,
    /// The member the key belongs to (`members.user_id`): a management key acts with that
    /// member's role; a guardrail assigned to the member applies to the key.
    pub member_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct WorkspaceRecord {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub monthly_budget_nanos: Option<i64>,
    pub created_at_ms: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct MemberRecord {
    pub org_id: String,
    pub user_id: String,
    pub email: String,
    /// `owner`, `admin` or `member`.
    pub role: String,
    pub created_at_ms: i64,
}

/// OpenRouter guardrail: spend caps and model allow/block lists, assigned to keys and members.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct GuardrailRecord {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub max_daily_spend_nanos: Option<i64>,
    pub max_weekly_spend_nanos: Option<i64>,
    pub max_monthly_spend_nanos: Option<i64>,
    /// JSON array of model ids (empty = all allowed).
    pub allowed_models: String,
    /// JSON array of model ids.
    pub blocked_models: String,
    pub require_zdr: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One ledger line. Append-only: corrections are new lines.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct LedgerEntry {
    /// Assigned by the database; ignored on insert.
    pub id: i64,
    pub org_id: String,
    /// Signed: credits positive, charges negative.
    pub amount_nanos: i64,
    pub currency: String,
    /// `grant`, `topup`, `charge` or `refund`.
    pub kind: String,
    /// What the line is about (generation id, lease id, payment id…). `(org_id, kind,
    /// reference)` is unique: appending the same line twice is a no-op.
    pub reference: String,
    pub key_id: Option<String>,
    pub workspace_id: Option<String>,
    pub note: Option<String>,
    pub created_at_ms: i64,
}

/// Organisations, workspaces, members, keys and guardrails.
pub trait AccountRepo: Send + Sync {
    fn create_org<'a>(&'a self, org: &'a OrgRecord) -> BoxFuture<'a, Result<(), StoreError>>;
    fn get_org<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<OrgRecord>, StoreError>>;
    fn list_orgs(&self) -> BoxFuture<'_, Result<Vec<OrgRecord>, StoreError>>;
    /// A number that moves on with every change to orgs, keys, workspaces, members,
    /// guardrails and guardrail assignments, made by any instance (or by hand in SQL), and is
    /// visible exactly when the change is: what has not moved has not changed.
    fn accounts_version(&self) -> BoxFuture<'_, Result<i64, StoreError>>;

    fn create_key<'a>(&'a self, key: &'a KeyRecord) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Replaces every field of the key with `id` (and `org_id`); false when there is none.
    fn update_key<'a>(&'a self, key: &'a KeyRecord) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn get_key<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<KeyRecord>, StoreError>>;
    /// The org's keys that are not revoked, newest first.
    fn list_keys<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<Vec<KeyRecord>, StoreError>>;
    /// Every key (revoked included) with `updated_at_ms > since_ms`, oldest change first.
    fn keys_changed_since(&self, since_ms: i64) -> BoxFuture<'_, Result<Vec<KeyRecord>, StoreError>>;

    fn create_workspace<'a>(&'a self, ws: &'a WorkspaceRecord) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Every workspace of every org, for the in-memory cache.
    fn all_workspaces(&self) -> BoxFuture<'_, Result<Vec<WorkspaceRecord>, StoreError>>;
    fn list_workspaces<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<Vec<WorkspaceRecord>, StoreError>>;
    fn update_workspace<'a>(&'a self, ws: &'a WorkspaceRecord) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Keys in the workspace are detached (`workspace_id` cleared, `updated_at_ms` bumped so
    /// that `keys_changed_since` reports them) in the same transaction.
    fn delete_workspace<'a>(&'a self, org_id: &'a str, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Inserts or updates (by `org_id`, `user_id`).
    fn upsert_member<'a>(&'a self, member: &'a MemberRecord) -> BoxFuture<'a, Result<(), StoreError>>;
    fn list_members<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<Vec<MemberRecord>, StoreError>>;
    fn delete_member<'a>(&'a self, org_id: &'a str, user_id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;

    fn create_guardrail<'a>(&'a self, g: &'a GuardrailRecord) -> BoxFuture<'a, Result<(), StoreError>>;
    fn update_guardrail<'a>(&'a self, g: &'a GuardrailRecord) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn delete_guardrail<'a>(&'a self, org_id: &'a str, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn list_guardrails<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<Vec<GuardrailRecord>, StoreError>>;
    /// Every guardrail of every org, for the in-memory cache.
    fn all_guardrails(&self) -> BoxFuture<'_, Result<Vec<GuardrailRecord>, StoreError>>;
    /// Assigns (or with `assigned = false` unassigns) a guardrail to keys; a key holds at most
    /// one guardrail, so assigning replaces its other one. Ids of other orgs are ignored. Returns how many assignments changed.
    fn set_guardrail_keys<'a>(
        &'a self,
        org_id: &'a str,
        guardrail_id: &'a str,
        key_ids: &'a [String],
        assigned: bool,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// `(guardrail_id, key_id)` pairs of every assignment.
    fn all_guardrail_keys(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, StoreError>>;
}

/// Credit set aside for one gateway instance, so that admission can reserve request costs in
/// memory. A lease is live while `closed` is false and `expires_at_ms` is in the future; an
/// instance that dies simply stops renewing it, and the unused part returns to the org when it
/// expires. Charges made under a lease are ordinary ledger lines (durable on their own).
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct LeaseRecord {
    pub id: String,
    pub org_id: String,
    pub amount_nanos: i64,
    /// Charged so far under this lease.
    pub used_nanos: i64,
    /// Which instance holds it (for operators reading the table).
    pub holder: String,
    pub expires_at_ms: i64,
    pub closed: bool,
    pub created_at_ms: i64,
}

/// One settled request: the charge line, and the lease it was reserved under.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Charge {
    pub entry: LedgerEntry,
    pub lease_id: Option<String>,
}

/// The append-only ledger and the credit leases.
pub trait LedgerRepo: Send + Sync {
    /// Appends the lines in one transaction; a line whose `(org_id, kind, reference)` exists
    /// is skipped. Returns how many were inserted.
    fn append<'a>(&'a self, entries: &'a [LedgerEntry]) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// Records charges in one transaction: each line is appended (skipped if its reference
    /// exists) and, when it was inserted, its amount (as a positive number) is added to its
    /// lease's `used_nanos`. Returns how many lines were inserted.
    fn charge<'a>(&'a self, charges: &'a [Charge]) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// Sum of every line of the org (the balance), in nanos.
    fn balance<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<i64, StoreError>>;
    /// `(balance, usage)`: the sum of every line of the org and the sum of its `charge` lines
    /// (as a positive number), read in one statement so that both see the same charges (two
    /// reads could straddle a commit: a balance without a charge the usage already counts).
    fn totals<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<(i64, i64), StoreError>>;
    /// The balance minus the unused part of every live lease (at `now_ms`).
    fn available<'a>(&'a self, org_id: &'a str, now_ms: i64) -> BoxFuture<'a, Result<i64, StoreError>>;
    /// Opens `lease` only if `available(org, lease.created_at_ms) >= lease.amount_nanos`,
    /// atomically with respect to every other writer (SQLite: one writer, `BEGIN IMMEDIATE`;
    /// Postgres: the org row locked `FOR NO KEY UPDATE`). Returns whether it was opened (never
    /// for an unknown org or a negative amount).
    fn open_lease<'a>(&'a self, lease: &'a LeaseRecord) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Moves a live lease's expiry; false when it is closed, already expired (by the system
    /// clock: its credit may have been leased again since) or gone.
    fn renew_lease<'a>(&'a self, id: &'a str, expires_at_ms: i64) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn close_lease<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    fn get_lease<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<LeaseRecord>, StoreError>>;
    /// Sum of `charge` lines (as a positive number) since `since_ms`, for the org or, if
    /// given, one key.
    fn spend_since<'a>(
        &'a self,
        org_id: &'a str,
        key_id: Option<&'a str>,
        since_ms: i64,
    ) -> BoxFuture<'a, Result<i64, StoreError>>;
    /// Sum of `charge` lines (as a positive number) of keys in a workspace since `since_ms`.
    fn workspace_spend_since<'a>(
        &'a self,
        org_id: &'a str,
        workspace_id: &'a str,
        since_ms: i64,
    ) -> BoxFuture<'a, Result<i64, StoreError>>;
    /// Sum of `charge` lines (as a positive number) of the keys that belong to member
    /// `user_id` since `since_ms`: what a guardrail assigned to the member caps.
    fn member_spend_since<'a>(
        &'a self,
        org_id: &'a str,
        user_id: &'a str,
        since_ms: i64,
    ) -> BoxFuture<'a, Result<i64, StoreError>>;
    /// Newest first, `id < before` when given.
    fn entries<'a>(
        &'a self,
        org_id: &'a str,
        before: Option<i64>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<LedgerEntry>, StoreError>>;
}
