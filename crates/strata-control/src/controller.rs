//! The controller of one pool: the gateway's load in, replicas out.
//!
//! Every second it turns the load into an autoscaler signal (token demand,
//! the prompt share of it, requests in flight and waiting, p95 latencies,
//! and the capacity of a replica: the instance type's profile until a
//! saturated pool has measured it), asks the autoscaler how many replicas
//! (in units of the pool's first instance type) the pool needs, has the
//! planner pick the cheapest mix of catalog offers for that capacity (spot
//! spread over the zones that have not just reclaimed a replica, with the
//! hedge; on demand where spot is out), and makes the provider's instances
//! match the plan: launches first, and lets replicas go only when nothing
//! is starting, so capacity is made before it is broken. A preemption
//! notice takes the replica out of the plan's count at once, so its
//! replacement starts while it drains.
//!
//! `Controller` is the pure part (no clock, no I/O) and is what the
//! simulator drives; `run` is the live loop around a `Provider`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use strata_core::config::{CapacityType, Config, InstanceType, Offering};
use strata_core::store::{DecisionRecord, DecisionStore};
use strata_core::Load;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::autoscale::{Autoscaler, Decision, Reason, ScalePolicy, Signal};
use crate::metrics::ControllerMetrics;
use crate::planner::{cheapest, diff, plan, Offer, Plan, PlanPolicy, Slot, SpotRoom};
use crate::provider::{Instance, Provider, ProviderEvent};
use crate::ControlError;

/// What the controller needs to know about its pool.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub name: String,
    /// The offers the pool may use, each with its instance type's profile.
    pub offers: Vec<(Offering, InstanceType)>,
    /// The instance type replicas are counted in.
    pub unit: InstanceType,
    /// Autoscaling policy; `None` keeps `fixed_replicas` units.
    pub scale: Option<ScalePolicy>,
    pub fixed_replicas: u32,
    pub spot_hedge: u32,
    /// A zone that just reclaimed a spot replica gets no new one for this long.
    pub spot_cooldown: Duration,
    /// Spot zones dearer per token than the cheapest by more than this
    /// share are used only when the cheaper ones have no room.
    pub spot_zone_premium: f64,
    /// At most this share of the replicas on one zone's spot.
    pub spot_max_zone_share: f64,
    /// A zone that reclaimed within this long, where a reclaim leaves a
    /// gap, holds at most the hedge (`risky_zones`); zero: off.
    pub spot_risk_window: Duration,
    /// The notice a reclaimed replica gets (`pool.preemption_notice_secs`).
    pub notice: Duration,
    /// A reclaimed replica takes requests until this long before it goes
    /// (`pool.preemption_drain_secs`; `None`: it drains from the notice
    /// on). The provider acts on it; the simulator's gateway reads it here.
    pub preemption_drain: Option<Duration>,
    /// Requests one replica runs at once (the in-flight floor).
    pub slots_per_replica: u32,
    /// Spot replicas for a batch backlog, beside the autoscaler's count.
    pub batch_spot: BatchSpot,
}

/// Spot replicas the controller adds to work off a Batch API backlog
/// sooner (`pool.batch_spot_*`): one for each `work` of full-load work
/// the backlog holds, at most `max_replicas`, only from spot offers that
/// cost at most `price_share` of the cheapest on-demand offer per token,
/// and only where the zones have spot room the rest of the plan leaves.
/// Never on demand: a batch that would miss its window is the
/// autoscaler's (`Reason::BatchWindow`), on whatever is cheapest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSpot {
    pub max_replicas: u32,
    pub price_share: f64,
    pub work: Duration,
}

impl Default for BatchSpot {
    fn default() -> Self {
        BatchSpot::from(&strata_core::config::PoolConfig::default())
    }
}

impl From<&strata_core::config::PoolConfig> for BatchSpot {
    fn from(p: &strata_core::config::PoolConfig) -> Self {
        BatchSpot {
            max_replicas: p.batch_spot_max_replicas,
            price_share: p.batch_spot_price_share,
            work: Duration::from_secs_f64(p.batch_spot_work_secs.max(1.0)),
        }
    }
}

impl PoolSpec {
    /// The pool of `strata.toml`: its allowed offers, autoscaling when
    /// `pool.autoscale`, else `fixed_replicas` replicas.
    pub fn from_config(config: &Config, fixed_replicas: u32) -> Self {
        let offers: Vec<(Offering, InstanceType)> = config
            .pool_offerings()
            .into_iter()
            .filter_map(|o| {
                Some((
                    o.clone(),
                    config.instance_types.get(&o.instance_type)?.clone(),
                ))
            })
            .collect();
        let unit = config
            .unit_type()
            .map(|(_, t)| t.clone())
            .unwrap_or_default();
        PoolSpec {
            name: "default".into(),
            offers,
            unit,
            scale: config
                .pool
                .autoscale
                .then(|| ScalePolicy::from(&config.pool)),
            fixed_replicas,
            spot_hedge: config.pool.spot_hedge,
            spot_cooldown: Duration::from_secs_f64(config.pool.spot_cooldown_secs),
            spot_zone_premium: config.pool.spot_zone_premium,
            spot_max_zone_share: config.pool.spot_max_zone_share,
            spot_risk_window: Duration::from_secs_f64(config.pool.spot_risk_window_secs),
            notice: Duration::from_secs_f64(config.pool.preemption_notice_secs),
            preemption_drain: config
                .pool
                .preemption_drain_secs
                .map(Duration::from_secs_f64),
            slots_per_replica: config.gateway.slots_per_replica,
            batch_spot: BatchSpot::from(&config.pool),
        }
    }

    /// Replicas to start with: none when the pool scales from zero.
    pub fn initial_replicas(&self) -> u32 {
        match &self.scale {
            Some(p) if p.scale_to_zero_after.is_some() => 0,
            Some(p) => p.min_replicas,
            None => self.fixed_replicas,
        }
    }
}

/// A replica's capacity as measured: tokens served per replica-second
/// while every slot was busy or requests waited (so the pool served all
/// it could), over the last `KEPT` such moments; the profile's figure until
/// there are enough. Streamed output counts as it passes, but prompts and
/// unstreamed answers count when their requests end, so one second can
/// hold a lump of them: the ratio of sums over minutes of saturation
/// measures what an average of per-second rates would overstate. The first
/// `SETTLE` of each saturated stretch is left out: the requests that fill
/// the slots end only later, so its tokens read low.
#[derive(Debug, Clone, Default)]
pub struct CapacityMeter {
    /// (tokens, replica-seconds) of each saturated moment, oldest first.
    samples: VecDeque<(f64, f64)>,
    saturated_since: Option<Duration>,
}

impl CapacityMeter {
    const ENOUGH: usize = 10;
    const KEPT: usize = 300;
    const SETTLE: Duration = Duration::from_secs(60);

    /// What the pool served since the last observation, and whether every
    /// slot was busy (or requests waited) at `now`.
    pub fn observe(&mut self, now: Duration, saturated: bool, tokens: f64, replica_seconds: f64) {
        if !saturated {
            self.saturated_since = None;
            return;
        }
        let since = *self.saturated_since.get_or_insert(now);
        if now.saturating_sub(since) >= Self::SETTLE {
            self.sample(tokens, replica_seconds);
        }
    }

    /// `tokens` served by `replica_seconds` of replicas (replicas × seconds).
    pub fn sample(&mut self, tokens: f64, replica_seconds: f64) {
        if !(tokens.is_finite()
            && tokens >= 0.0
            && replica_seconds.is_finite()
            && replica_seconds > 0.0)
        {
            return;
        }
        if self.samples.len() == Self::KEPT {
            self.samples.pop_front();
        }
        self.samples.push_back((tokens, replica_seconds));
    }

    /// The measured capacity once there are enough samples (kept within a
    /// factor of 4 of the profile, against a mis-measurement), else `profile`.
    pub fn capacity(&self, profile: f64) -> f64 {
        let (tokens, time) = self
            .samples
            .iter()
            .fold((0.0, 0.0), |(t, s), (k, r)| (t + k, s + r));
        if self.measured() && profile > 0.0 && tokens > 0.0 {
            (tokens / time).clamp(profile / 4.0, profile * 4.0)
        } else {
            profile
        }
    }

    pub fn measured(&self) -> bool {
        self.samples.len() >= Self::ENOUGH
    }
}

/// Tokens per request, from the requests that ended over the last
/// `WINDOW` (tokens served over requests done), kept when too few ended to
/// tell. While requests wait, the tokens served are what the replicas could
/// do, not what was asked: arrivals × tokens per request is the demand then.
#[derive(Debug, Clone, Default)]
pub struct RequestSize {
    /// (time, tokens served, requests done) at each observation, oldest first.
    history: VecDeque<(Duration, u64, u64)>,
    tokens_per_request: Option<f64>,
}

impl RequestSize {
    const WINDOW: Duration = Duration::from_secs(300);
    /// Requests that must have ended within the window to update the figure.
    const ENOUGH: u64 = 10;

    pub fn observe(&mut self, now: Duration, load: &Load) {
        let done = load
            .requests_total
            .saturating_sub((load.in_flight + load.waiting) as u64);
        while self
            .history
            .front()
            .is_some_and(|(at, _, _)| now.saturating_sub(*at) > Self::WINDOW)
        {
            self.history.pop_front();
        }
        self.history.push_back((now, load.tokens_total, done));
        if let Some((_, tokens, requests)) = self.history.front() {
            let ended = done.saturating_sub(*requests);
            if ended >= Self::ENOUGH {
                let tokens = load.tokens_total.saturating_sub(*tokens);
                self.tokens_per_request = Some(tokens as f64 / ended as f64);
            }
        }
    }

    pub fn tokens_per_request(&self) -> Option<f64> {
        self.tokens_per_request
    }
}

/// One step's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub signal: Signal,
    pub decision: Option<Decision>,
    /// Units of the pool's first instance type wanted.
    pub desired: u32,
    pub spot_zones: BTreeSet<String>,
    /// Zones held to the hedge for a recent reclaim (`risky_zones`).
    pub risky_zones: BTreeSet<String>,
    /// The plan: the autoscaler's count, then the batch's spot.
    pub plan: Plan,
    /// Of the plan's replicas, spot added for the batch backlog; and as
    /// many in the step before.
    pub batch_spot: u32,
    pub batch_spot_before: u32,
}

#[derive(Debug, Clone, Copy)]
struct Cooling {
    holding: u32,
    at: Duration,
    /// `spot_cooldown`, doubled for each reclaim that comes within two of
    /// them of the last (a stormy zone), at most 16 times.
    cooldown: Duration,
}

pub struct Controller {
    spec: PoolSpec,
    scaler: Option<Autoscaler>,
    desired: u32,
    /// Zone → how many spot replicas it held after it last reclaimed one
    /// or refused a launch, when, and for how long that holds.
    preempted: BTreeMap<String, Cooling>,
    /// On-demand offers that refused a launch (no capacity there), with
    /// what each held then and when.
    short: BTreeMap<Slot, (u32, Duration)>,
    prompt_share: f64,
    meter: CapacityMeter,
    size: RequestSize,
    last: Option<(Duration, Load)>,
    /// Spot replicas running by zone, as the provider last listed them.
    spot_held: BTreeMap<String, u32>,
    /// Spot replicas the last step added for the batch backlog.
    batch_spot: u32,
}

impl Controller {
    pub fn new(spec: PoolSpec) -> Self {
        Controller {
            scaler: spec.scale.clone().map(Autoscaler::new),
            desired: spec.initial_replicas(),
            spec,
            preempted: BTreeMap::new(),
            short: BTreeMap::new(),
            prompt_share: 0.5,
            meter: CapacityMeter::default(),
            size: RequestSize::default(),
            last: None,
            spot_held: BTreeMap::new(),
            batch_spot: 0,
        }
    }

    pub fn desired(&self) -> u32 {
        self.desired
    }

    /// `zone` reclaimed a spot replica (or refused a launch) at `now`,
    /// leaving `holding` spot replicas there: for the cooldown it gets no
    /// more than that. A zone that reclaims again soon after its cooldown
    /// cools down twice as long (up to 16 times `spot_cooldown`): spot
    /// that is launched only to be reclaimed costs a launch and a notice
    /// of billing for nothing.
    pub fn preempted(&mut self, zone: &str, holding: u32, now: Duration) {
        let base = self.spec.spot_cooldown;
        let cooldown = match self.preempted.get(zone) {
            Some(c) if now.saturating_sub(c.at) < 2 * c.cooldown => {
                if now.saturating_sub(c.at) < c.cooldown {
                    // The same storm (several replicas reclaimed together).
                    c.cooldown
                } else {
                    (c.cooldown * 2).min(base * 16)
                }
            }
            _ => base,
        };
        self.preempted.insert(
            zone.to_owned(),
            Cooling {
                holding,
                at: now,
                cooldown,
            },
        );
    }

    /// Spot room by zone: no limit, or at most what a zone held after it
    /// last reclaimed or refused, during the cooldown.
    pub fn spot_room(&self, now: Duration) -> SpotRoom {
        self.spec
            .offers
            .iter()
            .filter(|(o, _)| o.capacity == CapacityType::Spot)
            .map(|(o, _)| {
                let limit = self
                    .preempted
                    .get(&o.zone)
                    .filter(|c| now.saturating_sub(c.at) < c.cooldown)
                    .map(|c| c.holding);
                (o.zone.clone(), limit)
            })
            .collect()
    }

    /// Zones that reclaimed a spot replica (or refused a launch) within
    /// `spot_risk_window` and whose spot launches slower than the notice
    /// (a type without `launch_secs` counts as slower): a reclaim there
    /// takes its replicas before any replacement can be ready. Each holds
    /// at most the hedge (`PlanPolicy::spot_risky`).
    pub fn risky_zones(&self, now: Duration) -> BTreeSet<String> {
        if self.spec.spot_risk_window.is_zero() {
            return BTreeSet::new();
        }
        let slow = |zone: &str| {
            self.spec.offers.iter().any(|(o, t)| {
                o.zone == zone
                    && o.capacity == CapacityType::Spot
                    && t.launch_secs
                        .is_none_or(|s| s > self.spec.notice.as_secs_f64())
            })
        };
        self.preempted
            .iter()
            .filter(|(zone, c)| now.saturating_sub(c.at) < self.spec.spot_risk_window && slow(zone))
            .map(|(zone, _)| zone.clone())
            .collect()
    }

    /// An on-demand `slot` refused a launch at `now` while the pool held
    /// `holding` replicas there: for `spot_cooldown` it gets no more than
    /// that, and the planner covers the rest with other on-demand offers.
    pub fn on_demand_refused(&mut self, slot: &Slot, holding: u32, now: Duration) {
        self.short.insert(slot.clone(), (holding, now));
    }

    /// The on-demand offers still cooling after a refusal, each with the
    /// replicas it may hold.
    fn on_demand_room(&self, now: Duration) -> BTreeMap<Slot, u32> {
        self.short
            .iter()
            .filter(|(_, (_, at))| now.saturating_sub(*at) < self.spec.spot_cooldown)
            .map(|(slot, (holding, _))| (slot.clone(), *holding))
            .collect()
    }

    /// Zones where spot can be had now (room above zero).
    pub fn spot_zones(&self, now: Duration) -> BTreeSet<String> {
        self.spot_room(now)
            .into_iter()
            .filter(|(_, room)| *room != Some(0))
            .map(|(z, _)| z)
            .collect()
    }

    /// The offers with the tokens per second each serves at the current mix.
    pub fn offers(&self) -> Vec<Offer> {
        let unit_profile = self.spec.unit.tokens_per_s(self.prompt_share);
        let scale = self.meter.capacity(unit_profile) / unit_profile.max(f64::MIN_POSITIVE);
        self.spec
            .offers
            .iter()
            .map(|(o, t)| {
                let mut offer = Offer::priced(o, t, self.prompt_share);
                // A measured capacity corrects every profile alike.
                offer.tokens_per_s *= scale;
                offer
            })
            .collect()
    }

    /// Turns the gateway's load at `now` into a signal: demand and mix
    /// from the token counters since the last call (while requests wait,
    /// at least the arrivals × tokens per request), capacity measured
    /// while the pool was saturated.
    pub fn signal(&mut self, now: Duration, load: &Load) -> Signal {
        self.size.observe(now, load);
        let (served, demand, dt) = match &self.last {
            Some((at, prev)) if now > *at => {
                let dt = (now - *at).as_secs_f64();
                let tokens = load.tokens_total.saturating_sub(prev.tokens_total) as f64;
                let prompt = load
                    .prompt_tokens_total
                    .saturating_sub(prev.prompt_tokens_total) as f64;
                if tokens > 0.0 {
                    self.prompt_share = 0.8 * self.prompt_share + 0.2 * (prompt / tokens);
                }
                let served = tokens / dt;
                // Served tokens read what the replicas could do while
                // requests wait (nothing at all while none is ready).
                let asked = match self.size.tokens_per_request() {
                    Some(size) if load.waiting > 0 => {
                        load.requests_total.saturating_sub(prev.requests_total) as f64 * size / dt
                    }
                    _ => 0.0,
                };
                (served, served.max(asked), dt)
            }
            _ => (0.0, 0.0, 0.0),
        };
        let slots = self.spec.slots_per_replica as usize;
        let full = slots > 0 && load.in_flight >= load.routable * slots;
        let saturated = (load.waiting > 0 || full) && load.routable > 0;
        if dt > 0.0 {
            self.meter
                .observe(now, saturated, served * dt, load.routable as f64 * dt);
        }
        self.last = Some((now, *load));
        let unit_profile = self.spec.unit.tokens_per_s(self.prompt_share);
        Signal {
            at: now,
            demand_tokens_per_s: demand,
            in_flight: load.in_flight as u32,
            queued: load.waiting as u32,
            batch_lines: load.batch_lines as u32,
            batch_tokens_per_s: load.batch_tokens_per_s,
            batch_backlog_tokens: load.batch_backlog_tokens,
            capacity_per_replica: self.meter.capacity(unit_profile),
            slots_per_replica: self.spec.slots_per_replica,
            ttft_p95_ms: load.ttft_p95_ms,
            tpot_p95_ms: load.tpot_p95_ms,
            ready: Some(load.routable as u32),
        }
    }

    /// One control step at `now`: the decision (when autoscaling) and the plan.
    pub fn step(&mut self, now: Duration, load: &Load) -> Step {
        let signal = self.signal(now, load);
        let decision = self.scaler.as_mut().map(|s| {
            s.observe(signal);
            s.decide(now, self.desired)
        });
        if let Some(d) = &decision {
            self.desired = d.desired;
        }
        let spot_zones = self.spot_zones(now);
        let room = self.spot_room(now);
        let needed = f64::from(self.desired) * signal.capacity_per_replica;
        // The autoscaler already kept min/max; the planner only keeps one
        // replica while there is any demand.
        let policy = PlanPolicy {
            allow_spot: true,
            allow_on_demand: true,
            spot_hedge: self.spec.spot_hedge,
            min_replicas: 1,
            spot_zone_premium: self.spec.spot_zone_premium,
            spot_held: self.spot_held.clone(),
            spot_max_zone_share: self.spec.spot_max_zone_share,
            spot_risky: self.risky_zones(now),
            on_demand_room: self.on_demand_room(now),
        };
        let risky_zones = policy.spot_risky.clone();
        // Units of the profile's capacity: the plan's replicas of the unit
        // type match the count (no rounding up by a hair).
        let offers = self.offers();
        let mut plan = plan(needed * (1.0 - 1e-9), &offers, &room, &policy);
        let batch_spot = self.add_batch_spot(&mut plan, &signal, &offers, &room, &policy);
        let batch_spot_before = std::mem::replace(&mut self.batch_spot, batch_spot);
        Step {
            signal,
            decision,
            desired: self.desired,
            spot_zones,
            risky_zones,
            plan,
            batch_spot,
            batch_spot_before,
        }
    }

    /// Adds to `plan` the spot replicas `BatchSpot` allows for the batch
    /// backlog (in the zones' room the plan leaves); how many.
    fn add_batch_spot(
        &self,
        plan: &mut Plan,
        signal: &Signal,
        offers: &[Offer],
        room: &SpotRoom,
        policy: &PlanPolicy,
    ) -> u32 {
        let b = self.spec.batch_spot;
        let per_replica = signal.capacity_per_replica * b.work.as_secs_f64();
        if b.max_replicas == 0 || per_replica <= 0.0 {
            return 0;
        }
        // `max` with 0 also turns a forged NaN into none.
        let wanted = (signal.batch_backlog_tokens.max(0.0) / per_replica)
            .floor()
            .min(f64::from(b.max_replicas)) as u32;
        if wanted == 0 {
            return 0;
        }
        let limit = cheapest(offers, CapacityType::OnDemand, None)
            .map(|o| o.dollars_per_token_rate() * b.price_share);
        let cheap: Vec<Offer> = offers
            .iter()
            .filter(|o| o.capacity == CapacityType::Spot)
            .filter(|o| limit.is_none_or(|l| o.dollars_per_token_rate() <= l))
            .cloned()
            .collect();
        // What the plan's own spot leaves of each zone's room, and of the
        // replicas it holds there.
        let mut left = room.clone();
        let mut held = policy.spot_held.clone();
        for s in plan
            .replicas
            .iter()
            .filter(|s| s.capacity == CapacityType::Spot)
        {
            if let Some(Some(n)) = left.get_mut(&s.zone) {
                *n = n.saturating_sub(1);
            }
            if let Some(n) = held.get_mut(&s.zone) {
                *n = n.saturating_sub(1);
            }
        }
        let extra = crate::planner::plan(
            f64::from(wanted) * signal.capacity_per_replica * (1.0 - 1e-9),
            &cheap,
            &left,
            &PlanPolicy {
                allow_on_demand: false,
                spot_hedge: 0,
                min_replicas: 0,
                spot_held: held,
                ..policy.clone()
            },
        );
        plan.cost_per_hour += extra.cost_per_hour;
        plan.tokens_per_s += extra.tokens_per_s;
        let added = extra.replicas.len() as u32;
        plan.replicas.extend(extra.replicas);
        added
    }
}

/// A controller advanced by `tick` on any clock against a provider: the
/// live loop (`run`) and the simulator drive the same code.
pub struct Driver {
    pub controller: Controller,
    target: Plan,
    next_step: Option<Duration>,
    /// How long a slot waits after failed starts before it is launched
    /// into again.
    pub start_backoff: StartBackoff,
    /// Slots whose replicas failed to start, in a row: how many, and when
    /// the next launch into the slot may go.
    failed_starts: BTreeMap<Slot, (u32, Duration)>,
    /// The provider's instances after the last tick: a failed one's slot,
    /// and whether it had served.
    known: BTreeMap<String, (Slot, bool)>,
    /// Replicas that failed before they were ever ready, since the start.
    failed_start_count: u64,
}

/// The wait after a replica fails to start (exits, or is given up before
/// it is ready), before its slot is launched into again: `first`, doubled
/// with each failure in a row up to `max`, forgotten once a replica of
/// the slot is ready (Kubernetes backs off a crashing container alike,
/// 10 s to 5 min). Without it a replica that cannot start (an image that
/// cannot be pulled, a model that will not load, a flag the engine
/// refuses) is relaunched at once, again and again, each try billed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StartBackoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for StartBackoff {
    fn default() -> Self {
        StartBackoff {
            first: Duration::from_secs(10),
            max: Duration::from_secs(300),
        }
    }
}

impl StartBackoff {
    /// The wait after `failures` failed starts in a row (at least one).
    pub fn wait(&self, failures: u32) -> Duration {
        let doubled = self
            .first
            .saturating_mul(1 << failures.saturating_sub(1).min(20));
        doubled.min(self.max)
    }
}

/// What a tick that ran a control step decided.
pub struct Ticked {
    pub step: Step,
    /// The count or the mix changed (worth a log line and a stored decision).
    pub changed: bool,
    pub previous: Plan,
}

impl Driver {
    pub fn new(controller: Controller) -> Self {
        Driver {
            controller,
            target: Plan::default(),
            next_step: None,
            start_backoff: StartBackoff::default(),
            failed_starts: BTreeMap::new(),
            known: BTreeMap::new(),
            failed_start_count: 0,
        }
    }

    /// Replicas that failed before they were ever ready, since the start.
    pub fn failed_starts(&self) -> u64 {
        self.failed_start_count
    }

    /// Slots not launched into at `now`: their wait after failed starts
    /// has not ended.
    pub fn held_back(&self, now: Duration) -> BTreeSet<Slot> {
        self.failed_starts
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(slot, _)| slot.clone())
            .collect()
    }

    /// A replica that failed before it was ready holds its slot back;
    /// one that is ready clears it.
    fn started_or_not(&mut self, event: &ProviderEvent, now: Duration) {
        match event {
            ProviderEvent::Failed { id, detail } => {
                let Some((slot, false)) = self.known.get(id) else {
                    return;
                };
                self.failed_start_count += 1;
                let (failures, until) = self.failed_starts.entry(slot.clone()).or_default();
                *failures += 1;
                let wait = self.start_backoff.wait(*failures);
                *until = now + wait;
                tracing::warn!(
                    instance = %id,
                    instance_type = %slot.instance_type,
                    zone = %slot.zone,
                    failures = *failures,
                    wait_secs = wait.as_secs_f64(),
                    %detail,
                    "a replica failed to start; its slot waits before the next launch"
                );
            }
            ProviderEvent::Ready { id } => {
                if let Some((slot, _)) = self.known.get(id) {
                    self.failed_starts.remove(slot);
                }
            }
            _ => {}
        }
    }

    /// The plan the provider is being moved to.
    pub fn target(&self) -> &Plan {
        &self.target
    }

    /// Provider events; a control step when one is due (every second, or
    /// at once after a preemption or a sold-out zone); then the provider's
    /// instances are moved toward the plan.
    pub async fn tick<P: Provider>(
        &mut self,
        provider: &mut P,
        now: Duration,
        load: &Load,
    ) -> Option<Ticked> {
        for event in provider.poll().await {
            self.started_or_not(&event, now);
            if let ProviderEvent::Preempting { slot, .. } | ProviderEvent::Unavailable { slot } =
                &event
            {
                if slot.capacity == CapacityType::Spot {
                    // What the zone still holds (the reclaimed replica has left the list).
                    let holding = spot_by_zone(&provider.list())
                        .get(&slot.zone)
                        .copied()
                        .unwrap_or(0);
                    self.controller.preempted(&slot.zone, holding, now);
                } else if matches!(event, ProviderEvent::Unavailable { .. }) {
                    // An on-demand offer that refused, and what it still holds.
                    let holding = provider.list().iter().filter(|i| &i.slot == slot).count();
                    self.controller.on_demand_refused(slot, holding as u32, now);
                }
                // Plan again at once: the zone is out, the replacement goes elsewhere.
                self.next_step = None;
            }
            tracing::debug!(?event, "provider event");
        }
        let mut ticked = None;
        if self.next_step.is_none_or(|t| now >= t) {
            self.next_step = Some(now + Duration::from_secs(1));
            self.controller.spot_held = spot_by_zone(&provider.list());
            let step = self.controller.step(now, load);
            let count_changed = step
                .decision
                .is_some_and(|d| d.desired != d.current || d.reason == Reason::FromZero);
            let mix_changed = mix(&step.plan) != mix(&self.target);
            let changed = count_changed || (mix_changed && !self.target.replicas.is_empty());
            let previous = std::mem::replace(&mut self.target, step.plan.clone());
            ticked = Some(Ticked {
                step,
                changed,
                previous,
            });
        }
        let held = self.held_back(now);
        converge(provider, &self.target, &self.controller.offers(), &held).await;
        self.known = provider
            .list()
            .into_iter()
            .map(|i| (i.id, (i.slot, i.ready)))
            .collect();
        ticked
    }
}

/// Runs the pool until `shutdown`: a tick every 250 ms; decisions that
/// change the replica count or the plan's mix are logged and stored (and
/// counted in `metrics`, which also follows the replicas and their cost).
/// Stops every instance at the end.
pub async fn run<P: Provider>(
    controller: Controller,
    mut provider: P,
    load: watch::Receiver<Load>,
    store: Arc<dyn DecisionStore>,
    metrics: Option<Arc<ControllerMetrics>>,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut driver = Driver::new(controller);
    let mut last = started;
    let mut failed_seen = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let l = *load.borrow();
        let ticked = driver.tick(&mut provider, started.elapsed(), &l).await;
        let pool = driver.controller.spec.name.as_str();
        if let Some(t) = &ticked {
            if t.changed {
                record(&*store, &driver.controller, &t.step, &l, &t.previous).await;
                if let Some(m) = &metrics {
                    m.decided(pool, &t.step.change().2);
                }
            }
        }
        if let Some(m) = &metrics {
            let now = tokio::time::Instant::now();
            m.observe(
                pool,
                &provider.list(),
                driver.target().replicas.len(),
                &driver.controller.offers(),
                now - last,
            );
            let failed = driver.failed_starts();
            m.starts(
                pool,
                failed - failed_seen,
                driver.held_back(started.elapsed()).len(),
            );
            failed_seen = failed;
            last = now;
        }
    }
    provider.shutdown().await;
    if let Some(m) = &metrics {
        // This copy holds nothing now (a standby, or stopping).
        m.stopped(&driver.controller.spec.name);
    }
    Ok(())
}

/// Spot instances by zone.
fn spot_by_zone(instances: &[Instance]) -> BTreeMap<String, u32> {
    let mut held = BTreeMap::new();
    for i in instances
        .iter()
        .filter(|i| i.slot.capacity == CapacityType::Spot)
    {
        *held.entry(i.slot.zone.clone()).or_default() += 1;
    }
    held
}

/// The plan's replicas by slot, for noticing a change of mix.
fn mix(plan: &Plan) -> BTreeMap<&Slot, usize> {
    let mut m = BTreeMap::new();
    for s in &plan.replicas {
        *m.entry(s).or_default() += 1;
    }
    m
}

/// Makes the provider's instances match `target`: launches what is
/// missing, but not into a `held` slot (failed starts); lets extras go
/// only when nothing is starting or waiting to launch.
async fn converge<P: Provider>(
    provider: &mut P,
    target: &Plan,
    offers: &[Offer],
    held: &BTreeSet<Slot>,
) {
    let running = provider.list();
    let slots: Vec<Slot> = running.iter().map(|i| i.slot.clone()).collect();
    let change = diff(&slots, target);
    for slot in change.launch.iter().filter(|s| !held.contains(*s)) {
        let Some(offer) = offers.iter().find(|o| Slot::from(*o) == *slot) else {
            continue;
        };
        if let Err(e) = provider.launch(offer).await {
            tracing::error!(error = %e, "cannot launch a replica");
        }
    }
    if !change.launch.is_empty() || running.iter().any(|i| !i.ready) {
        return;
    }
    let mut taken = BTreeSet::new();
    for slot in &change.terminate {
        // The least busy replica of that kind goes first (the newest when
        // the provider cannot tell): its requests have the least to lose.
        let least_busy = running
            .iter()
            .rev()
            .filter(|i| i.slot == *slot && !taken.contains(&i.id))
            .min_by(|a, b| a.busy.unwrap_or(0.0).total_cmp(&b.busy.unwrap_or(0.0)));
        if let Some(i) = least_busy {
            taken.insert(i.id.clone());
            let why = if target.replicas.len() < running.len() {
                "scaled down"
            } else {
                "replaced by a cheaper or available offer"
            };
            provider.terminate(&i.id, why).await;
        }
    }
}

impl Step {
    /// What changed, as stored: replicas from, to, and the reason (`replan`
    /// for a change of mix at the same count, `batch_spot` for spot added
    /// or let go for the batch backlog, counted with the autoscaler's).
    pub fn change(&self) -> (u32, u32, String) {
        let (from, to, reason) = match &self.decision {
            Some(d) if d.desired != d.current || d.reason == Reason::FromZero => {
                (d.current, d.desired, d.reason)
            }
            _ if self.batch_spot != self.batch_spot_before => {
                return (
                    self.desired + self.batch_spot_before,
                    self.desired + self.batch_spot,
                    "batch_spot".into(),
                );
            }
            _ => (self.desired, self.desired, Reason::Hold),
        };
        let reason = match reason {
            Reason::Hold => "replan".to_owned(),
            r => serde_json::to_value(r)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        };
        (from, to, reason)
    }
}

async fn record(
    store: &dyn DecisionStore,
    c: &Controller,
    step: &Step,
    load: &Load,
    before: &Plan,
) {
    let (from, to, reason) = step.change();
    let d = step.decision;
    let inputs = serde_json::json!({
        "stable_demand_tokens_per_s": d.map(|d| d.stable_demand),
        "panic_demand_tokens_per_s": d.map(|d| d.panic_demand),
        "planned_tokens_per_s_per_replica": d.map(|d| d.planned_per_replica),
        "capacity_tokens_per_s_per_replica": step.signal.capacity_per_replica,
        "capacity_measured": c.meter.measured(),
        "prompt_share": c.prompt_share,
        "in_flight": load.in_flight,
        "waiting": load.waiting,
        "batch_lines": load.batch_lines,
        "batch_tokens_per_s": load.batch_tokens_per_s,
        "batch_backlog_tokens": load.batch_backlog_tokens,
        "batch_spot_replicas": step.batch_spot,
        // Which class's work drove the step: batch lines alone hold one
        // replica, a batch that would miss its window adds what it needs,
        // a backlog adds spot; anything else is interactive demand.
        "class": if reason == "batch_spot"
            || d.is_some_and(|d| d.reason == Reason::BatchWindow)
            || load.in_flight == 0 && load.waiting == 0 && load.batch_lines > 0
            && d.is_none_or(|d| d.stable_demand <= 0.0 && d.panic_demand <= 0.0)
        {
            "batch"
        } else {
            "interactive"
        },
        "routable_replicas": load.routable,
        "ttft_p95_ms": load.ttft_p95_ms,
        "tpot_p95_ms": load.tpot_p95_ms,
        "spot_zones": step.spot_zones,
        "spot_risky_zones": step.risky_zones,
        "plan": step.plan.replicas,
        "plan_cost_per_hour": step.plan.cost_per_hour,
        "previous_cost_per_hour": before.cost_per_hour,
    });
    tracing::info!(from, to, %reason, cost_per_hour = step.plan.cost_per_hour, %inputs, "controller decision");
    let record = DecisionRecord {
        at_ms: strata_core::now_ms(),
        pool: c.spec.name.clone(),
        from_replicas: from,
        to_replicas: to,
        reason,
        inputs: inputs.to_string(),
    };
    if let Err(e) = store.record_decision(&record).await {
        tracing::warn!(error = %e, "cannot store a controller decision");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_start_waits_ten_seconds_doubling_to_five_minutes() {
        let b = StartBackoff::default();
        let waits: Vec<u64> = (1..=7).map(|n| b.wait(n).as_secs()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(b.wait(u32::MAX), Duration::from_secs(300));
        assert_eq!(b.wait(0), Duration::from_secs(10));
    }

    fn profile(decode: f64) -> InstanceType {
        InstanceType {
            threads: 1,
            prefill_tokens_per_s: 1000.0,
            decode_tokens_per_s: vec![decode],
            launch_secs: None,
            gpus: 0,
        }
    }

    fn offering(t: &str, zone: &str, cap: CapacityType, price: f64) -> Offering {
        Offering {
            instance_type: t.into(),
            zone: zone.into(),
            capacity: cap,
            price_per_hour: price,
        }
    }

    /// One type in zones a and b, spot at a third of on-demand.
    fn spec(scale: Option<ScalePolicy>) -> PoolSpec {
        let t = profile(100.0);
        let mut offers = Vec::new();
        for z in ["a", "b"] {
            offers.push((offering("small", z, CapacityType::Spot, 0.1), t.clone()));
            offers.push((offering("small", z, CapacityType::OnDemand, 0.3), t.clone()));
        }
        PoolSpec {
            name: "default".into(),
            offers,
            unit: t,
            scale,
            fixed_replicas: 2,
            spot_hedge: 0,
            spot_cooldown: Duration::from_secs(300),
            spot_zone_premium: 0.25,
            spot_max_zone_share: 1.0,
            spot_risk_window: Duration::ZERO,
            notice: Duration::from_secs(30),
            preemption_drain: None,
            slots_per_replica: 4,
            batch_spot: BatchSpot::default(),
        }
    }

    #[test]
    fn a_batch_backlog_adds_spot_while_spot_is_cheap_and_has_room_and_never_on_demand() {
        let mut c = Controller::new(PoolSpec {
            batch_spot: BatchSpot {
                max_replicas: 3,
                price_share: 0.5,
                work: Duration::from_secs(900),
            },
            ..spec(None)
        });
        // A replica's full-load work over 900 s.
        let work = c.offers()[0].tokens_per_s * 900.0;
        let backlog = |tokens: f64| Load {
            batch_lines: 32,
            batch_backlog_tokens: tokens,
            ..load(0)
        };
        let mut t = 0;
        let mut step = |c: &mut Controller, l: &Load| {
            t += 1;
            c.step(Duration::from_secs(t), l)
        };
        // Less than one replica's worth: nothing added.
        let s = step(&mut c, &backlog(0.9 * work));
        assert_eq!((s.batch_spot, s.plan.replicas.len()), (0, 2));
        // Two and a half: two more, spot (a third of on demand's price).
        let s = step(&mut c, &backlog(2.5 * work));
        assert_eq!(s.batch_spot, 2);
        assert_eq!(count(&s.plan, CapacityType::Spot), 4, "{:?}", s.plan);
        assert_eq!(s.change(), (2, 4, "batch_spot".into()));
        // A big backlog: at most max_replicas.
        let s = step(&mut c, &backlog(100.0 * work));
        assert_eq!((s.batch_spot, s.plan.replicas.len()), (3, 5));
        // A forged or garbled backlog adds nothing.
        for bad in [f64::NAN, -1e12] {
            assert_eq!(step(&mut c, &backlog(bad)).batch_spot, 0);
        }
        // Both zones out of spot: the pool's own replicas go on demand,
        // the backlog's do not.
        c.preempted("a", 0, Duration::ZERO);
        c.preempted("b", 0, Duration::ZERO);
        let s = step(&mut c, &backlog(100.0 * work));
        assert_eq!(s.batch_spot, 0);
        assert_eq!(count(&s.plan, CapacityType::OnDemand), 2, "{:?}", s.plan);
        assert_eq!(count(&s.plan, CapacityType::Spot), 0, "{:?}", s.plan);
        // Spot dearer than the share of on demand allows: none either.
        let mut dear = Controller::new(PoolSpec {
            batch_spot: BatchSpot {
                max_replicas: 3,
                price_share: 0.3,
                work: Duration::from_secs(900),
            },
            ..spec(None)
        });
        let s = step(&mut dear, &backlog(100.0 * work));
        assert_eq!((s.batch_spot, s.plan.replicas.len()), (0, 2));
    }

    fn load(tokens: u64) -> Load {
        Load {
            tokens_total: tokens,
            routable: 1,
            ..Load::default()
        }
    }

    fn count(plan: &Plan, cap: CapacityType) -> usize {
        plan.replicas.iter().filter(|s| s.capacity == cap).count()
    }

    #[test]
    fn a_fixed_pool_runs_spot_across_zones_then_on_demand_while_both_zones_reclaim() {
        let mut c = Controller::new(spec(None));
        let s = c.step(Duration::ZERO, &load(0));
        assert_eq!(count(&s.plan, CapacityType::Spot), 2);
        let zones: BTreeSet<&str> = s.plan.replicas.iter().map(|r| r.zone.as_str()).collect();
        assert_eq!(zones.len(), 2, "spread: {:?}", s.plan);
        // A storm in zone a: both spot replicas go to b.
        c.preempted("a", 0, Duration::from_secs(10));
        let s = c.step(Duration::from_secs(11), &load(0));
        assert!(s
            .plan
            .replicas
            .iter()
            .all(|r| r.zone == "b" && r.capacity == CapacityType::Spot));
        // Then b reclaims too: on-demand carries the pool.
        c.preempted("b", 0, Duration::from_secs(20));
        let s = c.step(Duration::from_secs(21), &load(0));
        assert_eq!(count(&s.plan, CapacityType::OnDemand), 2);
        // After the cooldown spot is back, and the diff replaces on-demand.
        let s2 = c.step(Duration::from_secs(400), &load(0));
        assert_eq!(count(&s2.plan, CapacityType::Spot), 2);
        let change = diff(&s.plan.replicas, &s2.plan);
        assert!(change
            .launch
            .iter()
            .all(|s| s.capacity == CapacityType::Spot));
        assert!(change
            .terminate
            .iter()
            .all(|s| s.capacity == CapacityType::OnDemand));
    }

    #[tokio::test]
    async fn scaling_down_lets_the_least_busy_replica_go() {
        use crate::provider::sim::{SimProvider, SimSettings};
        let mut cloud = SimProvider::new(SimSettings {
            spot: BTreeMap::new(),
            offset: Duration::ZERO,
            launch_delay: Duration::ZERO,
            launch_delays: Default::default(),
            notice: Duration::from_secs(60),
            drain: Duration::from_secs(30),
        });
        let c = Controller::new(spec(None));
        let offer = c
            .offers()
            .into_iter()
            .find(|o| o.capacity == CapacityType::Spot)
            .unwrap();
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(cloud.launch(&offer).await.unwrap());
        }
        cloud.poll().await;
        for (id, busy) in ids.iter().zip([500.0, 20.0, 900.0]) {
            cloud.set_busy(id, busy);
        }
        let keep_two = Plan {
            replicas: vec![Slot::from(&offer); 2],
            ..Plan::default()
        };
        converge(&mut cloud, &keep_two, &c.offers(), &BTreeSet::new()).await;
        let left: Vec<String> = cloud.list().into_iter().map(|i| i.id).collect();
        assert_eq!(left, [ids[0].clone(), ids[2].clone()]);
    }

    #[test]
    fn a_zone_that_reclaimed_lately_holds_no_more_than_the_hedge_where_a_reclaim_leaves_a_gap() {
        let risky = |launch_secs: Option<f64>| {
            let mut spec = PoolSpec {
                fixed_replicas: 4,
                spot_hedge: 1,
                spot_risk_window: Duration::from_secs(3600),
                ..spec(None)
            };
            for (_, t) in &mut spec.offers {
                t.launch_secs = launch_secs;
            }
            let mut c = Controller::new(spec);
            c.preempted("a", 0, Duration::ZERO);
            let in_a = |c: &mut Controller, t: u64| {
                let s = c.step(Duration::from_secs(t), &load(0));
                let spot = |z: &str| {
                    s.plan
                        .replicas
                        .iter()
                        .filter(|r| r.zone == z && r.capacity == CapacityType::Spot)
                        .count()
                };
                assert_eq!(s.plan.replicas.len(), 5, "{:?}", s.plan);
                // The step says which zone it held back, for the decision.
                let held: Vec<&str> = s.risky_zones.iter().map(String::as_str).collect();
                assert_eq!(held == ["a"], spot("a") == 1, "{held:?}");
                (spot("a"), spot("b"))
            };
            // After the cooldown (300 s), within the hour, and after it.
            (in_a(&mut c, 400), in_a(&mut c, 3700))
        };
        // Launches slower than the 30 s notice (or of unknown length): a
        // holds the hedge's one replica for the hour, b the rest; then
        // the spread is even again.
        assert_eq!(risky(Some(180.0)), ((1, 4), (3, 2)));
        assert_eq!(risky(None), ((1, 4), (3, 2)));
        // A replacement ready within the notice leaves no gap: no cap.
        assert_eq!(risky(Some(20.0)), ((3, 2), (3, 2)));
    }

    #[test]
    fn a_zone_that_keeps_reclaiming_cools_down_longer_each_time() {
        let mut c = Controller::new(spec(None));
        let out = |c: &Controller, t: u64| !c.spot_zones(Duration::from_secs(t)).contains("a");
        c.preempted("a", 0, Duration::from_secs(0));
        assert!(out(&c, 299) && !out(&c, 300));
        // Reclaimed again 400 s later (within two cooldowns): 600 s now.
        c.preempted("a", 0, Duration::from_secs(400));
        assert!(out(&c, 999) && !out(&c, 1000));
        // A second replica reclaimed in the same storm does not double it again.
        c.preempted("a", 0, Duration::from_secs(410));
        assert!(!out(&c, 1010));
        // Calm for long enough: back to the base cooldown.
        c.preempted("a", 0, Duration::from_secs(10_000));
        assert!(!out(&c, 10_300));
    }

    #[test]
    fn demand_scales_the_plan_and_the_prompt_share_sets_the_capacity() {
        let mut c = Controller::new(spec(Some(ScalePolicy {
            min_replicas: 1,
            max_replicas: 10,
            target_utilisation: 1.0,
            ..ScalePolicy::default()
        })));
        // Decode-only demand of 350 tokens/s at 100 tokens/s a replica: 4 replicas.
        let mut tokens = 0;
        let mut last = None;
        for t in 0..30 {
            let s = c.step(Duration::from_secs(t), &load(tokens));
            tokens += 350;
            last = Some(s);
        }
        let s = last.unwrap();
        assert!(
            (s.signal.capacity_per_replica - 100.0).abs() < 1.0,
            "{:?}",
            s.signal
        );
        assert_eq!(s.desired, 4);
        assert_eq!(s.plan.replicas.len(), 4);
        // All prompt tokens: a replica prefills 1000/s, so one is enough in the end.
        let mut c = Controller::new(spec(Some(ScalePolicy {
            target_utilisation: 1.0,
            scale_down_delay: Duration::ZERO,
            ..ScalePolicy::default()
        })));
        let mut l = load(0);
        for t in 0..120 {
            c.step(Duration::from_secs(t), &l);
            l.tokens_total += 350;
            l.prompt_tokens_total += 350;
        }
        assert!(c.prompt_share > 0.99);
        assert_eq!(c.desired(), 1);
    }

    #[test]
    fn while_requests_wait_demand_is_what_arrives_not_what_was_served() {
        let mut c = Controller::new(spec(Some(ScalePolicy {
            min_replicas: 1,
            max_replicas: 20,
            target_utilisation: 1.0,
            ..ScalePolicy::default()
        })));
        // Two requests a second of 150 tokens each, all served: 300 tokens/s.
        let mut l = load(0);
        l.routable = 3;
        for t in 0..120 {
            c.step(Duration::from_secs(t), &l);
            l.requests_total += 2;
            l.tokens_total += 300;
        }
        assert_eq!(c.desired(), 3);
        // The replicas are reclaimed: nothing is served while the same
        // requests keep arriving and wait. Served tokens would read zero
        // and let the pool shrink; the demand stays 300 tokens/s.
        l.routable = 0;
        for t in 120..400 {
            let s = c.step(Duration::from_secs(t), &l);
            l.requests_total += 2;
            l.waiting += 2;
            if t > 125 {
                assert!(
                    (s.signal.demand_tokens_per_s - 300.0).abs() < 1.0,
                    "{:?}",
                    s.signal
                );
            }
        }
        assert_eq!(c.desired(), 3);
    }

    #[test]
    fn capacity_is_measured_only_while_requests_wait() {
        let mut c = Controller::new(spec(None));
        let mut l = load(0);
        l.routable = 2;
        for t in 0..20 {
            c.step(Duration::from_secs(t), &l);
            l.tokens_total += 120; // 60 tokens/s a replica, but nobody waits
        }
        assert!(!c.meter.measured());
        // Requests wait from 20 s: the first minute of it is left out.
        l.waiting = 3;
        for t in 20..85 {
            c.step(Duration::from_secs(t), &l);
            l.tokens_total += 120;
        }
        assert!(!c.meter.measured());
        for t in 85..100 {
            c.step(Duration::from_secs(t), &l);
            l.tokens_total += 120;
        }
        assert!(c.meter.measured());
        let s = c.step(Duration::from_secs(100), &l);
        assert!(
            (s.signal.capacity_per_replica - 60.0).abs() < 5.0,
            "{:?}",
            s.signal
        );
    }

    #[test]
    fn lumps_of_tokens_from_requests_ending_together_do_not_inflate_the_capacity() {
        let mut m = CapacityMeter::default();
        // Two replicas serve 100 tokens/s each, but requests end in lumps:
        // 1,000 tokens every fifth second, nothing in between.
        for t in 0..200 {
            m.sample(if t % 5 == 4 { 1000.0 } else { 0.0 }, 2.0);
        }
        assert!((m.capacity(150.0) - 100.0).abs() < 1e-9);
        // A backlog clearing in one second (10x) moves it by a few percent.
        m.sample(2000.0, 2.0);
        let c = m.capacity(150.0);
        assert!(c > 100.0 && c < 110.0, "{c}");
    }
}
