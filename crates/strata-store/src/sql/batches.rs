//! Batches of the Batch API and their finished lines, sealed per tenant.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::Row;
use strata_core::store::{BatchLine, BatchStore, StoreError, StoredBatch};
use strata_core::tenant::TenantId;

use crate::sql::{query_err, SqlStore};

const BATCHES: &str = "batches";
const LINES: &str = "batch_lines";

/// The statuses after which a batch does nothing more.
const ENDED: &str = "('completed', 'failed', 'expired', 'cancelled')";

impl SqlStore {
    fn open_batch(&self, tenant: &TenantId, r: &AnyRow) -> Result<StoredBatch, StoreError> {
        let id: String = r.get("id");
        let content = self.unseal(tenant, BATCHES, &id, r.get("sealed"))?;
        Ok(StoredBatch {
            created_at_ms: r.get("created_at_ms"),
            status: r.get("status"),
            content,
            id,
        })
    }
}

/// A line's row name in the sealing binding: the batch and the line.
fn line_row(batch: &str, line: u32) -> String {
    format!("{batch}/{line}")
}

#[async_trait]
impl BatchStore for SqlStore {
    async fn create_batch(&self, tenant: &TenantId, b: &StoredBatch) -> Result<(), StoreError> {
        let sealed = self.seal(tenant, BATCHES, &b.id, &b.content).await?;
        sqlx::query(&self.sql(
            "INSERT INTO batches (tenant_id, id, created_at_ms, status, sealed) VALUES (?, ?, ?, ?, ?)",
        ))
        .bind(tenant.as_str())
        .bind(&b.id)
        .bind(b.created_at_ms)
        .bind(&b.status)
        .bind(sealed)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn update_batch(
        &self,
        tenant: &TenantId,
        b: &StoredBatch,
        from: &str,
    ) -> Result<bool, StoreError> {
        let sealed = self.seal(tenant, BATCHES, &b.id, &b.content).await?;
        let done = sqlx::query(&self.sql(
            "UPDATE batches SET status = ?, sealed = ? WHERE tenant_id = ? AND id = ? AND status = ?",
        ))
        .bind(&b.status)
        .bind(sealed)
        .bind(tenant.as_str())
        .bind(&b.id)
        .bind(from)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn batch(&self, tenant: &TenantId, id: &str) -> Result<Option<StoredBatch>, StoreError> {
        let row = self.row(BATCHES, tenant, id).await?;
        self.open_row(tenant, row, |r| self.open_batch(tenant, r))
            .await
    }

    async fn batches(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredBatch>, StoreError> {
        let rows = self.newest_rows(BATCHES, tenant, after, limit).await?;
        self.open_rows(tenant, &rows, |r| self.open_batch(tenant, r))
            .await
    }

    async fn unfinished_batches(&self) -> Result<Vec<(TenantId, String)>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT tenant_id, id FROM batches WHERE status NOT IN {ENDED} \
             ORDER BY created_at_ms, id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(rows
            .iter()
            .map(|r| (TenantId(r.get("tenant_id")), r.get("id")))
            .collect())
    }

    async fn finish_line(
        &self,
        tenant: &TenantId,
        batch: &str,
        l: &BatchLine,
    ) -> Result<bool, StoreError> {
        let sealed = self
            .seal(tenant, LINES, &line_row(batch, l.line), &l.content)
            .await?;
        let done = sqlx::query(&self.sql(
            "INSERT INTO batch_lines (tenant_id, batch_id, line, ok, sealed) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (tenant_id, batch_id, line) DO NOTHING",
        ))
        .bind(tenant.as_str())
        .bind(batch)
        .bind(i64::from(l.line))
        .bind(i64::from(l.ok))
        .bind(sealed)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn finished_lines(
        &self,
        tenant: &TenantId,
        batch: &str,
        content: bool,
    ) -> Result<Vec<BatchLine>, StoreError> {
        let columns = if content { "*" } else { "line, ok" };
        let rows = sqlx::query(&self.sql(&format!(
            "SELECT {columns} FROM batch_lines WHERE tenant_id = ? AND batch_id = ? ORDER BY line"
        )))
        .bind(tenant.as_str())
        .bind(batch)
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        let open = |r: &AnyRow| -> Result<BatchLine, StoreError> {
            let line = u32::try_from(r.get::<i64, _>("line")).unwrap_or(u32::MAX);
            let content = match r.try_get::<Vec<u8>, _>("sealed") {
                Ok(sealed) => self.unseal(tenant, LINES, &line_row(batch, line), &sealed)?,
                Err(_) => Vec::new(),
            };
            Ok(BatchLine {
                line,
                ok: r.get::<i64, _>("ok") != 0,
                content,
            })
        };
        if content {
            self.open_rows(tenant, &rows, open).await
        } else {
            rows.iter().map(open).collect()
        }
    }

    async fn line_counts(&self, tenant: &TenantId, batch: &str) -> Result<(u64, u64), StoreError> {
        let row = sqlx::query(&self.sql(
            "SELECT COUNT(*) AS n, COUNT(CASE WHEN ok <> 0 THEN 1 END) AS ok FROM batch_lines \
             WHERE tenant_id = ? AND batch_id = ?",
        ))
        .bind(tenant.as_str())
        .bind(batch)
        .fetch_one(&self.pool)
        .await
        .map_err(query_err)?;
        let n = row.get::<i64, _>("n").max(0) as u64;
        let ok = row.get::<i64, _>("ok").max(0) as u64;
        Ok((ok, n - ok.min(n)))
    }
}
