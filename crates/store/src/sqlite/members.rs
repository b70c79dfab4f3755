//! [`MemberRepo`] on SQLite: the checks and writes of each change in one `BEGIN IMMEDIATE`
//! transaction (SQLite has one writer, so nothing slips in between).

use sqlx::{Sqlite, Transaction};

use super::SqliteStore;
use crate::members::{GuardrailMemberRecord, MemberChange, MemberRepo, MAX_MEMBERS};
use crate::sql::MEMBER_COLUMNS;
use crate::{BoxFuture, MemberRecord, StoreError};

async fn owners(tx: &mut Transaction<'static, Sqlite>, org_id: &str) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM members WHERE org_id = ? AND role = 'owner'")
        .bind(org_id)
        .fetch_one(&mut **tx)
        .await?)
}

async fn role_of(tx: &mut Transaction<'static, Sqlite>, org_id: &str, user_id: &str) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT role FROM members WHERE org_id = ? AND user_id = ?")
        .bind(org_id)
        .bind(user_id)
        .fetch_optional(&mut **tx)
        .await?)
}

impl MemberRepo for SqliteStore {
    fn add_member<'a>(&'a self, member: &'a MemberRecord) -> BoxFuture<'a, Result<MemberChange, StoreError>> {
        Box::pin(async move {
            let mut tx = self.begin_write().await?;
            let (count, same): (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN lower(email) = lower(?) OR user_id = ? THEN 1 ELSE 0 END), 0) \
                 FROM members WHERE org_id = ?",
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
            sqlx::query(&format!("INSERT INTO members ({MEMBER_COLUMNS}) VALUES (?, ?, ?, ?, ?)"))
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
            let mut tx = self.begin_write().await?;
            let Some(current) = role_of(&mut tx, org_id, user_id).await? else { return Ok(MemberChange::NotFound) };
            if current == "owner" && role != "owner" && owners(&mut tx, org_id).await? <= 1 {
                return Ok(MemberChange::LastOwner);
            }
            sqlx::query("UPDATE members SET role = ? WHERE org_id = ? AND user_id = ?")
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
            let mut tx = self.begin_write().await?;
            let Some(current) = role_of(&mut tx, org_id, user_id).await? else { return Ok(MemberChange::NotFound) };
            if current == "owner" && owners(&mut tx, org_id).await? <= 1 {
                return Ok(MemberChange::LastOwner);
            }
            sqlx::query("DELETE FROM members WHERE org_id = ? AND user_id = ?")
                .bind(org_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM guardrail_members WHERE org_id = ? AND user_id = ?")
                .bind(org_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE api_keys SET revoked_at_ms = ?, disabled = 1, updated_at_ms = MAX(updated_at_ms + 1, ?) \
                 WHERE org_id = ? AND member_id = ? AND kind = 'management' AND revoked_at_ms IS NULL",
            )
            .bind(now_ms)
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
            let mut tx = self.begin_write().await?;
            let mut changed = 0;
            for user_id in user_ids {
                let done = if assigned {
                    // Replaces the member's other guardrail; the guardrail and the member must
                    // both be of `org_id`, else the SELECT yields nothing.
                    sqlx::query(
                        "INSERT INTO guardrail_members (guardrail_id, org_id, user_id, created_at_ms) \
                         SELECT g.id, g.org_id, m.user_id, ? FROM guardrails g \
                         JOIN members m ON m.org_id = g.org_id AND m.user_id = ? \
                         WHERE g.id = ? AND g.org_id = ? \
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
                    sqlx::query("DELETE FROM guardrail_members WHERE guardrail_id = ? AND org_id = ? AND user_id = ?")
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
