//! Background responses while they run, and their events, sealed per
//! tenant (each event bound to its response and sequence number).

use async_trait::async_trait;
use sqlx::Row;
use strata_core::store::{Appended, BackgroundStore, Running, StoreError, StoredResponse};
use strata_core::tenant::TenantId;

use crate::sql::{query_err, Dialect, SqlStore};

const RESPONSES: &str = "responses";
const EVENTS: &str = "response_events";

/// An event's row name in the sealing binding: the response and the
/// sequence number (an event cannot be moved to another place unnoticed).
fn event_row(response: &str, seq: u64) -> String {
    format!("{response}/{seq}")
}

#[async_trait]
impl BackgroundStore for SqlStore {
    async fn put_running(&self, tenant: &TenantId, r: &StoredResponse) -> Result<bool, StoreError> {
        let sealed = self.seal(tenant, RESPONSES, &r.id, &r.content).await?;
        let done = sqlx::query(&self.sql(
            "INSERT INTO responses \
             (tenant_id, id, created_at_ms, model, conversation_id, replica, sealed, background) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 'running') ON CONFLICT (tenant_id, id) DO UPDATE SET \
             replica = excluded.replica, sealed = excluded.sealed \
             WHERE responses.background IS NOT NULL",
        ))
        .bind(tenant.as_str())
        .bind(&r.id)
        .bind(r.created_at_ms)
        .bind(&r.model)
        .bind(&r.conversation_id)
        .bind(&r.replica)
        .bind(sealed)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn running(&self, tenant: &TenantId, id: &str) -> Result<Option<Running>, StoreError> {
        let state: Option<Option<String>> = sqlx::query_scalar(
            &self.sql("SELECT background FROM responses WHERE tenant_id = ? AND id = ?"),
        )
        .bind(tenant.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(state.flatten().as_deref().and_then(Running::parse))
    }

    async fn append_events(
        &self,
        tenant: &TenantId,
        id: &str,
        first: u64,
        events: &[Vec<u8>],
    ) -> Result<Appended, StoreError> {
        let mut sealed = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let row = event_row(id, first + i as u64);
            sealed.push(self.seal(tenant, EVENTS, &row, event).await?);
        }
        let mut tx = self.begin_write().await?;
        // The response's row, locked until the events are in: a delete or
        // an end waits for them, and they wait for a delete.
        let lock = match self.dialect() {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        };
        let state: Option<Option<String>> = sqlx::query_scalar(&self.sql(&format!(
            "SELECT background FROM responses WHERE tenant_id = ? AND id = ?{lock}"
        )))
        .bind(tenant.as_str())
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_err)?;
        let running = state.flatten().as_deref().and_then(Running::parse);
        if running.is_none() {
            return Ok(Appended {
                kept: false,
                running,
            });
        }
        for (i, event) in sealed.into_iter().enumerate() {
            let done = sqlx::query(&self.sql(
                "INSERT INTO response_events (tenant_id, response_id, seq, sealed) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (tenant_id, response_id, seq) DO NOTHING",
            ))
            .bind(tenant.as_str())
            .bind(id)
            .bind((first + i as u64) as i64)
            .bind(event)
            .execute(&mut *tx)
            .await
            .map_err(query_err)?;
            if done.rows_affected() != 1 {
                // Another gateway wrote this number: it runs the response.
                return Ok(Appended {
                    kept: false,
                    running,
                });
            }
        }
        tx.commit().await.map_err(query_err)?;
        Ok(Appended {
            kept: true,
            running,
        })
    }

    async fn events(
        &self,
        tenant: &TenantId,
        id: &str,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let rows = sqlx::query(&self.sql(
            "SELECT seq, sealed FROM response_events \
             WHERE tenant_id = ? AND response_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        ))
        .bind(tenant.as_str())
        .bind(id)
        .bind(after.map_or(-1, |n| n as i64))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        self.open_rows(tenant, &rows, |r| {
            let seq = r.get::<i64, _>("seq") as u64;
            let event = self.unseal(tenant, EVENTS, &event_row(id, seq), r.get("sealed"))?;
            Ok((seq, event))
        })
        .await
    }

    async fn cancel_running(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<bool>, StoreError> {
        let done = sqlx::query(&self.sql(
            "UPDATE responses SET background = 'cancelling' \
             WHERE tenant_id = ? AND id = ? AND background IS NOT NULL",
        ))
        .bind(tenant.as_str())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        if done.rows_affected() == 1 {
            return Ok(Some(true));
        }
        let exists =
            sqlx::query(&self.sql("SELECT 1 FROM responses WHERE tenant_id = ? AND id = ?"))
                .bind(tenant.as_str())
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(query_err)?;
        Ok(exists.map(|_| false))
    }

    async fn running_responses(&self) -> Result<Vec<(TenantId, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant_id, id FROM responses WHERE background IS NOT NULL \
             ORDER BY created_at_ms, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(rows
            .iter()
            .map(|r| (TenantId(r.get("tenant_id")), r.get("id")))
            .collect())
    }
}
