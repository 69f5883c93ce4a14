//! strata on Kubernetes: the manifests `strata k8s render` prints
//! (`render`), the provider that keeps one engine Deployment per pool
//! variant (`provider`), and leader election with a `coordination.k8s.io`
//! Lease (`lease`). Only the `strata` binary depends on this crate, so the
//! Kubernetes client stays out of every other crate's build.

pub mod lease;
pub mod provider;
pub mod render;

pub use kube::Client;

/// A client for the cluster this runs in (its service account), or the
/// one a kubeconfig names.
pub async fn connect() -> Result<Client, String> {
    Client::try_default().await.map_err(|e| e.to_string())
}
