//! KV snapshots between replicas. Draining a replica stops new requests to
//! it, waits for the running ones, takes the KV cells of its kept sessions
//! (`/internal/kv/export`), seals each under its tenant's data key and
//! writes it to the snapshot directory. A later turn of such a session, on
//! another replica, first restores the snapshot there
//! (`/internal/kv/import`), so it prefills only its new tokens. A snapshot
//! the target refuses (another model or settings) is dropped and the turn
//! prefills as usual. Snapshots live in the data directory on one machine,
//! or in the database (`SnapshotStore`) where several gateways share one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use strata_core::snapshot::{frames, Snapshot};
use strata_core::store::SnapshotStore;
use strata_core::tenant::TenantId;
use strata_core::{ApiError, KV_EXPORT_PATH, KV_IMPORT_PATH};
use strata_store::{Binding, Vault};

use crate::fleet::replicas::{Replica, ReplicaSet};

const TABLE: &str = "kv_snapshots";

/// Where sealed snapshots are kept.
pub enum Snapshots {
    /// `<dir>/<tenant>/<session>.kv`.
    Dir { dir: PathBuf, vault: Arc<Vault> },
    /// The database, for every gateway of a cluster.
    Store(Arc<dyn SnapshotStore>),
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Drained {
    pub replica: String,
    pub snapshots: usize,
    pub bytes: usize,
}

/// Ids are the gateway's own (`ten_…`, `conv_…`, `resp_…`); anything else
/// never becomes a path.
fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Snapshots {
    pub fn new(dir: PathBuf, vault: Arc<Vault>) -> Self {
        Snapshots::Dir { dir, vault }
    }

    fn path(dir: &Path, tenant: &str, session: &str) -> Option<PathBuf> {
        (safe_name(tenant) && safe_name(session))
            .then(|| dir.join(tenant).join(format!("{session}.kv")))
    }

    /// Seals and keeps one encoded snapshot (replacing an older one).
    pub async fn save(&self, tenant: &str, session: &str, bytes: &[u8]) -> Result<(), String> {
        if !safe_name(tenant) || !safe_name(session) {
            return Err("unusable tenant or session id".into());
        }
        match self {
            Snapshots::Dir { dir, vault } => {
                let path = Snapshots::path(dir, tenant, session).expect("checked above");
                let at = Binding {
                    tenant,
                    table: TABLE,
                    row: session,
                };
                let sealed = vault.seal(at, bytes).await.map_err(|e| e.to_string())?;
                write_atomically(&path, &sealed).map_err(|e| format!("{}: {e}", path.display()))
            }
            Snapshots::Store(store) => store
                .put_snapshot(&TenantId(tenant.to_owned()), session, bytes)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Removes and opens the tenant's snapshot of `session`, if any.
    pub async fn take(&self, tenant: &str, session: &str) -> Option<Vec<u8>> {
        let opened = match self {
            Snapshots::Dir { dir, vault } => {
                let path = Snapshots::path(dir, tenant, session)?;
                let sealed = std::fs::read(&path).ok()?;
                let _ = std::fs::remove_file(&path);
                let at = Binding {
                    tenant,
                    table: TABLE,
                    row: session,
                };
                vault
                    .open_sealed(at, &sealed)
                    .await
                    .map_err(|e| e.to_string())
            }
            Snapshots::Store(store) => store
                .take_snapshot(&TenantId(tenant.to_owned()), session)
                .await
                .map_err(|e| e.to_string())
                .transpose()?,
        };
        match opened {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                tracing::warn!(%tenant, %session, error = %e, "a KV snapshot did not open; dropped");
                None
            }
        }
    }

    /// Removes a deleted tenant's snapshot files (sealed under its data key,
    /// which is gone: unreadable, but still taking room and naming its
    /// sessions). In the database they go with the tenant's rows.
    pub fn forget_tenant(&self, tenant: &str) -> std::io::Result<()> {
        match self {
            Snapshots::Dir { dir, .. } if safe_name(tenant) => {
                match std::fs::remove_dir_all(dir.join(tenant)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    pub async fn has(&self, tenant: &str, session: &str) -> bool {
        match self {
            Snapshots::Dir { dir, .. } => {
                Snapshots::path(dir, tenant, session).is_some_and(|p| p.is_file())
            }
            Snapshots::Store(store) => store
                .has_snapshot(&TenantId(tenant.to_owned()), session)
                .await
                .unwrap_or(false),
        }
    }

    /// Drains `replica`: no new requests, running ones finish (up to
    /// `wait`), then its sessions' KV cells are saved.
    pub async fn drain(
        &self,
        replicas: &ReplicaSet,
        client: &reqwest::Client,
        id: &str,
        wait: Duration,
    ) -> Result<Drained, ApiError> {
        let replica = replicas
            .find(id)
            .ok_or_else(|| ApiError::not_found(format!("No replica with id `{id}`.")))?;
        replica.quiesce(wait).await;
        if replica.endpoint.external.is_some() {
            // Another server keeps no snapshots: its sessions are
            // prefilled again wherever they go next.
            return Ok(Drained {
                replica: id.to_owned(),
                snapshots: 0,
                bytes: 0,
            });
        }
        let body = export(client, &replica).await?;
        let mut drained = Drained {
            replica: id.to_owned(),
            snapshots: 0,
            bytes: 0,
        };
        for bytes in frames(&body) {
            let Ok((tenant, session)) = Snapshot::ids(bytes) else {
                continue;
            };
            match self.save(&tenant, &session, bytes).await {
                Ok(()) => {
                    drained.snapshots += 1;
                    drained.bytes += bytes.len();
                }
                Err(e) => {
                    tracing::warn!(%tenant, %session, error = %e, "cannot keep a KV snapshot")
                }
            }
        }
        tracing::info!(replica = %id, snapshots = drained.snapshots, bytes = drained.bytes, "replica drained");
        Ok(drained)
    }

    /// Restores the tenant's snapshot of `session` on `replica`; true when
    /// the replica took it.
    pub async fn restore(
        &self,
        client: &reqwest::Client,
        replica: &Replica,
        tenant: &str,
        session: &str,
    ) -> bool {
        let Some(bytes) = self.take(tenant, session).await else {
            return false;
        };
        let url = format!("{}{KV_IMPORT_PATH}", replica.endpoint.url);
        match client.post(url).body(bytes).send().await {
            Ok(r) if r.status().is_success() => true,
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                tracing::warn!(replica = %replica.endpoint.id, %status, %text, "KV snapshot refused; the turn prefills");
                false
            }
            Err(e) => {
                tracing::warn!(replica = %replica.endpoint.id, error = %e, "KV snapshot not delivered");
                false
            }
        }
    }
}

async fn export(client: &reqwest::Client, replica: &Replica) -> Result<bytes::Bytes, ApiError> {
    let url = format!("{}{KV_EXPORT_PATH}", replica.endpoint.url);
    let failed = |e: String| {
        ApiError::bad_gateway(format!("The replica did not hand over its KV cache: {e}"))
    };
    let r = client
        .post(url)
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !r.status().is_success() {
        return Err(failed(r.status().to_string()));
    }
    r.bytes().await.map_err(|e| failed(e.to_string()))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("snapshot paths have a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("kv.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gateway_made_ids_become_paths() {
        assert!(safe_name("ten_0a9f") && safe_name("conv_x-1"));
        for bad in ["", "../etc", "a/b", "x.kv", &"a".repeat(129)] {
            assert!(!safe_name(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn snapshots_are_sealed_per_tenant_and_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let kek = strata_store::Kek::from_hex(&"11".repeat(32)).unwrap();
        let vault = Arc::new(
            Vault::open(
                &dir.path().join("keyring.json"),
                kek,
                strata_store::KekSource::Environment,
            )
            .unwrap(),
        );
        vault.create_tenant_key("ten_a").await.unwrap();
        let s = Snapshots::new(dir.path().join("snapshots"), vault);
        s.save("ten_a", "conv_1", b"SKV1 kv cells CANARY")
            .await
            .unwrap();
        let file = dir.path().join("snapshots/ten_a/conv_1.kv");
        let on_disk = std::fs::read(&file).unwrap();
        assert!(!on_disk.windows(6).any(|w| w == b"CANARY"));
        // Moved to another tenant's directory, it does not open.
        std::fs::create_dir_all(dir.path().join("snapshots/ten_b")).unwrap();
        std::fs::copy(&file, dir.path().join("snapshots/ten_b/conv_1.kv")).unwrap();
        assert_eq!(s.take("ten_b", "conv_1").await, None);
        assert!(s.has("ten_a", "conv_1").await);
        assert_eq!(
            s.take("ten_a", "conv_1").await.as_deref(),
            Some(&b"SKV1 kv cells CANARY"[..])
        );
        assert!(!s.has("ten_a", "conv_1").await);
        assert!(s.save("ten_a", "../x", b"x").await.is_err());
    }
}
