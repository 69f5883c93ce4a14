//! The controller and the gateways as separate processes sharing one
//! PostgreSQL (cluster mode): the gateways report their load to the store
//! every second and read the replicas' endpoints from the instances the
//! controller records; the controller sums the gateways' reports into the
//! `Loads` its autoscalers read (the whole, and each catalog model's).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use strata_core::store::{GatewayLoad, InstanceRecord, InstanceState, Store};
use strata_core::{Load, Loads, ReplicaEndpoint};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often gateways report and the controller reads.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A report older than this no longer counts for the gauges (in flight,
/// waiting, latency): its gateway is gone or cut off.
pub const FRESH_MS: i64 = 5_000;
/// Reports older than this are deleted.
pub const FORGET_MS: i64 = 3_600_000;

/// The cluster's load from the gateways' reports. Counters (requests,
/// tokens) are each gateway's own totals since it started, so the sum
/// grows by every gateway's increase since the last read: a gateway seen
/// for the first time counts from then on, one that restarted (its total
/// went down) from zero, and one that went away stops adding.
#[derive(Debug, Default)]
pub struct ClusterLoad {
    last: BTreeMap<String, Load>,
    total: Load,
}

impl ClusterLoad {
    pub fn update(&mut self, reports: &[GatewayLoad]) -> Load {
        let mut now = Load {
            requests_total: self.total.requests_total,
            tokens_total: self.total.tokens_total,
            prompt_tokens_total: self.total.prompt_tokens_total,
            ..Load::default()
        };
        for r in reports {
            let l = &r.load;
            if let Some(before) = self.last.get(&r.gateway) {
                let grew = |new: u64, old: u64| if new >= old { new - old } else { new };
                now.requests_total += grew(l.requests_total, before.requests_total);
                now.tokens_total += grew(l.tokens_total, before.tokens_total);
                now.prompt_tokens_total += grew(l.prompt_tokens_total, before.prompt_tokens_total);
            }
            self.last.insert(r.gateway.clone(), *l);
            if r.age_ms > FRESH_MS {
                continue;
            }
            now.in_flight += l.in_flight;
            now.waiting += l.waiting;
            now.batch_lines += l.batch_lines;
            // Each gateway runs batches of its own: their needs add up.
            now.batch_tokens_per_s += l.batch_tokens_per_s;
            now.batch_backlog_tokens += l.batch_backlog_tokens;
            // Every gateway sees the same replicas; the most any sees.
            now.routable = now.routable.max(l.routable);
            now.ttft_p95_ms = max_of(now.ttft_p95_ms, l.ttft_p95_ms);
            now.tpot_p95_ms = max_of(now.tpot_p95_ms, l.tpot_p95_ms);
        }
        self.last
            .retain(|g, _| reports.iter().any(|r| &r.gateway == g));
        self.total = now;
        now
    }
}

fn max_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// The replicas a gateway knows: instances that have not ended (the
/// gateway's health checks decide which of them take requests); those on
/// their way out (stopping, preempted) as draining.
pub fn endpoints(instances: &[InstanceRecord]) -> Vec<ReplicaEndpoint> {
    let mut out: Vec<ReplicaEndpoint> = instances
        .iter()
        .filter(|i| i.ended_at_ms.is_none() && !i.endpoint.is_empty())
        .filter_map(|i| {
            let draining = match i.state {
                InstanceState::Starting | InstanceState::Ready => false,
                InstanceState::Stopped | InstanceState::Preempted => true,
                InstanceState::Exited => return None,
            };
            Some(ReplicaEndpoint {
                id: i.id.clone(),
                url: i.endpoint.clone(),
                reserved_for: None,
                draining,
                // Its pool's model, where the controller recorded one.
                model: Some(i.kind.model.clone()).filter(|m| !m.is_empty()),
                // An external engine's API key stays with the process that launched it.
                external: None,
            })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Ticks every `REPORT_EVERY` (the first at once) until `cancel`.
struct Every {
    interval: tokio::time::Interval,
    cancel: CancellationToken,
}

impl Every {
    fn new(cancel: CancellationToken) -> Every {
        Every {
            interval: tokio::time::interval(REPORT_EVERY),
            cancel,
        }
    }

    /// False once cancelled.
    async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

/// Gateway side: reports this gateway's load every `REPORT_EVERY` until
/// `cancel`.
pub async fn report_load(
    store: Arc<dyn Store>,
    gateway: String,
    load: watch::Receiver<Loads>,
    cancel: CancellationToken,
) {
    let mut every = Every::new(cancel);
    while every.tick().await {
        let loads = load.borrow().clone();
        let reports = std::iter::once(("", &loads.total))
            .chain(loads.by_model.iter().map(|(m, l)| (m.as_str(), l)));
        for (model, l) in reports {
            if let Err(e) = store.report_load(&gateway, model, l).await {
                tracing::warn!(error = %e, "cannot report this gateway's load");
                break;
            }
        }
    }
}

/// Gateway side: publishes the recorded replicas every `REPORT_EVERY`
/// until `cancel` (the last list stays when the store cannot be read).
pub async fn discover_replicas(
    store: Arc<dyn Store>,
    publish: watch::Sender<Vec<ReplicaEndpoint>>,
    cancel: CancellationToken,
) {
    let mut every = Every::new(cancel);
    while every.tick().await {
        match store.running_instances().await {
            Ok(instances) => {
                let found = endpoints(&instances);
                publish.send_if_modified(|now| {
                    let changed = *now != found;
                    if changed {
                        tracing::info!(replicas = found.len(), "replicas changed");
                        *now = found;
                    }
                    changed
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the replicas"),
        }
    }
}

/// Controller side: publishes the cluster's load every `REPORT_EVERY`
/// until `cancel`: the gateways' whole loads summed, and each model's.
pub async fn gather_load(
    store: Arc<dyn Store>,
    publish: watch::Sender<Loads>,
    cancel: CancellationToken,
) {
    let mut every = Every::new(cancel);
    let mut sums: BTreeMap<String, ClusterLoad> = BTreeMap::new();
    while every.tick().await {
        match store.gateway_loads(FORGET_MS).await {
            Ok(reports) => {
                let mut by_model: BTreeMap<String, Vec<GatewayLoad>> = BTreeMap::new();
                for r in reports {
                    by_model.entry(r.model.clone()).or_default().push(r);
                }
                sums.retain(|model, _| by_model.contains_key(model));
                let mut loads = Loads::default();
                for (model, reports) in by_model {
                    let load = sums.entry(model.clone()).or_default().update(&reports);
                    match model.is_empty() {
                        true => loads.total = load,
                        false => {
                            loads.by_model.insert(model, load);
                        }
                    }
                }
                publish.send_replace(loads);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the gateways' load"),
        }
    }
}

/// Controller side, on taking over (before it runs any replica itself):
/// instances a previous leader left running are recorded as ended (its
/// engines stopped with it, or it was cut off and stops acting).
pub async fn close_orphans(store: &dyn Store) -> usize {
    let Ok(instances) = store.running_instances().await else {
        return 0;
    };
    let mut closed = 0;
    for mut i in instances {
        i.state = InstanceState::Exited;
        i.ended_at_ms = Some(strata_core::now_ms());
        i.detail = Some("its controller lost the lease".into());
        if store.upsert_instance(&i).await.is_ok() {
            closed += 1;
        }
    }
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(gateway: &str, requests: u64, in_flight: usize, age_ms: i64) -> GatewayLoad {
        GatewayLoad {
            gateway: gateway.into(),
            model: String::new(),
            age_ms,
            load: Load {
                requests_total: requests,
                tokens_total: requests * 10,
                prompt_tokens_total: requests * 4,
                in_flight,
                waiting: 1,
                batch_lines: in_flight * 2,
                batch_tokens_per_s: in_flight as f64 * 100.0,
                batch_backlog_tokens: in_flight as f64 * 1e6,
                routable: 2,
                ttft_p95_ms: Some(requests as f64),
                tpot_p95_ms: None,
            },
        }
    }

    #[test]
    fn counters_grow_by_each_gateways_increase_and_never_fall() {
        let mut c = ClusterLoad::default();
        // First sight: a gateway's past is not this controller's load.
        let l = c.update(&[report("a", 100, 3, 0), report("b", 50, 2, 0)]);
        assert_eq!((l.requests_total, l.in_flight, l.waiting), (0, 5, 2));
        assert_eq!(l.batch_lines, 10, "batch lines summed over gateways");
        assert_eq!(l.batch_tokens_per_s, 500.0, "batches' needs summed too");
        assert_eq!(l.batch_backlog_tokens, 5e6, "and their backlogs");
        let l = c.update(&[report("a", 110, 3, 0), report("b", 55, 2, 0)]);
        assert_eq!(l.requests_total, 15);
        assert_eq!(l.tokens_total, 150);
        assert_eq!(l.ttft_p95_ms, Some(110.0));
        // b restarted (its total went down) and c appeared.
        let l = c.update(&[
            report("a", 120, 3, 0),
            report("b", 4, 2, 0),
            report("c", 7, 1, 0),
        ]);
        assert_eq!(l.requests_total, 15 + 10 + 4);
        // a went silent: its gauges stop counting, the total stays.
        let l = c.update(&[report("a", 120, 3, FRESH_MS + 1), report("b", 6, 2, 0)]);
        assert_eq!(l.requests_total, 29 + 2);
        assert_eq!((l.in_flight, l.routable), (2, 2));
        // c reappears after being forgotten: counted from then on.
        let l = c.update(&[report("b", 6, 0, 0), report("c", 9, 0, 0)]);
        assert_eq!(l.requests_total, 31);
    }

    #[test]
    fn instances_that_have_not_ended_are_known_and_leaving_ones_drain() {
        use strata_core::config::CapacityType;
        use strata_core::store::InstanceKind;
        let kind = InstanceKind {
            pool: "default".into(),
            model: "m".into(),
            instance_type: "local".into(),
            zone: "local".into(),
            capacity: CapacityType::OnDemand,
            price_per_hour: 0.0,
            tokens_per_s: 1.0,
        };
        let rec = |id: &str, state, ended: Option<i64>| InstanceRecord {
            id: id.into(),
            provider: "local".into(),
            endpoint: format!("http://127.0.0.1:1/{id}"),
            state,
            started_at_ms: 1,
            ended_at_ms: ended,
            detail: None,
            kind: kind.clone(),
        };
        let found = endpoints(&[
            rec("r2", InstanceState::Ready, None),
            rec("r1", InstanceState::Starting, None),
            rec("r3", InstanceState::Exited, Some(5)),
            rec("r4", InstanceState::Preempted, Some(5)),
            rec("r5", InstanceState::Stopped, None),
            rec("r6", InstanceState::Exited, None),
        ]);
        let ids: Vec<(&str, bool)> = found.iter().map(|e| (e.id.as_str(), e.draining)).collect();
        assert_eq!(ids, [("r1", false), ("r2", false), ("r5", true)]);
    }
}
