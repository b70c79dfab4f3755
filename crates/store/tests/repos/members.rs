//! Members and guardrails: upserts, the owner and size invariants, revoking a removed member's
//! management keys, and guardrail assignments to keys and members (within one org only).

use marga_store::{GuardrailRecord, KeyRecord, MemberChange, MemberRecord, MAX_MEMBERS};

use crate::backend::Ctx;
use crate::fixtures::{key, now_ms, org};

pub(crate) async fn members_upsert_list_delete(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("a")).await.unwrap();
    repos.create_org(&org("b")).await.unwrap();
    let m = MemberRecord {
        org_id: "a".into(),
        user_id: "u1".into(),
        email: "u1@example.com".into(),
        role: "member".into(),
        created_at_ms: 10,
    };
    repos.upsert_member(&m).await.unwrap();
    repos
        .upsert_member(&MemberRecord {
            role: "admin".into(),
            email: "new@example.com".into(),
            created_at_ms: 99,
            ..m.clone()
        })
        .await
        .unwrap();
    repos
        .upsert_member(&MemberRecord {
            user_id: "u2".into(),
            created_at_ms: 20,
            ..m.clone()
        })
        .await
        .unwrap();
    repos
        .upsert_member(&MemberRecord {
            org_id: "b".into(),
            ..m.clone()
        })
        .await
        .unwrap();

    let members = repos.list_members("a").await.unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(
        members[0],
        MemberRecord {
            role: "admin".into(),
            email: "new@example.com".into(),
            ..m.clone()
        },
        "an upsert updates email and role, and keeps created_at_ms"
    );
    assert!(!repos.delete_member("b", "u2").await.unwrap());
    assert!(repos.delete_member("a", "u1").await.unwrap());
    assert!(!repos.delete_member("a", "u1").await.unwrap());
    assert_eq!(repos.list_members("a").await.unwrap().len(), 1);
    assert_eq!(repos.list_members("b").await.unwrap().len(), 1);
}

pub(crate) async fn guardrails_crud_assignments_and_isolation(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("a")).await.unwrap();
    repos.create_org(&org("b")).await.unwrap();
    for (id, org_id) in [("ka1", "a"), ("ka2", "a"), ("kb1", "b")] {
        repos.create_key(&key(id, org_id, 10)).await.unwrap();
    }
    let g = GuardrailRecord {
        id: "g1".into(),
        org_id: "a".into(),
        name: "no frontier".into(),
        max_daily_spend_nanos: Some(1),
        max_weekly_spend_nanos: Some(2),
        max_monthly_spend_nanos: None,
        allowed_models: "[]".into(),
        blocked_models: r#"["openai/gpt-5"]"#.into(),
        require_zdr: true,
        created_at_ms: 10,
        updated_at_ms: 10,
    };
    repos.create_guardrail(&g).await.unwrap();
    let gb = GuardrailRecord {
        id: "gb".into(),
        org_id: "b".into(),
        ..g.clone()
    };
    repos.create_guardrail(&gb).await.unwrap();
    assert_eq!(repos.list_guardrails("a").await.unwrap(), vec![g.clone()]);
    assert_eq!(repos.all_guardrails().await.unwrap().len(), 2);

    // B cannot update or delete A's guardrail.
    let hijack = GuardrailRecord {
        org_id: "b".into(),
        require_zdr: false,
        ..g.clone()
    };
    assert!(!repos.update_guardrail(&hijack).await.unwrap());
    assert!(!repos.delete_guardrail("b", "g1").await.unwrap());
    let updated = GuardrailRecord {
        max_monthly_spend_nanos: Some(3),
        updated_at_ms: 20,
        ..g.clone()
    };
    assert!(repos.update_guardrail(&updated).await.unwrap());
    assert_eq!(repos.list_guardrails("a").await.unwrap(), vec![updated]);

    // Assignments: other orgs' keys and guardrails are ignored.
    let keys = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        repos
            .set_guardrail_keys("a", "g1", &keys(&["ka1", "ka2", "kb1", "ghost"]), true)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        repos
            .set_guardrail_keys("a", "g1", &keys(&["ka1"]), true)
            .await
            .unwrap(),
        0,
        "already assigned"
    );
    assert_eq!(
        repos
            .set_guardrail_keys("b", "g1", &keys(&["kb1"]), true)
            .await
            .unwrap(),
        0,
        "not B's guardrail"
    );
    assert_eq!(
        repos
            .set_guardrail_keys("a", "gb", &keys(&["ka1"]), true)
            .await
            .unwrap(),
        0,
        "not A's guardrail"
    );
    assert_eq!(
        repos
            .set_guardrail_keys("b", "gb", &keys(&["kb1"]), true)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        repos
            .set_guardrail_keys("b", "g1", &keys(&["ka1"]), false)
            .await
            .unwrap(),
        0,
        "B cannot unassign"
    );
    let pairs = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(g, k)| ((*g).to_owned(), (*k).to_owned()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        repos.all_guardrail_keys().await.unwrap(),
        pairs(&[("g1", "ka1"), ("g1", "ka2"), ("gb", "kb1")])
    );
    assert_eq!(
        repos
            .set_guardrail_keys("a", "g1", &keys(&["ka2"]), false)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        repos.all_guardrail_keys().await.unwrap(),
        pairs(&[("g1", "ka1"), ("gb", "kb1")])
    );

    // Deleting a guardrail drops its assignments.
    assert!(repos.delete_guardrail("a", "g1").await.unwrap());
    assert!(!repos.delete_guardrail("a", "g1").await.unwrap());
    assert_eq!(repos.all_guardrail_keys().await.unwrap(), pairs(&[("gb", "kb1")]));
    assert_eq!(repos.all_guardrails().await.unwrap(), vec![gb]);
}

fn member(org_id: &str, user_id: &str, role: &str) -> MemberRecord {
    MemberRecord {
        org_id: org_id.into(),
        user_id: user_id.into(),
        email: format!("{user_id}@example.com"),
        role: role.into(),
        created_at_ms: 10,
    }
}

pub(crate) async fn members_keep_an_owner_a_cap_and_unique_emails(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("a")).await.unwrap();
    repos.create_org(&org("b")).await.unwrap();
    assert_eq!(repos.add_member(&member("a", "boss", "owner")).await.unwrap(), MemberChange::Done);
    let shouting = MemberRecord { user_id: "other".into(), email: "BOSS@example.com".into(), ..member("a", "x", "member") };
    assert_eq!(repos.add_member(&shouting).await.unwrap(), MemberChange::Duplicate, "emails compare without case");
    assert_eq!(repos.add_member(&member("a", "boss", "member")).await.unwrap(), MemberChange::Duplicate);
    assert_eq!(repos.add_member(&member("b", "boss", "owner")).await.unwrap(), MemberChange::Done, "per org");
    assert_eq!(repos.add_member(&member("zz", "u", "owner")).await.unwrap_or(MemberChange::NotFound), MemberChange::NotFound);

    assert_eq!(repos.set_member_role("a", "boss", "admin").await.unwrap(), MemberChange::LastOwner);
    assert_eq!(repos.remove_member("a", "boss", now_ms()).await.unwrap(), MemberChange::LastOwner);
    assert_eq!(repos.set_member_role("a", "nobody", "admin").await.unwrap(), MemberChange::NotFound);
    assert_eq!(repos.set_member_role("b", "u1", "admin").await.unwrap(), MemberChange::NotFound);
    for i in 1..MAX_MEMBERS {
        assert_eq!(repos.add_member(&member("a", &format!("u{i}"), "member")).await.unwrap(), MemberChange::Done);
    }
    assert_eq!(repos.add_member(&member("a", "one-too-many", "member")).await.unwrap(), MemberChange::Full);
    assert_eq!(repos.set_member_role("a", "u1", "owner").await.unwrap(), MemberChange::Done);
    assert_eq!(repos.set_member_role("a", "boss", "member").await.unwrap(), MemberChange::Done, "another owner exists");
    let roles: Vec<(String, String)> =
        repos.all_members().await.unwrap().into_iter().filter(|m| m.org_id == "a" && m.role != "member").map(|m| (m.user_id, m.role)).collect();
    assert_eq!(roles, [("u1".to_owned(), "owner".to_owned())]);
    assert_eq!(repos.list_members("b").await.unwrap().len(), 1, "org b untouched");
}

pub(crate) async fn removing_a_member_revokes_their_management_keys_only(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("a")).await.unwrap();
    repos.add_member(&member("a", "boss", "owner")).await.unwrap();
    repos.add_member(&member("a", "dev", "admin")).await.unwrap();
    let owned = |id: &str, kind: &str, who: &str| KeyRecord {
        kind: kind.into(),
        member_id: Some(who.into()),
        ..key(id, "a", 10)
    };
    for k in [owned("mg-dev", "management", "dev"), owned("sk-dev", "inference", "dev"), owned("mg-boss", "management", "boss")] {
        repos.create_key(&k).await.unwrap();
    }
    assert_eq!(repos.get_key("mg-dev").await.unwrap().unwrap().member_id.as_deref(), Some("dev"));
    let g = GuardrailRecord { id: "g".into(), org_id: "a".into(), name: "g".into(), allowed_models: "[]".into(), blocked_models: "[]".into(), ..GuardrailRecord::default() };
    repos.create_guardrail(&g).await.unwrap();
    assert_eq!(repos.set_guardrail_members("a", "g", &["dev".into()], true, 5).await.unwrap(), 1);

    let at = now_ms();
    assert_eq!(repos.remove_member("a", "dev", at).await.unwrap(), MemberChange::Done);
    assert_eq!(repos.remove_member("a", "dev", at).await.unwrap(), MemberChange::NotFound);
    let mg = repos.get_key("mg-dev").await.unwrap().unwrap();
    assert_eq!((mg.revoked_at_ms, mg.disabled), (Some(at), true));
    assert!(mg.updated_at_ms > 10, "bumped so that caches see it");
    assert!(repos.keys_changed_since(10).await.unwrap().iter().any(|k| k.id == "mg-dev"));
    let sk = repos.get_key("sk-dev").await.unwrap().unwrap();
    assert_eq!((sk.revoked_at_ms, sk.disabled), (None, false), "inference keys are the org's: they keep working");
    assert_eq!(repos.get_key("mg-boss").await.unwrap().unwrap().revoked_at_ms, None);
    assert!(repos.all_guardrail_members().await.unwrap().is_empty(), "the assignment went with the member");
}

pub(crate) async fn concurrent_demotions_never_leave_an_org_without_owner(ctx: &Ctx) {
    let repos = ctx.repos.clone();
    repos.create_org(&org("a")).await.unwrap();
    for round in 0..5 {
        let (x, y) = (format!("x{round}"), format!("y{round}"));
        repos.add_member(&member("a", &x, "owner")).await.unwrap();
        repos.add_member(&member("a", &y, "owner")).await.unwrap();
        let others: Vec<String> = repos.list_members("a").await.unwrap().into_iter().filter(|m| m.user_id != x && m.user_id != y).map(|m| m.user_id).collect();
        for other in &others {
            repos.remove_member("a", other, now_ms()).await.unwrap();
        }
        let (r1, r2) = (repos.clone(), repos.clone());
        let (a, b) = (x.clone(), y.clone());
        let one = tokio::spawn(async move { r1.set_member_role("a", &a, "member").await.unwrap() });
        let two = tokio::spawn(async move { r2.remove_member("a", &b, now_ms()).await.unwrap() });
        let results = [one.await.unwrap(), two.await.unwrap()];
        assert_eq!(results.iter().filter(|r| **r == MemberChange::Done).count(), 1, "round {round}: {results:?}");
        let owners = repos.list_members("a").await.unwrap().into_iter().filter(|m| m.role == "owner").count();
        assert_eq!(owners, 1, "round {round}");
    }
}

pub(crate) async fn guardrail_member_assignments_replace_and_stay_in_their_org(ctx: &Ctx) {
    let repos = &*ctx.repos;
    for o in ["a", "b"] {
        repos.create_org(&org(o)).await.unwrap();
        repos.add_member(&member(o, &format!("{o}1"), "member")).await.unwrap();
        for g in ["g1", "g2"] {
            let id = format!("{o}-{g}");
            let record = GuardrailRecord { id: id.clone(), org_id: o.into(), name: id, allowed_models: "[]".into(), blocked_models: "[]".into(), ..GuardrailRecord::default() };
            repos.create_guardrail(&record).await.unwrap();
        }
    }
    let a1 = vec!["a1".to_owned()];
    assert_eq!(repos.set_guardrail_members("a", "a-g1", &a1, true, 7).await.unwrap(), 1);
    assert_eq!(repos.set_guardrail_members("a", "a-g1", &a1, true, 8).await.unwrap(), 0, "already assigned");
    assert_eq!(repos.set_guardrail_members("a", "a-g2", &a1, true, 9).await.unwrap(), 1, "replaces");
    // Another org's guardrail or member: nothing happens.
    assert_eq!(repos.set_guardrail_members("a", "b-g1", &a1, true, 9).await.unwrap(), 0);
    assert_eq!(repos.set_guardrail_members("a", "a-g1", &["b1".to_owned()], true, 9).await.unwrap(), 0);
    assert_eq!(repos.set_guardrail_members("b", "a-g2", &a1, false, 9).await.unwrap(), 0);
    let all = repos.all_guardrail_members().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].guardrail_id.as_str(), all[0].org_id.as_str(), all[0].user_id.as_str(), all[0].created_at_ms), ("a-g2", "a", "a1", 9));
    assert_eq!(repos.set_guardrail_members("a", "a-g2", &a1, false, 10).await.unwrap(), 1);
    repos.set_guardrail_members("a", "a-g1", &a1, true, 11).await.unwrap();
    assert!(repos.delete_guardrail("a", "a-g1").await.unwrap());
    assert!(repos.all_guardrail_members().await.unwrap().is_empty(), "deleting the guardrail drops its assignments");
}

pub(crate) async fn guardrail_key_assignment_replaces_the_keys_other_guardrail(ctx: &Ctx) {
    let repos = &*ctx.repos;
    repos.create_org(&org("a")).await.unwrap();
    repos.create_key(&key("k", "a", 10)).await.unwrap();
    for g in ["g1", "g2"] {
        let record = GuardrailRecord { id: g.into(), org_id: "a".into(), name: g.into(), allowed_models: "[]".into(), blocked_models: "[]".into(), ..GuardrailRecord::default() };
        repos.create_guardrail(&record).await.unwrap();
    }
    let k = vec!["k".to_owned()];
    repos.set_guardrail_keys("a", "g1", &k, true).await.unwrap();
    repos.set_guardrail_keys("a", "g2", &k, true).await.unwrap();
    assert_eq!(repos.all_guardrail_keys().await.unwrap(), [("g2".to_owned(), "k".to_owned())]);
}
