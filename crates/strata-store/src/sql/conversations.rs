//! Responses, conversations and KV snapshots in SQL. A turn (the response
//! row and the items it appends to its conversation) is one transaction.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use strata_core::store::{
    ConversationStore, Order, SnapshotStore, StoreError, StoredConversation, StoredItem,
    StoredResponse,
};
use strata_core::tenant::TenantId;

use super::{query_err, SqlStore};

const RESPONSES: &str = "responses";
const CONVERSATIONS: &str = "conversations";
const ITEMS: &str = "conversation_items";

impl SqlStore {
    fn response_from(&self, tenant: &TenantId, r: &AnyRow) -> Result<StoredResponse, StoreError> {
        let id: String = r.get("id");
        Ok(StoredResponse {
            content: self.unseal(tenant, RESPONSES, &id, r.get("sealed"))?,
            id,
            created_at_ms: r.get("created_at_ms"),
            model: r.get("model"),
            conversation_id: r.get("conversation_id"),
            replica: r.get("replica"),
        })
    }

    fn conversation_from(
        &self,
        tenant: &TenantId,
        r: &AnyRow,
    ) -> Result<StoredConversation, StoreError> {
        let id: String = r.get("id");
        Ok(StoredConversation {
            content: self.unseal(tenant, CONVERSATIONS, &id, r.get("sealed"))?,
            id,
            created_at_ms: r.get("created_at_ms"),
        })
    }

    fn item_from(&self, tenant: &TenantId, r: &AnyRow) -> Result<StoredItem, StoreError> {
        let id: String = r.get("id");
        Ok(StoredItem {
            content: self.unseal(tenant, ITEMS, &id, r.get("sealed"))?,
            id,
            created_at_ms: r.get("created_at_ms"),
        })
    }

    /// Appends `items` after the conversation's last one, inside `tx`; false
    /// if the tenant has no such conversation. Callers hold `items_lock`.
    async fn append_in(
        &self,
        tx: &mut Transaction<'_, Any>,
        tenant: &TenantId,
        conversation: &str,
        items: &[StoredItem],
    ) -> Result<bool, StoreError> {
        self.lock_in(tx, &format!("{tenant}/{conversation}"))
            .await?;
        let exists =
            sqlx::query(&self.sql("SELECT 1 FROM conversations WHERE tenant_id = ? AND id = ?"))
                .bind(tenant.as_str())
                .bind(conversation)
                .fetch_optional(&mut **tx)
                .await
                .map_err(query_err)?;
        if exists.is_none() {
            return Ok(false);
        }
        let last: i64 = sqlx::query_scalar(&self.sql(
            "SELECT COALESCE(MAX(seq), 0) FROM conversation_items \
             WHERE tenant_id = ? AND conversation_id = ?",
        ))
        .bind(tenant.as_str())
        .bind(conversation)
        .fetch_one(&mut **tx)
        .await
        .map_err(query_err)?;
        for (i, item) in items.iter().enumerate() {
            let sealed = self.seal(tenant, ITEMS, &item.id, &item.content).await?;
            sqlx::query(&self.sql(
                "INSERT INTO conversation_items \
                 (tenant_id, conversation_id, seq, id, created_at_ms, sealed) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            ))
            .bind(tenant.as_str())
            .bind(conversation)
            .bind(last + 1 + i as i64)
            .bind(&item.id)
            .bind(item.created_at_ms)
            .bind(sealed)
            .execute(&mut **tx)
            .await
            .map_err(query_err)?;
        }
        Ok(true)
    }
}

#[async_trait]
impl ConversationStore for SqlStore {
    async fn put_response(
        &self,
        tenant: &TenantId,
        response: &StoredResponse,
        items: &[StoredItem],
    ) -> Result<bool, StoreError> {
        let sealed = self
            .seal(tenant, RESPONSES, &response.id, &response.content)
            .await?;
        let _writer = self.items_lock.lock().await;
        let mut tx = self.begin_write().await?;
        if let Some(conversation) = &response.conversation_id {
            if !self.append_in(&mut tx, tenant, conversation, items).await? {
                return Ok(false);
            }
        }
        sqlx::query(&self.sql(
            "INSERT INTO responses \
             (tenant_id, id, created_at_ms, model, conversation_id, replica, sealed) \
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id, id) DO UPDATE SET \
             created_at_ms = excluded.created_at_ms, model = excluded.model, \
             conversation_id = excluded.conversation_id, replica = excluded.replica, \
             sealed = excluded.sealed, background = NULL",
        ))
        .bind(tenant.as_str())
        .bind(&response.id)
        .bind(response.created_at_ms)
        .bind(&response.model)
        .bind(&response.conversation_id)
        .bind(&response.replica)
        .bind(sealed)
        .execute(&mut *tx)
        .await
        .map_err(query_err)?;
        tx.commit().await.map_err(query_err)?;
        Ok(true)
    }

    async fn response(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let row = self.row(RESPONSES, tenant, id).await?;
        self.open_row(tenant, row, |r| self.response_from(tenant, r))
            .await
    }

    async fn delete_response(&self, tenant: &TenantId, id: &str) -> Result<bool, StoreError> {
        // The row first, then its events, in one transaction: an append
        // of a response that still runs waits for the row and finds it
        // gone (it stops there).
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(&self.sql("DELETE FROM responses WHERE tenant_id = ? AND id = ?"))
            .bind(tenant.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(query_err)?;
        sqlx::query(
            &self.sql("DELETE FROM response_events WHERE tenant_id = ? AND response_id = ?"),
        )
        .bind(tenant.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(query_err)?;
        tx.commit().await.map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn conversation_replica(
        &self,
        tenant: &TenantId,
        conversation: &str,
    ) -> Result<Option<String>, StoreError> {
        let replica: Option<Option<String>> = sqlx::query_scalar(&self.sql(
            "SELECT replica FROM responses WHERE tenant_id = ? AND conversation_id = ? \
             ORDER BY created_at_ms DESC, id DESC LIMIT 1",
        ))
        .bind(tenant.as_str())
        .bind(conversation)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(replica.flatten())
    }

    async fn create_conversation(
        &self,
        tenant: &TenantId,
        conversation: &StoredConversation,
        items: &[StoredItem],
    ) -> Result<(), StoreError> {
        let sealed = self
            .seal(
                tenant,
                CONVERSATIONS,
                &conversation.id,
                &conversation.content,
            )
            .await?;
        let _writer = self.items_lock.lock().await;
        let mut tx = self.begin_write().await?;
        sqlx::query(&self.sql(
            "INSERT INTO conversations (tenant_id, id, created_at_ms, sealed) VALUES (?, ?, ?, ?)",
        ))
        .bind(tenant.as_str())
        .bind(&conversation.id)
        .bind(conversation.created_at_ms)
        .bind(sealed)
        .execute(&mut *tx)
        .await
        .map_err(query_err)?;
        self.append_in(&mut tx, tenant, &conversation.id, items)
            .await?;
        tx.commit().await.map_err(query_err)?;
        Ok(())
    }

    async fn conversation(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<StoredConversation>, StoreError> {
        let row = self.row(CONVERSATIONS, tenant, id).await?;
        self.open_row(tenant, row, |r| self.conversation_from(tenant, r))
            .await
    }

    async fn update_conversation(
        &self,
        tenant: &TenantId,
        conversation: &StoredConversation,
    ) -> Result<bool, StoreError> {
        let sealed = self
            .seal(
                tenant,
                CONVERSATIONS,
                &conversation.id,
                &conversation.content,
            )
            .await?;
        let done = sqlx::query(
            &self.sql("UPDATE conversations SET sealed = ? WHERE tenant_id = ? AND id = ?"),
        )
        .bind(sealed)
        .bind(tenant.as_str())
        .bind(&conversation.id)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_conversation(&self, tenant: &TenantId, id: &str) -> Result<bool, StoreError> {
        let _writer = self.items_lock.lock().await;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            &self.sql("DELETE FROM conversation_items WHERE tenant_id = ? AND conversation_id = ?"),
        )
        .bind(tenant.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(query_err)?;
        let done =
            sqlx::query(&self.sql("DELETE FROM conversations WHERE tenant_id = ? AND id = ?"))
                .bind(tenant.as_str())
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(query_err)?;
        tx.commit().await.map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn append_items(
        &self,
        tenant: &TenantId,
        conversation: &str,
        items: &[StoredItem],
    ) -> Result<bool, StoreError> {
        let _writer = self.items_lock.lock().await;
        let mut tx = self.begin_write().await?;
        if !self.append_in(&mut tx, tenant, conversation, items).await? {
            return Ok(false);
        }
        tx.commit().await.map_err(query_err)?;
        Ok(true)
    }

    async fn items(
        &self,
        tenant: &TenantId,
        conversation: &str,
        after: Option<&str>,
        limit: u32,
        order: Order,
    ) -> Result<Option<Vec<StoredItem>>, StoreError> {
        if self.conversation(tenant, conversation).await?.is_none() {
            return Ok(None);
        }
        let (past, direction) = match order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        let rows = sqlx::query(&self.sql(&format!(
            "SELECT * FROM conversation_items WHERE tenant_id = ?1 AND conversation_id = ?2 \
             AND (?3 IS NULL OR seq {past} (SELECT seq FROM conversation_items \
                  WHERE tenant_id = ?1 AND conversation_id = ?2 AND id = ?3)) \
             ORDER BY seq {direction} LIMIT ?4"
        )))
        .bind(tenant.as_str())
        .bind(conversation)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err)?;
        self.open_rows(tenant, &rows, |r| self.item_from(tenant, r))
            .await
            .map(Some)
    }

    async fn item(
        &self,
        tenant: &TenantId,
        conversation: &str,
        id: &str,
    ) -> Result<Option<StoredItem>, StoreError> {
        let row = sqlx::query(&self.sql(
            "SELECT * FROM conversation_items \
             WHERE tenant_id = ? AND conversation_id = ? AND id = ?",
        ))
        .bind(tenant.as_str())
        .bind(conversation)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err)?;
        self.open_row(tenant, row, |r| self.item_from(tenant, r))
            .await
    }

    async fn delete_item(
        &self,
        tenant: &TenantId,
        conversation: &str,
        id: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(
            "DELETE FROM conversation_items \
             WHERE tenant_id = ? AND conversation_id = ? AND id = ?",
        ))
        .bind(tenant.as_str())
        .bind(conversation)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(done.rows_affected() == 1)
    }
}

const SNAPSHOTS: &str = "kv_snapshots";

#[async_trait]
impl SnapshotStore for SqlStore {
    async fn put_snapshot(
        &self,
        tenant: &TenantId,
        session: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let sealed = self.seal(tenant, SNAPSHOTS, session, bytes).await?;
        sqlx::query(&self.sql(
            "INSERT INTO kv_snapshots (tenant_id, session, created_at_ms, sealed) VALUES (?, ?, ?, ?) \
             ON CONFLICT (tenant_id, session) DO UPDATE SET \
             created_at_ms = excluded.created_at_ms, sealed = excluded.sealed",
        ))
        .bind(tenant.as_str())
        .bind(session)
        .bind(strata_core::now_ms())
        .bind(sealed)
        .execute(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(())
    }

    async fn take_snapshot(
        &self,
        tenant: &TenantId,
        session: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut tx = self.begin_write().await?;
        let sealed: Option<Vec<u8>> = sqlx::query_scalar(
            &self.sql("SELECT sealed FROM kv_snapshots WHERE tenant_id = ? AND session = ?"),
        )
        .bind(tenant.as_str())
        .bind(session)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_err)?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        // Used once: whoever deletes it restores it.
        let done =
            sqlx::query(&self.sql("DELETE FROM kv_snapshots WHERE tenant_id = ? AND session = ?"))
                .bind(tenant.as_str())
                .bind(session)
                .execute(&mut *tx)
                .await
                .map_err(query_err)?;
        tx.commit().await.map_err(query_err)?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        self.unsealing(tenant, || self.unseal(tenant, SNAPSHOTS, session, &sealed))
            .await
            .map(Some)
    }

    async fn has_snapshot(&self, tenant: &TenantId, session: &str) -> Result<bool, StoreError> {
        let found = sqlx::query(
            &self.sql("SELECT 1 FROM kv_snapshots WHERE tenant_id = ? AND session = ?"),
        )
        .bind(tenant.as_str())
        .bind(session)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err)?;
        Ok(found.is_some())
    }
}
