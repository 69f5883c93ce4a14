//! Stored chat completions, sealed per tenant.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::Row;
use strata_core::store::{CompletionStore, StoreError, StoredCompletion};
use strata_core::tenant::TenantId;

use crate::sql::{query_err, SqlStore};

const COMPLETIONS: &str = "stored_completions";

impl SqlStore {
    fn open_completion(
        &self,
        tenant: &TenantId,
        r: &AnyRow,
    ) -> Result<StoredCompletion, StoreError> {
        let id: String = r.get("id");
        let content = self.unseal(tenant, COMPLETIONS, &id, r.get("sealed"))?;
        Ok(StoredCompletion {
            id,
            created_at_ms: r.get("created_at_ms"),
            model: r.get("model"),
            content,
        })
    }
}

#[async_trait]
impl CompletionStore for SqlStore {
    async fn put_completion(
        &self,
        tenant: &TenantId,
        c: &StoredCompletion,
    ) -> Result<(), StoreError> {
        let sealed = self.seal(tenant, COMPLETIONS, &c.id, &c.content).await?;
        sqlx::query(
            &self.sql("INSERT INTO stored_completions (tenant_id, id, created_at_ms, model, sealed) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant_id, id) DO UPDATE SET \
             created_at_ms = excluded.created_at_ms, model = excluded.model, sealed = excluded.sealed",)
        )
        .bind(tenant.as_str())
        .bind(&c.id)
        .bind(c.created_at_ms)
        .bind(&c.model)
        .bind(sealed)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn completion(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<StoredCompletion>, StoreError> {
        let row = self.row(COMPLETIONS, tenant, id).await?;
        self.open_row(tenant, row, |r| self.open_completion(tenant, r))
            .await
    }

    async fn completions(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredCompletion>, StoreError> {
        let rows = self.newest_rows(COMPLETIONS, tenant, after, limit).await?;
        self.open_rows(tenant, &rows, |r| self.open_completion(tenant, r))
            .await
    }

    async fn delete_completion(&self, tenant: &TenantId, id: &str) -> Result<bool, StoreError> {
        self.delete_row(COMPLETIONS, tenant, id).await
    }
}
