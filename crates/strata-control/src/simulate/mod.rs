//! The simulator: a request trace replayed against a policy that sizes the
//! pool on the `sim` provider (virtual clock, spot availability from
//! recorded traces), with a gateway that queues requests FIFO and sends
//! each to the ready replica with the least work that has a free slot, and
//! replicas modelled with continuous batching (`replica`). Reclaimed or
//! let-go replicas drain; requests still running when one is gone start
//! over elsewhere (counted as restarted), or, where the policy's load
//! balancer has not noticed it gone (`Policy::routes_to_lost`), hang there
//! with whatever else it is sent until it does. Everything runs on the
//! virtual clock in steps of `dt`, so a run is deterministic.
//!
//! A Batch API backlog (`BatchBacklog`) can run beside the trace, as the
//! live gateway runs one: its lines take only the slots interactive
//! requests leave (a reserved share of the slots aside), the line that
//! has done least on the least busy replica is preempted (started over
//! later) when an interactive request waits (the live gateway takes the
//! newest: the same for lines of one size submitted together), at
//! most `lines_in_flight` hold slots at once, and its tokens are not
//! demand; the policy sees its lines, its pace and its backlog as the
//! live controller does.

pub mod baselines;
pub mod replica;
pub mod trace;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use strata_core::config::{CapacityType, InstanceType, Offering};
use strata_core::latency::LatencyWindow;
use strata_core::Load;

use crate::controller::{Controller, Driver, PoolSpec};
use crate::planner::Offer;
use crate::provider::sim::{SimProvider, SimSettings, SimView};
use crate::provider::Provider;
use replica::{Finished, ReplicaModel, Running, Served};
use trace::TraceRequest;

/// What to simulate: the trace, the catalog, the cloud, the objectives.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub trace: Vec<TraceRequest>,
    pub offers: Vec<(Offering, InstanceType)>,
    pub cloud: SimSettings,
    pub slo_ttft: Duration,
    pub dt: Duration,
    /// Before the trace, its first `warmup` is replayed once, unmeasured and
    /// unbilled, so every policy meets the trace warmed up.
    pub warmup: Duration,
    /// A Batch API backlog beside the trace.
    pub batch: Option<BatchBacklog>,
}

/// A batch of `lines` lines of one size, submitted `at` (trace time) with
/// `window` to finish, run as `gateway.batch_lines_in_flight` and
/// `gateway.batch_reserved_share` run one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchBacklog {
    pub at: Duration,
    pub lines: u32,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub window: Duration,
    pub lines_in_flight: u32,
    pub reserved_share: f64,
}

/// How a run's batch went.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BatchOutcome {
    pub lines: u32,
    pub finished: u32,
    /// Lines taken off a replica for an interactive request (or lost with
    /// their replica), started over.
    pub preempted: usize,
    /// Seconds from submission to its last line (None: not finished).
    pub done_after_s: Option<f64>,
    pub within_window: bool,
    /// Prompt + output tokens of its finished lines.
    pub tokens: u64,
}

impl Scenario {
    /// Offers with tokens/s at the trace's prompt share.
    pub fn priced_offers(&self) -> Vec<Offer> {
        let share = self.prompt_share();
        self.offers
            .iter()
            .map(|(o, t)| Offer::priced(o, t, share))
            .collect()
    }

    pub fn prompt_share(&self) -> f64 {
        let (p, o) = self.trace.iter().fold((0.0, 0.0), |(p, o), r| {
            (
                p + f64::from(r.prompt_tokens),
                o + f64::from(r.output_tokens),
            )
        });
        if p + o > 0.0 {
            p / (p + o)
        } else {
            0.5
        }
    }

    /// Token demand (prompt + output tokens/s) per `window`, by arrival.
    pub fn demand(&self, window: Duration) -> Vec<f64> {
        let end = self.trace.last().map_or(Duration::ZERO, |r| r.at);
        let n = (end.as_secs_f64() / window.as_secs_f64()).floor() as usize + 1;
        let mut out = vec![0.0; n];
        for r in &self.trace {
            let i = (r.at.as_secs_f64() / window.as_secs_f64()) as usize;
            out[i] += f64::from(r.prompt_tokens + r.output_tokens) / window.as_secs_f64();
        }
        out
    }
}

/// Sizes the pool: called every `dt` with the gateway's load.
#[async_trait]
pub trait Policy: Send {
    fn name(&self) -> String;
    async fn tick(&mut self, now: Duration, load: &Load, cloud: &mut SimProvider);
    /// How long before a reclaimed replica goes its gateway stops routing
    /// to it: `None`, from the notice on (strata's default); zero, never
    /// (one that hears no notice: the requests the replica holds when it
    /// goes start over elsewhere).
    fn drain_before_reclaim(&self) -> Option<Duration> {
        None
    }

    /// Whether its load balancer still sends requests to replica `id`,
    /// whose instance is gone: it has not found it lost yet. What is sent
    /// there hangs (a vanished address answers nothing) and starts over
    /// elsewhere once it is dropped.
    fn routes_to_lost(&self, _id: &str) -> bool {
        false
    }
}

/// Whether a replica takes new requests at `now`: ready, and not leaving,
/// or reclaimed and more than its policy's `drain_before_reclaim` from
/// going.
fn takes_requests(v: &SimView, drain: Option<Duration>, now: Duration) -> bool {
    v.ready
        && match v.leaving_until {
            None => true,
            Some(end) => v.reclaimed && drain.is_some_and(|d| end > now + d),
        }
}

/// Keeps `replicas` of one offer, whatever the load (replacing lost ones).
pub struct Static {
    pub offer: Offer,
    pub replicas: u32,
}

#[async_trait]
impl Policy for Static {
    fn name(&self) -> String {
        format!(
            "static {} x {} ({})",
            self.replicas,
            self.offer.instance_type,
            self.offer.capacity.as_str()
        )
    }

    async fn tick(&mut self, _now: Duration, _load: &Load, cloud: &mut SimProvider) {
        cloud.poll().await;
        for _ in cloud.list().len()..self.replicas as usize {
            let _ = cloud.launch(&self.offer).await;
        }
    }
}

/// strata's own controller (the live code) on the simulated cloud.
pub struct Strata {
    pub driver: Driver,
    /// `pool.preemption_drain_secs`, as the live provider keeps it.
    drain: Option<Duration>,
}

impl Strata {
    /// A simulated replica takes as many requests at once as its profile
    /// lists batch sizes (`ReplicaModel`), so that is the controller's
    /// slots per replica here (live, the gateway's match the engine's).
    pub fn new(mut spec: PoolSpec) -> Self {
        spec.slots_per_replica = spec.unit.decode_tokens_per_s.len().max(1) as u32;
        Strata {
            drain: spec.preemption_drain,
            driver: Driver::new(Controller::new(spec)),
        }
    }
}

#[async_trait]
impl Policy for Strata {
    fn name(&self) -> String {
        "strata".into()
    }

    async fn tick(&mut self, now: Duration, load: &Load, cloud: &mut SimProvider) {
        self.driver.tick(cloud, now, load).await;
    }

    fn drain_before_reclaim(&self) -> Option<Duration> {
        self.drain
    }
}

/// Replicas needed for a token demand with one offer's capacity.
pub fn replicas_for(demand: f64, offer: &Offer) -> u32 {
    (demand / offer.tokens_per_s.max(f64::MIN_POSITIVE)).ceil() as u32
}

/// The cheapest capacity that meets each minute's demand, with no launch
/// delay and no preemption losses: offers cheapest per token first, spot
/// as far as the trace has it that minute (a capped zone up to its count),
/// the rest on demand (`planner::cover`). Whole replicas, so a minute of
/// small demand still pays for one.
pub fn lower_bound(s: &Scenario) -> f64 {
    let mut offers = s.priced_offers();
    offers.retain(|o| o.tokens_per_s > 0.0);
    offers.sort_by(|a, b| {
        a.dollars_per_token_rate()
            .total_cmp(&b.dollars_per_token_rate())
    });
    let window = Duration::from_secs(60);
    let mut cost = 0.0;
    for (i, demand) in s.demand(window).into_iter().enumerate() {
        let at = s.cloud.offset + s.warmup + window * i as u32;
        let mut left = demand;
        // Replicas of each zone's spot taken so far this minute.
        let mut taken: HashMap<&str, u32> = HashMap::new();
        for o in &offers {
            if left <= 0.0 {
                break;
            }
            if o.capacity == CapacityType::OnDemand {
                // What spot could not carry: the least-cost on-demand cover.
                let fill = crate::planner::cover(&offers, CapacityType::OnDemand, None, left);
                cost += fill.iter().map(|o| o.price_per_hour / 60.0).sum::<f64>();
                break;
            }
            let room = match s.cloud.spot.get(&o.zone) {
                None => u32::MAX,
                Some(t) if t.capped => t.at(at),
                Some(t) if t.at(at) > 0 => u32::MAX,
                _ => 0,
            };
            let used = taken.entry(o.zone.as_str()).or_default();
            let n = replicas_for(left, o).min(room.saturating_sub(*used));
            *used += n;
            left -= f64::from(n) * o.tokens_per_s;
            cost += f64::from(n) * o.price_per_hour / 60.0;
        }
    }
    cost
}

/// The `q` percentile of sorted values; NaN when there are none.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    strata_core::latency::percentile(sorted, q).unwrap_or(f64::NAN)
}

/// One policy's run.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub policy: String,
    pub cost: f64,
    pub requests: usize,
    pub finished: usize,
    /// Requests that lost their replica and started over elsewhere.
    pub restarted: usize,
    /// Requests never served by the end of the run.
    pub unserved: usize,
    pub tokens: u64,
    pub cost_per_million_tokens: f64,
    pub ttft_ms: [f64; 3],
    pub tpot_ms: [f64; 3],
    /// Share of requests with TTFT within the objective (unserved count as misses).
    pub slo_attainment: f64,
    /// Replica-hours by "type (capacity)".
    pub replica_hours: BTreeMap<String, f64>,
    pub preemptions: usize,
    pub timeline: Vec<Minute>,
    pub batch: Option<BatchOutcome>,
}

/// One simulated minute of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Minute {
    /// Tokens per second asked for (by arrival).
    pub demand: f64,
    /// Tokens per second the ready replicas taking requests serve at full
    /// batch (their profile at the trace's prompt share).
    pub capacity: f64,
    /// Replicas starting, serving or draining.
    pub replicas: u32,
    /// Dollars so far.
    pub cost: f64,
}

/// Dollars the instances cost within `[from, to]`.
fn billed(bills: &[crate::provider::sim::SimBill], from: Duration, to: Duration) -> f64 {
    bills.iter().map(|b| b.cost_within(from, to)).sum()
}

/// Replays the scenario's trace against `policy`; runs on past the last
/// arrival until every request is served (or `tail` more has passed).
pub async fn simulate(s: &Scenario, policy: &mut dyn Policy, tail: Duration) -> Outcome {
    simulate_with_progress(s, policy, tail, &mut |_| {}).await
}

/// As `simulate`, calling `progress` with the share of the trace replayed
/// (0–1) once per simulated minute.
pub async fn simulate_with_progress(
    s: &Scenario,
    policy: &mut dyn Policy,
    tail: Duration,
    progress: &mut (dyn FnMut(f64) + Send),
) -> Outcome {
    let mut cloud = SimProvider::new(s.cloud.clone());
    let drain = policy.drain_before_reclaim();
    let profiles: HashMap<&str, &InstanceType> = s
        .offers
        .iter()
        .map(|(o, t)| (o.instance_type.as_str(), t))
        .collect();
    // The warm-up copy, then the trace itself (measured from `measured`).
    let mut trace: Vec<TraceRequest> = s
        .trace
        .iter()
        .filter(|r| r.at < s.warmup)
        .copied()
        .collect();
    let measured = trace.len();
    trace.extend(s.trace.iter().map(|r| TraceRequest {
        at: r.at + s.warmup,
        ..*r
    }));
    // Ids from `interactive` on are the batch's lines.
    let interactive = trace.len();
    let batch = s.batch.map(|b| BatchBacklog {
        at: b.at + s.warmup,
        ..b
    });
    let mut lines = BatchRun::default();
    let last = trace
        .last()
        .map_or(Duration::ZERO, |r| r.at)
        .max(batch.map_or(Duration::ZERO, |b| b.at));
    let stop = last + batch.map_or(tail, |b| tail.max(b.window));
    let mut next = 0;
    let mut queue: VecDeque<Running> = VecDeque::new();
    let mut models: BTreeMap<String, ReplicaModel> = BTreeMap::new();
    let mut done: Vec<Finished> = Vec::new();
    let mut restarted = 0;
    // Replicas gone that the policy's load balancer still routes to.
    let mut lost: BTreeSet<String> = BTreeSet::new();
    let mut load = Load::default();
    // Tokens served by every replica so far, counted as they are produced
    // (the live gateway counts streamed output so, prompts when their
    // requests end), so a long request is demand while it runs.
    let mut served = Served::default();
    let mut recent = LatencyWindow::default();
    let mut timeline = Vec::new();
    let demand = s.demand(Duration::from_secs(60));
    // Every policy's ready replicas valued alike: the profile at the
    // trace's prompt share (a policy's own offers may carry its estimate).
    let share = s.prompt_share();
    let mut now = Duration::ZERO;
    loop {
        let idle = next == trace.len()
            && queue.is_empty()
            && batch.is_none_or(|_| lines.released && lines.queue.is_empty())
            && models.values().all(|m| m.running.is_empty());
        if now > stop || (idle && now > last) {
            break;
        }
        cloud.advance_to(now);
        policy.tick(now, &load, &mut cloud).await;
        let view = cloud.view();
        // Replicas gone: what they ran starts over, once the policy's
        // load balancer has stopped sending them requests (until then they
        // hang there).
        lost.clear();
        models.retain(|id, m| {
            if view.iter().any(|v| &v.id == id) {
                return true;
            }
            if policy.routes_to_lost(id) {
                lost.insert(id.clone());
                return true;
            }
            for r in m.running.drain(..).rev() {
                if r.batch {
                    lines.preempted += 1;
                    lines.queue.push_front(r.restart());
                } else {
                    restarted += 1;
                    queue.push_front(r.restart());
                }
            }
            false
        });
        for v in &view {
            if v.ready && !models.contains_key(&v.id) {
                if let Some(p) = profiles.get(v.offer.instance_type.as_str()) {
                    models.insert(v.id.clone(), ReplicaModel::new(p));
                }
            }
        }
        // Arrivals.
        while next < trace.len() && trace[next].at <= now {
            let r = &trace[next];
            queue.push_back(Running::new(next, r.at, r.prompt_tokens, r.output_tokens));
            load.requests_total += 1;
            next += 1;
        }
        if let Some(b) = batch.filter(|b| !lines.released && now >= b.at) {
            lines.released = true;
            lines.queue = (0..b.lines as usize)
                .map(|i| {
                    Running::new(interactive + i, b.at, b.prompt_tokens, b.output_tokens).batch()
                })
                .collect();
        }
        // Routing: the least busy replica with a free slot, FIFO; batch
        // lines as the live gateway runs them: their reserved share first,
        // then interactive requests, which take batch lines' slots beyond
        // that share while they wait, then batch lines in what is left.
        let open: Vec<&String> = view
            .iter()
            .filter(|v| takes_requests(v, drain, now))
            .map(|v| &v.id)
            .chain(&lost)
            .collect();
        let (reserved, cap) = batch.map_or((0, 0), |b| {
            let slots: usize = open
                .iter()
                .filter_map(|id| models.get(*id))
                .map(ReplicaModel::max_sequences)
                .sum();
            let cap = b.lines_in_flight as usize;
            (
                ((b.reserved_share * slots as f64).floor() as usize).min(cap),
                cap,
            )
        });
        lines.route(&open, &mut models, reserved);
        while !queue.is_empty() {
            let Some(id) = least_busy(&open, &models, |m| m.free_slots() > 0) else {
                break;
            };
            let r = queue.pop_front().expect("not empty");
            models.get_mut(id).expect("open").running.push(r);
        }
        lines.make_way(&open, &mut models, &mut queue, reserved);
        if queue.is_empty() {
            lines.route(&open, &mut models, cap);
        }
        // Serve.
        for (id, m) in models.iter_mut().filter(|(id, _)| !lost.contains(*id)) {
            let (before, before_batch) = (m.served, m.served_batch);
            let finished = m.step(now, s.dt);
            // Batch lines' tokens are not demand.
            served.prompt +=
                (m.served.prompt - before.prompt) - (m.served_batch.prompt - before_batch.prompt);
            served.output +=
                (m.served.output - before.output) - (m.served_batch.output - before_batch.output);
            for f in finished {
                if f.id >= interactive {
                    lines.finished += 1;
                    lines.tokens += u64::from(f.prompt_tokens + f.output_tokens);
                    lines.last_done = Some(f.done);
                    continue;
                }
                let tpot = (f.output_tokens > 1).then(|| f.tpot().as_secs_f64() * 1000.0);
                recent.record(f.done, f.ttft().as_secs_f64() * 1000.0, tpot);
                if f.id >= measured {
                    done.push(f);
                }
            }
            let leaving = view
                .iter()
                .any(|v| &v.id == id && v.leaving_until.is_some());
            if leaving && m.running.is_empty() {
                cloud.release(id);
            }
        }
        load.tokens_total = (served.prompt + served.output) as u64;
        load.prompt_tokens_total = served.prompt as u64;
        load.in_flight = models
            .values()
            .map(|m| m.running.len() - m.batch_lines())
            .sum();
        load.waiting = queue.len();
        if let Some(b) = batch.filter(|_| lines.released) {
            let running: usize = models.values().map(ReplicaModel::batch_lines).sum();
            // The live runner hands the gateway at most its lines in flight.
            load.batch_lines = (running + lines.queue.len()).min(cap.max(running));
            let pace = strata_core::batch::Pace {
                lines_left: u64::from(b.lines - lines.finished),
                finished: u64::from(lines.finished),
                finished_tokens: lines.tokens,
                deadline_ms: (b.at + b.window).as_millis() as i64,
                cap_per_s: None,
            };
            load.batch_tokens_per_s = pace.needed_per_s(now.as_millis() as i64);
            load.batch_backlog_tokens = pace.backlog_tokens();
        }
        load.routable = open.len();
        (load.ttft_p95_ms, load.tpot_p95_ms) = recent.p95(now);
        if now.as_millis() % 60_000 < s.dt.as_millis() {
            progress((now.as_secs_f64() / last.as_secs_f64().max(1.0)).min(1.0));
        }
        if now >= s.warmup && (now - s.warmup).as_millis() % 60_000 < s.dt.as_millis() {
            let minute = ((now - s.warmup).as_secs() / 60) as usize;
            timeline.push(Minute {
                demand: demand.get(minute).copied().unwrap_or(0.0),
                capacity: view
                    .iter()
                    .filter(|v| takes_requests(v, drain, now))
                    .filter_map(|v| profiles.get(v.offer.instance_type.as_str()))
                    .map(|p| p.tokens_per_s(share))
                    .sum(),
                replicas: view.len() as u32,
                cost: billed(&cloud.bills(), s.warmup, now),
            });
        }
        now += s.dt;
    }
    let bills = cloud.bills();
    let end = cloud.now();
    let cost = billed(&bills, s.warmup, end);
    let mut replica_hours = BTreeMap::new();
    for b in &bills {
        let hours = b.hours_within(s.warmup, end);
        *replica_hours
            .entry(format!(
                "{} ({})",
                b.slot.instance_type,
                b.slot.capacity.as_str()
            ))
            .or_insert(0.0) += hours;
    }
    let mut ttft: Vec<f64> = done
        .iter()
        .map(|f| f.ttft().as_secs_f64() * 1000.0)
        .collect();
    let mut tpot: Vec<f64> = done
        .iter()
        .filter(|f| f.output_tokens > 1)
        .map(|f| f.tpot().as_secs_f64() * 1000.0)
        .collect();
    ttft.sort_by(f64::total_cmp);
    tpot.sort_by(f64::total_cmp);
    let slo_ms = s.slo_ttft.as_secs_f64() * 1000.0;
    let tokens: u64 = done
        .iter()
        .map(|f| u64::from(f.prompt_tokens + f.output_tokens))
        .sum();
    let within = ttft.iter().filter(|&&t| t <= slo_ms).count();
    Outcome {
        policy: policy.name(),
        cost,
        requests: s.trace.len(),
        finished: done.len(),
        restarted,
        unserved: s.trace.len() - done.len(),
        tokens,
        cost_per_million_tokens: if tokens > 0 {
            cost / tokens as f64 * 1e6
        } else {
            f64::NAN
        },
        ttft_ms: [
            percentile(&ttft, 0.5),
            percentile(&ttft, 0.95),
            percentile(&ttft, 0.99),
        ],
        tpot_ms: [
            percentile(&tpot, 0.5),
            percentile(&tpot, 0.95),
            percentile(&tpot, 0.99),
        ],
        slo_attainment: within as f64 / s.trace.len().max(1) as f64,
        replica_hours,
        preemptions: bills.iter().filter(|b| b.preempted).count(),
        timeline,
        batch: batch.map(|b| {
            let done_after_s = lines
                .last_done
                .filter(|_| lines.finished == b.lines)
                .map(|at| at.saturating_sub(b.at).as_secs_f64());
            BatchOutcome {
                lines: b.lines,
                finished: lines.finished,
                preempted: lines.preempted,
                done_after_s,
                within_window: done_after_s.is_some_and(|d| d <= b.window.as_secs_f64()),
                tokens: lines.tokens,
            }
        }),
    }
}

/// The open replica with the least work of those `fits` takes.
fn least_busy<'a>(
    open: &[&'a String],
    models: &BTreeMap<String, ReplicaModel>,
    fits: impl Fn(&ReplicaModel) -> bool,
) -> Option<&'a String> {
    open.iter()
        .copied()
        .filter(|id| models.get(*id).is_some_and(&fits))
        .min_by(|a, b| {
            models[*a]
                .outstanding()
                .total_cmp(&models[*b].outstanding())
        })
}

/// A batch's lines during a run.
#[derive(Default)]
struct BatchRun {
    released: bool,
    /// Lines waiting for a slot, next first.
    queue: VecDeque<Running>,
    finished: u32,
    tokens: u64,
    last_done: Option<Duration>,
    preempted: usize,
}

impl BatchRun {
    /// Waiting lines into free slots while fewer than `up_to` run.
    fn route(
        &mut self,
        open: &[&String],
        models: &mut BTreeMap<String, ReplicaModel>,
        up_to: usize,
    ) {
        let mut running: usize = models.values().map(ReplicaModel::batch_lines).sum();
        while running < up_to && !self.queue.is_empty() {
            let Some(id) = least_busy(open, models, |m| m.free_slots() > 0) else {
                return;
            };
            let line = self.queue.pop_front().expect("not empty");
            models.get_mut(id).expect("open").running.push(line);
            running += 1;
        }
    }

    /// While interactive requests wait, each takes the slot of a batch
    /// line beyond the `reserved` ones (the line starts over later).
    fn make_way(
        &mut self,
        open: &[&String],
        models: &mut BTreeMap<String, ReplicaModel>,
        queue: &mut VecDeque<Running>,
        reserved: usize,
    ) {
        let mut running: usize = models.values().map(ReplicaModel::batch_lines).sum();
        while running > reserved && !queue.is_empty() {
            let Some(id) = least_busy(open, models, |m| m.batch_lines() > 0) else {
                return;
            };
            let m = models.get_mut(id).expect("open");
            if let Some(line) = m.preempt_batch() {
                self.preempted += 1;
                self.queue.push_front(line);
                m.running.push(queue.pop_front().expect("not empty"));
            }
            running -= 1;
        }
    }
}
