//! Instances (engine replicas) as the controller records them.

use async_trait::async_trait;
use sqlx::Row;
use strata_core::config::CapacityType;
use strata_core::store::{InstanceKind, InstanceRecord, InstanceState, InstanceStore, StoreError};

use crate::sql::{query_err, SqlStore};

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
