//! Files of the Files API, their names and bytes sealed per tenant.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::Row;
use strata_core::store::{FileStore, Order, StoreError, StoredFile};
use strata_core::tenant::TenantId;

use crate::sql::{query_err, SqlStore};

const FILES: &str = "files";
/// The bytes are bound to their own table name, so that a file's sealed
/// name and content cannot be swapped for one another.
const CONTENT: &str = "files.content";

impl SqlStore {
    fn open_file(&self, tenant: &TenantId, r: &AnyRow) -> Result<StoredFile, StoreError> {
        let id: String = r.get("id");
        let name = self.unseal(tenant, FILES, &id, r.get("sealed_name"))?;
        let content = match r.try_get::<Vec<u8>, _>("sealed") {
            Ok(sealed) => self.unseal(tenant, CONTENT, &id, &sealed)?,
            Err(_) => Vec::new(),
        };
        Ok(StoredFile {
            created_at_ms: r.get("created_at_ms"),
            purpose: r.get("purpose"),
            filename: String::from_utf8_lossy(&name).into_owned(),
            bytes: r.get("bytes"),
            content,
            id,
        })
    }
}

#[async_trait]
impl FileStore for SqlStore {
    async fn put_file(&self, tenant: &TenantId, f: &StoredFile) -> Result<(), StoreError> {
        let name = self
            .seal(tenant, FILES, &f.id, f.filename.as_bytes())
            .await?;
        let sealed = self.seal(tenant, CONTENT, &f.id, &f.content).await?;
        sqlx::query(&self.sql(
            "INSERT INTO files (tenant_id, id, created_at_ms, purpose, bytes, sealed_name, sealed) \
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id, id) DO NOTHING",
        ))
        .bind(tenant.as_str())
        .bind(&f.id)
        .bind(f.created_at_ms)
        .bind(&f.purpose)
        .bind(f.bytes)
        .bind(name)
        .bind(sealed)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn file(
        &self,
        tenant: &TenantId,
        id: &str,
        content: bool,
    ) -> Result<Option<StoredFile>, StoreError> {
        let columns = if content {
            "*"
        } else {
            "id, created_at_ms, purpose, bytes, sealed_name"
        };
        let row = sqlx::query(&self.sql(&format!(
            "SELECT {columns} FROM files WHERE tenant_id = ? AND id = ?"
        )))
        .bind(tenant.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err)?;
        self.open_row(tenant, row, |r| self.open_file(tenant, r))
            .await
    }

    async fn files(
        &self,
        tenant: &TenantId,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: u32,
        order: Order,
    ) -> Result<Vec<StoredFile>, StoreError> {
        let (cmp, dir) = match order {
            Order::Desc => ("<", "DESC"),
            Order::Asc => (">", "ASC"),
        };
        let rows = sqlx::query(&self.sql(&format!(
            "SELECT id, created_at_ms, purpose, bytes, sealed_name FROM files \
             WHERE tenant_id = ?1 AND (?2 IS NULL OR purpose = ?2) AND (?3 IS NULL OR \
             (created_at_ms, id) {cmp} (SELECT created_at_ms, id FROM files \
              WHERE tenant_id = ?1 AND id = ?3)) \
             ORDER BY created_at_ms {dir}, id {dir} LIMIT ?4"
        )))
        .bind(tenant.as_str())
        .bind(purpose)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        self.open_rows(tenant, &rows, |r| self.open_file(tenant, r))
            .await
    }

    async fn delete_file(&self, tenant: &TenantId, id: &str) -> Result<bool, StoreError> {
        self.delete_row(FILES, tenant, id).await
    }
}
