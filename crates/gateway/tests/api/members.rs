//! Members and roles end to end: an organisation starts with an owner holding the first
//! management key; members are added with a role and get a management key that acts with it;
//! every management endpoint asks the role matrix of docs/accounts.md (403 `forbidden`
//! otherwise); guardrails assigned to a member apply to the member's keys; another
//! organisation's member and guardrail ids answer 404 and change nothing.

use reqwest::Method;
use serde_json::{json, Value};

use crate::accounts::{call, chat, get, grant, new_key, new_org, post, Answer};
use crate::helpers::{spawn_app, TestApp};

/// A member added by `by` with `role`: `(user id, management key)`.
async fn add_member(app: &TestApp, by: &str, email: &str, role: &str) -> (String, String) {
    let added = post(app, by, "/me/members", &json!({"email": email, "role": role})).await;
    assert_eq!(added.status, 201, "{}", added.body);
    assert_eq!(added.body["data"]["role"], role);
    let id = added.body["data"]["user_id"].as_str().expect("user id").to_owned();
    (id, added.body["management_key"].as_str().expect("management key").to_owned())
}

fn assert_forbidden(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 403, "{what}: {}", answer.body);
    assert_eq!(answer.body["error"]["code"], "forbidden", "{what}");
    assert_eq!(answer.body["error"]["type"], "permission_error", "{what}: the OpenAI envelope");
}

async fn role_in_list(app: &TestApp, key: &str, user_id: &str) -> Option<String> {
    let listed = get(app, key, "/me/members").await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let rows = listed.body["data"].as_array().cloned().unwrap_or_default();
    rows.iter().find(|m| m["user_id"] == user_id).and_then(|m| m["role"].as_str().map(str::to_owned))
}

/// An org with an owner (its first management key), an admin and a member.
struct Team {
    org: String,
    owner: String,
    owner_id: String,
    admin: String,
    admin_id: String,
    member: String,
    member_id: String,
}

async fn team(app: &TestApp) -> Team {
    let created = post(app, &app.master_key, "/admin/orgs", &json!({"name": "Team", "currency": "USD", "owner_email": "boss@example.com"})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let org = created.body["id"].as_str().expect("org").to_owned();
    let owner = created.body["management_key"].as_str().expect("key").to_owned();
    let owner_id = created.body["owner_user_id"].as_str().expect("owner id").to_owned();
    let (admin_id, admin) = add_member(app, &owner, "admin@example.com", "admin").await;
    let (member_id, member) = add_member(app, &owner, "member@example.com", "member").await;
    Team { org, owner, owner_id, admin, admin_id, member, member_id }
}

#[tokio::test]
async fn a_new_org_starts_with_an_owner_who_holds_the_management_key() {
    let app = spawn_app().await;
    let t = team(&app).await;
    let listed = get(&app, &t.owner, "/me/members").await;
    assert_eq!(listed.body["total_count"], 3, "{}", listed.body);
    let owner = &listed.body["data"][0];
    assert_eq!((owner["user_id"].as_str(), owner["email"].as_str(), owner["role"].as_str()), (Some(t.owner_id.as_str()), Some("boss@example.com"), Some("owner")));
    let keys = get(&app, &t.owner, "/v1/keys").await;
    let creators: Vec<&Value> = keys.body["data"].as_array().expect("keys").iter().map(|k| &k["creator_user_id"]).collect();
    assert!(creators.contains(&&json!(t.owner_id)) && creators.contains(&&json!(t.admin_id)), "{creators:?}");
    // Every member reads the org.
    for key in [&t.owner, &t.admin, &t.member] {
        for path in ["/me/members", "/v1/keys", "/v1/guardrails", "/me/workspaces", "/v1/guardrails/assignments/members"] {
            let answer = get(&app, key, path).await;
            assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        }
    }
}

#[tokio::test]
async fn a_member_reads_but_changes_nothing() {
    let app = spawn_app().await;
    let t = team(&app).await;
    let (_, owner_key_hash) = new_key(&app, &t.owner, json!({"name": "owned"})).await;
    let guardrail = post(&app, &t.owner, "/v1/guardrails", &json!({"name": "g"})).await;
    let g = guardrail.body["data"]["id"].as_str().expect("id").to_owned();
    let attempts: Vec<(Method, String, Option<Value>)> = vec![
        (Method::POST, "/v1/keys".into(), Some(json!({"name": "mine"}))),
        (Method::POST, "/me/keys".into(), Some(json!({"name": "mine"}))),
        (Method::POST, "/v1/auth/account/api-keys".into(), Some(json!({"name": "mine"}))),
        (Method::PATCH, format!("/v1/keys/{owner_key_hash}"), Some(json!({"disabled": true}))),
        (Method::DELETE, format!("/v1/keys/{owner_key_hash}"), None),
        (Method::POST, "/v1/guardrails".into(), Some(json!({"name": "x"}))),
        (Method::PATCH, format!("/v1/guardrails/{g}"), Some(json!({"name": "x"}))),
        (Method::DELETE, format!("/v1/guardrails/{g}"), None),
        (Method::POST, format!("/v1/guardrails/{g}/members"), Some(json!({"member_user_ids": [t.admin_id]}))),
        (Method::POST, format!("/v1/guardrails/{g}/keys"), Some(json!({"key_hashes": [owner_key_hash]}))),
        (Method::POST, "/me/workspaces".into(), Some(json!({"name": "w"}))),
        (Method::PUT, "/me/routing/sandbox/echo".into(), Some(json!([{"model": "sandbox/echo"}]))),
        (Method::POST, "/me/members".into(), Some(json!({"email": "x@example.com"}))),
        (Method::PATCH, format!("/me/members/{}", t.admin_id), Some(json!({"role": "member"}))),
        (Method::DELETE, format!("/me/members/{}", t.admin_id), None),
    ];
    for (method, path, body) in attempts {
        let answer = call(&app, method.clone(), &t.member, &path, body.as_ref()).await;
        assert_forbidden(&answer, &format!("member {method} {path}"));
    }
    assert_eq!(get(&app, &t.owner, &format!("/v1/keys/{owner_key_hash}")).await.body["data"]["disabled"], false);
    assert_eq!(get(&app, &t.owner, &format!("/v1/guardrails/{g}")).await.body["data"]["name"], "g");
    assert_eq!(role_in_list(&app, &t.owner, &t.admin_id).await.as_deref(), Some("admin"));
    assert_eq!(get(&app, &t.owner, "/me/members").await.body["total_count"], 3);
}

#[tokio::test]
async fn an_admin_manages_everything_but_owners() {
    let app = spawn_app().await;
    let t = team(&app).await;
    // Allowed: keys, guardrails, workspaces, routing, adding and removing non-owners.
    let (_, hash) = new_key(&app, &t.admin, json!({"name": "by-admin"})).await;
    assert_eq!(get(&app, &t.owner, &format!("/v1/keys/{hash}")).await.body["data"]["creator_user_id"], json!(t.admin_id));
    assert_eq!(post(&app, &t.admin, "/v1/guardrails", &json!({"name": "g"})).await.status, 201);
    assert_eq!(post(&app, &t.admin, "/me/workspaces", &json!({"name": "w"})).await.status, 201);
    let chain = call(&app, Method::PUT, &t.admin, "/me/routing/sandbox/echo", Some(&json!([{"model": "sandbox/echo"}]))).await;
    assert_eq!(chain.status, 200, "{}", chain.body);
    let (temp_id, _) = add_member(&app, &t.admin, "temp@example.com", "admin").await;
    let removed = call(&app, Method::DELETE, &t.admin, &format!("/me/members/{temp_id}"), None).await;
    assert_eq!(removed.status, 200, "{}", removed.body);
    let (member_mg, _) = new_key(&app, &t.admin, json!({"name": "for member", "kind": "management", "creator_user_id": t.member_id})).await;
    let acting = get(&app, &member_mg, "/me/members").await;
    assert_eq!(acting.status, 200, "acts as the member: {}", acting.body);
    assert_forbidden(&post(&app, &member_mg, "/v1/keys", &json!({"name": "nope"})).await, "with the member's role");

    // Refused: owners, and roles.
    assert_forbidden(&post(&app, &t.admin, "/me/members", &json!({"email": "o@example.com", "role": "owner"})).await, "add an owner");
    let promote = call(&app, Method::PATCH, &t.admin, &format!("/me/members/{}", t.admin_id), Some(&json!({"role": "owner"}))).await;
    assert_forbidden(&promote, "promote oneself");
    let demote = call(&app, Method::PATCH, &t.admin, &format!("/me/members/{}", t.member_id), Some(&json!({"role": "admin"}))).await;
    assert_forbidden(&demote, "change a role");
    assert_forbidden(&call(&app, Method::DELETE, &t.admin, &format!("/me/members/{}", t.owner_id), None).await, "remove an owner");
    let as_owner = json!({"name": "as owner", "kind": "management", "creator_user_id": t.owner_id});
    assert_forbidden(&post(&app, &t.admin, "/v1/keys", &as_owner).await, "a management key acting as an owner");
    let owner_keys = get(&app, &t.owner, "/v1/keys").await.body["data"].as_array().cloned().unwrap_or_default();
    let owner_mg = owner_keys.iter().find(|k| k["kind"] == "management" && k["creator_user_id"] == json!(t.owner_id)).expect("owner's key");
    let owner_mg = owner_mg["hash"].as_str().expect("hash");
    assert_forbidden(&call(&app, Method::DELETE, &t.admin, &format!("/v1/keys/{owner_mg}"), None).await, "revoke an owner's key");
    assert_forbidden(&call(&app, Method::PATCH, &t.admin, &format!("/v1/keys/{owner_mg}"), Some(&json!({"disabled": true}))).await, "disable an owner's key");
    assert_eq!(get(&app, &t.owner, "/me/members").await.status, 200, "the owner's key still works");
    assert_eq!(role_in_list(&app, &t.owner, &t.admin_id).await.as_deref(), Some("admin"));
    assert_eq!(role_in_list(&app, &t.owner, &t.member_id).await.as_deref(), Some("member"));
}

#[tokio::test]
async fn owners_change_roles_at_once_and_an_org_always_keeps_one() {
    let app = spawn_app().await;
    let t = team(&app).await;
    assert_forbidden(&post(&app, &t.member, "/v1/keys", &json!({"name": "x"})).await, "before the promotion");
    let promoted = call(&app, Method::PATCH, &t.owner, &format!("/me/members/{}", t.member_id), Some(&json!({"role": "admin"}))).await;
    assert_eq!(promoted.status, 200, "{}", promoted.body);
    assert_eq!(promoted.body["data"]["role"], "admin");
    assert_eq!(post(&app, &t.member, "/v1/keys", &json!({"name": "x"})).await.status, 201, "the new role applies at once");

    let last = call(&app, Method::PATCH, &t.owner, &format!("/me/members/{}", t.owner_id), Some(&json!({"role": "admin"}))).await;
    assert_eq!((last.status, last.body["error"]["code"].as_str()), (409, Some("last_owner")), "{}", last.body);
    let leave = call(&app, Method::DELETE, &t.owner, &format!("/me/members/{}", t.owner_id), None).await;
    assert_eq!((leave.status, leave.body["error"]["code"].as_str()), (409, Some("last_owner")));
    let bad = call(&app, Method::PATCH, &t.owner, &format!("/me/members/{}", t.admin_id), Some(&json!({"role": "god"}))).await;
    assert_eq!(bad.status, 400);

    // A second owner: now the first may step down, and is an admin at once.
    let second = call(&app, Method::PATCH, &t.owner, &format!("/me/members/{}", t.admin_id), Some(&json!({"role": "owner"}))).await;
    assert_eq!(second.status, 200);
    let down = call(&app, Method::PATCH, &t.owner, &format!("/me/members/{}", t.owner_id), Some(&json!({"role": "admin"}))).await;
    assert_eq!(down.status, 200, "{}", down.body);
    let again = call(&app, Method::PATCH, &t.owner, &format!("/me/members/{}", t.owner_id), Some(&json!({"role": "owner"}))).await;
    assert_forbidden(&again, "an admin cannot make itself owner again");
    assert_eq!(role_in_list(&app, &t.admin, &t.admin_id).await.as_deref(), Some("owner"));
}

#[tokio::test]
async fn removing_a_member_revokes_their_management_keys_but_not_the_orgs_inference_keys() {
    let app = spawn_app().await;
    let t = team(&app).await;
    grant(&app, &t.org, "5").await;
    let (inference, _) = new_key(&app, &t.admin, json!({"name": "admin's app"})).await;
    assert_eq!(post(&app, &inference, "/v1/chat/completions", &chat(8)).await.status, 200);
    let removed = call(&app, Method::DELETE, &t.owner, &format!("/me/members/{}", t.admin_id), None).await;
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(get(&app, &t.admin, "/me/members").await.status, 401, "the removed member's key");
    assert_eq!(post(&app, &inference, "/v1/chat/completions", &chat(8)).await.status, 200, "the org's inference key");
    assert_eq!(role_in_list(&app, &t.owner, &t.admin_id).await, None);
    // A member may leave.
    let left = call(&app, Method::DELETE, &t.member, &format!("/me/members/{}", t.member_id), None).await;
    assert_eq!(left.status, 200, "{}", left.body);
    assert_eq!(get(&app, &t.member, "/me/members").await.status, 401);
    assert_eq!(get(&app, &t.owner, "/me/members").await.body["total_count"], 1);
}

#[tokio::test]
async fn an_org_has_at_most_fifty_members_each_email_once() {
    let app = spawn_app().await;
    let (_, owner) = new_org(&app, "USD").await;
    let dup = post(&app, &owner, "/me/members", &json!({"email": "a@example.com"})).await;
    assert_eq!(dup.status, 201);
    let again = post(&app, &owner, "/me/members", &json!({"email": "A@Example.com"})).await;
    assert_eq!((again.status, again.body["error"]["code"].as_str()), (409, Some("member_exists")));
    assert_eq!(post(&app, &owner, "/me/members", &json!({"email": "not an email"})).await.status, 400);
    assert_eq!(post(&app, &owner, "/me/members", &json!({"email": "b@example.com", "role": "boss"})).await.status, 400);
    for i in 0..48 {
        assert_eq!(post(&app, &owner, "/me/members", &json!({"email": format!("m{i}@example.com")})).await.status, 201);
    }
    let full = post(&app, &owner, "/me/members", &json!({"email": "late@example.com"})).await;
    assert_eq!((full.status, full.body["error"]["code"].as_str()), (409, Some("member_limit")), "{}", full.body);
    assert_eq!(get(&app, &owner, "/me/members").await.body["total_count"], 50);
}

#[tokio::test]
async fn inference_keys_and_unknown_keys_manage_no_members() {
    let app = spawn_app().await;
    let t = team(&app).await;
    let (inference, _) = new_key(&app, &t.owner, json!({"name": "app"})).await;
    assert_forbidden(&get(&app, &inference, "/me/members").await, "an inference key");
    assert_eq!(get(&app, "marga_mg_nope", "/me/members").await.status, 401);
    // The master key is the owner of the default org, whose operator member cannot be changed.
    let listed = get(&app, &app.master_key, "/me/members").await;
    assert_eq!(listed.body["data"][0]["user_id"], "operator", "{}", listed.body);
    let demote = call(&app, Method::PATCH, &app.master_key, "/me/members/operator", Some(&json!({"role": "member"}))).await;
    assert_forbidden(&demote, "the operator");
}

#[tokio::test]
async fn a_guardrail_on_a_member_applies_to_the_members_keys() {
    let app = spawn_app().await;
    let t = team(&app).await;
    grant(&app, &t.org, "5").await;
    let (members_key, _) = new_key(&app, &t.owner, json!({"name": "m", "creator_user_id": t.member_id})).await;
    let (owners_key, _) = new_key(&app, &t.owner, json!({"name": "o"})).await;
    let created = post(&app, &t.admin, "/v1/guardrails", &json!({"name": "no-echo", "blocked_models": ["sandbox/echo"]})).await;
    let g = created.body["data"]["id"].as_str().expect("id").to_owned();
    assert_eq!(post(&app, &members_key, "/v1/chat/completions", &chat(8)).await.status, 200);

    let assigned = post(&app, &t.admin, &format!("/v1/guardrails/{g}/assignments/members"), &json!({"member_user_ids": [t.member_id]})).await;
    assert_eq!(assigned.body["assigned_count"], 1, "{}", assigned.body);
    let refused = post(&app, &members_key, "/v1/chat/completions", &chat(8)).await;
    assert_forbidden(&refused, "the member's key under the guardrail");
    assert_eq!(post(&app, &owners_key, "/v1/chat/completions", &chat(8)).await.status, 200, "other members' keys");

    let listed = get(&app, &t.member, &format!("/v1/guardrails/{g}/assignments/members")).await;
    assert_eq!(listed.body["total_count"], 1, "{}", listed.body);
    assert_eq!(listed.body["data"][0]["user_id"], json!(t.member_id));
    assert_eq!(listed.body["data"][0]["organization_id"], json!(t.org));
    assert_eq!(get(&app, &t.owner, "/v1/guardrails/assignments/members").await.body["total_count"], 1);
    assert_eq!(get(&app, &t.owner, "/v1/guardrails/assignments/members?limit=0").await.status, 400);

    let removed = post(&app, &t.admin, &format!("/v1/guardrails/{g}/members/remove"), &json!({"member_user_ids": [t.member_id]})).await;
    assert_eq!(removed.body["unassigned_count"], 1);
    assert_eq!(post(&app, &members_key, "/v1/chat/completions", &chat(8)).await.status, 200, "lifted at once");
}

#[tokio::test]
async fn another_orgs_member_and_guardrail_ids_answer_404_and_change_nothing() {
    let app = spawn_app().await;
    let a = team(&app).await;
    let b = team(&app).await;
    let g_a = post(&app, &a.owner, "/v1/guardrails", &json!({"name": "a"})).await.body["data"]["id"].as_str().expect("id").to_owned();
    let g_b = post(&app, &b.owner, "/v1/guardrails", &json!({"name": "b"})).await.body["data"]["id"].as_str().expect("id").to_owned();
    let probes: Vec<(Method, String, Option<Value>)> = vec![
        (Method::PATCH, format!("/me/members/{}", a.member_id), Some(json!({"role": "owner"}))),
        (Method::DELETE, format!("/me/members/{}", a.member_id), None),
        (Method::DELETE, format!("/me/members/{}", a.owner_id), None),
        (Method::POST, format!("/v1/guardrails/{g_a}/members"), Some(json!({"member_user_ids": [b.member_id]}))),
        (Method::POST, format!("/v1/guardrails/{g_a}/assignments/members/remove"), Some(json!({"member_user_ids": [a.member_id]}))),
        (Method::GET, format!("/v1/guardrails/{g_a}/assignments/members"), None),
        (Method::GET, format!("/v1/guardrails/{g_a}/assignments/keys"), None),
    ];
    for (method, path, body) in probes {
        let answer = call(&app, method.clone(), &b.owner, &path, body.as_ref()).await;
        assert_eq!(answer.status, 404, "{method} {path}: {}", answer.body);
    }
    // B's guardrail and A's member: nothing is assigned.
    let cross = post(&app, &b.owner, &format!("/v1/guardrails/{g_b}/members"), &json!({"member_user_ids": [a.member_id]})).await;
    assert_eq!(cross.body["assigned_count"], 0, "{}", cross.body);
    // A key made by B cannot belong to A's member.
    let foreign = post(&app, &b.owner, "/v1/keys", &json!({"name": "x", "creator_user_id": a.member_id})).await;
    assert_eq!(foreign.status, 400, "{}", foreign.body);
    assert_eq!(role_in_list(&app, &a.owner, &a.member_id).await.as_deref(), Some("member"));
    assert_eq!(role_in_list(&app, &a.owner, &a.owner_id).await.as_deref(), Some("owner"));
    assert_eq!(get(&app, &a.owner, "/me/members").await.body["total_count"], 3);
    assert_eq!(get(&app, &b.owner, "/v1/guardrails/assignments/members").await.body["total_count"], 0);
    assert_eq!(get(&app, &a.owner, "/v1/guardrails/assignments/members").await.body["total_count"], 0);
    let listed_b = get(&app, &b.owner, "/me/members").await.body.to_string();
    assert!(!listed_b.contains(&a.member_id) && !listed_b.contains(&a.owner_id), "B lists A's members");
}

#[tokio::test]
async fn a_keys_own_guardrail_and_its_members_both_apply_and_assigning_replaces() {
    let app = spawn_app().await;
    let t = team(&app).await;
    grant(&app, &t.org, "5").await;
    let (key, hash) = new_key(&app, &t.owner, json!({"name": "m", "creator_user_id": t.member_id})).await;
    let new_guardrail = |body: Value| {
        let app = &app;
        let owner = t.owner.clone();
        async move { post(app, &owner, "/v1/guardrails", &body).await.body["data"]["id"].as_str().expect("id").to_owned() }
    };
    let open = new_guardrail(json!({"name": "open"})).await;
    let no_echo = new_guardrail(json!({"name": "no-echo", "blocked_models": ["sandbox/echo"]})).await;
    // The key's own guardrail allows everything; the member's blocks echo: both apply.
    assert_eq!(post(&app, &t.owner, &format!("/v1/guardrails/{open}/keys"), &json!({"key_hashes": [hash]})).await.body["assigned_count"], 1);
    assert_eq!(post(&app, &key, "/v1/chat/completions", &chat(8)).await.status, 200);
    post(&app, &t.owner, &format!("/v1/guardrails/{no_echo}/members"), &json!({"member_user_ids": [t.member_id]})).await;
    assert_forbidden(&post(&app, &key, "/v1/chat/completions", &chat(8)).await, "the member's guardrail too");
    // Assigning the member to another guardrail replaces: echo is allowed again.
    let moved = post(&app, &t.owner, &format!("/v1/guardrails/{open}/assignments/members"), &json!({"member_user_ids": [t.member_id]})).await;
    assert_eq!(moved.body["assigned_count"], 1, "{}", moved.body);
    assert_eq!(get(&app, &t.owner, &format!("/v1/guardrails/{no_echo}/assignments/members")).await.body["total_count"], 0);
    assert_eq!(post(&app, &key, "/v1/chat/completions", &chat(8)).await.status, 200);
    // Likewise for keys.
    post(&app, &t.owner, &format!("/v1/guardrails/{no_echo}/assignments/keys"), &json!({"key_hashes": [hash]})).await;
    assert_eq!(get(&app, &t.owner, &format!("/v1/guardrails/{open}/assignments/keys")).await.body["total_count"], 0);
    let listed = get(&app, &t.owner, &format!("/v1/guardrails/{no_echo}/assignments/keys")).await;
    assert_eq!(listed.body["data"][0]["key_hash"], json!(hash), "{}", listed.body);
    assert_forbidden(&post(&app, &key, "/v1/chat/completions", &chat(8)).await, "the key's new guardrail");
}

/// A guardrail's spend cap assigned to a member caps the member's keys together: once one of
/// them has spent it, the member's other keys are refused too, while a key of the org outside
/// the guardrail is not.
#[tokio::test]
async fn a_members_guardrail_caps_the_spend_of_all_the_members_keys_together() {
    let app = spawn_app().await;
    let t = team(&app).await;
    grant(&app, &t.org, "5").await;
    let (first, _) = new_key(&app, &t.owner, json!({"name": "m1", "creator_user_id": t.member_id})).await;
    let (second, _) = new_key(&app, &t.owner, json!({"name": "m2", "creator_user_id": t.member_id})).await;
    let (outside, _) = new_key(&app, &t.owner, json!({"name": "o"})).await;
    let probe = post(&app, &outside, "/v1/chat/completions", &chat(8)).await;
    assert_eq!(probe.status, 200, "{}", probe.body);
    let one = crate::accounts::number(&probe.body["usage"]["cost"]);
    assert!(one > rust_decimal::Decimal::ZERO, "sandbox requests cost something");
    let cap = one * rust_decimal::Decimal::from(6);
    let created = post(&app, &t.owner, "/v1/guardrails", &json!({"name": "daily", "max_daily_spend": cap.to_string()})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let g = created.body["data"]["id"].as_str().expect("id").to_owned();
    let assigned = post(&app, &t.owner, &format!("/v1/guardrails/{g}/members"), &json!({"member_user_ids": [t.member_id]})).await;
    assert_eq!(assigned.body["assigned_count"], 1, "{}", assigned.body);

    let mut served = 0;
    let refused = loop {
        let answer = post(&app, &first, "/v1/chat/completions", &chat(8)).await;
        if answer.status != 200 {
            break answer;
        }
        served += 1;
        assert!(served <= 6, "the cap of six requests' cost must stop the first key");
    };
    assert!(served >= 1, "the cap allows some requests: {}", refused.body);
    assert_eq!((refused.status, refused.body["error"]["code"].clone()), (429, json!("budget_exceeded")), "{}", refused.body);
    let other = post(&app, &second, "/v1/chat/completions", &chat(8)).await;
    assert_eq!(other.status, 429, "the member's other key shares the cap: {}", other.body);
    assert_eq!(other.body["error"]["code"], "budget_exceeded");
    assert_eq!(post(&app, &outside, "/v1/chat/completions", &chat(8)).await.status, 200, "keys outside the guardrail");
}
