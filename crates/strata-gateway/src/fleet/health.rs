//! Keeping the replica set current: the provider's endpoint list, and a
//! health check of every replica (which also learns the models it serves).

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use strata_core::ReplicaEndpoint;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::fleet::replicas::{Replica, ReplicaSet};

/// Follows the provider's endpoint list until `cancel`.
pub async fn follow_endpoints(
    set: Arc<ReplicaSet>,
    mut endpoints: watch::Receiver<Vec<ReplicaEndpoint>>,
    cancel: CancellationToken,
) {
    loop {
        set.set_endpoints(&endpoints.borrow_and_update().clone());
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = endpoints.changed() => if changed.is_err() { return },
        }
    }
}

/// Checks every replica's `/health` (and learns its models) each `interval`.
pub async fn check_health(
    set: Arc<ReplicaSet>,
    client: reqwest::Client,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let checks = set
            .snapshot()
            .iter()
            .map(|r| probe(r.clone(), &client, interval))
            .collect::<Vec<_>>();
        futures_util::future::join_all(checks).await;
    }
}

async fn probe(replica: Arc<Replica>, client: &reqwest::Client, timeout: Duration) {
    let base = &replica.endpoint.url;
    let timeout = timeout.max(Duration::from_secs(1));
    let check = match &replica.endpoint.external {
        // Another server: its readiness path, with its pool's key; it
        // serves its pool's model.
        Some(x) => client
            .get(format!("{base}{}", x.ready_path))
            .bearer_auth(&x.api_key),
        None => client.get(format!("{base}/health")),
    };
    let healthy = matches!(
        check.timeout(timeout).send().await,
        Ok(r) if r.status().is_success()
    );
    if healthy && !replica.knows_models() && replica.endpoint.external.is_some() {
        match &replica.endpoint.model {
            Some(model) => replica.set_models(vec![model.clone()]),
            None => return replica.mark_down(),
        }
    }
    if healthy && !replica.knows_models() {
        let models = async {
            let v: Value = client
                .get(format!("{base}/v1/models"))
                .timeout(timeout)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some(
                v["data"]
                    .as_array()?
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect::<Vec<_>>(),
            )
        };
        match models.await {
            Some(m) if !m.is_empty() => replica.set_models(m),
            // Ready only once we know what it serves.
            _ => return replica.mark_down(),
        }
    }
    let was = replica.set_ready(healthy);
    if was != healthy {
        tracing::info!(replica = %replica.endpoint.id, url = %base, ready = healthy, "replica readiness changed");
    }
}
