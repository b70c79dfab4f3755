//! [`MemberRepo`] on Postgres: each change that checks an invariant first locks the org's
//! row (`FOR NO KEY UPDATE`, as `open_lease` does), so member changes of one org queue up
//! behind each other on every instance.

use sqlx::{Postgres, Transaction};

use super::PgStore;
use crate::members::{GuardrailMemberRecord, MemberChange, MemberRepo, MAX_MEMBERS};
use crate::sql::MEMBER_COLUMNS;
use crate::{BoxFuture, MemberRecord, StoreError};

/// Begins a transaction holding the org's lock; `None` when there is no such org.
async fn lock_org(store: &PgStore, org_id: &str) -> Result<Option<Transaction<'static, Postgres>>, StoreError> {
    let mut tx = store.pool.begin().await?;
    let found: Option<(String,)> = sqlx::query_as("SELECT id FROM orgs WHERE id = $1 FOR NO KEY UPDATE")
        .bind(org_id)
        .fetch_optional(&mut *tx)
        .await?;
    Ok(found.map(|_| tx))
}

async fn owners(tx: &mut Transaction<'static, Postgres>, org_id: &str) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM members WHERE org_id = $1 AND role = 'owner'")
        .bind(org_id)
        .fetch_one(&mut **tx)
        .await?)
}

async fn role_of(tx: &mut Transaction<'static, Postgres>, org_id: &str, user_id: &str) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT role FROM members WHERE org_id = $1 AND user_id = $2")
        .bind(org_id)
        .bind(user_id)
        .fetch_optional(&mut **tx)
        .await?)
}

impl MemberRepo for PgStore {
    fn add_member<'a>(&'a self, member: &'a MemberRecord) -> BoxFuture<'a, Result<MemberChange, StoreError>> {
        Box::pin(async move {
            let Some(mut tx) = lock_org(self, &member.org_id).await? else { return Ok(MemberChange::NotFound) };
            let (count, same): (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN lower(email) = lower($1) OR user_id = $2 THEN 1 ELSE 0 END), 0)::BIGINT \
                 FROM members WHERE org_id = $3",
            )
            .bind(&member.email)
            .bind(&member.user_id)
            .bind(&member.org_id)
            .fetch_one(&mut *tx)
            .await?;
            if same > 0 {
                return Ok(MemberChange::Duplicate);
            }
            if count >= MAX_MEMBERS {
                return Ok(MemberChange::Full);
            }
            sqlx::query(&format!("INSERT INTO members ({MEMBER_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"))
                .bind(&member.org_id)
                .bind(&member.user_id)
                .bind(&member.email)
                .bind(&member.role)
                .bind(member.created_at_ms)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(MemberChange::Done)
        })
    }

    fn set_member_role<'a>(
        &'a self,
        org_id: &'a str,
        user_id: &'a str,
        role: &'a str,
    ) -> BoxFuture<'a, Result<MemberChange, StoreError>> {
        Box::pin(async move {
            let Some(mut tx) = lock_org(self, org_id).await? else { return Ok(MemberChange::NotFound) };
            let Some(current) = role_of(&mut tx, org_id, user_id).await? else { return Ok(MemberChange::NotFound) };
            if current == "owner" && role != "owner" && owners(&mut tx, org_id).await? <= 1 {
                return Ok(MemberChange::LastOwner);
            }
            sqlx::query("UPDATE members SET role = $1 WHERE org_id = $2 AND user_id = $3")
                .bind(role)
                .bind(org_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(MemberChange::Done)
        })
    }

    fn remove_member<'a>(
        &'a self,
        org_id: &'a str,
        user_id: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<MemberChange, StoreError>> {
        Box::pin(async move {
            let Some(mut tx) = lock_org(self, org_id).await? else { return Ok(MemberChange::NotFound) };
            let Some(current) = role_of(&mut tx, org_id, user_id).await? else { return Ok(MemberChange::NotFound) };
            if current == "owner" && owners(&mut tx, org_id).await? <= 1 {
                return Ok(MemberChange::LastOwner);
            }
            for sql in [
                "DELETE FROM members WHERE org_id = $1 AND user_id = $2",
                "DELETE FROM guardrail_members WHERE org_id = $1 AND user_id = $2",
            ] {
                sqlx::query(sql).bind(org_id).bind(user_id).execute(&mut *tx).await?;
            }
            sqlx::query(
                "UPDATE api_keys SET revoked_at_ms = $1, disabled = TRUE, updated_at_ms = GREATEST(updated_at_ms + 1, $1) \
                 WHERE org_id = $2 AND member_id = $3 AND kind = 'management' AND revoked_at_ms IS NULL",
            )
            .bind(now_ms)
            .bind(org_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(MemberChange::Done)
        })
    }

    fn all_members(&self) -> BoxFuture<'_, Result<Vec<MemberRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {MEMBER_COLUMNS} FROM members ORDER BY org_id, created_at_ms, user_id");
            Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
        })
    }

    fn set_guardrail_members<'a>(
        &'a self,
        org_id: &'a str,
        guardrail_id: &'a str,
        user_ids: &'a [String],
        assigned: bool,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let mut changed = 0;
            for user_id in user_ids {
                let done = if assigned {
                    sqlx::query(
                        "INSERT INTO guardrail_members (guardrail_id, org_id, user_id, created_at_ms) \
                         SELECT g.id, g.org_id, m.user_id, $1 FROM guardrails g \
                         JOIN members m ON m.org_id = g.org_id AND m.user_id = $2 \
                         WHERE g.id = $3 AND g.org_id = $4 \
                         ON CONFLICT (org_id, user_id) DO UPDATE SET guardrail_id = excluded.guardrail_id, \
                         created_at_ms = excluded.created_at_ms WHERE guardrail_members.guardrail_id <> excluded.guardrail_id",
                    )
                    .bind(now_ms)
                    .bind(user_id)
                    .bind(guardrail_id)
                    .bind(org_id)
                    .execute(&mut *tx)
                    .await?
                } else {
                    sqlx::query("DELETE FROM guardrail_members WHERE guardrail_id = $1 AND org_id = $2 AND user_id = $3")
                        .bind(guardrail_id)
                        .bind(org_id)
                        .bind(user_id)
                        .execute(&mut *tx)
                        .await?
                };
                changed += done.rows_affected();
            }
            tx.commit().await?;
            Ok(changed)
        })
    }

    fn all_guardrail_members(&self) -> BoxFuture<'_, Result<Vec<GuardrailMemberRecord>, StoreError>> {
        Box::pin(async move {
            let sql = "SELECT guardrail_id, org_id, user_id, created_at_ms FROM guardrail_members \
                       ORDER BY org_id, created_at_ms, user_id";
            Ok(sqlx::query_as(sql).fetch_all(&self.pool).await?)
        })
    }
}
