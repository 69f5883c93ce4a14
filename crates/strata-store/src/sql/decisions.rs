//! The controller's decisions.

use async_trait::async_trait;
use sqlx::Row;
use strata_core::store::{DecisionRecord, DecisionStore, StoreError};

use crate::sql::{query_err, SqlStore};

#[async_trait]
impl DecisionStore for SqlStore {
    async fn record_decision(&self, d: &DecisionRecord) -> Result<(), StoreError> {
        sqlx::query(&self.sql(
            "INSERT INTO decisions (at_ms, pool, from_replicas, to_replicas, reason, inputs) \
             VALUES (?, ?, ?, ?, ?, ?)",
        ))
        .bind(d.at_ms)
        .bind(&d.pool)
        .bind(i64::from(d.from_replicas))
        .bind(i64::from(d.to_replicas))
        .bind(&d.reason)
        .bind(&d.inputs)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn decisions(&self, limit: u32) -> Result<Vec<DecisionRecord>, StoreError> {
        let rows = sqlx::query(&self.sql(
            "SELECT * FROM (SELECT * FROM decisions ORDER BY seq DESC LIMIT ?) newest ORDER BY seq",
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(rows
            .iter()
            .map(|r| DecisionRecord {
                at_ms: r.get("at_ms"),
                pool: r.get("pool"),
                from_replicas: r.get::<i64, _>("from_replicas") as u32,
                to_replicas: r.get::<i64, _>("to_replicas") as u32,
                reason: r.get("reason"),
                inputs: r.get("inputs"),
            })
            .collect())
    }
}
