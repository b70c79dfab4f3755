//! The in-memory forms of organisations and keys that requests carry.

use std::sync::Arc;

use marga_store::{KeyRecord, OrgRecord};

use super::roles::Role;
use super::timezone::UtcOffset;
use crate::money::Currency;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// The operator's key: everything, as the owner of the default organisation.
    Master,
    /// Manages its organisation (keys, guardrails, …); cannot call models.
    Management,
    /// Calls models.
    Inference,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Master => "master",
            KeyKind::Management => "management",
            KeyKind::Inference => "inference",
        }
    }
}

#[derive(Debug)]
pub struct OrgInfo {
    pub id: String,
    pub name: String,
    pub currency: Currency,
    pub timezone: UtcOffset,
}

impl OrgInfo {
    pub fn from_record(record: &OrgRecord) -> Self {
        OrgInfo {
            id: record.id.clone(),
            name: record.name.clone(),
            currency: record.currency.parse().unwrap_or(Currency::Usd),
            timezone: UtcOffset::parse(&record.timezone).unwrap_or_default(),
        }
    }
}

#[derive(Debug)]
pub struct KeyInfo {
    /// The key's hash (hex SHA-256): its public identifier.
    pub id: String,
    pub org_id: String,
    pub workspace_id: Option<String>,
    pub kind: KeyKind,
    pub name: String,
    pub limit_nanos: Option<i64>,
    pub limit_reset: Option<String>,
    pub rpm_limit: Option<i64>,
    pub daily_limit: Option<i64>,
    pub budget_nanos: Option<i64>,
    pub trial: bool,
    pub disabled: bool,
    pub expires_at_ms: Option<i64>,
    /// The version of the record this was built from.
    pub updated_at_ms: i64,
    /// The member the key belongs to (its role, for a management key; its guardrail).
    pub member_id: Option<String>,
}

impl KeyInfo {
    pub fn master() -> Self {
        KeyInfo {
            id: "master".to_owned(),
            org_id: super::DEFAULT_ORG.to_owned(),
            workspace_id: None,
            kind: KeyKind::Master,
            name: "master key".to_owned(),
            limit_nanos: None,
            limit_reset: None,
            rpm_limit: None,
            daily_limit: None,
            budget_nanos: None,
            trial: false,
            disabled: false,
            expires_at_ms: None,
            updated_at_ms: 0,
            member_id: Some(super::OPERATOR_MEMBER.to_owned()),
        }
    }

    pub fn from_record(r: &KeyRecord) -> Self {
        KeyInfo {
            id: r.id.clone(),
            org_id: r.org_id.clone(),
            workspace_id: r.workspace_id.clone(),
            kind: if r.kind == "management" { KeyKind::Management } else { KeyKind::Inference },
            name: r.name.clone(),
            limit_nanos: r.limit_nanos,
            limit_reset: r.limit_reset.clone(),
            rpm_limit: r.rpm_limit,
            daily_limit: r.daily_limit,
            budget_nanos: r.budget_nanos,
            trial: r.trial,
            disabled: r.disabled,
            expires_at_ms: r.expires_at_ms,
            updated_at_ms: r.updated_at_ms,
            member_id: r.member_id.clone(),
        }
    }

    /// Not disabled and not expired at `now_ms`.
    pub fn usable_at(&self, now_ms: i64) -> bool {
        !self.disabled && self.expires_at_ms.is_none_or(|t| t > now_ms)
    }
}

/// Who is calling: a key, the organisation it belongs to and, for a management key, the role
/// of its member (see [`super::roles`]).
#[derive(Clone, Debug)]
pub struct Principal {
    pub org: Arc<OrgInfo>,
    pub key: Arc<KeyInfo>,
    pub role: Option<Role>,
}

impl Principal {
    pub fn is_master(&self) -> bool {
        self.key.kind == KeyKind::Master
    }

    /// May call models.
    pub fn require_inference(&self) -> Result<(), crate::error::ApiError> {
        match self.key.kind {
            KeyKind::Master | KeyKind::Inference => Ok(()),
            KeyKind::Management => Err(crate::error::ApiError::Forbidden {
                message: "management keys cannot call models; use an inference key".to_owned(),
            }),
        }
    }

    /// May read its organisation's data (any management key, any role): the least a
    /// management endpoint asks. Endpoints that change something ask [`Principal::require`].
    pub fn require_management(&self) -> Result<(), crate::error::ApiError> {
        self.require(super::Action::ReadOrg)
    }

    /// May manage every organisation (the operator).
    pub fn require_operator(&self) -> Result<(), crate::error::ApiError> {
        if self.is_master() {
            Ok(())
        } else {
            Err(crate::error::ApiError::Forbidden { message: "only the master key can manage organisations".to_owned() })
        }
    }
}
