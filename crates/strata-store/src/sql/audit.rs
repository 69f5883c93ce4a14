//! The audit trail: rows chained by a MAC under the audit key (a data key
//! of the keyring, so the KEK opens it), appended one at a time.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::Row;
use strata_core::store::{AuditStore, StoreError};
use strata_core::tenant::{audit_hash, AuditEntry, AuditKey, AuditRecord, TenantId, AUDIT_GENESIS};

use crate::sql::{query_err, SqlStore};

fn audit_from(r: &AnyRow) -> AuditRecord {
    AuditRecord {
        seq: r.get("seq"),
        entry: AuditEntry {
            at_ms: r.get("at_ms"),
            actor_key: r.get("actor_key"),
            actor_tenant: r.get("actor_tenant"),
            action: r.get("action"),
            tenant: r.get("tenant"),
            target: r.get("target"),
            result: r.get("result"),
        },
        prev_hash: r.get("prev_hash"),
        hash: r.get("hash"),
    }
}

#[async_trait]
impl AuditStore for SqlStore {
    async fn append_audit(&self, e: &AuditEntry) -> Result<AuditRecord, StoreError> {
        let key = self.audit_key().await?;
        let _one_at_a_time = self.audit_lock.lock().await;
        let mut tx = self.begin_write().await?;
        self.lock_in(&mut tx, "strata-audit").await?;
        let last: Option<(i64, String)> =
            sqlx::query_as(&self.sql("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"))
                .fetch_optional(&mut *tx)
                .await
                .map_err(query_err)?;
        let (seq, prev_hash) = match last {
            Some((seq, hash)) => (seq + 1, hash),
            None => (1, AUDIT_GENESIS.to_owned()),
        };
        let hash = audit_hash(&key, seq, &prev_hash, e);
        sqlx::query(&self.sql(
            "INSERT INTO audit (seq, at_ms, actor_key, actor_tenant, action, tenant, target, \
             result, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(seq)
        .bind(e.at_ms)
        .bind(&e.actor_key)
        .bind(&e.actor_tenant)
        .bind(&e.action)
        .bind(&e.tenant)
        .bind(&e.target)
        .bind(&e.result)
        .bind(&prev_hash)
        .bind(&hash)
        .execute(&mut *tx)
        .await
        .map_err(query_err)?;
        tx.commit().await.map_err(query_err)?;
        Ok(AuditRecord {
            seq,
            entry: e.clone(),
            prev_hash,
            hash,
        })
    }

    async fn audit_page(
        &self,
        tenant: Option<&TenantId>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(sqlx::query(&self.sql(
            "SELECT * FROM audit WHERE (?1 IS NULL OR tenant = ?1 OR actor_tenant = ?1) \
             AND seq > ?2 ORDER BY seq LIMIT ?3",
        ))
        .bind(tenant.map(TenantId::as_str))
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?
        .iter()
        .map(audit_from)
        .collect())
    }

    async fn audit_head(&self) -> Result<Option<(i64, String)>, StoreError> {
        sqlx::query_as(&self.sql("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"))
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err)
    }

    async fn audit_key(&self) -> Result<AuditKey, StoreError> {
        let vault = self.vault.as_ref().ok_or_else(|| {
            StoreError::Crypto(
                "the audit trail is keyed with the keyring: open it with the KEK".into(),
            )
        })?;
        vault
            .mac_key(crate::vault::AUDIT_KEY_OWNER)
            .await
            .map(AuditKey::from_bytes)
            .map_err(|e| StoreError::Crypto(e.to_string()))
    }

    async fn audit(&self, tenant: Option<&TenantId>) -> Result<Vec<AuditRecord>, StoreError> {
        self.audit_page(tenant, 0, u32::MAX).await
    }
}
