//! The policies strata is compared with, as SkyServe ships them (SkyPilot's
//! serve autoscalers, spot placer and replica manager, read in skypilot
//! 0.14.1: sky/serve/autoscalers.py, spot_placer.py, replica_managers.py,
//! constants.py; "SkyServe: Serving AI Models across Regions and Clouds
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
//!
//! When they act and what they know is `SkyTiming`: SkyServe's own
//! (`SkyTiming::skyserve`: decisions and load counts every 20 s, readiness
//! probes every 10 s that wait out a 15 s timeout on a vanished instance,
//! no preemption notice, a load balancer that keeps sending a lost
//! replica requests until its next sync after that, a sold-out zone
//! retried with backoff before it is given up, replicas let go torn down
//! after 120 s), or the simulator's earlier, more generous model
//! (`SkyTiming::ideal`: every step, with the notice, as strata gets it).

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use strata_core::config::CapacityType;
use strata_core::Load;

use super::Policy;
use crate::planner::Offer;
use crate::provider::sim::SimProvider;
use crate::provider::{Provider, ProviderEvent};

/// When a SkyServe policy acts and what it knows.
#[derive(Debug, Clone, PartialEq)]
pub struct SkyTiming {
    /// Decisions (launch, let go, fall back to on demand) this often;
    /// zero: every step. SkyServe: 20 s.
    pub decide_every: Duration,
    /// Request counts reach the controller this often (its load
    /// balancer's sync), half a period out of step with the decisions;
    /// zero: at once. SkyServe: 20 s.
    pub load_sync: Duration,
    /// A reclaim is known from its notice (and the replica drained from
    /// then on, as strata's are). SkyServe reads no notice: a reclaimed
    /// replica is in service in its eyes, and takes requests, until a
    /// readiness probe fails once the instance is gone.
    pub hears_notice: bool,
    /// Readiness probes this often: a replica counts as ready, or as lost,
    /// from the first probe that finds it so; zero: at once. SkyServe: 10 s.
    pub probe_every: Duration,
    /// How long a probe of an instance that is gone takes to fail: a
    /// vanished address answers nothing, so the probe waits out its
    /// timeout (SkyServe's readiness timeout: 15 s). Until then, and until
    /// the load balancer's next sync (`load_sync`) after it, the lost
    /// replica is still sent requests, which hang there and start over
    /// elsewhere once it is dropped (SkyServe's load balancer would give
    /// up on them after its 120 s timeout and retry: a miss either way).
    pub probe_timeout: Duration,
    /// Waits between the attempts to launch into a sold-out zone: the
    /// replica counts as launching meanwhile, and the zone is given up
    /// (marked preempted) when the last attempt fails. SkyServe: three
    /// attempts, backing off 60 s x 1.6 with ±40% jitter (60 s, then 96 s
    /// at the mean; the simulator takes the mean). Empty: the failure is
    /// known at once and the next step tries another zone.
    pub launch_retries: Vec<Duration>,
    /// A replica let go is torn down this long after (billed until then,
    /// taking no new requests): SkyServe sleeps 120 s first. None: it
    /// drains as strata's do, gone once its requests have ended.
    pub drain: Option<Duration>,
}

impl SkyTiming {
    /// SkyServe's timing (skypilot 0.14.1's defaults).
    pub fn skyserve() -> Self {
        SkyTiming {
            decide_every: Duration::from_secs(20),
            load_sync: Duration::from_secs(20),
            hears_notice: false,
            probe_every: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(15),
            launch_retries: vec![Duration::from_secs(60), Duration::from_secs(96)],
            drain: Some(Duration::from_secs(120)),
        }
    }

    /// The simulator's earlier model: acts every step, counts at once,
    /// hears the notice, moves on from a sold-out zone at once, drains as
    /// strata does.
    pub fn ideal() -> Self {
        SkyTiming {
            decide_every: Duration::ZERO,
            load_sync: Duration::ZERO,
            hears_notice: true,
            probe_every: Duration::ZERO,
            probe_timeout: Duration::ZERO,
            launch_retries: Vec::new(),
            drain: None,
        }
    }
}

/// A SkyServe controller's clock: when it decides, probes, and which
/// request count it has.
#[derive(Debug, Clone)]
struct Rhythm {
    timing: SkyTiming,
    next_decision: Duration,
    next_probe: Duration,
    next_sync: Duration,
    synced: u64,
    /// When the load balancer last synced with the controller.
    last_sync: Option<Duration>,
}

impl Rhythm {
    fn new(timing: SkyTiming) -> Self {
        Rhythm {
            next_sync: timing.load_sync / 2,
            timing,
            next_decision: Duration::ZERO,
            next_probe: Duration::ZERO,
            synced: 0,
            last_sync: None,
        }
    }

    /// Whether `every` has come round at `now` (then the next is set).
    fn due(next: &mut Duration, every: Duration, now: Duration) -> bool {
        if now < *next {
            return false;
        }
        *next = now + every;
        true
    }

    fn decides(&mut self, now: Duration) -> bool {
        Self::due(&mut self.next_decision, self.timing.decide_every, now)
    }

    fn probes(&mut self, now: Duration) -> bool {
        Self::due(&mut self.next_probe, self.timing.probe_every, now)
    }

    /// The request count the controller has at `now`.
    fn requests(&mut self, now: Duration, total: u64) -> u64 {
        if Self::due(&mut self.next_sync, self.timing.load_sync, now) {
            self.synced = total;
            self.last_sync = Some(now);
        }
        self.synced
    }

    async fn let_go(&self, cloud: &mut SimProvider, id: &str) {
        match self.timing.drain {
            Some(after) => cloud.terminate_after(id, after),
            None => cloud.terminate(id, "scaled down").await,
        }
    }

    /// Launches or lets go (newest first) instances of `offer` to have `want`.
    async fn keep(&self, cloud: &mut SimProvider, offer: &Offer, want: usize) {
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
            self.let_go(cloud, id).await;
        }
    }
}

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

/// SkyServe's request-rate autoscaler on on-demand replicas.
pub struct RequestRate {
    rate: RateTarget,
    offer: Offer,
    overprovision: u32,
    rhythm: Rhythm,
    name: String,
}

impl RequestRate {
    pub fn new(rate: RateTarget, offer: Offer, overprovision: u32, timing: SkyTiming) -> Self {
        RequestRate {
            rate,
            offer,
            overprovision,
            rhythm: Rhythm::new(timing),
            name: "request-rate autoscaler (on demand)".into(),
        }
    }

    /// The name its row carries.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

#[async_trait]
impl Policy for RequestRate {
    fn name(&self) -> String {
        self.name.clone()
    }

    async fn tick(&mut self, now: Duration, load: &Load, cloud: &mut SimProvider) {
        cloud.poll().await;
        let requests = self.rhythm.requests(now, load.requests_total);
        if !self.rhythm.decides(now) {
            return;
        }
        let want = self.rate.target(now, requests) + self.overprovision;
        self.rhythm.keep(cloud, &self.offer, want as usize).await;
    }
}

/// A spot replica as SkyServe's probes last found it.
#[derive(Debug, Clone)]
struct Probed {
    id: String,
    zone: String,
    ready: bool,
    /// When the probe that found its instance gone times out.
    fails_at: Option<Duration>,
}

/// A launch into a sold-out zone, waiting for its next attempt.
#[derive(Debug, Clone)]
struct Retry {
    offer: Offer,
    at: Duration,
    /// Attempts failed so far.
    failed: usize,
}

/// SpotHedge on the request-rate target.
pub struct SpotHedge {
    rate: RateTarget,
    /// One spot offer per zone.
    spot: Vec<Offer>,
    on_demand: Offer,
    overprovision: u32,
    base_on_demand: u32,
    rhythm: Rhythm,
    name: String,
    preempted: BTreeSet<String>,
    /// Without the notice: the spot replicas it launched and has not let
    /// go or found lost, oldest first, as its probes found them.
    probed: Vec<Probed>,
    /// Without the notice: replicas whose instance a probe found gone,
    /// and when that probe fails (its timeout); its load balancer routes
    /// to them until its first sync after that.
    lost: Vec<(String, Duration)>,
    /// Launches into sold-out zones between attempts.
    retrying: Vec<Retry>,
}

impl SpotHedge {
    pub fn new(
        rate: RateTarget,
        spot: Vec<Offer>,
        on_demand: Offer,
        overprovision: u32,
        base_on_demand: u32,
        timing: SkyTiming,
    ) -> Self {
        SpotHedge {
            rate,
            spot,
            on_demand,
            overprovision,
            base_on_demand,
            rhythm: Rhythm::new(timing),
            name: "SpotHedge (request rate)".into(),
            preempted: BTreeSet::new(),
            probed: Vec::new(),
            lost: Vec::new(),
            retrying: Vec::new(),
        }
    }

    /// The name its row carries.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
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

    /// One launch attempt of `offer`; a sold-out zone's is retried after
    /// the timing's waits (with none, the `Unavailable` event or, without
    /// the notice, the failure itself marks the zone at once).
    async fn attempt(
        &mut self,
        offer: Offer,
        failed: usize,
        now: Duration,
        cloud: &mut SimProvider,
    ) {
        let id = cloud.launch(&offer).await.ok();
        let up = id.filter(|id| cloud.list().iter().any(|i| &i.id == id));
        let timing = &self.rhythm.timing;
        match up {
            Some(id) => {
                if !timing.hears_notice {
                    self.probed.push(Probed {
                        id,
                        zone: offer.zone.clone(),
                        ready: false,
                        fails_at: None,
                    });
                }
            }
            None => match timing.launch_retries.get(failed) {
                Some(wait) => self.retrying.push(Retry {
                    at: now + *wait,
                    offer,
                    failed: failed + 1,
                }),
                None if !timing.hears_notice || failed > 0 => {
                    self.preempted.insert(offer.zone);
                }
                None => {}
            },
        }
    }

    /// Its spot replicas, oldest first, and how many of them are ready:
    /// the cloud's list when it hears notices, else what its probes found.
    fn spot_replicas(&self, cloud: &SimProvider) -> (Vec<(String, String)>, u32) {
        if self.rhythm.timing.hears_notice {
            let spot: Vec<_> = cloud
                .list()
                .into_iter()
                .filter(|i| i.slot.capacity == CapacityType::Spot)
                .collect();
            let ready = spot.iter().filter(|i| i.ready).count() as u32;
            let spot = spot.into_iter().map(|i| (i.id, i.slot.zone)).collect();
            return (spot, ready);
        }
        let ready = self.probed.iter().filter(|p| p.ready).count() as u32;
        let spot = self
            .probed
            .iter()
            .map(|p| (p.id.clone(), p.zone.clone()))
            .collect();
        (spot, ready)
    }
}

#[async_trait]
impl Policy for SpotHedge {
    fn name(&self) -> String {
        self.name.clone()
    }

    /// SkyServe's load balancer routes to every replica its controller
    /// lists as ready, and a reclaimed one stays listed until a probe
    /// finds it gone.
    fn drain_before_reclaim(&self) -> Option<Duration> {
        (!self.rhythm.timing.hears_notice).then_some(Duration::ZERO)
    }

    /// Until its controller has found the instance gone and its load
    /// balancer has synced since.
    fn routes_to_lost(&self, id: &str) -> bool {
        self.probed.iter().any(|p| p.id == id && p.ready)
            || self.lost.iter().any(|(lost, _)| lost == id)
    }

    async fn tick(&mut self, now: Duration, load: &Load, cloud: &mut SimProvider) {
        let events = cloud.poll().await;
        if self.rhythm.timing.hears_notice {
            for event in events {
                if let ProviderEvent::Preempting { slot, .. }
                | ProviderEvent::Unavailable { slot } = event
                {
                    self.preempted.insert(slot.zone);
                }
            }
        }
        // Launches into sold-out zones try again when their wait is over.
        let (due, waiting): (Vec<Retry>, Vec<Retry>) = std::mem::take(&mut self.retrying)
            .into_iter()
            .partition(|r| r.at <= now);
        self.retrying = waiting;
        for r in due {
            self.attempt(r.offer, r.failed, now, cloud).await;
        }
        // Without the notice a replica is ready from the probe that finds
        // it so, and lost (its zone then preempted) when a probe of its
        // vanished instance times out.
        if !self.rhythm.timing.hears_notice {
            if self.rhythm.probes(now) {
                let view = cloud.view();
                let timeout = self.rhythm.timing.probe_timeout;
                for p in &mut self.probed {
                    match view.iter().find(|v| v.id == p.id) {
                        Some(v) => p.ready = v.ready,
                        None => {
                            p.fails_at.get_or_insert(now + timeout);
                        }
                    }
                }
            }
            let (failed, probed): (Vec<Probed>, Vec<Probed>) = std::mem::take(&mut self.probed)
                .into_iter()
                .partition(|p| p.fails_at.is_some_and(|at| at <= now));
            self.probed = probed;
            for p in failed {
                self.preempted.insert(p.zone);
                self.lost.push((p.id, p.fails_at.expect("failed")));
            }
        }
        let requests = self.rhythm.requests(now, load.requests_total);
        // Its load balancer drops a lost replica at its first sync after
        // the controller found it so.
        let synced = self.rhythm.last_sync;
        self.lost.retain(|(_, at)| synced.is_none_or(|s| s < *at));
        if !self.rhythm.decides(now) {
            return;
        }
        let target = self.rate.target(now, requests);
        let spot_needed =
            (target + self.overprovision).saturating_sub(self.base_on_demand) as usize;
        let (spot, ready) = self.spot_replicas(cloud);
        let mut in_use: BTreeSet<String> = spot.iter().map(|(_, zone)| zone.clone()).collect();
        in_use.extend(self.retrying.iter().map(|r| r.offer.zone.clone()));
        let have = spot.len() + self.retrying.len();
        for _ in have..spot_needed {
            let Some(offer) = self.zone(&in_use) else {
                break;
            };
            in_use.insert(offer.zone.clone());
            self.attempt(offer, 0, now, cloud).await;
        }
        // Too many: launches still retrying go first, then the newest.
        let mut extra = have.saturating_sub(spot_needed);
        while extra > 0 && self.retrying.pop().is_some() {
            extra -= 1;
        }
        for (id, _) in spot.iter().rev().take(extra) {
            self.rhythm.let_go(cloud, id).await;
            self.probed.retain(|p| &p.id != id);
        }
        let fallback =
            (self.base_on_demand + (spot_needed as u32).saturating_sub(ready)).min(target);
        self.rhythm
            .keep(cloud, &self.on_demand, fallback as usize)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::provider::sim::{SimSettings, SpotTrace};

    fn offer(zone: &str, capacity: CapacityType, price: f64) -> Offer {
        Offer {
            instance_type: "t".into(),
            zone: zone.into(),
            capacity,
            price_per_hour: price,
            tokens_per_s: 100.0,
        }
    }

    /// Zones `a` ($1), `b` ($2) and `c` ($3) of spot, `a`'s availability
    /// from `a_trace` (100 s a tick), the others always; 60 s launches and
    /// a 125 s notice (so that a reclaimed instance goes between probes).
    fn cloud(a_trace: &str) -> SimProvider {
        let trace = format!(r#"{{"metadata": {{"gap_seconds": 100}}, "data": {a_trace}}}"#);
        SimProvider::new(SimSettings {
            spot: BTreeMap::from([("a".to_string(), SpotTrace::parse(&trace).unwrap())]),
            offset: Duration::ZERO,
            launch_delay: Duration::from_secs(60),
            launch_delays: BTreeMap::new(),
            notice: Duration::from_secs(125),
            drain: Duration::from_secs(30),
        })
    }

    /// A one-replica SpotHedge (the target is pinned at 1) over the zones.
    fn hedge(timing: SkyTiming) -> SpotHedge {
        let spot = ["a", "b", "c"]
            .iter()
            .zip([1.0, 2.0, 3.0])
            .map(|(z, p)| offer(z, CapacityType::Spot, p))
            .collect();
        let on_demand = offer("a", CapacityType::OnDemand, 5.0);
        SpotHedge::new(RateTarget::new(1.0, 1, 1), spot, on_demand, 0, 0, timing)
    }

    /// Ticks every 100 ms up to `secs`; each instance's (zone, capacity,
    /// launched at) in launch order.
    async fn run(
        policy: &mut dyn Policy,
        cloud: &mut SimProvider,
        secs: u64,
    ) -> Vec<(String, CapacityType, f64)> {
        let load = Load::default();
        let mut now = Duration::ZERO;
        while now <= Duration::from_secs(secs) {
            cloud.advance_to(now);
            policy.tick(now, &load, cloud).await;
            now += Duration::from_millis(100);
        }
        cloud
            .bills()
            .into_iter()
            .map(|b| (b.slot.zone, b.slot.capacity, b.launched.as_secs_f64()))
            .collect()
    }

    /// The first launch into `zone` of `capacity` from `after` seconds on.
    fn first(
        launches: &[(String, CapacityType, f64)],
        zone: &str,
        capacity: CapacityType,
        after: f64,
    ) -> f64 {
        launches
            .iter()
            .find(|(z, c, at)| z == zone && *c == capacity && *at >= after)
            .map_or(f64::NAN, |l| l.2)
    }

    #[tokio::test]
    async fn without_the_notice_a_reclaim_is_replaced_once_a_probe_finds_the_instance_gone() {
        // `a` sells out at 300 s: notice then, gone at 425 s.
        let mut ideal = cloud("[1, 1, 1, 0, 0, 0, 0, 0]");
        let seen = run(&mut hedge(SkyTiming::ideal()), &mut ideal, 600).await;
        assert_eq!(first(&seen, "a", CapacityType::Spot, 0.0), 0.0);
        // With the notice: the replacement and its on-demand cover at once
        // (the cover bought while the first replica launched went when it
        // was ready).
        let replaced = |seen: &[(String, CapacityType, f64)]| {
            (
                first(seen, "b", CapacityType::Spot, 0.0),
                first(seen, "a", CapacityType::OnDemand, 200.0),
            )
        };
        assert_eq!(replaced(&seen), (300.0, 300.0), "{seen:?}");

        let mut sky = cloud("[1, 1, 1, 0, 0, 0, 0, 0]");
        let seen = run(&mut hedge(SkyTiming::skyserve()), &mut sky, 600).await;
        // SkyServe: in service in its eyes until gone at 425 s; the probe
        // at 430 s (every 10 s) finds no one answering and times out at
        // 445 s; acted on at the next decision (every 20 s): 460 s.
        assert_eq!(replaced(&seen), (460.0, 460.0), "{seen:?}");
        // The dead replica's zone is given up: nothing launched into `a`
        // again.
        assert_eq!(
            seen.iter()
                .filter(|(z, c, _)| z == "a" && *c == CapacityType::Spot)
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn a_sold_out_zone_is_retried_with_backoff_before_another_is_tried() {
        // `a` (the cheapest) has no spot at all.
        let mut ideal = cloud("[0]");
        let seen = run(&mut hedge(SkyTiming::ideal()), &mut ideal, 400).await;
        assert_eq!(first(&seen, "b", CapacityType::Spot, 0.0), 0.1, "{seen:?}");

        let mut sky = cloud("[0]");
        let seen = run(&mut hedge(SkyTiming::skyserve()), &mut sky, 400).await;
        // Attempts at 0, 60 and 156 s; the zone is given up then, and the
        // next decision (160 s) launches into `b`. The launching replica is
        // covered on demand from the start.
        let launched = (
            first(&seen, "b", CapacityType::Spot, 0.0),
            first(&seen, "a", CapacityType::OnDemand, 0.0),
        );
        assert_eq!(launched, (160.0, 0.0), "{seen:?}");
        assert!(seen
            .iter()
            .all(|(z, c, _)| !(z == "a" && *c == CapacityType::Spot)));
    }

    #[tokio::test]
    async fn a_retried_launch_that_finds_room_keeps_its_zone() {
        // `a` has room from 100 s: the attempts at 0 and 60 s fail, the
        // third (156 s) launches there.
        let mut sky = cloud("[0, 1, 1, 1, 1]");
        let seen = run(&mut hedge(SkyTiming::skyserve()), &mut sky, 400).await;
        assert_eq!(
            first(&seen, "a", CapacityType::Spot, 0.0),
            156.0,
            "{seen:?}"
        );
        assert!(
            first(&seen, "b", CapacityType::Spot, 0.0).is_nan(),
            "{seen:?}"
        );
    }

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
