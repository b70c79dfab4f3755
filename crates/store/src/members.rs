//! Members of an organisation and their roles, with the invariants that must hold across
//! instances (at least one owner, at most [`MAX_MEMBERS`] members, one email once), and the
//! guardrails assigned to members.
//!
//! Every method that checks an invariant before it writes serialises on the organisation
//! (SQLite: one writer, `BEGIN IMMEDIATE`; Postgres: the org's row locked `FOR NO KEY
//! UPDATE`), so two owners demoting each other at once cannot leave the org without one.

use crate::{BoxFuture, MemberRecord, StoreError};

/// Members per organisation (BharatRouter: "at most 50 members plus pending invites").
pub const MAX_MEMBERS: i64 = 50;

/// What a member change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    Done,
    /// No such member in this organisation.
    NotFound,
    /// The change would leave the organisation without an owner.
    LastOwner,
    /// The organisation already has [`MAX_MEMBERS`] members.
    Full,
    /// A member with this email (or user id) exists.
    Duplicate,
}

/// A guardrail assigned to a member.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct GuardrailMemberRecord {
    pub guardrail_id: String,
    pub org_id: String,
    pub user_id: String,
    pub created_at_ms: i64,
}

pub trait MemberRepo: Send + Sync {
    /// Adds `member` unless the org is full or has a member with its email or user id.
    fn add_member<'a>(&'a self, member: &'a MemberRecord) -> BoxFuture<'a, Result<MemberChange, StoreError>>;
    /// Changes a member's role, refusing to demote the last owner.
    fn set_member_role<'a>(
        &'a self,
        org_id: &'a str,
        user_id: &'a str,
        role: &'a str,
    ) -> BoxFuture<'a, Result<MemberChange, StoreError>>;
    /// Removes a member, refusing to remove the last owner. In the same transaction their
    /// management keys are revoked (at `now_ms`, `updated_at_ms` bumped so that caches see
    /// it) and their guardrail assignment goes.
    fn remove_member<'a>(
        &'a self,
        org_id: &'a str,
        user_id: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<MemberChange, StoreError>>;
    /// Every member of every org, for the in-memory cache.
    fn all_members(&self) -> BoxFuture<'_, Result<Vec<MemberRecord>, StoreError>>;

    /// Assigns (replacing any other guardrail of the member) or unassigns a guardrail to
    /// members; the guardrail and each member must belong to `org_id`, other ids are ignored.
    /// Returns how many assignments changed.
    fn set_guardrail_members<'a>(
        &'a self,
        org_id: &'a str,
        guardrail_id: &'a str,
        user_ids: &'a [String],
        assigned: bool,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// Every member assignment of every org.
    fn all_guardrail_members(&self) -> BoxFuture<'_, Result<Vec<GuardrailMemberRecord>, StoreError>>;
}
