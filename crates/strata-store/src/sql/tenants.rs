//! Tenants, and the rate-limit columns tenants and keys share.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::Row;
use strata_core::store::{StoreError, TenantStore};
use strata_core::tenant::{Isolation, Priority, RateLimits, Tenant, TenantId};

use crate::sql::{query_err, write_err, SqlStore};

pub(super) fn limit_col(v: Option<u32>) -> Option<i64> {
    v.map(i64::from)
}

/// The `requests_per_minute` and `tokens_per_minute` columns of a row.
pub(super) fn limits_from(r: &AnyRow) -> RateLimits {
    RateLimits {
        requests_per_minute: limit_get(r, "requests_per_minute"),
        tokens_per_minute: limit_get(r, "tokens_per_minute"),
        batch_tokens_per_minute: limit_get(r, "batch_tokens_per_minute"),
    }
}

/// The `priority` column of a row.
pub(super) fn priority_from(r: &AnyRow) -> Result<Priority, StoreError> {
    let priority: String = r.get("priority");
    Priority::parse(&priority)
        .ok_or_else(|| StoreError::Query(format!("unknown priority {priority}")))
}

fn limit_get(r: &AnyRow, col: &str) -> Option<u32> {
    r.get::<Option<i64>, _>(col)
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

fn tenant_from(r: &AnyRow) -> Result<Tenant, StoreError> {
    let isolation: String = r.get("isolation");
    Ok(Tenant {
        id: TenantId(r.get("id")),
        name: r.get("name"),
        isolation: Isolation::parse(&isolation)
            .ok_or_else(|| StoreError::Query(format!("unknown isolation {isolation}")))?,
        limits: limits_from(r),
        monthly_budget_usd: r.get("monthly_budget_usd"),
        priority: priority_from(r)?,
        created_at_ms: r.get("created_at_ms"),
    })
}

#[async_trait]
impl TenantStore for SqlStore {
    async fn create_tenant(&self, t: &Tenant) -> Result<(), StoreError> {
        self.vault()?
            .create_tenant_key(t.id.as_str())
            .await
            .map_err(|e| StoreError::Crypto(e.to_string()))?;
        let inserted = sqlx::query(&self.sql(
            "INSERT INTO tenants (id, name, isolation, requests_per_minute, tokens_per_minute, \
             batch_tokens_per_minute, monthly_budget_usd, priority, created_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(t.id.as_str())
        .bind(&t.name)
        .bind(t.isolation.as_str())
        .bind(limit_col(t.limits.requests_per_minute))
        .bind(limit_col(t.limits.tokens_per_minute))
        .bind(limit_col(t.limits.batch_tokens_per_minute))
        .bind(t.monthly_budget_usd)
        .bind(t.priority.as_str())
        .bind(t.created_at_ms)
        .execute(&self.pool)
        .await;
        inserted.map_err(write_err(|| format!("tenant named `{}`", t.name)))?;
        Ok(())
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>, StoreError> {
        sqlx::query(&self.sql("SELECT * FROM tenants WHERE id = ?"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err)?
            .map(|r| tenant_from(&r))
            .transpose()
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        sqlx::query(&self.sql("SELECT * FROM tenants ORDER BY created_at_ms, id"))
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?
            .iter()
            .map(tenant_from)
            .collect()
    }

    async fn update_tenant(&self, t: &Tenant) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(
            "UPDATE tenants SET name = ?, isolation = ?, requests_per_minute = ?, \
             tokens_per_minute = ?, batch_tokens_per_minute = ?, monthly_budget_usd = ?, \
             priority = ? WHERE id = ?",
        ))
        .bind(&t.name)
        .bind(t.isolation.as_str())
        .bind(limit_col(t.limits.requests_per_minute))
        .bind(limit_col(t.limits.tokens_per_minute))
        .bind(limit_col(t.limits.batch_tokens_per_minute))
        .bind(t.monthly_budget_usd)
        .bind(t.priority.as_str())
        .bind(t.id.as_str())
        .execute(&self.pool)
        .await;
        let done = done.map_err(write_err(|| format!("tenant named `{}`", t.name)))?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_tenant(&self, id: &TenantId) -> Result<bool, StoreError> {
        if self.tenant(id).await?.is_none() {
            return Ok(false);
        }
        // Shred first: once the key is gone, no copy of the rows can be read.
        self.vault()?
            .destroy_tenant_key(id.as_str())
            .await
            .map_err(|e| StoreError::Crypto(e.to_string()))?;
        let mut tx = self.begin_write().await?;
        let tables = [
            "stored_completions",
            "response_events",
            "responses",
            "batch_lines",
            "batches",
            "files",
            "kv_snapshots",
            "conversation_items",
            "conversations",
            "api_keys",
        ];
        for table in tables {
            sqlx::query(&self.sql(&format!("DELETE FROM {table} WHERE tenant_id = ?")))
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(query_err)?;
        }
        sqlx::query(&self.sql("DELETE FROM tenants WHERE id = ?"))
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(query_err)?;
        tx.commit().await.map_err(query_err)?;
        Ok(true)
    }
}
