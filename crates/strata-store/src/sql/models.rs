//! The models deployed at run time.

use async_trait::async_trait;
use sqlx::Row;
use strata_core::store::{DeployedModel, ModelStore, StoreError};

use crate::sql::{query_err, SqlStore};

#[async_trait]
impl ModelStore for SqlStore {
    async fn put_model(&self, m: &DeployedModel) -> Result<(), StoreError> {
        sqlx::query(&self.sql(
            "INSERT INTO models (id, spec, created_at_ms, updated_at_ms) VALUES (?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, updated_at_ms = excluded.updated_at_ms",
        ))
        .bind(&m.id)
        .bind(&m.spec)
        .bind(m.created_at_ms)
        .bind(m.updated_at_ms)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn models(&self) -> Result<Vec<DeployedModel>, StoreError> {
        let rows =
            sqlx::query("SELECT id, spec, created_at_ms, updated_at_ms FROM models ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .map_err(query_err)?;
        Ok(rows
            .iter()
            .map(|r| DeployedModel {
                id: r.get("id"),
                spec: r.get("spec"),
                created_at_ms: r.get("created_at_ms"),
                updated_at_ms: r.get("updated_at_ms"),
            })
            .collect())
    }

    async fn delete_model(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql("DELETE FROM models WHERE id = ?"))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_err)?;
        Ok(done.rows_affected() > 0)
    }
}
