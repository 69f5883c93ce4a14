//! The `data_keys` table of a shared (PostgreSQL) keyring: one row per
//! tenant and key version, with the KEK id it is wrapped under and the
//! encryptions reserved under it by every gateway together.

use std::collections::BTreeMap;

use sqlx::{AnyPool, Row};

use super::error::VaultError;
use super::wrapped::{SharedRow, WrappedKey};

fn db_err(e: sqlx::Error) -> VaultError {
    VaultError::Shared(e.to_string())
}

fn row_from(r: &sqlx::any::AnyRow) -> (String, SharedRow) {
    let version: i64 = r.get("version");
    let reserved: i64 = r.get("reserved");
    (
        r.get("tenant_id"),
        SharedRow {
            kek_id: r.get("kek_id"),
            key: WrappedKey {
                version: version as u32,
                wrapped: r.get("wrapped"),
                reserved: reserved as u64,
            },
        },
    )
}

const COLUMNS: &str = "tenant_id, version, kek_id, wrapped, reserved";

/// Every tenant's rows, versions in order.
pub(super) async fn all(pool: &AnyPool) -> Result<BTreeMap<String, Vec<SharedRow>>, VaultError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM data_keys ORDER BY tenant_id, version"
    ))
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    let mut out: BTreeMap<String, Vec<SharedRow>> = BTreeMap::new();
    for r in &rows {
        let (tenant, row) = row_from(r);
        out.entry(tenant).or_default().push(row);
    }
    Ok(out)
}

/// One tenant's rows, versions in order (none once shredded).
pub(super) async fn tenant(pool: &AnyPool, tenant: &str) -> Result<Vec<SharedRow>, VaultError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM data_keys WHERE tenant_id = $1 ORDER BY version"
    ))
    .bind(tenant)
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    Ok(rows.iter().map(|r| row_from(r).1).collect())
}

/// Adds a key version unless one exists (the first writer's key wins).
pub(super) async fn insert(
    pool: &AnyPool,
    tenant: &str,
    kek_id: &str,
    w: &WrappedKey,
) -> Result<(), VaultError> {
    sqlx::query(
        "INSERT INTO data_keys (tenant_id, version, kek_id, wrapped, reserved) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, version) DO NOTHING",
    )
    .bind(tenant)
    .bind(i64::from(w.version))
    .bind(kek_id)
    .bind(&w.wrapped)
    .bind(w.reserved as i64)
    .execute(pool)
    .await
    .map_err(db_err)?;
    Ok(())
}

/// Reserves `step` more encryptions of a key version; the new total, or
/// `None` if the key is gone.
pub(super) async fn reserve(
    pool: &AnyPool,
    tenant: &str,
    version: u32,
    step: u64,
) -> Result<Option<u64>, VaultError> {
    let total: Option<i64> = sqlx::query_scalar(
        "UPDATE data_keys SET reserved = reserved + $3 \
         WHERE tenant_id = $1 AND version = $2 RETURNING reserved",
    )
    .bind(tenant)
    .bind(i64::from(version))
    .bind(step as i64)
    .fetch_optional(pool)
    .await
    .map_err(db_err)?;
    Ok(total.map(|t| t as u64))
}

pub(super) async fn delete(pool: &AnyPool, tenant: &str) -> Result<(), VaultError> {
    sqlx::query("DELETE FROM data_keys WHERE tenant_id = $1")
        .bind(tenant)
        .execute(pool)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// Re-wraps every row under the KEK `kek_id` in one transaction (rows
/// locked, so no gateway adds or shreds a key half-way); `rewrap` gives a
/// row's new wrapped form.
pub(super) async fn rewrap_all(
    pool: &AnyPool,
    kek_id: &str,
    rewrap: impl Fn(&str, &SharedRow) -> Result<String, VaultError>,
) -> Result<(), VaultError> {
    let mut tx = pool.begin().await.map_err(db_err)?;
    sqlx::query("LOCK TABLE data_keys IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM data_keys"))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
    for r in &rows {
        let (tenant, row) = row_from(r);
        let wrapped = rewrap(&tenant, &row)?;
        sqlx::query(
            "UPDATE data_keys SET kek_id = $3, wrapped = $4 WHERE tenant_id = $1 AND version = $2",
        )
        .bind(&tenant)
        .bind(i64::from(row.key.version))
        .bind(kek_id)
        .bind(&wrapped)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)
}
