//! What the routes of stored objects (stored chat completions, responses,
//! conversations and their items, files and batches) share: the stores they read, the audit
//! trail every access goes to, metadata updates, items as rows, and the
//! answer of a delete.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use strata_core::openai::{check_metadata, parse_body};
use strata_core::responses::Item;
use strata_core::store::{
    BackgroundStore, BatchStore, CompletionStore, ConversationStore, FileStore, StoreError,
    StoredItem,
};
use strata_core::ApiError;

use crate::http::error::store_error;
use crate::tenancy::audit::Audit;

/// The state of the stored-object routes.
pub struct Objects {
    pub completions: Arc<dyn CompletionStore>,
    pub conversations: Arc<dyn ConversationStore>,
    pub files: Arc<dyn FileStore>,
    pub batches: Arc<dyn BatchStore>,
    /// Background responses and their events.
    pub background: Arc<dyn BackgroundStore>,
    /// Their resumed streams open on this gateway, by tenant.
    pub followers: Arc<crate::tenancy::followers::Followers>,
    /// Rung when a batch is created or cancelled, for the batch runner.
    pub batch_created: Arc<tokio::sync::Notify>,
    pub audit: Audit,
    pub max_body_bytes: usize,
    /// Largest file an upload may hold.
    pub max_file_bytes: usize,
}

/// `after` and `limit` of a list route that lists newest first.
#[derive(Deserialize)]
pub(crate) struct NewestQuery {
    pub after: Option<String>,
    pub limit: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetadataUpdate {
    metadata: BTreeMap<String, String>,
}

/// An update body, checked: the new metadata.
pub(crate) fn parse_update(bytes: &[u8]) -> Result<BTreeMap<String, String>, ApiError> {
    let u: MetadataUpdate = parse_body(bytes)?;
    check_metadata(&u.metadata)?;
    Ok(u.metadata)
}

/// An item as a conversation's row.
pub(crate) fn stored_item(item: &Item, at_ms: i64) -> StoredItem {
    StoredItem {
        id: item.id.clone(),
        created_at_ms: at_ms,
        content: serde_json::to_vec(&item.to_json()).expect("JSON values serialise"),
    }
}

/// What a delete route answers: `body` when the store deleted the object,
/// else `missing`'s 404.
pub(crate) fn deleted(
    done: Result<bool, StoreError>,
    body: Value,
    missing: impl FnOnce() -> ApiError,
) -> Result<Value, ApiError> {
    if done.map_err(store_error)? {
        Ok(body)
    } else {
        Err(missing())
    }
}
