#![allow(dead_code)] // each test binary uses a part of it
//! Stores for the backend-independent tests: SQLite in a temporary
//! directory, and PostgreSQL at `DATABASE_URL`, each test in a schema of
//! its own (dropped at the end). Without `DATABASE_URL` the PostgreSQL half
//! fails, unless `STRATA_SKIP_POSTGRES` is set (then it is skipped, said on
//! stderr).

use std::path::Path;
use std::sync::Arc;

use sqlx::Executor;
use strata_store::{Kek, KekSource, SqlStore, Vault};

/// A shared tenant with a $10 monthly budget and no limits.
pub fn tenant(name: &str) -> strata_core::tenant::Tenant {
    use strata_core::tenant::{Isolation, RateLimits, Tenant, TenantId};
    Tenant {
        id: TenantId::new(),
        name: name.into(),
        isolation: Isolation::Shared,
        limits: RateLimits::default(),
        priority: Default::default(),
        monthly_budget_usd: Some(10.0),
        created_at_ms: 1,
    }
}

pub fn kek() -> Kek {
    Kek::from_hex(&"3c".repeat(32)).unwrap()
}

pub fn vault(dir: &Path) -> Arc<Vault> {
    Arc::new(Vault::open(&dir.join("keyring.json"), kek(), KekSource::Environment).unwrap())
}

/// The store at `db` (SQLite path or PostgreSQL URL) with its keyring: the
/// file in `dir`, or the table of a shared PostgreSQL.
pub async fn open(db: &str, dir: &Path) -> SqlStore {
    SqlStore::open_with_keyring(db, kek(), KekSource::Environment, &dir.join("keyring.json"))
        .await
        .unwrap()
        .0
}

/// A PostgreSQL database for one test: a fresh schema.
pub struct PgSchema {
    base: String,
    schema: String,
}

impl PgSchema {
    /// `None` when no `DATABASE_URL` is set (and it is not required).
    pub async fn create(name: &str) -> Option<PgSchema> {
        let Ok(base) = std::env::var("DATABASE_URL") else {
            // A missing database fails the test (it would otherwise count as
            // passed without running), unless skipping was asked for.
            assert!(
                std::env::var_os("STRATA_SKIP_POSTGRES").is_some(),
                "DATABASE_URL is not set: the PostgreSQL half of `{name}` cannot run; set it \
                 (scripts/test does), or STRATA_SKIP_POSTGRES=1 to skip it knowingly"
            );
            eprintln!("STRATA_SKIP_POSTGRES: PostgreSQL part of `{name}` skipped");
            return None;
        };
        // PostgreSQL cuts a name at 63 bytes: the unique part goes first so
        // a long test name cannot cut it off (and collide with a schema a
        // failed run left behind).
        let mut schema = format!("strata_test_{}_{name}", uuid_suffix());
        schema.truncate(63);
        let pool = sqlx::PgPool::connect(&base)
            .await
            .expect("PostgreSQL at DATABASE_URL");
        pool.execute(format!("CREATE SCHEMA {schema}").as_str())
            .await
            .unwrap();
        pool.close().await;
        Some(PgSchema { base, schema })
    }

    /// The URL whose connections use only this schema.
    pub fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}options=-c%20search_path%3D{}",
            self.base, self.schema
        )
    }

    /// A store on this schema with the keyring kept in it (as every
    /// gateway of a cluster opens it).
    pub async fn store(&self, dir: &Path) -> SqlStore {
        open(&self.url(), dir).await
    }

    pub async fn drop(self) {
        let pool = sqlx::PgPool::connect(&self.base).await.unwrap();
        pool.execute(format!("DROP SCHEMA {} CASCADE", self.schema).as_str())
            .await
            .unwrap();
    }
}

fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}_{}", std::process::id(), nanos % 1_000_000_000)
}

/// Where a test's store lives.
pub enum Backend {
    Sqlite(std::path::PathBuf),
    Postgres(PgSchema),
}

impl Backend {
    /// Opens (again) the test's store; keys live in `dir` either way.
    pub async fn open(&self, dir: &Path) -> SqlStore {
        match self {
            Backend::Sqlite(path) => SqlStore::open(path, vault(dir)).await.unwrap(),
            Backend::Postgres(pg) => pg.store(dir).await,
        }
    }

    /// Runs `sql` on the database behind the store's back (to tamper with it).
    pub async fn execute_raw(&self, sql: &str) {
        match self {
            Backend::Sqlite(path) => {
                let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", path.display()))
                    .await
                    .unwrap();
                pool.execute(sql).await.unwrap();
            }
            Backend::Postgres(pg) => {
                let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
                pool.execute(sql).await.unwrap();
            }
        }
    }

    pub async fn finish(self) {
        if let Backend::Postgres(pg) = self {
            pg.drop().await;
        }
    }
}

/// One test per backend for each `async fn name(backend: &Backend, dir: &Path)`.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    // Nested: opening creates the missing directory.
                    let backend =
                        $crate::common::Backend::Sqlite(dir.path().join("nested").join("s.db"));
                    super::$name(&backend, dir.path()).await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(pg) = $crate::common::PgSchema::create(stringify!($name)).await else {
                        return;
                    };
                    let dir = tempfile::tempdir().unwrap();
                    let backend = $crate::common::Backend::Postgres(pg);
                    super::$name(&backend, dir.path()).await;
                    backend.finish().await;
                }
            )*
        }
    };
}
