//! Orgs, keys and workspaces: creation, listing order, updates, change feeds and isolation
//! between organisations.

use marga_store::{GuardrailRecord, KeyRecord, MemberChange, MemberRecord, OrgRecord, WorkspaceRecord};

use crate::backend::Ctx;
use crate::fixtures::{charge, generation, key, line, org};

pub(crate) async fn orgs_and_keys(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("b")).await.unwrap();
    repos
        .create_org(&OrgRecord {
            created_at_ms: 500,
            ..org("a")
        })
        .await
        .unwrap();
    assert!(repos.create_org(&org("a")).await.is_err(), "duplicate org id");
    assert_eq!(repos.get_org("b").await.unwrap(), Some(org("b")));
    assert_eq!(repos.get_org("zz").await.unwrap(), None);
    let ids: Vec<_> = repos.list_orgs().await.unwrap().into_iter().map(|o| o.id).collect();
    assert_eq!(ids, ["a", "b"]);

    let full = KeyRecord {
        workspace_id: Some("ws".into()),
        limit_nanos: Some(5_000_000_000),
        limit_reset: Some("monthly".into()),
        rpm_limit: Some(60),
        daily_limit: Some(200),
        budget_nanos: Some(9_007_199_254_740_993),
        trial: true,
        disabled: false,
        expires_at_ms: Some(99_999),
        ..key("k1", "a", 10)
    };
    repos.create_key(&full).await.unwrap();
    repos.create_key(&key("k2", "a", 20)).await.unwrap();
    repos.create_key(&key("k3", "a", 30)).await.unwrap();
    assert!(repos.create_key(&key("k1", "a", 40)).await.is_err(), "duplicate key id");
    assert_eq!(repos.get_key("k1").await.unwrap(), Some(full.clone()));
    assert_eq!(repos.get_key("nope").await.unwrap(), None);

    // Newest first.
    let listed: Vec<_> = repos.list_keys("a").await.unwrap().into_iter().map(|k| k.id).collect();
    assert_eq!(listed, ["k3", "k2", "k1"]);

    // Replace every field; revoke k2.
    let changed = KeyRecord {
        name: "renamed".into(),
        disabled: true,
        limit_nanos: None,
        updated_at_ms: 50,
        ..full
    };
    assert!(repos.update_key(&changed).await.unwrap());
    assert_eq!(repos.get_key("k1").await.unwrap(), Some(changed));
    let revoked = KeyRecord {
        revoked_at_ms: Some(60),
        updated_at_ms: 60,
        ..key("k2", "a", 20)
    };
    assert!(repos.update_key(&revoked).await.unwrap());
    assert!(!repos.update_key(&key("ghost", "a", 1)).await.unwrap());

    let listed: Vec<_> = repos.list_keys("a").await.unwrap().into_iter().map(|k| k.id).collect();
    assert_eq!(listed, ["k3", "k1"], "revoked keys are not listed");

    // Revoked keys are reported, oldest change first, strictly after `since`.
    let changed: Vec<_> = repos
        .keys_changed_since(30)
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.id, k.revoked_at_ms))
        .collect();
    assert_eq!(changed, [("k1".to_owned(), None), ("k2".to_owned(), Some(60))]);
    assert_eq!(repos.keys_changed_since(0).await.unwrap().len(), 3);
    assert!(repos.keys_changed_since(60).await.unwrap().is_empty());
}

pub(crate) async fn keys_are_isolated_between_orgs(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("a")).await.unwrap();
    repos.create_org(&org("b")).await.unwrap();
    repos.create_key(&key("kb", "b", 10)).await.unwrap();

    // Org A addresses B's key through its own scope: nothing happens.
    let hijack = KeyRecord {
        name: "mine now".into(),
        revoked_at_ms: Some(99),
        ..key("kb", "a", 10)
    };
    assert!(!repos.update_key(&hijack).await.unwrap());
    assert_eq!(repos.get_key("kb").await.unwrap(), Some(key("kb", "b", 10)));
    assert!(repos.list_keys("a").await.unwrap().is_empty());
    assert_eq!(repos.list_keys("b").await.unwrap().len(), 1);
}

pub(crate) async fn workspaces_crud_isolation_and_key_detach(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("a")).await.unwrap();
    repos.create_org(&org("b")).await.unwrap();
    let ws = WorkspaceRecord {
        id: "w1".into(),
        org_id: "a".into(),
        name: "Research".into(),
        monthly_budget_nanos: Some(7),
        created_at_ms: 10,
    };
    repos.create_workspace(&ws).await.unwrap();
    repos
        .create_workspace(&WorkspaceRecord {
            id: "w2".into(),
            created_at_ms: 20,
            ..ws.clone()
        })
        .await
        .unwrap();
    repos
        .create_workspace(&WorkspaceRecord {
            id: "wb".into(),
            org_id: "b".into(),
            ..ws.clone()
        })
        .await
        .unwrap();
    let ids: Vec<_> = repos
        .list_workspaces("a")
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(ids, ["w1", "w2"]);

    // B cannot touch A's workspace.
    let hijack = WorkspaceRecord {
        org_id: "b".into(),
        name: "pwned".into(),
        ..ws.clone()
    };
    assert!(!repos.update_workspace(&hijack).await.unwrap());
    assert!(!repos.delete_workspace("b", "w1").await.unwrap());
    assert_eq!(repos.list_workspaces("a").await.unwrap()[0], ws);

    let renamed = WorkspaceRecord {
        name: "R&D".into(),
        monthly_budget_nanos: None,
        ..ws.clone()
    };
    assert!(repos.update_workspace(&renamed).await.unwrap());
    assert_eq!(repos.list_workspaces("a").await.unwrap()[0], renamed);

    // Deleting a workspace detaches its keys and reports them as changed.
    repos
        .create_key(&KeyRecord {
            workspace_id: Some("w1".into()),
            ..key("k1", "a", 10)
        })
        .await
        .unwrap();
    repos
        .create_key(&KeyRecord {
            workspace_id: Some("w2".into()),
            ..key("k2", "a", 10)
        })
        .await
        .unwrap();
    assert!(repos.delete_workspace("a", "w1").await.unwrap());
    assert!(!repos.delete_workspace("a", "w1").await.unwrap());
    let k1 = repos.get_key("k1").await.unwrap().unwrap();
    assert_eq!(k1.workspace_id, None);
    assert!(k1.updated_at_ms > 10);
    let changed: Vec<_> = repos
        .keys_changed_since(10)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(changed, ["k1"]);
    assert_eq!(
        repos.get_key("k2").await.unwrap().unwrap().workspace_id.as_deref(),
        Some("w2")
    );
    let ids: Vec<_> = repos
        .list_workspaces("a")
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(ids, ["w2"]);
    assert_eq!(repos.list_workspaces("b").await.unwrap().len(), 1);
}

/// Every write to what the accounts cache holds moves `accounts_version` on, in its own
/// transaction; ledger lines, charges, generations, reads and refused writes do not.
pub(crate) async fn account_changes_move_the_version_and_nothing_else_does(ctx: &Ctx) {
    let repos = &*ctx.repos;
    let mut seen = repos.accounts_version().await.unwrap();
    let mut moved = async |what: &str| {
        let now = repos.accounts_version().await.unwrap();
        assert!(now > seen, "{what} did not move the accounts version ({seen} → {now})");
        seen = now;
    };
    repos.create_org(&org("a")).await.unwrap();
    moved("creating an org").await;
    repos.create_key(&key("k1", "a", 10)).await.unwrap();
    moved("creating a key").await;
    assert!(repos.update_key(&KeyRecord { name: "renamed".into(), updated_at_ms: 11, ..key("k1", "a", 10) }).await.unwrap());
    moved("updating a key").await;
    let ws = WorkspaceRecord { id: "w1".into(), org_id: "a".into(), name: "R".into(), monthly_budget_nanos: None, created_at_ms: 10 };
    repos.create_workspace(&ws).await.unwrap();
    moved("creating a workspace").await;
    assert!(repos.update_workspace(&WorkspaceRecord { name: "S".into(), ..ws }).await.unwrap());
    moved("updating a workspace").await;
    assert!(repos.delete_workspace("a", "w1").await.unwrap());
    moved("deleting a workspace").await;
    let member = |user: &str, role: &str| MemberRecord {
        org_id: "a".into(),
        user_id: user.into(),
        email: format!("{user}@example.com"),
        role: role.into(),
        created_at_ms: 10,
    };
    assert_eq!(repos.add_member(&member("owner", "owner")).await.unwrap(), MemberChange::Done);
    assert_eq!(repos.add_member(&member("u1", "member")).await.unwrap(), MemberChange::Done);
    moved("adding members").await;
    assert_eq!(repos.set_member_role("a", "u1", "admin").await.unwrap(), MemberChange::Done);
    moved("changing a role").await;
    let g = GuardrailRecord { id: "g1".into(), org_id: "a".into(), name: "g".into(), allowed_models: "[]".into(), blocked_models: "[]".into(), ..GuardrailRecord::default() };
    repos.create_guardrail(&g).await.unwrap();
    moved("creating a guardrail").await;
    assert!(repos.update_guardrail(&GuardrailRecord { require_zdr: true, ..g.clone() }).await.unwrap());
    moved("updating a guardrail").await;
    assert_eq!(repos.set_guardrail_keys("a", "g1", &["k1".into()], true).await.unwrap(), 1);
    moved("assigning a guardrail to a key").await;
    assert_eq!(repos.set_guardrail_members("a", "g1", &["u1".into()], true, 20).await.unwrap(), 1);
    moved("assigning a guardrail to a member").await;
    assert_eq!(repos.remove_member("a", "u1", 30).await.unwrap(), MemberChange::Done);
    moved("removing a member").await;
    assert!(repos.delete_guardrail("a", "g1").await.unwrap());
    moved("deleting a guardrail").await;

    // What is not the accounts' does not move it; nor does a write that is refused.
    assert!(repos.create_org(&org("a")).await.is_err(), "duplicate org id");
    repos.append(&[line("a", "topup", "t1", 1_000, 40)]).await.unwrap();
    repos.charge(&[charge("a", "gen-1", 10, None)]).await.unwrap();
    repos.insert_generations(&[generation("gen-1")]).await.unwrap();
    let _ = (repos.list_orgs().await.unwrap(), repos.keys_changed_since(0).await.unwrap(), repos.all_members().await.unwrap());
    assert_eq!(repos.accounts_version().await.unwrap(), seen, "only account changes move the version");
}
