//! Leader election with a `coordination.k8s.io` Lease: the same
//! `LeaseStore` the controller's `Elector` uses on PostgreSQL, kept in the
//! cluster's API instead. Every write carries the Lease's resourceVersion,
//! so of two copies racing for it one write wins and the other sees a
//! conflict (and does not lead). Expiry is `renewTime + leaseDurationSeconds`
//! on the copies' clocks, which a cluster keeps in step (NTP), as other
//! Kubernetes controllers assume too.

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::Lease as KubeLease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use strata_core::store::{Lease, LeaseStore, StoreError};

pub struct KubeLeases {
    api: Api<KubeLease>,
}

impl KubeLeases {
    pub fn new(client: Client, namespace: &str) -> Self {
        KubeLeases {
            api: Api::namespaced(client, namespace),
        }
    }
}

/// A Lease's object name for a lease name (`controller/default` →
/// `strata-controller-default`).
pub fn object_name(name: &str) -> String {
    format!("strata-{}", crate::render::dns_chars(name))
}

fn err(e: kube::Error) -> StoreError {
    StoreError::Query(format!("Kubernetes Lease: {e}"))
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_missing(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn ms(t: &MicroTime) -> i64 {
    t.0.as_millisecond()
}

/// When the lease's term ends, in Unix milliseconds (0: not held).
fn expires_at_ms(l: &KubeLease) -> i64 {
    let Some(spec) = &l.spec else { return 0 };
    match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renew), Some(secs)) if spec.holder_identity.is_some() => {
            ms(renew) + i64::from(secs) * 1000
        }
        _ => 0,
    }
}

#[async_trait]
impl LeaseStore for KubeLeases {
    async fn claim_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, StoreError> {
        let object = object_name(name);
        let secs = ((ttl_ms.max(1000) + 999) / 1000) as i32;
        let current = match self.api.get(&object).await {
            Ok(l) => l,
            Err(e) if is_missing(&e) => {
                let fresh: KubeLease = serde_json::from_value(json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": object, "labels": {"app.kubernetes.io/managed-by": "strata"}},
                    "spec": {"holderIdentity": holder, "leaseDurationSeconds": secs,
                             "acquireTime": now(), "renewTime": now(), "leaseTransitions": 0},
                }))
                .expect("a Lease");
                return match self.api.create(&PostParams::default(), &fresh).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_conflict(&e) => Ok(false),
                    Err(e) => Err(err(e)),
                };
            }
            Err(e) => return Err(err(e)),
        };
        let spec = current.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(holder);
        if !mine && expires_at_ms(&current) > now_ms() {
            return Ok(false);
        }
        let mut next = current.clone();
        let s = next.spec.get_or_insert_with(Default::default);
        s.lease_duration_seconds = Some(secs);
        s.renew_time = Some(now());
        if !mine {
            s.holder_identity = Some(holder.to_owned());
            s.acquire_time = Some(now());
            s.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        // The resourceVersion read above makes this write conditional.
        match self
            .api
            .replace(&object, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let object = object_name(name);
        let current = match self.api.get(&object).await {
            Ok(l) => l,
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(err(e)),
        };
        if current
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            != Some(holder)
        {
            return Ok(());
        }
        let mut next = current;
        if let Some(s) = next.spec.as_mut() {
            s.holder_identity = None;
            s.renew_time = None;
        }
        match self
            .api
            .replace(&object, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(()),
            // Someone took it meanwhile: nothing of ours to release.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    async fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        match self.api.get(&object_name(name)).await {
            Ok(l) => Ok(Some(Lease {
                name: name.to_owned(),
                holder: l
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.clone())
                    .unwrap_or_default(),
                expires_at_ms: expires_at_ms(&l),
                transitions: l
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_transitions)
                    .map_or(0, i64::from),
            })),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }
}

fn now_ms() -> i64 {
    strata_core::now_ms()
}
