//! Each gateway's last load report.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::Row;
use strata_core::store::{GatewayLoad, LoadStore, StoreError};
use strata_core::Load;

use crate::sql::{query_err, SqlStore};

#[async_trait]
impl LoadStore for SqlStore {
    async fn report_load(&self, gateway: &str, model: &str, l: &Load) -> Result<(), StoreError> {
        let now = self.now_ms_sql();
        let q = format!(
            "INSERT INTO gateway_loads (gateway, model, reported_at_ms, requests_total, tokens_total, \
             prompt_tokens_total, in_flight, waiting, routable, ttft_p95_ms, tpot_p95_ms, \
             batch_lines, batch_tokens_per_s, batch_backlog_tokens) \
             VALUES (?, ?, {now}, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gateway, model) DO UPDATE SET \
             reported_at_ms = excluded.reported_at_ms, requests_total = excluded.requests_total, \
             tokens_total = excluded.tokens_total, prompt_tokens_total = excluded.prompt_tokens_total, \
             in_flight = excluded.in_flight, waiting = excluded.waiting, routable = excluded.routable, \
             ttft_p95_ms = excluded.ttft_p95_ms, tpot_p95_ms = excluded.tpot_p95_ms, \
             batch_lines = excluded.batch_lines, batch_tokens_per_s = excluded.batch_tokens_per_s, \
             batch_backlog_tokens = excluded.batch_backlog_tokens"
        );
        sqlx::query(&self.sql(&q))
            .bind(gateway)
            .bind(model)
            .bind(l.requests_total as i64)
            .bind(l.tokens_total as i64)
            .bind(l.prompt_tokens_total as i64)
            .bind(l.in_flight as i64)
            .bind(l.waiting as i64)
            .bind(l.routable as i64)
            .bind(l.ttft_p95_ms)
            .bind(l.tpot_p95_ms)
            .bind(l.batch_lines as i64)
            .bind(l.batch_tokens_per_s)
            .bind(l.batch_backlog_tokens)
            .execute(&self.pool)
            .await
            .map_err(query_err)?;
        Ok(())
    }

    async fn gateway_loads(&self, forget_ms: i64) -> Result<Vec<GatewayLoad>, StoreError> {
        let now = self.now_ms_sql();
        sqlx::query(&self.sql(&format!(
            "DELETE FROM gateway_loads WHERE reported_at_ms < {now} - ?"
        )))
        .bind(forget_ms)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        let rows = sqlx::query(&format!(
            "SELECT *, {now} - reported_at_ms AS age_ms FROM gateway_loads ORDER BY gateway, model"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        let count = |r: &AnyRow, col: &str| r.get::<i64, _>(col).max(0) as u64;
        Ok(rows
            .iter()
            .map(|r| GatewayLoad {
                gateway: r.get("gateway"),
                model: r.get("model"),
                age_ms: r.get("age_ms"),
                load: Load {
                    requests_total: count(r, "requests_total"),
                    tokens_total: count(r, "tokens_total"),
                    prompt_tokens_total: count(r, "prompt_tokens_total"),
                    in_flight: count(r, "in_flight") as usize,
                    waiting: count(r, "waiting") as usize,
                    batch_lines: count(r, "batch_lines") as usize,
                    // Not a number, or below zero (a forged row): none.
                    batch_tokens_per_s: r.get::<f64, _>("batch_tokens_per_s").max(0.0),
                    batch_backlog_tokens: r.get::<f64, _>("batch_backlog_tokens").max(0.0),
                    routable: count(r, "routable") as usize,
                    ttft_p95_ms: r.get("ttft_p95_ms"),
                    tpot_p95_ms: r.get("tpot_p95_ms"),
                },
            })
            .collect())
    }
}
