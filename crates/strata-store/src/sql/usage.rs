//! The usage ledger: one row per request, written in chunks of a few fixed
//! sizes; totals, month spend, per-replica usage for the cost ledger.

use async_trait::async_trait;
use sqlx::Row;
use strata_core::store::{ReplicaUsage, StoreError, UsageRecord, UsageStore, UsageTotals};
use strata_core::tenant::TenantId;

use crate::sql::{query_err, SqlStore};

#[async_trait]
impl UsageStore for SqlStore {
    async fn record_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError> {
        // Many rows per statement: one round trip per chunk instead of per
        // row (14 binds a row, well under either backend's limit). Chunks
        // come in a few fixed sizes, so the statements are prepared once
        // and cached rather than once per batch length. A row written twice
        // (a retried batch) is kept once.
        let mut tx = self.begin_write().await?;
        for chunk in usage_chunks(rows) {
            let row = format!("({})", ["?"; 14].join(", "));
            let statement = format!(
                "INSERT INTO usage (request_id, tenant_id, key_id, at_ms, model, replica, \
                 status, prompt_tokens, completion_tokens, ttft_ms, latency_ms, stream, cost_usd, batch) \
                 VALUES {} ON CONFLICT (request_id) DO NOTHING",
                vec![row; chunk.len()].join(", ")
            );
            let statement = self.sql(&statement);
            let mut q = sqlx::query(&statement);
            for r in chunk {
                q = q
                    .bind(&r.request_id)
                    .bind(&r.tenant_id)
                    .bind(&r.key_id)
                    .bind(r.at_ms)
                    .bind(&r.model)
                    .bind(&r.replica)
                    .bind(i64::from(r.status))
                    .bind(i64::from(r.prompt_tokens))
                    .bind(i64::from(r.completion_tokens))
                    .bind(r.ttft_ms)
                    .bind(r.latency_ms)
                    .bind(r.stream)
                    .bind(r.cost_usd)
                    .bind(r.batch);
            }
            q.execute(&mut *tx).await.map_err(query_err)?;
        }
        tx.commit().await.map_err(query_err)
    }

    async fn usage_totals(
        &self,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<UsageTotals>, StoreError> {
        let rows = sqlx::query(&self.sql(
            "SELECT model, COUNT(*) AS requests, CAST(SUM(prompt_tokens) AS BIGINT) AS p, \
             CAST(SUM(completion_tokens) AS BIGINT) AS c, \
             SUM(cost_usd) AS cost FROM usage WHERE ?1 IS NULL OR tenant_id = ?1 \
             GROUP BY model ORDER BY model",
        ))
        .bind(tenant.map(TenantId::as_str))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(rows
            .into_iter()
            .map(|r| UsageTotals {
                model: r.get("model"),
                requests: r.get::<i64, _>("requests") as u64,
                prompt_tokens: r.get::<i64, _>("p") as u64,
                completion_tokens: r.get::<i64, _>("c") as u64,
                cost_usd: r.get("cost"),
            })
            .collect())
    }

    async fn tenant_spend(&self, tenant: &TenantId, since_ms: i64) -> Result<f64, StoreError> {
        sqlx::query_scalar::<_, f64>(&self.sql(
            "SELECT COALESCE(SUM(cost_usd), 0.0) FROM usage WHERE tenant_id = ? AND at_ms >= ?",
        ))
        .bind(tenant.as_str())
        .bind(since_ms)
        .fetch_one(&self.pool)
        .await
        .map_err(query_err)
    }

    async fn usage_since(&self, since_ms: i64, limit: u32) -> Result<Vec<UsageRecord>, StoreError> {
        let rows = sqlx::query(&self.sql(
            "SELECT * FROM (SELECT * FROM usage WHERE at_ms >= ? ORDER BY at_ms DESC LIMIT ?) newest \
             ORDER BY at_ms",
        ))
        .bind(since_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(rows
            .iter()
            .map(|r| UsageRecord {
                request_id: r.get("request_id"),
                tenant_id: r.get("tenant_id"),
                key_id: r.get("key_id"),
                at_ms: r.get("at_ms"),
                model: r.get("model"),
                replica: r.get("replica"),
                status: r.get::<i64, _>("status") as u16,
                prompt_tokens: r.get::<i64, _>("prompt_tokens") as u32,
                completion_tokens: r.get::<i64, _>("completion_tokens") as u32,
                ttft_ms: r.get("ttft_ms"),
                latency_ms: r.get("latency_ms"),
                stream: flag(r, "stream"),
                cost_usd: r.get("cost_usd"),
                batch: flag(r, "batch"),
            })
            .collect())
    }

    async fn usage_by_replica(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<ReplicaUsage>, StoreError> {
        let rows = sqlx::query(&self.sql(
            "SELECT replica, tenant_id, model, batch, (at_ms / 3600000) * 3600000 AS hour_ms, \
             CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) AS tokens FROM usage \
             WHERE at_ms >= ? AND at_ms < ? GROUP BY replica, tenant_id, model, batch, hour_ms \
             ORDER BY hour_ms, replica, tenant_id, model, batch",
        ))
        .bind(since_ms)
        .bind(until_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(rows
            .into_iter()
            .map(|r| ReplicaUsage {
                replica: r.get("replica"),
                tenant_id: r.get("tenant_id"),
                model: r.get("model"),
                hour_ms: r.get("hour_ms"),
                tokens: r.get::<i64, _>("tokens").max(0) as u64,
                batch: flag(&r, "batch"),
            })
            .collect())
    }
}

/// A BOOLEAN column: a boolean on PostgreSQL, an integer on SQLite.
fn flag(r: &sqlx::any::AnyRow, column: &str) -> bool {
    r.try_get::<bool, _>(column)
        .or_else(|_| r.try_get::<i64, _>(column).map(|v| v != 0))
        .unwrap_or(false)
}

/// Sizes of the usage rows' INSERT statements, largest first.
const USAGE_CHUNKS: [usize; 5] = [256, 64, 16, 4, 1];

/// `rows` cut into chunks of the sizes in `USAGE_CHUNKS`, largest first.
fn usage_chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        let size = USAGE_CHUNKS.into_iter().find(|&n| n <= rows.len())?;
        let (chunk, rest) = rows.split_at(size);
        rows = rest;
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_rows_go_in_chunks_of_a_few_fixed_sizes() {
        let rows = [(); 1000];
        for n in [0, 1, 3, 17, 256, 600, 1000] {
            let sizes: Vec<usize> = usage_chunks(&rows[..n]).map(<[_]>::len).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n);
            assert!(sizes.iter().all(|s| USAGE_CHUNKS.contains(s)), "{sizes:?}");
            assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
        }
        let sizes: Vec<usize> = usage_chunks(&rows[..600]).map(<[_]>::len).collect();
        assert_eq!(sizes, [256, 256, 64, 16, 4, 4]);
    }
}
