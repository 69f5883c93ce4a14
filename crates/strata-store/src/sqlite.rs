//! The SQLite `Store`: one file, WAL mode, migrations applied at open.

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use strata_core::store::{
    InstanceRecord, InstanceState, Store, StoreError, UsageRecord, UsageTotals,
};

pub struct SqliteStore {
    pool: SqlitePool,
}

fn query_err(e: sqlx::Error) -> StoreError {
    StoreError::Query(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and migrates it.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
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
        Ok(SqliteStore { pool })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn record_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(query_err)?;
        for r in rows {
            sqlx::query(
                "INSERT OR REPLACE INTO usage (request_id, at_ms, model, replica, status, prompt_tokens, \
                 completion_tokens, ttft_ms, latency_ms, stream) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&r.request_id)
            .bind(r.at_ms)
            .bind(&r.model)
            .bind(&r.replica)
            .bind(i64::from(r.status))
            .bind(i64::from(r.prompt_tokens))
            .bind(i64::from(r.completion_tokens))
            .bind(r.ttft_ms)
            .bind(r.latency_ms)
            .bind(r.stream)
            .execute(&mut *tx)
            .await
            .map_err(query_err)?;
        }
        tx.commit().await.map_err(query_err)
    }

    async fn usage_totals(&self) -> Result<Vec<UsageTotals>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, COUNT(*) AS requests, SUM(prompt_tokens) AS p, SUM(completion_tokens) AS c \
             FROM usage GROUP BY model ORDER BY model",
        )
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
            })
            .collect())
    }

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
