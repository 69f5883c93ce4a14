//! API keys: digests, looked up by their first bytes.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::Row;
use strata_core::store::{KeyStore, StoreError};
use strata_core::tenant::{digest_lookup, ApiKeyRecord, Role, TenantId};

use crate::sql::tenants::{limit_col, limits_from, priority_from};
use crate::sql::{query_err, write_err, SqlStore};

fn key_from(r: &AnyRow) -> Result<ApiKeyRecord, StoreError> {
    let role: String = r.get("role");
    let models: Option<String> = r.get("models");
    let digest: Vec<u8> = r.get("digest");
    Ok(ApiKeyRecord {
        id: r.get("id"),
        tenant_id: TenantId(r.get("tenant_id")),
        name: r.get("name"),
        role: Role::parse(&role)
            .ok_or_else(|| StoreError::Query(format!("unknown role {role}")))?,
        models: models
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(|e| StoreError::Query(format!("bad model list: {e}")))?,
        limits: limits_from(r),
        priority: priority_from(r)?,
        expires_at_ms: r.get("expires_at_ms"),
        revoked_at_ms: r.get("revoked_at_ms"),
        created_at_ms: r.get("created_at_ms"),
        digest: digest
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Query("bad key digest".into()))?,
    })
}

#[async_trait]
impl KeyStore for SqlStore {
    async fn create_key(&self, k: &ApiKeyRecord) -> Result<(), StoreError> {
        let models = k
            .models
            .as_ref()
            .map(|m| serde_json::to_string(m).expect("strings serialise"));
        let inserted = sqlx::query(&self.sql(
            "INSERT INTO api_keys (tenant_id, id, name, digest, lookup, role, models, \
             requests_per_minute, tokens_per_minute, batch_tokens_per_minute, priority, \
             expires_at_ms, revoked_at_ms, created_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(k.tenant_id.as_str())
        .bind(&k.id)
        .bind(&k.name)
        .bind(k.digest.as_slice())
        .bind(digest_lookup(&k.digest))
        .bind(k.role.as_str())
        .bind(models)
        .bind(limit_col(k.limits.requests_per_minute))
        .bind(limit_col(k.limits.tokens_per_minute))
        .bind(limit_col(k.limits.batch_tokens_per_minute))
        .bind(k.priority.as_str())
        .bind(k.expires_at_ms)
        .bind(k.revoked_at_ms)
        .bind(k.created_at_ms)
        .execute(&self.pool)
        .await;
        inserted.map_err(write_err(|| format!("key {}", k.id)))?;
        Ok(())
    }

    async fn keys_by_lookup(&self, lookup: i64) -> Result<Vec<ApiKeyRecord>, StoreError> {
        sqlx::query(&self.sql("SELECT * FROM api_keys WHERE lookup = ?"))
            .bind(lookup)
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?
            .iter()
            .map(key_from)
            .collect()
    }

    async fn keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        sqlx::query(
            &self.sql("SELECT * FROM api_keys WHERE tenant_id = ? ORDER BY created_at_ms, id"),
        )
        .bind(tenant.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?
        .iter()
        .map(key_from)
        .collect()
    }

    async fn key(&self, tenant: &TenantId, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        sqlx::query(&self.sql("SELECT * FROM api_keys WHERE tenant_id = ? AND id = ?"))
            .bind(tenant.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err)?
            .map(|r| key_from(&r))
            .transpose()
    }

    async fn revoke_key(
        &self,
        tenant: &TenantId,
        id: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(
            "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, ?) \
             WHERE tenant_id = ? AND id = ?",
        ))
        .bind(at_ms)
        .bind(tenant.as_str())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }
}
