//! The policies strata is compared with, as SkyServe ships them (SkyPilot's
//! serve autoscalers; "SkyServe: Serving AI Models across Regions and Clouds
//! with Spot Instances", EuroSys 2025), written from their description:
//!
//! - `RequestRate` (on demand): queries per second over a 60 s window,
//!   target = ceil(qps / target_qps_per_replica) within [min, max],
//!   decided every 20 s, raised only after it asked for more for 300 s and
//!   lowered after 1200 s, plus `overprovision` replicas;
//! - `SpotHedge`: the same target; spot replicas = target + overprovision −
//!   base on-demand; on-demand fallback = base + spot needed − spot ready,
//!   at most the target, gone once spot is ready; each new spot replica in
//!   the cheapest zone neither in use nor recently preempted, and every zone
//!   usable again when fewer than two remain.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use strata_core::config::CapacityType;
use strata_core::Load;

use super::Policy;
use crate::planner::Offer;
use crate::provider::sim::SimProvider;
use crate::provider::{Provider, ProviderEvent};

/// SkyServe's request-rate target with its delays.
#[derive(Debug, Clone)]
pub struct RateTarget {
    pub target_qps_per_replica: f64,
    pub min: u32,
    pub max: u32,
    pub window: Duration,
    pub interval: Duration,
    pub upscale_delay: Duration,
    pub downscale_delay: Duration,
    samples: VecDeque<(Duration, u64)>,
    target: u32,
    next: Duration,
    up_since: Option<Duration>,
    down_since: Option<Duration>,
}

impl RateTarget {
    pub fn new(target_qps_per_replica: f64, min: u32, max: u32) -> Self {
        RateTarget {
            target_qps_per_replica,
            min,
            max,
            window: Duration::from_secs(60),
            interval: Duration::from_secs(20),
            upscale_delay: Duration::from_secs(300),
            downscale_delay: Duration::from_secs(1200),
            samples: VecDeque::new(),
            target: min,
            next: Duration::ZERO,
            up_since: None,
            down_since: None,
        }
    }

    /// The target at `now`, given requests answered so far.
    pub fn target(&mut self, now: Duration, requests_total: u64) -> u32 {
        self.samples.push_back((now, requests_total));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) > self.window)
        {
            self.samples.pop_front();
        }
        if now < self.next {
            return self.target;
        }
        self.next = now + self.interval;
        let (t0, n0) = *self.samples.front().expect("just pushed");
        let span = now.saturating_sub(t0).as_secs_f64().max(1.0);
        let qps = requests_total.saturating_sub(n0) as f64 / span;
        let want = ((qps / self.target_qps_per_replica.max(f64::MIN_POSITIVE)).ceil() as u32)
            .clamp(self.min, self.max);
        if want > self.target {
            self.down_since = None;
            let since = *self.up_since.get_or_insert(now);
            if now.saturating_sub(since) >= self.upscale_delay {
                self.target = want;
                self.up_since = None;
            }
        } else if want < self.target {
            self.up_since = None;
            let since = *self.down_since.get_or_insert(now);
            if now.saturating_sub(since) >= self.downscale_delay {
                self.target = want;
                self.down_since = None;
            }
        } else {
            self.up_since = None;
            self.down_since = None;
        }
        self.target
    }
}

/// Launches or lets go (newest first) instances of `offer` to have `want`.
async fn keep(cloud: &mut SimProvider, offer: &Offer, want: usize) {
    let have: Vec<String> = cloud
        .list()
        .into_iter()
        .filter(|i| {
            i.slot.capacity == offer.capacity && i.slot.instance_type == offer.instance_type
        })
        .map(|i| i.id)
        .collect();
    for _ in have.len()..want {
        let _ = cloud.launch(offer).await;
    }
    for id in have.iter().rev().take(have.len().saturating_sub(want)) {
        cloud.terminate(id, "scaled down").await;
    }
}

/// SkyServe's request-rate autoscaler on on-demand replicas.
pub struct RequestRate {
    pub rate: RateTarget,
    pub offer: Offer,
    pub overprovision: u32,
}

#[async_trait]
impl Policy for RequestRate {
    fn name(&self) -> String {
        "request-rate autoscaler (on demand)".into()
    }

    async fn tick(&mut self, now: Duration, load: &Load, cloud: &mut SimProvider) {
        cloud.poll().await;
        let want = self.rate.target(now, load.requests_total) + self.overprovision;
        keep(cloud, &self.offer, want as usize).await;
    }
}

/// SpotHedge on the request-rate target.
pub struct SpotHedge {
    pub rate: RateTarget,
    /// One spot offer per zone.
    pub spot: Vec<Offer>,
    pub on_demand: Offer,
    pub overprovision: u32,
    pub base_on_demand: u32,
    preempted: BTreeSet<String>,
}

impl SpotHedge {
    pub fn new(
        rate: RateTarget,
        spot: Vec<Offer>,
        on_demand: Offer,
        overprovision: u32,
        base_on_demand: u32,
    ) -> Self {
        SpotHedge {
            rate,
            spot,
            on_demand,
            overprovision,
            base_on_demand,
            preempted: BTreeSet::new(),
        }
    }

    /// The cheapest zone neither in use nor recently preempted (in use but
    /// not preempted when every free one is out); every zone again when
    /// fewer than two are usable.
    fn zone(&mut self, in_use: &BTreeSet<String>) -> Option<Offer> {
        let usable =
            |p: &BTreeSet<String>| self.spot.iter().filter(|o| !p.contains(&o.zone)).count();
        if usable(&self.preempted) < 2 {
            self.preempted.clear();
        }
        let by_price = |a: &&Offer, b: &&Offer| a.price_per_hour.total_cmp(&b.price_per_hour);
        let fresh = self
            .spot
            .iter()
            .filter(|o| !self.preempted.contains(&o.zone) && !in_use.contains(&o.zone))
            .min_by(by_price);
        fresh
            .or_else(|| {
                self.spot
                    .iter()
                    .filter(|o| !self.preempted.contains(&o.zone))
                    .min_by(by_price)
            })
            .cloned()
    }
}

#[async_trait]
impl Policy for SpotHedge {
    fn name(&self) -> String {
        "SpotHedge (request rate)".into()
    }

    async fn tick(&mut self, now: Duration, load: &Load, cloud: &mut SimProvider) {
        for event in cloud.poll().await {
            if let ProviderEvent::Preempting { slot, .. } | ProviderEvent::Unavailable { slot } =
                event
            {
                self.preempted.insert(slot.zone);
            }
        }
        let target = self.rate.target(now, load.requests_total);
        let spot_needed = (target + self.overprovision).saturating_sub(self.base_on_demand);
        let spot: Vec<_> = cloud
            .list()
            .into_iter()
            .filter(|i| i.slot.capacity == CapacityType::Spot)
            .collect();
        let ready = spot.iter().filter(|i| i.ready).count() as u32;
        let mut in_use: BTreeSet<String> = spot.iter().map(|i| i.slot.zone.clone()).collect();
        for _ in spot.len()..spot_needed as usize {
            let Some(offer) = self.zone(&in_use) else {
                break;
            };
            in_use.insert(offer.zone.clone());
            let _ = cloud.launch(&offer).await;
        }
        for i in spot
            .iter()
            .rev()
            .take(spot.len().saturating_sub(spot_needed as usize))
        {
            cloud.terminate(&i.id, "scaled down").await;
        }
        let fallback = (self.base_on_demand + spot_needed.saturating_sub(ready)).min(target);
        keep(cloud, &self.on_demand, fallback as usize).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_target_waits_300_s_to_rise_and_1200_s_to_fall() {
        // 2 replicas' worth of queries (1 qps each) from t = 0.
        let mut r = RateTarget::new(1.0, 1, 10);
        let mut n = 0;
        let mut at = |r: &mut RateTarget, secs: u64, qps: u64| {
            let mut last = 0;
            for t in (secs..secs + 20).step_by(1) {
                n += qps;
                last = r.target(Duration::from_secs(t), n);
            }
            last
        };
        let mut seen = Vec::new();
        for s in (0..400).step_by(20) {
            seen.push((s, at(&mut r, s, 2)));
        }
        assert!(
            seen.iter().filter(|(s, _)| *s < 280).all(|(_, t)| *t == 1),
            "{seen:?}"
        );
        assert_eq!(seen.last().unwrap().1, 2, "{seen:?}");
        // Quiet: still 2 after 1,100 s, 1 after 1,300 s.
        let mut seen = Vec::new();
        for s in (400..1800).step_by(20) {
            seen.push((s, at(&mut r, s, 0)));
        }
        assert!(
            seen.iter().filter(|(s, _)| *s < 1500).all(|(_, t)| *t == 2),
            "{seen:?}"
        );
        assert_eq!(seen.last().unwrap().1, 1);
    }
}
