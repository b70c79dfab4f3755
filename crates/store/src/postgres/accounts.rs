//! Postgres: organisations, API keys, workspaces, members and guardrails.

use super::PgStore;
use crate::sql::{unix_now_ms, GUARDRAIL_COLUMNS, KEY_COLUMNS, MEMBER_COLUMNS, ORG_COLUMNS, WORKSPACE_COLUMNS};
use crate::{AccountRepo, BoxFuture, GuardrailRecord, KeyRecord, MemberRecord, OrgRecord, StoreError, WorkspaceRecord};

impl AccountRepo for PgStore {
    fn create_org<'a>(&'a self, org: &'a OrgRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(&format!("INSERT INTO orgs ({ORG_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"))
                .bind(&org.id)
                .bind(&org.name)
                .bind(&org.currency)
                .bind(&org.timezone)
                .bind(org.created_at_ms)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn get_org<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<OrgRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {ORG_COLUMNS} FROM orgs WHERE id = $1");
            Ok(sqlx::query_as(&sql).bind(id).fetch_optional(&self.pool).await?)
        })
    }

    fn list_orgs(&self) -> BoxFuture<'_, Result<Vec<OrgRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {ORG_COLUMNS} FROM orgs ORDER BY created_at_ms, id");
            Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
        })
    }

    fn accounts_version(&self) -> BoxFuture<'_, Result<i64, StoreError>> {
        Box::pin(async move {
            let (version,): (i64,) =
                sqlx::query_as("SELECT version FROM accounts_version WHERE id = 1").fetch_one(&self.pool).await?;
            Ok(version)
        })
    }

    fn create_key<'a>(&'a self, key: &'a KeyRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let sql = format!(
                "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
            );
            sqlx::query(&sql)
                .bind(&key.id)
                .bind(&key.org_id)
                .bind(&key.workspace_id)
                .bind(&key.kind)
                .bind(&key.name)
                .bind(&key.label)
                .bind(key.limit_nanos)
                .bind(&key.limit_reset)
                .bind(key.rpm_limit)
                .bind(key.daily_limit)
                .bind(key.budget_nanos)
                .bind(key.trial)
                .bind(key.disabled)
                .bind(key.expires_at_ms)
                .bind(key.created_at_ms)
                .bind(key.updated_at_ms)
                .bind(key.revoked_at_ms)
                .bind(&key.member_id)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn update_key<'a>(&'a self, key: &'a KeyRecord) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "UPDATE api_keys SET workspace_id = $1, kind = $2, name = $3, label = $4, limit_nanos = $5, \
                 limit_reset = $6, rpm_limit = $7, daily_limit = $8, budget_nanos = $9, trial = $10, disabled = $11, \
                 expires_at_ms = $12, updated_at_ms = $13, revoked_at_ms = $14, member_id = $15 WHERE id = $16 AND org_id = $17",
            )
            .bind(&key.workspace_id)
            .bind(&key.kind)
            .bind(&key.name)
            .bind(&key.label)
            .bind(key.limit_nanos)
            .bind(&key.limit_reset)
            .bind(key.rpm_limit)
            .bind(key.daily_limit)
            .bind(key.budget_nanos)
            .bind(key.trial)
            .bind(key.disabled)
            .bind(key.expires_at_ms)
            .bind(key.updated_at_ms)
            .bind(key.revoked_at_ms)
            .bind(&key.member_id)
            .bind(&key.id)
            .bind(&key.org_id)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn get_key<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<KeyRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
            Ok(sqlx::query_as(&sql).bind(id).fetch_optional(&self.pool).await?)
        })
    }

    fn list_keys<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<Vec<KeyRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE org_id = $1 AND revoked_at_ms IS NULL \
                 ORDER BY created_at_ms DESC, id DESC"
            );
            Ok(sqlx::query_as(&sql).bind(org_id).fetch_all(&self.pool).await?)
        })
    }

    fn keys_changed_since(&self, since_ms: i64) -> BoxFuture<'_, Result<Vec<KeyRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE updated_at_ms > $1 ORDER BY updated_at_ms, id");
            Ok(sqlx::query_as(&sql).bind(since_ms).fetch_all(&self.pool).await?)
        })
    }

    fn create_workspace<'a>(&'a self, ws: &'a WorkspaceRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(&format!(
                "INSERT INTO workspaces ({WORKSPACE_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"
            ))
            .bind(&ws.id)
            .bind(&ws.org_id)
            .bind(&ws.name)
            .bind(ws.monthly_budget_nanos)
            .bind(ws.created_at_ms)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
    }

    fn all_workspaces(&self) -> BoxFuture<'_, Result<Vec<WorkspaceRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {WORKSPACE_COLUMNS} FROM workspaces");
            Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
        })
    }

    fn list_workspaces<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<Vec<WorkspaceRecord>, StoreError>> {
        Box::pin(async move {
            let sql =
                format!("SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE org_id = $1 ORDER BY created_at_ms, id");
            Ok(sqlx::query_as(&sql).bind(org_id).fetch_all(&self.pool).await?)
        })
    }

    fn update_workspace<'a>(&'a self, ws: &'a WorkspaceRecord) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done =
                sqlx::query("UPDATE workspaces SET name = $1, monthly_budget_nanos = $2 WHERE id = $3 AND org_id = $4")
                    .bind(&ws.name)
                    .bind(ws.monthly_budget_nanos)
                    .bind(&ws.id)
                    .bind(&ws.org_id)
                    .execute(&self.pool)
                    .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn delete_workspace<'a>(&'a self, org_id: &'a str, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query("DELETE FROM workspaces WHERE id = $1 AND org_id = $2")
                .bind(id)
                .bind(org_id)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Ok(false);
            }
            sqlx::query(
                "UPDATE api_keys SET workspace_id = NULL, updated_at_ms = GREATEST(updated_at_ms + 1, $1) \
                 WHERE org_id = $2 AND workspace_id = $3",
            )
            .bind(unix_now_ms())
            .bind(org_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn upsert_member<'a>(&'a self, member: &'a MemberRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let sql = format!(
                "INSERT INTO members ({MEMBER_COLUMNS}) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (org_id, user_id) DO UPDATE SET email = excluded.email, role = excluded.role"
            );
            sqlx::query(&sql)
                .bind(&member.org_id)
                .bind(&member.user_id)
                .bind(&member.email)
                .bind(&member.role)
                .bind(member.created_at_ms)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn list_members<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<Vec<MemberRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {MEMBER_COLUMNS} FROM members WHERE org_id = $1 ORDER BY created_at_ms, user_id");
            Ok(sqlx::query_as(&sql).bind(org_id).fetch_all(&self.pool).await?)
        })
    }

    fn delete_member<'a>(&'a self, org_id: &'a str, user_id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM members WHERE org_id = $1 AND user_id = $2")
                .bind(org_id)
                .bind(user_id)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn create_guardrail<'a>(&'a self, g: &'a GuardrailRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let sql = format!(
                "INSERT INTO guardrails ({GUARDRAIL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            );
            sqlx::query(&sql)
                .bind(&g.id)
                .bind(&g.org_id)
                .bind(&g.name)
                .bind(g.max_daily_spend_nanos)
                .bind(g.max_weekly_spend_nanos)
                .bind(g.max_monthly_spend_nanos)
                .bind(&g.allowed_models)
                .bind(&g.blocked_models)
                .bind(g.require_zdr)
                .bind(g.created_at_ms)
                .bind(g.updated_at_ms)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn update_guardrail<'a>(&'a self, g: &'a GuardrailRecord) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "UPDATE guardrails SET name = $1, max_daily_spend_nanos = $2, max_weekly_spend_nanos = $3, \
                 max_monthly_spend_nanos = $4, allowed_models = $5, blocked_models = $6, require_zdr = $7, \
                 updated_at_ms = $8 WHERE id = $9 AND org_id = $10",
            )
            .bind(&g.name)
            .bind(g.max_daily_spend_nanos)
            .bind(g.max_weekly_spend_nanos)
            .bind(g.max_monthly_spend_nanos)
            .bind(&g.allowed_models)
            .bind(&g.blocked_models)
            .bind(g.require_zdr)
            .bind(g.updated_at_ms)
            .bind(&g.id)
            .bind(&g.org_id)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn delete_guardrail<'a>(&'a self, org_id: &'a str, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            // guardrail_keys rows go with it (ON DELETE CASCADE).
            let done = sqlx::query("DELETE FROM guardrails WHERE id = $1 AND org_id = $2")
                .bind(id)
                .bind(org_id)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn list_guardrails<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<Vec<GuardrailRecord>, StoreError>> {
        Box::pin(async move {
            let sql =
                format!("SELECT {GUARDRAIL_COLUMNS} FROM guardrails WHERE org_id = $1 ORDER BY created_at_ms, id");
            Ok(sqlx::query_as(&sql).bind(org_id).fetch_all(&self.pool).await?)
        })
    }

    fn all_guardrails(&self) -> BoxFuture<'_, Result<Vec<GuardrailRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {GUARDRAIL_COLUMNS} FROM guardrails ORDER BY org_id, created_at_ms, id");
            Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
        })
    }

    fn set_guardrail_keys<'a>(
        &'a self,
        org_id: &'a str,
        guardrail_id: &'a str,
        key_ids: &'a [String],
        assigned: bool,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            // Both the guardrail and each key must belong to `org_id`; other ids match nothing.
            let sql = if assigned {
                "INSERT INTO guardrail_keys (guardrail_id, key_id) \
                 SELECT g.id, k.id FROM guardrails g JOIN api_keys k ON k.org_id = g.org_id \
                 WHERE g.id = $1 AND g.org_id = $2 AND k.id = $3 \
                 ON CONFLICT (guardrail_id, key_id) DO NOTHING"
            } else {
                "DELETE FROM guardrail_keys WHERE guardrail_id = $1 \
                 AND EXISTS (SELECT 1 FROM guardrails g WHERE g.id = guardrail_keys.guardrail_id AND g.org_id = $2) \
                 AND key_id = $3"
            };
            let mut tx = self.pool.begin().await?;
            let mut changed = 0;
            for key_id in key_ids {
                if assigned {
                    // A key holds at most one guardrail: assigning replaces the other one.
                    sqlx::query(
                        "DELETE FROM guardrail_keys WHERE key_id = $1 AND guardrail_id <> $2 \
                         AND EXISTS (SELECT 1 FROM guardrails g WHERE g.id = $2 AND g.org_id = $3) \
                         AND EXISTS (SELECT 1 FROM api_keys k WHERE k.id = guardrail_keys.key_id AND k.org_id = $3)",
                    )
                    .bind(key_id)
                    .bind(guardrail_id)
                    .bind(org_id)
                    .execute(&mut *tx)
                    .await?;
                }
                let done = sqlx::query(sql)
                    .bind(guardrail_id)
                    .bind(org_id)
                    .bind(key_id)
                    .execute(&mut *tx)
                    .await?;
                changed += done.rows_affected();
            }
            tx.commit().await?;
            Ok(changed)
        })
    }

    fn all_guardrail_keys(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, StoreError>> {
        Box::pin(async move {
            let sql = "SELECT guardrail_id, key_id FROM guardrail_keys ORDER BY guardrail_id, key_id";
            Ok(sqlx::query_as(sql).fetch_all(&self.pool).await?)
        })
    }
}
