//! The `sim` provider: a virtual cloud on a virtual clock, for the
//! simulator and for testing the controller against real spot behaviour.
//!
//! Spot availability per zone comes from a trace (the spot-traces format:
//! `{"metadata": {"gap_seconds": N}, "data": [count, ...]}`, one tick per
//! `gap_seconds`), read as: while a zone's count is 0 it has no spot
//! capacity, so a spot launch there fails and its running spot replicas get
//! a preemption notice (gone when it ends). The trace can start at any
//! offset and wraps around. Launches take `launch_delay` to become ready.
//! The clock moves only by `advance_to`; every instance is billed at its
//! offer's price from launch to the moment it is gone.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use strata_core::config::CapacityType;

use crate::planner::{Offer, Slot};
use crate::provider::{Instance, Provider, ProviderEvent};
use crate::ControlError;

/// Spot capacity of one zone over time.
#[derive(Debug, Clone, PartialEq)]
pub struct SpotTrace {
    pub gap: Duration,
    pub data: Vec<u32>,
    /// The counts cap how many spot replicas the zone holds (node event
    /// traces); otherwise any count above 0 means spot can be had.
    pub capped: bool,
}

#[derive(Deserialize)]
struct TraceFile {
    metadata: TraceMeta,
    data: Vec<f64>,
}

#[derive(Deserialize)]
struct TraceMeta {
    gap_seconds: f64,
}

impl SpotTrace {
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: TraceFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if f.metadata.gap_seconds.is_nan() || f.metadata.gap_seconds <= 0.0 || f.data.is_empty() {
            return Err("a trace needs gap_seconds > 0 and at least one data point".into());
        }
        Ok(SpotTrace {
            gap: Duration::from_secs_f64(f.metadata.gap_seconds),
            data: f.data.iter().map(|v| v.max(0.0).round() as u32).collect(),
            capped: false,
        })
    }

    /// Spot nodes alive over time from add/remove events (`time_ms,add|remove,node`
    /// lines, as SpotServe's traces), sampled every `gap`; the counts cap
    /// the zone's spot replicas.
    pub fn from_node_events(text: &str, gap: Duration) -> Result<Self, String> {
        let mut events: Vec<(u64, i64)> = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let mut f = line.split(',').map(str::trim);
            let (Some(ms), Some(kind)) = (f.next(), f.next()) else {
                return Err(format!("line {}: expected time_ms,add|remove,node", i + 1));
            };
            let ms: u64 = ms
                .parse()
                .map_err(|_| format!("line {}: `{ms}` is not a time in ms", i + 1))?;
            let delta = match kind {
                "add" => 1,
                "remove" => -1,
                _ => {
                    return Err(format!(
                        "line {}: `{kind}` is neither add nor remove",
                        i + 1
                    ))
                }
            };
            events.push((ms, delta));
        }
        if events.is_empty() || gap.is_zero() {
            return Err("no events".into());
        }
        events.sort_by_key(|e| e.0);
        let end = events.last().expect("not empty").0;
        let gap_ms = gap.as_millis().max(1) as u64;
        let (mut alive, mut next, mut data) = (0i64, 0usize, Vec::new());
        let mut t = 0;
        while t <= end {
            while next < events.len() && events[next].0 <= t {
                alive += events[next].1;
                next += 1;
            }
            data.push(alive.max(0) as u32);
            t += gap_ms;
        }
        Ok(SpotTrace {
            gap,
            data,
            capped: true,
        })
    }

    pub fn load(path: &Path) -> Result<Self, ControlError> {
        let text = std::fs::read_to_string(path).map_err(crate::io_at(path))?;
        Self::parse(&text).map_err(|e| ControlError::BadData(format!("{}: {e}", path.display())))
    }

    /// Spot instances obtainable at `t` (wrapping around the trace).
    pub fn at(&self, t: Duration) -> u32 {
        let tick = (t.as_secs_f64() / self.gap.as_secs_f64()) as usize;
        self.data[tick % self.data.len()]
    }

    /// Share of ticks with spot capacity.
    pub fn availability(&self) -> f64 {
        self.data.iter().filter(|&&v| v > 0).count() as f64 / self.data.len() as f64
    }
}

#[derive(Debug, Clone)]
pub struct SimSettings {
    /// Spot availability by zone; a zone without a trace always has spot.
    pub spot: BTreeMap<String, SpotTrace>,
    /// Where in the traces the virtual clock's zero falls.
    pub offset: Duration,
    /// Launch to ready.
    pub launch_delay: Duration,
    /// Launch to ready for these instance types (others: `launch_delay`).
    pub launch_delays: BTreeMap<String, Duration>,
    /// Preemption notice (AWS gives two minutes).
    pub notice: Duration,
    /// Longest a replica being let go drains (its requests finish first).
    pub drain: Duration,
}

#[derive(Debug, Clone, PartialEq)]
struct SimInstance {
    id: String,
    offer: Offer,
    launched: Duration,
    ready: bool,
    /// When it stops being billed (set when it is let go or reclaimed).
    gone_at: Option<Duration>,
    preempted: bool,
    /// `Gone` was reported.
    reported: bool,
    /// Work in hand, as the simulator's replica model last said.
    busy: f64,
    /// Let go for a fixed time (`terminate_after`): billed to `gone_at`
    /// even once idle.
    held: bool,
}

/// An instance as the simulator's gateway sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimView {
    pub id: String,
    pub offer: Offer,
    pub ready: bool,
    /// Leaving then (let go, or reclaimed): a replica let go drains and
    /// takes no new requests; a reclaimed one takes them until its
    /// policy's gateway drains it (`Policy::drain_before_reclaim`).
    pub leaving_until: Option<Duration>,
    /// Reclaimed (it goes when its notice ends), not let go.
    pub reclaimed: bool,
}

/// A finished or running instance's bill.
#[derive(Debug, Clone, PartialEq)]
pub struct SimBill {
    pub id: String,
    pub slot: Slot,
    pub launched: Duration,
    pub gone: Option<Duration>,
    pub preempted: bool,
    pub price_per_hour: f64,
    pub cost: f64,
}

impl SimBill {
    /// How long it ran within `[from, to]`.
    fn ran_within(&self, from: Duration, to: Duration) -> Duration {
        let end = self.gone.unwrap_or(to).min(to);
        end.saturating_sub(self.launched.max(from))
    }

    pub fn hours_within(&self, from: Duration, to: Duration) -> f64 {
        self.ran_within(from, to).as_secs_f64() / 3600.0
    }

    /// Dollars it cost within `[from, to]`.
    pub fn cost_within(&self, from: Duration, to: Duration) -> f64 {
        self.price_per_hour * self.ran_within(from, to).as_secs_f64() / 3600.0
    }
}

pub struct SimProvider {
    settings: SimSettings,
    now: Duration,
    next_id: u64,
    instances: Vec<SimInstance>,
    events: Vec<ProviderEvent>,
}

impl SimProvider {
    pub fn new(settings: SimSettings) -> Self {
        SimProvider {
            settings,
            now: Duration::ZERO,
            next_id: 0,
            instances: Vec::new(),
            events: Vec::new(),
        }
    }

    pub fn now(&self) -> Duration {
        self.now
    }

    /// Moves the virtual clock forward (never back).
    pub fn advance_to(&mut self, t: Duration) {
        self.now = self.now.max(t);
    }

    /// How many spot replicas `zone` can hold now (`None`: no limit).
    pub fn spot_room(&self, zone: &str) -> Option<u32> {
        let trace = self.settings.spot.get(zone)?;
        let count = trace.at(self.settings.offset + self.now);
        match (trace.capped, count) {
            (true, n) => Some(n),
            (false, 0) => Some(0),
            (false, _) => None,
        }
    }

    fn spot_running(&self, zone: &str) -> Vec<usize> {
        (0..self.instances.len())
            .filter(|&k| {
                let i = &self.instances[k];
                i.offer.capacity == CapacityType::Spot
                    && i.offer.zone == zone
                    && i.gone_at.is_none()
            })
            .collect()
    }

    /// Every instance's bill up to now.
    pub fn bills(&self) -> Vec<SimBill> {
        self.instances
            .iter()
            .map(|i| {
                let mut bill = SimBill {
                    id: i.id.clone(),
                    slot: Slot::from(&i.offer),
                    launched: i.launched,
                    gone: i.gone_at.filter(|g| *g <= self.now),
                    preempted: i.preempted,
                    price_per_hour: i.offer.price_per_hour,
                    cost: 0.0,
                };
                bill.cost = bill.cost_within(Duration::ZERO, self.now);
                bill
            })
            .collect()
    }

    /// Instances not gone yet.
    pub fn view(&self) -> Vec<SimView> {
        self.instances
            .iter()
            .filter(|i| i.gone_at.is_none_or(|g| g > self.now))
            .map(|i| SimView {
                id: i.id.clone(),
                offer: i.offer.clone(),
                ready: i.ready,
                leaving_until: i.gone_at,
                reclaimed: i.preempted,
            })
            .collect()
    }

    /// The work a replica has in hand (for choosing which one to let go).
    pub fn set_busy(&mut self, id: &str, tokens: f64) {
        if let Some(i) = self.instances.iter_mut().find(|i| i.id == id) {
            i.busy = tokens;
        }
    }

    /// A replica being let go finished its requests: it goes now (unless
    /// it was let go for a fixed time).
    pub fn release(&mut self, id: &str) {
        let now = self.now;
        if let Some(i) = self
            .instances
            .iter_mut()
            .find(|i| i.id == id && !i.preempted && !i.held && i.gone_at.is_some_and(|g| g > now))
        {
            i.gone_at = Some(now);
        }
    }

    /// Lets a replica go as SkyServe scales one down: it takes no new
    /// requests from now and is torn down (and billed until then) `after`
    /// from now, whether or not its requests ended sooner. One not ready
    /// yet goes at once.
    pub fn terminate_after(&mut self, id: &str, after: Duration) {
        let now = self.now;
        if let Some(i) = self
            .instances
            .iter_mut()
            .find(|i| i.id == id && i.gone_at.is_none())
        {
            i.gone_at = Some(if i.ready { now + after } else { now });
            i.held = i.ready;
        }
    }

    /// Tokens per second the ready replicas serve now.
    pub fn ready_capacity(&self) -> f64 {
        self.instances
            .iter()
            .filter(|i| i.ready && i.gone_at.is_none())
            .map(|i| i.offer.tokens_per_s)
            .sum()
    }
}

#[async_trait]
impl Provider for SimProvider {
    async fn launch(&mut self, offer: &Offer) -> Result<String, ControlError> {
        let id = format!("sim-{}", self.next_id);
        self.next_id += 1;
        let full = self
            .spot_room(&offer.zone)
            .is_some_and(|room| self.spot_running(&offer.zone).len() >= room as usize);
        if offer.capacity == CapacityType::Spot && full {
            self.events.push(ProviderEvent::Unavailable {
                slot: Slot::from(offer),
            });
            return Ok(id);
        }
        self.instances.push(SimInstance {
            id: id.clone(),
            offer: offer.clone(),
            launched: self.now,
            ready: false,
            gone_at: None,
            preempted: false,
            reported: false,
            busy: 0.0,
            held: false,
        });
        Ok(id)
    }

    async fn terminate(&mut self, id: &str, _why: &str) {
        let now = self.now;
        let drain = self.settings.drain;
        if let Some(i) = self
            .instances
            .iter_mut()
            .find(|i| i.id == id && i.gone_at.is_none())
        {
            // Not ready yet: nothing to drain.
            i.gone_at = Some(if i.ready { now + drain } else { now });
        }
    }

    fn list(&self) -> Vec<Instance> {
        self.instances
            .iter()
            .filter(|i| i.gone_at.is_none())
            .map(|i| Instance {
                id: i.id.clone(),
                slot: Slot::from(&i.offer),
                ready: i.ready,
                busy: Some(i.busy),
            })
            .collect()
    }

    async fn poll(&mut self) -> Vec<ProviderEvent> {
        let now = self.now;
        let notice = self.settings.notice;
        // Zones holding more spot replicas than they have room for reclaim
        // the newest.
        let mut reclaim = Vec::new();
        let zones: std::collections::BTreeSet<String> =
            self.settings.spot.keys().cloned().collect();
        for zone in zones {
            if let Some(room) = self.spot_room(&zone) {
                let running = self.spot_running(&zone);
                reclaim.extend(
                    running
                        .iter()
                        .rev()
                        .take(running.len().saturating_sub(room as usize)),
                );
            }
        }
        for (k, i) in self.instances.iter_mut().enumerate() {
            let delay = self
                .settings
                .launch_delays
                .get(&i.offer.instance_type)
                .copied()
                .unwrap_or(self.settings.launch_delay);
            if i.gone_at.is_none() && !i.ready && now >= i.launched + delay {
                i.ready = true;
                self.events.push(ProviderEvent::Ready { id: i.id.clone() });
            }
            if reclaim.contains(&k) {
                i.gone_at = Some(now + notice);
                i.preempted = true;
                self.events.push(ProviderEvent::Preempting {
                    id: i.id.clone(),
                    slot: Slot::from(&i.offer),
                    notice,
                });
            }
        }
        // Reclaimed instances whose notice ran out, and drained ones.
        for i in &mut self.instances {
            if !i.reported && i.gone_at.is_some_and(|g| g <= now) {
                i.reported = true;
                self.events.push(ProviderEvent::Gone { id: i.id.clone() });
            }
        }
        std::mem::take(&mut self.events)
    }

    async fn shutdown(&mut self) {
        let now = self.now;
        for i in &mut self.instances {
            if i.gone_at.is_none() {
                i.gone_at = Some(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_events_become_a_capped_count_per_tick() {
        let t = SpotTrace::from_node_events(
            "0,add,n1\n0,add,n2\n60000,remove,n1\n120000,add,n3\n",
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(t.capped);
        assert_eq!(t.data, [2, 1, 2]);
        assert!(SpotTrace::from_node_events("5,grow,n1\n", Duration::from_secs(1)).is_err());
        assert!(SpotTrace::from_node_events("", Duration::from_secs(1)).is_err());
    }

    #[tokio::test]
    async fn a_capped_zone_refuses_launches_beyond_its_count_and_reclaims_the_newest() {
        let trace = SpotTrace {
            gap: Duration::from_secs(100),
            data: vec![2, 1],
            capped: true,
        };
        let mut p = SimProvider::new(SimSettings {
            spot: BTreeMap::from([("a".to_string(), trace)]),
            offset: Duration::ZERO,
            launch_delay: Duration::ZERO,
            launch_delays: BTreeMap::new(),
            notice: Duration::from_secs(10),
            drain: Duration::ZERO,
        });
        let offer = Offer {
            instance_type: "t".into(),
            zone: "a".into(),
            capacity: CapacityType::Spot,
            price_per_hour: 1.0,
            tokens_per_s: 1.0,
        };
        let first = p.launch(&offer).await.unwrap();
        let second = p.launch(&offer).await.unwrap();
        p.launch(&offer).await.unwrap();
        let events = p.poll().await;
        assert!(events
            .iter()
            .any(|e| matches!(e, ProviderEvent::Unavailable { .. })));
        assert_eq!(p.list().len(), 2);
        p.advance_to(Duration::from_secs(100));
        let events = p.poll().await;
        assert!(events.contains(&ProviderEvent::Preempting {
            id: second,
            slot: Slot::from(&offer),
            notice: Duration::from_secs(10),
        }));
        assert_eq!(
            p.list().iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
            [first]
        );
    }

    #[test]
    fn a_trace_is_read_per_tick_and_wraps_around() {
        let t =
            SpotTrace::parse(r#"{"metadata": {"gap_seconds": 10}, "data": [1, 0, 2]}"#).unwrap();
        let at = |s| t.at(Duration::from_secs(s));
        assert_eq!(
            [at(0), at(9), at(10), at(25), at(30), at(41)],
            [1, 1, 0, 2, 1, 0]
        );
        assert!((t.availability() - 2.0 / 3.0).abs() < 1e-12);
        for bad in [
            r#"{"metadata": {"gap_seconds": 0}, "data": [1]}"#,
            r#"{"metadata": {"gap_seconds": 5}, "data": []}"#,
            r#"{"data": [1]}"#,
        ] {
            assert!(SpotTrace::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_replica_let_go_for_a_fixed_time_is_billed_for_it_though_idle() {
        let mut p = SimProvider::new(SimSettings {
            spot: BTreeMap::new(),
            offset: Duration::ZERO,
            launch_delay: Duration::from_secs(10),
            launch_delays: BTreeMap::new(),
            notice: Duration::from_secs(20),
            drain: Duration::from_secs(30),
        });
        let offer = Offer {
            instance_type: "t".into(),
            zone: "a".into(),
            capacity: CapacityType::OnDemand,
            price_per_hour: 3.6,
            tokens_per_s: 10.0,
        };
        let (held, drained) = (
            p.launch(&offer).await.unwrap(),
            p.launch(&offer).await.unwrap(),
        );
        p.advance_to(Duration::from_secs(10));
        p.poll().await;
        p.terminate_after(&held, Duration::from_secs(120));
        p.terminate(&drained, "scaled down").await;
        // Both take no new requests; the drained one goes as soon as it is
        // idle, the held one only after its 120 s.
        assert!(p.view().iter().all(|v| v.leaving_until.is_some()));
        p.release(&held);
        p.release(&drained);
        p.advance_to(Duration::from_secs(200));
        let cost = |id: &str| p.bills().iter().find(|b| b.id == id).unwrap().cost;
        assert!((cost(&held) - 0.13).abs() < 1e-9, "{}", cost(&held));
        assert!((cost(&drained) - 0.01).abs() < 1e-9, "{}", cost(&drained));
        // One not ready yet goes at once.
        let fresh = p.launch(&offer).await.unwrap();
        p.terminate_after(&fresh, Duration::from_secs(120));
        assert!(p.view().iter().all(|v| v.id != fresh));
    }

    #[tokio::test]
    async fn launches_become_ready_after_the_delay_and_a_sold_out_zone_reclaims_with_notice() {
        let trace =
            SpotTrace::parse(r#"{"metadata": {"gap_seconds": 100}, "data": [1, 0]}"#).unwrap();
        let mut p = SimProvider::new(SimSettings {
            spot: BTreeMap::from([("a".to_string(), trace)]),
            offset: Duration::ZERO,
            launch_delay: Duration::from_secs(30),
            launch_delays: BTreeMap::new(),
            notice: Duration::from_secs(20),
            drain: Duration::from_secs(30),
        });
        let offer = Offer {
            instance_type: "t".into(),
            zone: "a".into(),
            capacity: CapacityType::Spot,
            price_per_hour: 3.6,
            tokens_per_s: 10.0,
        };
        let id = p.launch(&offer).await.unwrap();
        p.advance_to(Duration::from_secs(29));
        assert!(p.poll().await.is_empty());
        p.advance_to(Duration::from_secs(30));
        assert_eq!(p.poll().await, [ProviderEvent::Ready { id: id.clone() }]);
        assert_eq!(p.ready_capacity(), 10.0);
        // At 100 s the zone sells out: notice now, gone 20 s later.
        p.advance_to(Duration::from_secs(100));
        assert!(matches!(
            &p.poll().await[..],
            [ProviderEvent::Preempting { .. }]
        ));
        assert!(p.list().is_empty());
        // A spot launch there now is refused.
        p.launch(&offer).await.unwrap();
        assert!(matches!(
            &p.poll().await[..],
            [ProviderEvent::Unavailable { .. }]
        ));
        p.advance_to(Duration::from_secs(120));
        assert_eq!(p.poll().await, [ProviderEvent::Gone { id }]);
        // Billed from launch to the end of the notice: 120 s at $3.6/h.
        let bills = p.bills();
        assert_eq!(bills.len(), 1);
        assert!((bills[0].cost - 0.12).abs() < 1e-9 && bills[0].preempted);
    }

    #[tokio::test]
    async fn an_instance_type_with_its_own_launch_delay_is_ready_after_that() {
        let mut p = SimProvider::new(SimSettings {
            spot: BTreeMap::new(),
            offset: Duration::ZERO,
            launch_delay: Duration::from_secs(30),
            launch_delays: BTreeMap::from([("gpu".to_string(), Duration::from_secs(200))]),
            notice: Duration::from_secs(20),
            drain: Duration::ZERO,
        });
        let offer = |t: &str| Offer {
            instance_type: t.into(),
            zone: "a".into(),
            capacity: CapacityType::OnDemand,
            price_per_hour: 1.0,
            tokens_per_s: 10.0,
        };
        let cpu = p.launch(&offer("cpu")).await.unwrap();
        let gpu = p.launch(&offer("gpu")).await.unwrap();
        p.advance_to(Duration::from_secs(30));
        assert_eq!(p.poll().await, [ProviderEvent::Ready { id: cpu }]);
        p.advance_to(Duration::from_secs(199));
        assert!(p.poll().await.is_empty());
        p.advance_to(Duration::from_secs(200));
        assert_eq!(p.poll().await, [ProviderEvent::Ready { id: gpu }]);
    }
}
