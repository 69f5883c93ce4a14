//! The controller's Prometheus metrics: replicas by pool, instance type,
//! zone, capacity type and state; the pool's desired size; what its
//! instances cost so far and per hour now; decisions by reason; replicas
//! that failed to start and the offers waiting after them; whether this
//! copy acts. `strata serve` shows them on the gateway's `/metrics`,
//! `strata controller` on its own `--metrics-listen` address.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::planner::{Capacity, Offer};
use crate::provider::Instance;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub pool: String,
    pub instance_type: String,
    pub zone: String,
    pub capacity: &'static str,
    /// `starting` or `ready`.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub pool: String,
    pub capacity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub pool: String,
    pub reason: String,
}

type Dollars = Counter<f64, AtomicU64>;

pub struct ControllerMetrics {
    registry: Registry,
    pub replicas: Family<ReplicaLabels, Gauge>,
    pub desired: Family<PoolLabels, Gauge>,
    pub cost: Family<CostLabels, Dollars>,
    pub cost_rate: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    pub decisions: Family<DecisionLabels, Counter>,
    /// Replicas that failed before they were ever ready.
    pub failed_starts: Family<PoolLabels, Counter>,
    /// Offers not launched into until a wait after failed starts ends.
    pub held_back: Family<PoolLabels, Gauge>,
    /// 1 while this copy acts (holds the lease, or is the only one).
    pub leading: Gauge,
}

pub fn capacity_label(c: Capacity) -> &'static str {
    match c {
        Capacity::Spot => "spot",
        Capacity::OnDemand => "on_demand",
    }
}

impl ControllerMetrics {
    pub fn new() -> Self {
        let m = ControllerMetrics {
            registry: Registry::default(),
            replicas: Family::default(),
            desired: Family::default(),
            cost: Family::default(),
            cost_rate: Family::default(),
            decisions: Family::default(),
            failed_starts: Family::default(),
            held_back: Family::default(),
            leading: Gauge::default(),
        };
        let mut registry = Registry::with_prefix("strata_controller");
        registry.register(
            "replicas",
            "Replicas the provider holds, by pool, instance type, zone, capacity type and state",
            m.replicas.clone(),
        );
        registry.register(
            "desired_replicas",
            "Replicas the pool's plan asks for",
            m.desired.clone(),
        );
        registry.register(
            "cost_dollars",
            "Dollars the pool's instances cost while this controller ran them (price × time)",
            m.cost.clone(),
        );
        registry.register(
            "cost_rate_dollars_per_hour",
            "What the pool's instances cost per hour now",
            m.cost_rate.clone(),
        );
        registry.register(
            "decisions",
            "Changes of a pool's size or mix, by reason",
            m.decisions.clone(),
        );
        registry.register(
            "failed_starts",
            "Replicas that failed (exited, or were given up) before they were ever ready",
            m.failed_starts.clone(),
        );
        registry.register(
            "held_back_offers",
            "Offers the pool launches into again only after a wait, for replicas that failed to start",
            m.held_back.clone(),
        );
        registry.register(
            "leading",
            "1 while this controller acts on the pool",
            m.leading.clone(),
        );
        ControllerMetrics { registry, ..m }
    }

    /// The provider's instances now, the plan's size, and `elapsed` of
    /// their prices since the last call.
    pub fn observe(
        &self,
        pool: &str,
        instances: &[Instance],
        desired: usize,
        offers: &[Offer],
        elapsed: Duration,
    ) {
        let mut counts: BTreeMap<(String, String, Capacity, bool), i64> = BTreeMap::new();
        let mut rate = 0.0;
        let mut spent: BTreeMap<Capacity, f64> = BTreeMap::new();
        for i in instances {
            let s = &i.slot;
            *counts
                .entry((s.instance_type.clone(), s.zone.clone(), s.capacity, i.ready))
                .or_default() += 1;
            let price = offers
                .iter()
                .find(|o| {
                    o.instance_type == s.instance_type
                        && o.zone == s.zone
                        && o.capacity == s.capacity
                })
                .map_or(0.0, |o| o.price_per_hour);
            rate += price;
            *spent.entry(s.capacity).or_default() += price * elapsed.as_secs_f64() / 3600.0;
        }
        // Kinds that went away must not keep their last count.
        self.replicas.clear();
        for ((instance_type, zone, capacity, ready), n) in counts {
            self.replicas
                .get_or_create(&ReplicaLabels {
                    pool: pool.to_owned(),
                    instance_type,
                    zone,
                    capacity: capacity_label(capacity),
                    state: if ready { "ready" } else { "starting" },
                })
                .set(n);
        }
        let labels = PoolLabels {
            pool: pool.to_owned(),
        };
        self.desired.get_or_create(&labels).set(desired as i64);
        self.cost_rate.get_or_create(&labels).set(rate);
        for (capacity, dollars) in spent {
            self.cost
                .get_or_create(&CostLabels {
                    pool: pool.to_owned(),
                    capacity: capacity_label(capacity),
                })
                .inc_by(dollars);
        }
    }

    /// The pool is no longer run from here: its replica and rate gauges go
    /// (the counters stay, as counters do).
    pub fn stopped(&self, pool: &str) {
        self.replicas.clear();
        let labels = PoolLabels {
            pool: pool.to_owned(),
        };
        self.desired.get_or_create(&labels).set(0);
        self.cost_rate.get_or_create(&labels).set(0.0);
        self.held_back.get_or_create(&labels).set(0);
    }

    /// Failed starts since the last call, and the offers waiting now.
    pub fn starts(&self, pool: &str, failed: u64, held_back: usize) {
        let labels = PoolLabels {
            pool: pool.to_owned(),
        };
        self.failed_starts.get_or_create(&labels).inc_by(failed);
        self.held_back.get_or_create(&labels).set(held_back as i64);
    }

    pub fn decided(&self, pool: &str, reason: &str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                pool: pool.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition (OpenMetrics, ending in `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::Slot;

    fn instance(id: &str, zone: &str, capacity: Capacity, ready: bool) -> Instance {
        Instance {
            id: id.into(),
            slot: Slot {
                instance_type: "g5.xlarge".into(),
                zone: zone.into(),
                capacity,
            },
            ready,
            busy: None,
        }
    }

    fn offer(zone: &str, capacity: Capacity, price: f64) -> Offer {
        Offer {
            instance_type: "g5.xlarge".into(),
            zone: zone.into(),
            capacity,
            price_per_hour: price,
            tokens_per_s: 100.0,
        }
    }

    #[test]
    fn replicas_by_kind_and_state_cost_by_capacity_and_decisions_by_reason() {
        let m = ControllerMetrics::new();
        let offers = [
            offer("a", Capacity::Spot, 0.4),
            offer("a", Capacity::OnDemand, 1.0),
        ];
        let running = [
            instance("1", "a", Capacity::Spot, true),
            instance("2", "a", Capacity::Spot, false),
            instance("3", "a", Capacity::OnDemand, true),
        ];
        m.observe("default", &running, 3, &offers, Duration::from_secs(1800));
        m.decided("default", "scale_up");
        let text = m.render();
        for line in [
            r#"strata_controller_replicas{pool="default",instance_type="g5.xlarge",zone="a",capacity="spot",state="ready"} 1"#,
            r#"strata_controller_replicas{pool="default",instance_type="g5.xlarge",zone="a",capacity="spot",state="starting"} 1"#,
            r#"strata_controller_replicas{pool="default",instance_type="g5.xlarge",zone="a",capacity="on_demand",state="ready"} 1"#,
            r#"strata_controller_desired_replicas{pool="default"} 3"#,
            r#"strata_controller_cost_rate_dollars_per_hour{pool="default"} 1.8"#,
            // Half an hour of two spot replicas at 0.4 and one on demand at 1.0.
            r#"strata_controller_cost_dollars_total{pool="default",capacity="spot"} 0.4"#,
            r#"strata_controller_cost_dollars_total{pool="default",capacity="on_demand"} 0.5"#,
            r#"strata_controller_decisions_total{pool="default",reason="scale_up"} 1"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // The on-demand replica goes: its series goes too.
        m.observe("default", &running[..2], 2, &offers, Duration::ZERO);
        assert!(!m
            .render()
            .contains(r#"capacity="on_demand",state="ready"} 1"#));
    }

    #[test]
    fn failed_starts_add_up_and_the_offers_waiting_after_them_are_a_gauge() {
        let m = ControllerMetrics::new();
        m.starts("default", 2, 1);
        m.starts("default", 1, 1);
        let text = m.render();
        for line in [
            r#"strata_controller_failed_starts_total{pool="default"} 3"#,
            r#"strata_controller_held_back_offers{pool="default"} 1"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // A replica of the offer served: nothing waits, the count stays.
        m.starts("default", 0, 0);
        let text = m.render();
        assert!(text.contains(r#"strata_controller_held_back_offers{pool="default"} 0"#));
        assert!(text.contains(r#"strata_controller_failed_starts_total{pool="default"} 3"#));
    }
}
