//! Replicas leaving: drained for the controller that lets them go (on one
//! machine, through the link), for a cluster's controller (through the
//! database's leases), or all of them when the gateway and its engines
//! stop. A drained replica takes no new requests and hands its sessions'
//! KV caches over as snapshots.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_core::link::DrainRequest;
use strata_core::store::LeaseStore;
use strata_core::ReplicaEndpoint;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::fleet::replicas::ReplicaSet;
use crate::fleet::snapshots::Snapshots;

/// Drains the replicas the controller is about to let go, each in its own
/// task, and answers when each is done (also when it failed: the replica
/// goes either way).
pub async fn serve_drains(
    drains: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<DrainRequest>>>,
    replicas: Arc<ReplicaSet>,
    client: reqwest::Client,
    snapshots: Option<Arc<Snapshots>>,
    cancel: CancellationToken,
) {
    let mut drains = drains.lock().await;
    loop {
        let request = tokio::select! {
            _ = cancel.cancelled() => return,
            r = drains.recv() => match r { Some(r) => r, None => return },
        };
        let (replicas, client, snapshots) = (replicas.clone(), client.clone(), snapshots.clone());
        tokio::spawn(async move {
            let id = &request.replica;
            let started = Instant::now();
            match &snapshots {
                Some(s) => {
                    if let Err(e) = s.drain(&replicas, &client, id, request.wait).await {
                        tracing::warn!(replica = %id, error = %e.message, "drain incomplete");
                    }
                }
                None => {
                    if let Some(r) = replicas.find(id) {
                        r.quiesce(request.wait).await;
                    }
                }
            }
            tracing::info!(replica = %id, secs = started.elapsed().as_secs_f64(), "drained for the controller");
            let _ = request.done.send(());
        });
    }
}

/// Cluster mode: replicas the controller lets go arrive marked `draining`
/// (every gateway stops sending them new requests). The gateway that takes
/// the replica's drain lease first keeps its sessions' caches as snapshots
/// in the database, then takes its drained lease, which the controller
/// waits for before it stops the replica.
pub async fn drain_leaving(
    mut endpoints: watch::Receiver<Vec<ReplicaEndpoint>>,
    replicas: Arc<ReplicaSet>,
    client: reqwest::Client,
    snapshots: Arc<Snapshots>,
    leases: Arc<dyn LeaseStore>,
    cancel: CancellationToken,
) {
    let me = format!("gateway-{}", uuid::Uuid::new_v4().simple());
    let mut seen = std::collections::HashSet::new();
    loop {
        let leaving: Vec<String> = endpoints
            .borrow_and_update()
            .iter()
            .filter(|e| e.draining && seen.insert(e.id.clone()))
            .map(|e| e.id.clone())
            .collect();
        for id in leaving {
            let (replicas, client, snapshots, leases, me) = (
                replicas.clone(),
                client.clone(),
                snapshots.clone(),
                leases.clone(),
                me.clone(),
            );
            tokio::spawn(async move {
                let lease = strata_core::drain_lease(&id);
                if !matches!(leases.claim_lease(&lease, &me, 120_000).await, Ok(true)) {
                    return;
                }
                // Every gateway saw it leave; give their last requests a moment.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let kept = snapshots
                    .drain(&replicas, &client, &id, Duration::from_secs(20))
                    .await;
                if let Err(e) = &kept {
                    tracing::warn!(replica = %id, error = %e.message, "drain incomplete");
                }
                let done = strata_core::drained_lease(&id);
                if let Err(e) = leases.claim_lease(&done, &me, 3_600_000).await {
                    tracing::warn!(replica = %id, error = %e, "cannot tell the controller the drain is done");
                }
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = endpoints.changed() => if changed.is_err() { return },
        }
    }
}

/// The replicas are about to stop with this process: keeps their
/// sessions' caches for whichever replicas serve the next turns.
pub async fn drain_all(replicas: &ReplicaSet, client: &reqwest::Client, snapshots: &Snapshots) {
    for r in replicas.snapshot().iter().filter(|r| r.is_ready()) {
        let id = &r.endpoint.id;
        if let Err(e) = snapshots
            .drain(replicas, client, id, Duration::from_secs(5))
            .await
        {
            tracing::warn!(replica = %id, error = %e.message, "no snapshots taken at shutdown");
        }
    }
}
