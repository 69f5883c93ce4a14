//! The SQLite `Store`: one file, WAL mode, migrations applied at open.
//! Tenant content is sealed by the `Vault` before it reaches a row.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use strata_core::store::{
    AuditStore, CompletionStore, InstanceRecord, InstanceState, InstanceStore, KeyStore,
    StoreError, StoredCompletion, TenantStore, UsageRecord, UsageStore, UsageTotals,
};
use strata_core::tenant::{
    audit_hash, digest_lookup, ApiKeyRecord, AuditEntry, AuditRecord, Isolation, RateLimits, Role,
    Tenant, TenantId, AUDIT_GENESIS,
};

use crate::vault::{Binding, Vault};

mod conversations;

const COMPLETIONS: &str = "stored_completions";

pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
    /// `None` for tools that touch no tenant content (audit verification).
    vault: Option<Arc<Vault>>,
    /// One appender at a time, so each audit row chains to the one before.
    audit_lock: tokio::sync::Mutex<()>,
    /// One conversation writer at a time, so items get consecutive `seq`s.
    pub(crate) items_lock: tokio::sync::Mutex<()>,
}

pub(crate) fn query_err(e: sqlx::Error) -> StoreError {
    StoreError::Query(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and migrates it.
    pub async fn open(path: &Path, vault: Arc<Vault>) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, Some(vault)).await
    }

    /// Opens without a keyring: everything but tenant content works, and
    /// creating tenants or touching sealed rows is an error.
    pub async fn open_without_vault(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, None).await
    }

    async fn open_with(path: &Path, vault: Option<Arc<Vault>>) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Open(format!("{}: {e}", dir.display())))?;
        }
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(|e| StoreError::Open(e.to_string()))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))?;
        sqlx::migrate!("migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(SqliteStore {
            pool,
            vault,
            audit_lock: tokio::sync::Mutex::new(()),
            items_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn vault(&self) -> Result<&Vault, StoreError> {
        self.vault
            .as_deref()
            .ok_or_else(|| StoreError::Crypto("this store was opened without a keyring".into()))
    }

    /// Seals tenant content for row `row` of `table`.
    pub(crate) fn seal(
        &self,
        tenant: &TenantId,
        table: &str,
        row: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let at = Binding {
            tenant: tenant.as_str(),
            table,
            row,
        };
        self.vault()?
            .seal(at, plaintext)
            .map_err(|e| StoreError::Crypto(e.to_string()))
    }

    /// Opens what `seal` sealed for the same tenant, table and row.
    pub(crate) fn unseal(
        &self,
        tenant: &TenantId,
        table: &str,
        row: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let at = Binding {
            tenant: tenant.as_str(),
            table,
            row,
        };
        self.vault()?
            .open_sealed(at, sealed)
            .map_err(|e| StoreError::Crypto(e.to_string()))
    }
}

fn limit_col(v: Option<u32>) -> Option<i64> {
    v.map(i64::from)
}

/// The `requests_per_minute` and `tokens_per_minute` columns of a row.
fn limits_from(r: &SqliteRow) -> RateLimits {
    RateLimits {
        requests_per_minute: limit_get(r, "requests_per_minute"),
        tokens_per_minute: limit_get(r, "tokens_per_minute"),
    }
}

fn limit_get(r: &SqliteRow, col: &str) -> Option<u32> {
    r.get::<Option<i64>, _>(col)
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

fn tenant_from(r: &SqliteRow) -> Result<Tenant, StoreError> {
    let isolation: String = r.get("isolation");
    Ok(Tenant {
        id: TenantId(r.get("id")),
        name: r.get("name"),
        isolation: Isolation::parse(&isolation)
            .ok_or_else(|| StoreError::Query(format!("unknown isolation {isolation}")))?,
        limits: limits_from(r),
        monthly_budget_usd: r.get("monthly_budget_usd"),
        created_at_ms: r.get("created_at_ms"),
    })
}

fn key_from(r: &SqliteRow) -> Result<ApiKeyRecord, StoreError> {
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
        expires_at_ms: r.get("expires_at_ms"),
        revoked_at_ms: r.get("revoked_at_ms"),
        created_at_ms: r.get("created_at_ms"),
        digest: digest
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Query("bad key digest".into()))?,
    })
}

fn audit_from(r: &SqliteRow) -> AuditRecord {
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

impl SqliteStore {
    fn open_completion(
        &self,
        tenant: &TenantId,
        r: &SqliteRow,
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
impl UsageStore for SqliteStore {
    async fn record_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError> {
        // Many rows per statement: one round trip to SQLite's worker per
        // chunk instead of per row (13 binds a row, well under the limit).
        let mut tx = self.pool.begin().await.map_err(query_err)?;
        for chunk in rows.chunks(256) {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT OR REPLACE INTO usage (request_id, tenant_id, key_id, at_ms, model, replica, \
                 status, prompt_tokens, completion_tokens, ttft_ms, latency_ms, stream, cost_usd) ",
            );
            q.push_values(chunk, |mut b, r| {
                b.push_bind(&r.request_id)
                    .push_bind(&r.tenant_id)
                    .push_bind(&r.key_id)
                    .push_bind(r.at_ms)
                    .push_bind(&r.model)
                    .push_bind(&r.replica)
                    .push_bind(i64::from(r.status))
                    .push_bind(i64::from(r.prompt_tokens))
                    .push_bind(i64::from(r.completion_tokens))
                    .push_bind(r.ttft_ms)
                    .push_bind(r.latency_ms)
                    .push_bind(r.stream)
                    .push_bind(r.cost_usd);
            });
            q.build().execute(&mut *tx).await.map_err(query_err)?;
        }
        tx.commit().await.map_err(query_err)
    }

    async fn usage_totals(
        &self,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<UsageTotals>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, COUNT(*) AS requests, SUM(prompt_tokens) AS p, SUM(completion_tokens) AS c, \
             SUM(cost_usd) AS cost FROM usage WHERE ?1 IS NULL OR tenant_id = ?1 \
             GROUP BY model ORDER BY model",
        )
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
        sqlx::query_scalar::<_, f64>(
            "SELECT COALESCE(SUM(cost_usd), 0.0) FROM usage WHERE tenant_id = ? AND at_ms >= ?",
        )
        .bind(tenant.as_str())
        .bind(since_ms)
        .fetch_one(&self.pool)
        .await
        .map_err(query_err)
    }
}

#[async_trait]
impl InstanceStore for SqliteStore {
    async fn upsert_instance(&self, i: &InstanceRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO instances (id, provider, endpoint, state, started_at_ms, ended_at_ms, detail) \
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET state = excluded.state, \
             ended_at_ms = excluded.ended_at_ms, detail = excluded.detail",
        )
        .bind(&i.id)
        .bind(&i.provider)
        .bind(&i.endpoint)
        .bind(i.state.as_str())
        .bind(i.started_at_ms)
        .bind(i.ended_at_ms)
        .bind(&i.detail)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM instances ORDER BY started_at_ms DESC, id DESC")
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?;
        rows.into_iter()
            .map(|r| {
                let state: String = r.get("state");
                Ok(InstanceRecord {
                    id: r.get("id"),
                    provider: r.get("provider"),
                    endpoint: r.get("endpoint"),
                    state: InstanceState::parse(&state).ok_or_else(|| {
                        StoreError::Query(format!("unknown instance state {state}"))
                    })?,
                    started_at_ms: r.get("started_at_ms"),
                    ended_at_ms: r.get("ended_at_ms"),
                    detail: r.get("detail"),
                })
            })
            .collect()
    }
}

/// A unique-constraint failure is `Conflict` on `what`; anything else a query error.
fn write_err(what: impl FnOnce() -> String) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(what()),
        _ => query_err(e),
    }
}

#[async_trait]
impl TenantStore for SqliteStore {
    async fn create_tenant(&self, t: &Tenant) -> Result<(), StoreError> {
        self.vault()?
            .create_tenant_key(t.id.as_str())
            .map_err(|e| StoreError::Crypto(e.to_string()))?;
        let inserted = sqlx::query(
            "INSERT INTO tenants (id, name, isolation, requests_per_minute, tokens_per_minute, \
             monthly_budget_usd, created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(t.id.as_str())
        .bind(&t.name)
        .bind(t.isolation.as_str())
        .bind(limit_col(t.limits.requests_per_minute))
        .bind(limit_col(t.limits.tokens_per_minute))
        .bind(t.monthly_budget_usd)
        .bind(t.created_at_ms)
        .execute(&self.pool)
        .await;
        inserted.map_err(write_err(|| format!("tenant named `{}`", t.name)))?;
        Ok(())
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>, StoreError> {
        sqlx::query("SELECT * FROM tenants WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err)?
            .map(|r| tenant_from(&r))
            .transpose()
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        sqlx::query("SELECT * FROM tenants ORDER BY created_at_ms, id")
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?
            .iter()
            .map(tenant_from)
            .collect()
    }

    async fn update_tenant(&self, t: &Tenant) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE tenants SET name = ?, isolation = ?, requests_per_minute = ?, \
             tokens_per_minute = ?, monthly_budget_usd = ? WHERE id = ?",
        )
        .bind(&t.name)
        .bind(t.isolation.as_str())
        .bind(limit_col(t.limits.requests_per_minute))
        .bind(limit_col(t.limits.tokens_per_minute))
        .bind(t.monthly_budget_usd)
        .bind(t.id.as_str())
        .execute(&self.pool)
        .await;
        let done = done.map_err(write_err(|| format!("tenant named `{}`", t.name)))?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_tenant(&self, id: &TenantId) -> Result<bool, StoreError> {
        if self.tenant(id).await?.is_none() {
            return Ok(false);
        }
        // Shred first: once the key is gone, no copy of the rows can be read.
        self.vault()?
            .destroy_tenant_key(id.as_str())
            .map_err(|e| StoreError::Crypto(e.to_string()))?;
        let mut tx = self.pool.begin().await.map_err(query_err)?;
        let tables = [
            "stored_completions",
            "responses",
            "conversation_items",
            "conversations",
            "api_keys",
        ];
        for table in tables {
            sqlx::query(&format!("DELETE FROM {table} WHERE tenant_id = ?"))
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(query_err)?;
        }
        sqlx::query("DELETE FROM tenants WHERE id = ?")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(query_err)?;
        tx.commit().await.map_err(query_err)?;
        Ok(true)
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn create_key(&self, k: &ApiKeyRecord) -> Result<(), StoreError> {
        let models = k
            .models
            .as_ref()
            .map(|m| serde_json::to_string(m).expect("strings serialise"));
        let inserted = sqlx::query(
            "INSERT INTO api_keys (tenant_id, id, name, digest, lookup, role, models, \
             requests_per_minute, tokens_per_minute, expires_at_ms, revoked_at_ms, created_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(k.tenant_id.as_str())
        .bind(&k.id)
        .bind(&k.name)
        .bind(k.digest.as_slice())
        .bind(digest_lookup(&k.digest))
        .bind(k.role.as_str())
        .bind(models)
        .bind(limit_col(k.limits.requests_per_minute))
        .bind(limit_col(k.limits.tokens_per_minute))
        .bind(k.expires_at_ms)
        .bind(k.revoked_at_ms)
        .bind(k.created_at_ms)
        .execute(&self.pool)
        .await;
        inserted.map_err(write_err(|| format!("key {}", k.id)))?;
        Ok(())
    }

    async fn keys_by_lookup(&self, lookup: i64) -> Result<Vec<ApiKeyRecord>, StoreError> {
        sqlx::query("SELECT * FROM api_keys WHERE lookup = ?")
            .bind(lookup)
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?
            .iter()
            .map(key_from)
            .collect()
    }

    async fn keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        sqlx::query("SELECT * FROM api_keys WHERE tenant_id = ? ORDER BY created_at_ms, id")
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?
            .iter()
            .map(key_from)
            .collect()
    }

    async fn key(&self, tenant: &TenantId, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        sqlx::query("SELECT * FROM api_keys WHERE tenant_id = ? AND id = ?")
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
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, ?) \
             WHERE tenant_id = ? AND id = ?",
        )
        .bind(at_ms)
        .bind(tenant.as_str())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }
}

#[async_trait]
impl AuditStore for SqliteStore {
    async fn append_audit(&self, e: &AuditEntry) -> Result<AuditRecord, StoreError> {
        let _one_at_a_time = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await.map_err(query_err)?;
        let last: Option<(i64, String)> =
            sqlx::query_as("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await
                .map_err(query_err)?;
        let (seq, prev_hash) = match last {
            Some((seq, hash)) => (seq + 1, hash),
            None => (1, AUDIT_GENESIS.to_owned()),
        };
        let hash = audit_hash(seq, &prev_hash, e);
        sqlx::query(
            "INSERT INTO audit (seq, at_ms, actor_key, actor_tenant, action, tenant, target, \
             result, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
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

    async fn audit(&self, tenant: Option<&TenantId>) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(sqlx::query(
            "SELECT * FROM audit WHERE ?1 IS NULL OR tenant = ?1 OR actor_tenant = ?1 ORDER BY seq",
        )
        .bind(tenant.map(TenantId::as_str))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?
        .iter()
        .map(audit_from)
        .collect())
    }
}

#[async_trait]
impl CompletionStore for SqliteStore {
    async fn put_completion(
        &self,
        tenant: &TenantId,
        c: &StoredCompletion,
    ) -> Result<(), StoreError> {
        let sealed = self.seal(tenant, COMPLETIONS, &c.id, &c.content)?;
        sqlx::query(
            "INSERT OR REPLACE INTO stored_completions (tenant_id, id, created_at_ms, model, sealed) \
             VALUES (?, ?, ?, ?, ?)",
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
        sqlx::query("SELECT * FROM stored_completions WHERE tenant_id = ? AND id = ?")
            .bind(tenant.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err)?
            .map(|r| self.open_completion(tenant, &r))
            .transpose()
    }

    async fn completions(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredCompletion>, StoreError> {
        sqlx::query(
            "SELECT * FROM stored_completions WHERE tenant_id = ?1 AND (?2 IS NULL OR \
             (created_at_ms, id) < (SELECT created_at_ms, id FROM stored_completions \
              WHERE tenant_id = ?1 AND id = ?2)) \
             ORDER BY created_at_ms DESC, id DESC LIMIT ?3",
        )
        .bind(tenant.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?
        .iter()
        .map(|r| self.open_completion(tenant, r))
        .collect()
    }

    async fn delete_completion(&self, tenant: &TenantId, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM stored_completions WHERE tenant_id = ? AND id = ?")
            .bind(tenant.as_str())
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }
}
