//! Named leases (leader election, drains), on the database's clock.

use async_trait::async_trait;
use sqlx::Row;
use strata_core::store::{Lease, LeaseStore, StoreError};

use crate::sql::{query_err, SqlStore};

#[async_trait]
impl LeaseStore for SqlStore {
    async fn claim_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, StoreError> {
        // One statement: insert, or take over an expired term, or extend
        // one's own; a row comes back only when `holder` holds it after.
        let now = self.now_ms_sql();
        let q = format!(
            "INSERT INTO leases (name, holder, expires_at_ms, transitions) VALUES (?, ?, {now} + ?, 0) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             expires_at_ms = excluded.expires_at_ms, \
             transitions = leases.transitions + CASE WHEN leases.holder = excluded.holder THEN 0 ELSE 1 END \
             WHERE leases.holder = excluded.holder OR leases.expires_at_ms <= {now} \
             RETURNING holder"
        );
        let row = sqlx::query(&self.sql(&q))
            .bind(name)
            .bind(holder)
            .bind(ttl_ms.max(1))
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err)?;
        Ok(row.is_some())
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let now = self.now_ms_sql();
        sqlx::query(&self.sql(&format!(
            "UPDATE leases SET expires_at_ms = {now} - 1 WHERE name = ? AND holder = ?"
        )))
        .bind(name)
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        let row = sqlx::query(&self.sql("SELECT * FROM leases WHERE name = ?"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err)?;
        Ok(row.map(|r| Lease {
            name: r.get("name"),
            holder: r.get("holder"),
            expires_at_ms: r.get("expires_at_ms"),
            transitions: r.get("transitions"),
        }))
    }
}
