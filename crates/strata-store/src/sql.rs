//! The SQL `Store`, one implementation for both backends through sqlx's
//! `Any` driver: SQLite (one file, WAL mode; the embedded default) and
//! PostgreSQL (cluster mode), each with its own migrations, applied at open.
//! Queries are written once with `?` placeholders and numbered for
//! PostgreSQL by `sql`. Tenant content is sealed by the `Vault` before it
//! reaches a row.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, Once};

use async_trait::async_trait;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Connection, Executor, Row, Transaction};
use strata_core::config::{is_postgres_url, CapacityType};
use strata_core::store::{
    AuditStore, CompletionStore, DecisionRecord, DecisionStore, GatewayLoad, InstanceKind,
    InstanceRecord, InstanceState, InstanceStore, KeyStore, Lease, LeaseStore, LoadStore,
    ReplicaUsage, StoreError, StoredCompletion, TenantStore, UsageRecord, UsageStore, UsageTotals,
};
use strata_core::tenant::{
    audit_hash, digest_lookup, ApiKeyRecord, AuditEntry, AuditRecord, Isolation, RateLimits, Role,
    Tenant, TenantId, AUDIT_GENESIS,
};
use strata_core::Load;

use crate::vault::{Binding, Kek, KekSource, Vault};

mod conversations;

const COMPLETIONS: &str = "stored_completions";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

pub struct SqlStore {
    pub(crate) pool: AnyPool,
    dialect: Dialect,
    /// `None` for tools that touch no tenant content (audit verification).
    vault: Option<Arc<Vault>>,
    /// One appender at a time, so each audit row chains to the one before.
    audit_lock: tokio::sync::Mutex<()>,
    /// One conversation writer at a time, so items get consecutive `seq`s.
    pub(crate) items_lock: tokio::sync::Mutex<()>,
}

/// Sorts a driver error into what the gateway tells clients: a database
/// that is away or a full disk is a temporary 503, anything else a failure.
pub(crate) fn query_err(e: sqlx::Error) -> StoreError {
    let message = e.to_string();
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(message),
        sqlx::Error::Database(db) => match db.code().as_deref().unwrap_or_default() {
            // PostgreSQL disk_full; SQLite's SQLITE_FULL (SQLite codes have
            // at most four digits, PostgreSQL's five characters; extended
            // codes keep the primary code in the low byte).
            "53100" => StoreError::Full(message),
            code if code.len() < 5 && code.parse::<u32>().is_ok_and(|c| c & 0xff == 13) => {
                StoreError::Full(message)
            }
            // PostgreSQL connection_exception and operator intervention
            // (admin_shutdown, crash_shutdown, cannot_connect_now).
            code if code.starts_with("08") || code.starts_with("57P") => {
                StoreError::Unavailable(message)
            }
            _ => StoreError::Query(message),
        },
        _ => StoreError::Query(message),
    }
}

impl SqlStore {
    /// Opens (creating if needed) a SQLite database file and migrates it.
    pub async fn open(path: &Path, vault: Arc<Vault>) -> Result<SqlStore, StoreError> {
        SqlStore::open_sqlite(path, Some(vault)).await
    }

    /// Opens without a keyring: everything but tenant content works, and
    /// creating tenants or touching sealed rows is an error.
    pub async fn open_without_vault(path: &Path) -> Result<SqlStore, StoreError> {
        SqlStore::open_sqlite(path, None).await
    }

    /// Opens `db`: a PostgreSQL URL (`postgres://…`), else a SQLite file path.
    pub async fn open_any(db: &str, vault: Option<Arc<Vault>>) -> Result<SqlStore, StoreError> {
        if is_postgres_url(db) {
            SqlStore::connect_postgres(db, vault).await
        } else {
            SqlStore::open_sqlite(Path::new(db), vault).await
        }
    }

    /// Opens `db` with the keyring that belongs to it: on SQLite the file
    /// `keyring_file`; on PostgreSQL the shared table (a `keyring_file` left
    /// from a single-machine start is imported into it once).
    pub async fn open_with_keyring(
        db: &str,
        kek: Kek,
        source: KekSource,
        keyring_file: &Path,
    ) -> Result<(SqlStore, Arc<Vault>), StoreError> {
        let crypto = |e: crate::vault::VaultError| StoreError::Crypto(e.to_string());
        if is_postgres_url(db) {
            let store = SqlStore::connect_postgres(db, None).await?;
            let vault = Vault::open_shared(store.raw_pool(), kek, source, Some(keyring_file))
                .await
                .map_err(crypto)?;
            let vault = Arc::new(vault);
            Ok((store.with_vault(vault.clone()), vault))
        } else {
            let vault = Arc::new(Vault::open(keyring_file, kek, source).map_err(crypto)?);
            let store = SqlStore::open_sqlite(Path::new(db), Some(vault.clone())).await?;
            Ok((store, vault))
        }
    }

    async fn open_sqlite(path: &Path, vault: Option<Arc<Vault>>) -> Result<SqlStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Open(format!("{}: {e}", dir.display())))?;
        }
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = SqlStore::connect_pool(&url, Dialect::Sqlite)
            .await
            .map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))?;
        sqlx::migrate!("migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(SqlStore::with_pool(pool, Dialect::Sqlite, vault))
    }

    /// Connects to PostgreSQL at `url` and migrates it.
    pub async fn connect_postgres(
        url: &str,
        vault: Option<Arc<Vault>>,
    ) -> Result<SqlStore, StoreError> {
        let pool = SqlStore::connect_pool(url, Dialect::Postgres)
            .await
            .map_err(|e| StoreError::Open(format!("PostgreSQL: {e}")))?;
        sqlx::migrate!("migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(SqlStore::with_pool(pool, Dialect::Postgres, vault))
    }

    async fn connect_pool(url: &str, dialect: Dialect) -> Result<AnyPool, sqlx::Error> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let options: AnyConnectOptions = url.parse()?;
        AnyPoolOptions::new()
            .max_connections(if dialect == Dialect::Sqlite { 4 } else { 8 })
            // A database that is away answers in seconds (a clear 503), not
            // sqlx's default 30 s of waiting for a connection.
            .acquire_timeout(std::time::Duration::from_secs(5))
            // When SQLite rolls a transaction back by itself (a full disk),
            // sqlx's ROLLBACK fails and it goes on counting the transaction
            // as open: every later BEGIN on that connection fails ("non-zero
            // transaction depth"). Such a connection is closed, not pooled.
            .after_release(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
    }

    fn with_pool(pool: AnyPool, dialect: Dialect, vault: Option<Arc<Vault>>) -> SqlStore {
        SqlStore {
            pool,
            dialect,
            vault,
            audit_lock: tokio::sync::Mutex::new(()),
            items_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// This store with `vault` sealing its tenant content (a shared keyring
    /// is opened on the store's own pool, after its migrations).
    pub fn with_vault(mut self, vault: Arc<Vault>) -> SqlStore {
        self.vault = Some(vault);
        self
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The database's clock in Unix milliseconds, as an SQL expression.
    fn now_ms_sql(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// The connection pool, for tools and tests that read the database
    /// directly (sealed columns stay sealed).
    pub fn raw_pool(&self) -> AnyPool {
        self.pool.clone()
    }

    /// `q` for this backend: `?` placeholders become `$1`, `$2`, … (and
    /// `?N` becomes `$N`) for PostgreSQL.
    pub fn sql<'q>(&self, q: &'q str) -> Cow<'q, str> {
        match self.dialect {
            Dialect::Sqlite => Cow::Borrowed(q),
            Dialect::Postgres => Cow::Owned(number_placeholders(q)),
        }
    }

    /// The tenant's row `id` of `table`.
    pub(crate) async fn row(
        &self,
        table: &str,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<AnyRow>, StoreError> {
        sqlx::query(&self.sql(&format!(
            "SELECT * FROM {table} WHERE tenant_id = ? AND id = ?"
        )))
        .bind(tenant.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err)
    }

    /// Deletes the tenant's row `id` of `table`; false if there was none.
    pub(crate) async fn delete_row(
        &self,
        table: &str,
        tenant: &TenantId,
        id: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(&format!(
            "DELETE FROM {table} WHERE tenant_id = ? AND id = ?"
        )))
        .bind(tenant.as_str())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }

    /// A transaction that writes. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`, waiting out `busy_timeout`): a deferred one that
    /// reads first fails to upgrade with SQLITE_BUSY_SNAPSHOT when another
    /// connection wrote in between, which no timeout cures.
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Any>, StoreError> {
        match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Dialect::Postgres => self.pool.begin().await,
        }
        .map_err(query_err)
    }

    /// Inside `tx`, waits for other writers of `key` in other processes
    /// (PostgreSQL advisory lock, released at commit); in-process writers
    /// are already serialised by the caller's mutex, and SQLite has one
    /// writer at a time anyway.
    pub(crate) async fn lock_in(
        &self,
        tx: &mut Transaction<'_, Any>,
        key: &str,
    ) -> Result<(), StoreError> {
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1)::bigint)")
                .bind(key)
                .execute(&mut **tx)
                .await
                .map_err(query_err)?;
        }
        Ok(())
    }

    fn vault(&self) -> Result<&Vault, StoreError> {
        self.vault
            .as_deref()
            .ok_or_else(|| StoreError::Crypto("this store was opened without a keyring".into()))
    }

    /// Seals tenant content for row `row` of `table`.
    pub(crate) async fn seal(
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
            .await
            .map_err(|e| StoreError::Crypto(e.to_string()))
    }

    /// Opens what `seal` sealed for the same tenant, table and row, with the
    /// keys in memory: callers run it inside `unsealing`.
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
            .open_cached(at, sealed)
            .map_err(|e| StoreError::Crypto(e.to_string()))
    }

    /// `open` applied to the tenant's row, if there is one (see `unsealing`).
    pub(crate) async fn open_row<T>(
        &self,
        tenant: &TenantId,
        row: Option<AnyRow>,
        open: impl Fn(&AnyRow) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.unsealing(tenant, || row.as_ref().map(&open).transpose())
            .await
    }

    /// `open` applied to each of the tenant's rows (see `unsealing`).
    pub(crate) async fn open_rows<T>(
        &self,
        tenant: &TenantId,
        rows: &[AnyRow],
        open: impl Fn(&AnyRow) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.unsealing(tenant, || rows.iter().map(&open).collect())
            .await
    }

    /// Runs `open` (which unseals the tenant's rows) with the tenant's keys
    /// ready, and once more if it failed and a shared keyring then read
    /// newer keys (a version another gateway added).
    pub(crate) async fn unsealing<T>(
        &self,
        tenant: &TenantId,
        open: impl Fn() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let vault = self.vault()?;
        let crypto = |e: crate::vault::VaultError| StoreError::Crypto(e.to_string());
        vault.ready(tenant.as_str()).await.map_err(crypto)?;
        let first = open();
        if first.is_err() && vault.ready(tenant.as_str()).await.map_err(crypto)? {
            return open();
        }
        first
    }
}

fn number_placeholders(q: &str) -> String {
    let mut out = String::with_capacity(q.len() + 16);
    let mut next = 1;
    let mut chars = q.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '?' {
            out.push(c);
            continue;
        }
        out.push('$');
        if chars.peek().is_some_and(char::is_ascii_digit) {
            while let Some(d) = chars.next_if(char::is_ascii_digit) {
                out.push(d);
            }
        } else {
            out.push_str(&next.to_string());
            next += 1;
        }
    }
    out
}

fn limit_col(v: Option<u32>) -> Option<i64> {
    v.map(i64::from)
}

/// The `requests_per_minute` and `tokens_per_minute` columns of a row.
fn limits_from(r: &AnyRow) -> RateLimits {
    RateLimits {
        requests_per_minute: limit_get(r, "requests_per_minute"),
        tokens_per_minute: limit_get(r, "tokens_per_minute"),
    }
}

fn limit_get(r: &AnyRow, col: &str) -> Option<u32> {
    r.get::<Option<i64>, _>(col)
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

fn tenant_from(r: &AnyRow) -> Result<Tenant, StoreError> {
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

fn key_from(r: &AnyRow) -> Result<ApiKeyRecord, StoreError> {
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
impl UsageStore for SqlStore {
    async fn record_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError> {
        // Many rows per statement: one round trip per chunk instead of per
        // row (13 binds a row, well under either backend's limit). Chunks
        // come in a few fixed sizes, so the statements are prepared once
        // and cached rather than once per batch length. A row written twice
        // (a retried batch) is kept once.
        let mut tx = self.begin_write().await?;
        for chunk in usage_chunks(rows) {
            let row = format!("({})", ["?"; 13].join(", "));
            let statement = format!(
                "INSERT INTO usage (request_id, tenant_id, key_id, at_ms, model, replica, \
                 status, prompt_tokens, completion_tokens, ttft_ms, latency_ms, stream, cost_usd) \
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
                    .bind(r.cost_usd);
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
                // BOOLEAN on PostgreSQL, an integer on SQLite.
                stream: r
                    .try_get::<bool, _>("stream")
                    .or_else(|_| r.try_get::<i64, _>("stream").map(|v| v != 0))
                    .unwrap_or(false),
                cost_usd: r.get("cost_usd"),
            })
            .collect())
    }

    async fn usage_by_replica(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<ReplicaUsage>, StoreError> {
        let rows = sqlx::query(&self.sql(
            "SELECT replica, tenant_id, model, (at_ms / 3600000) * 3600000 AS hour_ms, \
             CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) AS tokens FROM usage \
             WHERE at_ms >= ? AND at_ms < ? GROUP BY replica, tenant_id, model, hour_ms \
             ORDER BY hour_ms, replica, tenant_id, model",
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
            })
            .collect())
    }
}

#[async_trait]
impl InstanceStore for SqlStore {
    async fn upsert_instance(&self, i: &InstanceRecord) -> Result<(), StoreError> {
        sqlx::query(
            &self.sql("INSERT INTO instances (id, provider, endpoint, state, started_at_ms, ended_at_ms, detail, \
             pool, model, instance_type, zone, capacity, price_per_hour, tokens_per_s) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET endpoint = excluded.endpoint, state = excluded.state, \
             ended_at_ms = excluded.ended_at_ms, detail = excluded.detail",)
        )
        .bind(&i.id)
        .bind(&i.provider)
        .bind(&i.endpoint)
        .bind(i.state.as_str())
        .bind(i.started_at_ms)
        .bind(i.ended_at_ms)
        .bind(&i.detail)
        .bind(&i.kind.pool)
        .bind(&i.kind.model)
        .bind(&i.kind.instance_type)
        .bind(&i.kind.zone)
        .bind(i.kind.capacity.as_str())
        .bind(i.kind.price_per_hour)
        .bind(i.kind.tokens_per_s)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        self.select_instances("", None).await
    }

    async fn running_instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        self.select_instances("WHERE ended_at_ms IS NULL", None)
            .await
    }

    async fn instances_since(&self, since_ms: i64) -> Result<Vec<InstanceRecord>, StoreError> {
        self.select_instances(
            "WHERE ended_at_ms IS NULL OR ended_at_ms >= ?",
            Some(since_ms),
        )
        .await
    }
}

impl SqlStore {
    /// Instances matching `filter` (a `WHERE` clause or nothing, with at
    /// most one `?` for `bind`), newest first.
    async fn select_instances(
        &self,
        filter: &str,
        bind: Option<i64>,
    ) -> Result<Vec<InstanceRecord>, StoreError> {
        let sql = format!("SELECT * FROM instances {filter} ORDER BY started_at_ms DESC, id DESC");
        let sql = self.sql(&sql);
        let mut query = sqlx::query(&sql);
        if let Some(b) = bind {
            query = query.bind(b);
        }
        let rows = query.fetch_all(&self.pool).await.map_err(query_err)?;
        rows.into_iter()
            .map(|r| {
                let state: String = r.get("state");
                let capacity: String = r.get("capacity");
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
                    kind: InstanceKind {
                        pool: r.get("pool"),
                        model: r.get("model"),
                        instance_type: r.get("instance_type"),
                        zone: r.get("zone"),
                        capacity: CapacityType::parse(&capacity).ok_or_else(|| {
                            StoreError::Query(format!("unknown capacity type {capacity}"))
                        })?,
                        price_per_hour: r.get("price_per_hour"),
                        tokens_per_s: r.get("tokens_per_s"),
                    },
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
impl TenantStore for SqlStore {
    async fn create_tenant(&self, t: &Tenant) -> Result<(), StoreError> {
        self.vault()?
            .create_tenant_key(t.id.as_str())
            .await
            .map_err(|e| StoreError::Crypto(e.to_string()))?;
        let inserted = sqlx::query(&self.sql(
            "INSERT INTO tenants (id, name, isolation, requests_per_minute, tokens_per_minute, \
             monthly_budget_usd, created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ))
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
        sqlx::query(&self.sql("SELECT * FROM tenants WHERE id = ?"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err)?
            .map(|r| tenant_from(&r))
            .transpose()
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        sqlx::query(&self.sql("SELECT * FROM tenants ORDER BY created_at_ms, id"))
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?
            .iter()
            .map(tenant_from)
            .collect()
    }

    async fn update_tenant(&self, t: &Tenant) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(
            "UPDATE tenants SET name = ?, isolation = ?, requests_per_minute = ?, \
             tokens_per_minute = ?, monthly_budget_usd = ? WHERE id = ?",
        ))
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
            .await
            .map_err(|e| StoreError::Crypto(e.to_string()))?;
        let mut tx = self.begin_write().await?;
        let tables = [
            "stored_completions",
            "responses",
            "kv_snapshots",
            "conversation_items",
            "conversations",
            "api_keys",
        ];
        for table in tables {
            sqlx::query(&self.sql(&format!("DELETE FROM {table} WHERE tenant_id = ?")))
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(query_err)?;
        }
        sqlx::query(&self.sql("DELETE FROM tenants WHERE id = ?"))
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(query_err)?;
        tx.commit().await.map_err(query_err)?;
        Ok(true)
    }
}

#[async_trait]
impl KeyStore for SqlStore {
    async fn create_key(&self, k: &ApiKeyRecord) -> Result<(), StoreError> {
        let models = k
            .models
            .as_ref()
            .map(|m| serde_json::to_string(m).expect("strings serialise"));
        let inserted = sqlx::query(&self.sql(
            "INSERT INTO api_keys (tenant_id, id, name, digest, lookup, role, models, \
             requests_per_minute, tokens_per_minute, expires_at_ms, revoked_at_ms, created_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ))
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
        sqlx::query(&self.sql("SELECT * FROM api_keys WHERE lookup = ?"))
            .bind(lookup)
            .fetch_all(&self.pool)
            .await
            .map_err(query_err)?
            .iter()
            .map(key_from)
            .collect()
    }

    async fn keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        sqlx::query(
            &self.sql("SELECT * FROM api_keys WHERE tenant_id = ? ORDER BY created_at_ms, id"),
        )
        .bind(tenant.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?
        .iter()
        .map(key_from)
        .collect()
    }

    async fn key(&self, tenant: &TenantId, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        sqlx::query(&self.sql("SELECT * FROM api_keys WHERE tenant_id = ? AND id = ?"))
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
        let done = sqlx::query(&self.sql(
            "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, ?) \
             WHERE tenant_id = ? AND id = ?",
        ))
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
impl AuditStore for SqlStore {
    async fn append_audit(&self, e: &AuditEntry) -> Result<AuditRecord, StoreError> {
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
        let hash = audit_hash(seq, &prev_hash, e);
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

    async fn audit(&self, tenant: Option<&TenantId>) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(sqlx::query(&self.sql(
            "SELECT * FROM audit WHERE ?1 IS NULL OR tenant = ?1 OR actor_tenant = ?1 ORDER BY seq",
        ))
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
        let rows = sqlx::query(&self.sql(
            "SELECT * FROM stored_completions WHERE tenant_id = ?1 AND (?2 IS NULL OR \
             (created_at_ms, id) < (SELECT created_at_ms, id FROM stored_completions \
              WHERE tenant_id = ?1 AND id = ?2)) \
             ORDER BY created_at_ms DESC, id DESC LIMIT ?3",
        ))
        .bind(tenant.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        self.open_rows(tenant, &rows, |r| self.open_completion(tenant, r))
            .await
    }

    async fn delete_completion(&self, tenant: &TenantId, id: &str) -> Result<bool, StoreError> {
        self.delete_row(COMPLETIONS, tenant, id).await
    }
}

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

#[async_trait]
impl LoadStore for SqlStore {
    async fn report_load(&self, gateway: &str, l: &Load) -> Result<(), StoreError> {
        let now = self.now_ms_sql();
        let q = format!(
            "INSERT INTO gateway_loads (gateway, reported_at_ms, requests_total, tokens_total, \
             prompt_tokens_total, in_flight, waiting, routable, ttft_p95_ms, tpot_p95_ms) \
             VALUES (?, {now}, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gateway) DO UPDATE SET \
             reported_at_ms = excluded.reported_at_ms, requests_total = excluded.requests_total, \
             tokens_total = excluded.tokens_total, prompt_tokens_total = excluded.prompt_tokens_total, \
             in_flight = excluded.in_flight, waiting = excluded.waiting, routable = excluded.routable, \
             ttft_p95_ms = excluded.ttft_p95_ms, tpot_p95_ms = excluded.tpot_p95_ms"
        );
        sqlx::query(&self.sql(&q))
            .bind(gateway)
            .bind(l.requests_total as i64)
            .bind(l.tokens_total as i64)
            .bind(l.prompt_tokens_total as i64)
            .bind(l.in_flight as i64)
            .bind(l.waiting as i64)
            .bind(l.routable as i64)
            .bind(l.ttft_p95_ms)
            .bind(l.tpot_p95_ms)
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
            "SELECT *, {now} - reported_at_ms AS age_ms FROM gateway_loads ORDER BY gateway"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        let count = |r: &AnyRow, col: &str| r.get::<i64, _>(col).max(0) as u64;
        Ok(rows
            .iter()
            .map(|r| GatewayLoad {
                gateway: r.get("gateway"),
                age_ms: r.get("age_ms"),
                load: Load {
                    requests_total: count(r, "requests_total"),
                    tokens_total: count(r, "tokens_total"),
                    prompt_tokens_total: count(r, "prompt_tokens_total"),
                    in_flight: count(r, "in_flight") as usize,
                    waiting: count(r, "waiting") as usize,
                    routable: count(r, "routable") as usize,
                    ttft_p95_ms: r.get("ttft_p95_ms"),
                    tpot_p95_ms: r.get("tpot_p95_ms"),
                },
            })
            .collect())
    }
}

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

    #[test]
    fn driver_errors_sort_into_what_clients_are_told() {
        // A database that is away (the e2e store-fault tests see these from
        // a stopped PostgreSQL and a full disk under SQLite).
        for e in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        ] {
            assert!(matches!(query_err(e), StoreError::Unavailable(_)));
        }
        assert!(matches!(
            query_err(sqlx::Error::RowNotFound),
            StoreError::Query(_)
        ));
    }
}
