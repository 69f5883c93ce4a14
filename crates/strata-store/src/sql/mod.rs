//! The SQL `Store`, one implementation for both backends through sqlx's
//! `Any` driver: SQLite (one file, WAL mode; the embedded default) and
//! PostgreSQL (cluster mode), each with its own migrations, applied at open.
//! Queries are written once with `?` placeholders and numbered for
//! PostgreSQL by `sql`. Tenant content is sealed by the `Vault` before it
//! reaches a row. Each stored kind's trait is implemented in a file of its
//! own below; this one opens the database and holds what they share.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, Once};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Connection, Executor, Transaction};
use strata_core::config::is_postgres_url;
use strata_core::store::StoreError;
use strata_core::tenant::TenantId;

use crate::vault::{Binding, Kek, KekSource, Vault};

mod audit;
mod background;
mod batches;
mod completions;
mod conversations;
mod decisions;
mod files;
mod instances;
mod keys;
mod leases;
mod loads;
mod models;
mod tenants;
mod usage;

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

    /// A page of the tenant's rows of `table`, newest first: at most
    /// `limit`, older than the row `after` when given.
    pub(crate) async fn newest_rows(
        &self,
        table: &str,
        tenant: &TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AnyRow>, StoreError> {
        sqlx::query(&self.sql(&format!(
            "SELECT * FROM {table} WHERE tenant_id = ?1 AND (?2 IS NULL OR \
             (created_at_ms, id) < (SELECT created_at_ms, id FROM {table} \
              WHERE tenant_id = ?1 AND id = ?2)) \
             ORDER BY created_at_ms DESC, id DESC LIMIT ?3"
        )))
        .bind(tenant.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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

/// A unique-constraint failure is `Conflict` on `what`; anything else a query error.
fn write_err(what: impl FnOnce() -> String) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(what()),
        _ => query_err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
