//! Members of an organisation and their roles (BharatRouter's teams): `GET/POST /me/members`,
//! `PATCH /me/members/{id}` (change a role: owners only), `DELETE /me/members/{id}` (remove,
//! or leave). Who may do what is [`crate::accounts::roles`]'s matrix.
//!
//! Marga has no browser sign-in, so adding a member returns a management key for them (shown
//! once): that key acts with the member's role. An organisation always keeps at least one
//! owner and has at most [`MAX_MEMBERS`] members; removing a member revokes their management
//! keys (their inference keys are the organisation's and keep working).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use marga_store::{MemberChange, MemberRecord, MAX_MEMBERS};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::extract::{parse_json, read_body};
use super::keys::{create_key, internal, iso, member_role, NewKey};
use super::AppState;
use crate::accounts::{Action, Principal, Role, OPERATOR_MEMBER};
use crate::error::ApiError;
use crate::pipeline::unix_now_ms;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMember {
    email: String,
    #[serde(default)]
    role: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolePatch {
    role: String,
}

#[derive(Serialize)]
pub struct MemberView {
    id: String,
    user_id: String,
    organization_id: String,
    email: String,
    role: String,
    created_at: Value,
}

fn view(m: &MemberRecord) -> MemberView {
    MemberView {
        id: m.user_id.clone(),
        user_id: m.user_id.clone(),
        organization_id: m.org_id.clone(),
        email: m.email.clone(),
        role: m.role.clone(),
        created_at: iso(m.created_at_ms),
    }
}

/// A fresh member id.
pub fn new_user_id() -> String {
    format!("usr_{}", uuid::Uuid::now_v7().simple())
}

/// A plausible email, trimmed: 3 to 254 characters with one `@` not at either end.
pub fn valid_email(email: &str) -> Result<String, ApiError> {
    let email = email.trim();
    let ok = (3..=254).contains(&email.len())
        && email.matches('@').count() == 1
        && !email.starts_with('@')
        && !email.ends_with('@')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(email.to_owned())
    } else {
        Err(ApiError::invalid("`email` must be an email address", Some("email".into())))
    }
}

fn parse_role(text: &str) -> Result<Role, ApiError> {
    Role::parse(text)
        .ok_or_else(|| ApiError::invalid(format!("`role` must be owner, admin or member, not `{text}`"), Some("role".into())))
}

fn caller(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let principal = state.admission.accounts.authenticate(headers)?;
    principal.require(Action::ReadOrg)?;
    Ok(principal)
}

fn refused(change: MemberChange) -> ApiError {
    match change {
        MemberChange::NotFound => ApiError::NotFound,
        MemberChange::LastOwner => ApiError::Conflict {
            code: "last_owner",
            message: "an organisation keeps at least one owner: make another member owner first".to_owned(),
        },
        MemberChange::Full => ApiError::Conflict {
            code: "member_limit",
            message: format!("an organisation has at most {MAX_MEMBERS} members"),
        },
        MemberChange::Duplicate => {
            ApiError::Conflict { code: "member_exists", message: "a member with this email exists".to_owned() }
        }
        MemberChange::Done => ApiError::Internal(anyhow::anyhow!("a member change succeeded but was reported as refused")),
    }
}

/// `GET /me/members`: every member of the caller's organisation (any role).
pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let principal = caller(&state, &headers)?;
    let members = state.admission.accounts.repo().list_members(&principal.org.id).await.map_err(internal)?;
    #[derive(Serialize)]
    struct Listing {
        data: Vec<MemberView>,
        total_count: usize,
    }
    let data: Vec<MemberView> = members.iter().map(view).collect();
    Ok(Json(Listing { total_count: data.len(), data }).into_response())
}

/// `POST /me/members {email, role?}` → 201 with the member and their management key (shown
/// once). Adding an owner is an owner's act.
pub async fn add(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let principal = caller(&state, &headers)?;
    principal.require(Action::ManageMembers)?;
    let new: NewMember = parse_json(&read_body(body, state.max_body).await?)?;
    let role = parse_role(new.role.as_deref().unwrap_or("member"))?;
    if role == Role::Owner {
        principal.require(Action::ManageOwners)?;
    }
    let member = MemberRecord {
        org_id: principal.org.id.clone(),
        user_id: new_user_id(),
        email: valid_email(&new.email)?,
        role: role.as_str().to_owned(),
        created_at_ms: unix_now_ms(),
    };
    let accounts = &state.admission.accounts;
    match accounts.members().add_member(&member).await.map_err(internal)? {
        MemberChange::Done => {}
        other => return Err(refused(other)),
    }
    let request = NewKey {
        name: format!("{} ({})", member.email, &member.user_id[member.user_id.len().saturating_sub(6)..]),
        kind: Some("management".to_owned()),
        creator_user_id: Some(member.user_id.clone()),
        ..NewKey::default()
    };
    let (_, management_key) = create_key(&state, &principal, request).await?;
    accounts.refresh_members().await.map_err(internal)?;
    #[derive(Serialize)]
    struct Added {
        data: MemberView,
        management_key: String,
    }
    Ok((StatusCode::CREATED, Json(Added { data: view(&member), management_key })).into_response())
}

/// The caller's org's member `id`, or 404; the operator (whom the master key acts as) is not
/// for members to change.
async fn target(state: &AppState, principal: &Principal, id: &str) -> Result<Role, ApiError> {
    let role = member_role(state, &principal.org.id, id).await?.ok_or(ApiError::NotFound)?;
    if id == OPERATOR_MEMBER && principal.org.id == crate::accounts::DEFAULT_ORG {
        return Err(ApiError::Forbidden { message: "the operator's membership cannot be changed".to_owned() });
    }
    Ok(role)
}

/// `PATCH /me/members/{id} {role}`: owners only; the last owner cannot step down.
pub async fn update(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = caller(&state, &headers)?;
    principal.require(Action::ManageOwners)?;
    let patch: RolePatch = parse_json(&read_body(body, state.max_body).await?)?;
    let role = parse_role(&patch.role)?;
    target(&state, &principal, &id).await?;
    let accounts = &state.admission.accounts;
    match accounts.members().set_member_role(&principal.org.id, &id, role.as_str()).await.map_err(internal)? {
        MemberChange::Done => {}
        other => return Err(refused(other)),
    }
    accounts.refresh_members().await.map_err(internal)?;
    let members = accounts.repo().list_members(&principal.org.id).await.map_err(internal)?;
    let member = members.iter().find(|m| m.user_id == id).ok_or(ApiError::NotFound)?;
    Ok(Json(super::keys::Data { data: view(member) }).into_response())
}

/// `DELETE /me/members/{id}`: owners remove anyone, admins remove admins and members, anyone
/// may leave; the last owner cannot go. Their management keys are revoked with them.
pub async fn remove(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let principal = caller(&state, &headers)?;
    let role = target(&state, &principal, &id).await?;
    let leaving = principal.key.member_id.as_deref() == Some(id.as_str()) && !principal.is_master();
    if !leaving {
        principal.require(if role == Role::Owner { Action::ManageOwners } else { Action::ManageMembers })?;
    }
    let accounts = &state.admission.accounts;
    match accounts.members().remove_member(&principal.org.id, &id, unix_now_ms()).await.map_err(internal)? {
        MemberChange::Done => {}
        other => return Err(refused(other)),
    }
    // The revoked keys and the roles, here at once; elsewhere within a refresh.
    accounts.refresh().await.map_err(internal)?;
    Ok(Json(serde_json::json!({ "deleted": true })).into_response())
}
