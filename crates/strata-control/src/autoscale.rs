//! The autoscaler, kept pure: signals in, a decision out, on whatever clock
//! the caller keeps (the live controller's, or the simulator's virtual one).
//!
//! Desired replicas = token demand / (target utilisation × measured capacity
//! per replica), from the mean demand over a stable window (60 s) and, to
//! catch bursts, a short panic window (6 s; scale up only, entered when it
//! asks for more than `panic_threshold` × the current replicas while
//! requests wait). Going up
//! happens at once; going down only to the highest count asked for during the
//! last `scale_down_delay`, so a dip does not remove capacity a recovery
//! needs. With `scale_to_zero_after`, a pool with no requests for that long
//! goes to zero, and the first request brings one replica back. When the
//! pool misses a latency objective (p95 TTFT or time per output token)
//! while requests wait for a slot, one more replica is added, at most once
//! per panic window.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq)]
pub struct ScalePolicy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Share of a replica's measured capacity to plan for (0–1].
    pub target_utilisation: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    /// Panic when the short window asks for this many times the current replicas.
    pub panic_threshold: f64,
    pub scale_down_delay: Duration,
    /// Scale to zero after this long without any request; `None`: never.
    pub scale_to_zero_after: Option<Duration>,
    /// p95 objectives in milliseconds: time to first token, time per output token.
    pub slo_ttft_p95_ms: Option<f64>,
    pub slo_tpot_p95_ms: Option<f64>,
}

impl From<&strata_core::config::PoolConfig> for ScalePolicy {
    fn from(c: &strata_core::config::PoolConfig) -> Self {
        ScalePolicy {
            min_replicas: c.min_replicas,
            max_replicas: c.max_replicas,
            target_utilisation: c.target_utilisation,
            stable_window: Duration::from_secs_f64(c.stable_window_secs),
            panic_window: Duration::from_secs_f64(c.panic_window_secs),
            panic_threshold: c.panic_threshold,
            scale_down_delay: Duration::from_secs_f64(c.scale_down_delay_secs),
            scale_to_zero_after: c.scale_to_zero_after_secs.map(Duration::from_secs_f64),
            slo_ttft_p95_ms: c.slo_ttft_p95_ms,
            slo_tpot_p95_ms: c.slo_tpot_p95_ms,
        }
    }
}

impl Default for ScalePolicy {
    fn default() -> Self {
        ScalePolicy::from(&strata_core::config::PoolConfig::default())
    }
}

/// What the controller measured at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Signal {
    /// Time on the caller's clock.
    pub at: Duration,
    /// Prompt + generation tokens per second asked of the pool.
    pub demand_tokens_per_s: f64,
    pub in_flight: u32,
    pub queued: u32,
    /// Batch lines holding or waiting for a slot: they keep one replica
    /// (no scale to zero under a running batch) and ask for no more.
    pub batch_lines: u32,
    /// Tokens a second running batches need to end within their windows:
    /// replicas are added for it only where the interactive demand leaves
    /// too little of the pool.
    pub batch_tokens_per_s: f64,
    /// Tokens the running batches have left: not the autoscaler's (the
    /// controller may add spot for it beside the count it asks for).
    pub batch_backlog_tokens: f64,
    /// Tokens per second one replica serves at full load (measured).
    pub capacity_per_replica: f64,
    /// Requests one replica takes at once (0: not known). Prompts and
    /// unstreamed answers count as tokens when their requests end, so
    /// while long requests run the token demand can read low; the
    /// requests holding a slot then set a floor:
    /// never fewer replicas than their slots need, plus one while others
    /// wait (a waiting queue asks for one more replica, not one per
    /// `slots` waiting: a burst drains faster than replicas launch).
    pub slots_per_replica: u32,
    /// Recent p95 time to first token and per output token (milliseconds).
    pub ttft_p95_ms: Option<f64>,
    pub tpot_p95_ms: Option<f64>,
    /// Replicas taking requests (None: not known). A missed objective
    /// adds a replica only once the replicas asked for serve: a launch
    /// takes minutes, and a step per panic window meanwhile overshoots.
    pub ready: Option<u32>,
}

impl Signal {
    /// A signal with demand and capacity only (no requests counted, no latencies).
    pub fn demand(at: Duration, demand_tokens_per_s: f64, capacity_per_replica: f64) -> Self {
        Signal {
            at,
            demand_tokens_per_s,
            in_flight: 0,
            queued: 0,
            batch_lines: 0,
            batch_tokens_per_s: 0.0,
            batch_backlog_tokens: 0.0,
            capacity_per_replica,
            slots_per_replica: 0,
            ttft_p95_ms: None,
            tpot_p95_ms: None,
            ready: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Nothing to change.
    Hold,
    /// The stable window asks for more.
    ScaleUp,
    /// A burst: the panic window asks for more.
    Panic,
    /// Demand stayed lower for the whole scale-down delay.
    ScaleDown,
    /// No request for the idle period.
    ToZero,
    /// Requests arrived while at zero.
    FromZero,
    /// A latency objective was missed while requests waited.
    SloMiss,
    /// A batch would miss its window on what interactive work leaves.
    BatchWindow,
}

/// One decision, with the inputs that made it (stored for `strata decisions`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Decision {
    pub at: Duration,
    pub current: u32,
    pub desired: u32,
    pub reason: Reason,
    pub stable_demand: f64,
    pub panic_demand: f64,
    /// Tokens per second one replica is planned for (capacity × utilisation).
    pub planned_per_replica: f64,
}

pub struct Autoscaler {
    policy: ScalePolicy,
    signals: VecDeque<Signal>,
    /// Replica counts the stable window asked for, over the scale-down delay.
    wanted: VecDeque<(Duration, u32)>,
    panic_until: Option<Duration>,
    last_request: Option<Duration>,
    last_slo_step: Option<Duration>,
    /// How far over its objective the latency was at that step.
    last_slo_miss: Option<f64>,
}

impl Autoscaler {
    pub fn new(policy: ScalePolicy) -> Self {
        Autoscaler {
            policy,
            signals: VecDeque::new(),
            wanted: VecDeque::new(),
            panic_until: None,
            last_request: None,
            last_slo_step: None,
            last_slo_miss: None,
        }
    }

    pub fn policy(&self) -> &ScalePolicy {
        &self.policy
    }

    pub fn observe(&mut self, s: Signal) {
        if s.in_flight > 0 || s.queued > 0 || s.batch_lines > 0 || s.demand_tokens_per_s > 0.0 {
            self.last_request = Some(s.at);
        }
        self.signals.push_back(s);
        let keep = self.policy.stable_window.max(self.policy.panic_window);
        while self
            .signals
            .front()
            .is_some_and(|f| s.at.saturating_sub(f.at) > keep)
        {
            self.signals.pop_front();
        }
    }

    fn mean_demand(&self, now: Duration, window: Duration) -> f64 {
        let recent: Vec<f64> = self
            .signals
            .iter()
            .filter(|s| now.saturating_sub(s.at) <= window)
            .map(|s| s.demand_tokens_per_s)
            .collect();
        if recent.is_empty() {
            0.0
        } else {
            recent.iter().sum::<f64>() / recent.len() as f64
        }
    }

    /// When the last signal shows requests waiting for a slot and a p95
    /// latency above its objective: how far above (the larger ratio of
    /// measured to objective).
    fn slo_miss(&self) -> Option<f64> {
        let s = self.signals.back()?;
        let ratio = |measured: Option<f64>, goal: Option<f64>| match (measured, goal) {
            (Some(m), Some(g)) if g > 0.0 && m > g => m / g,
            _ => 0.0,
        };
        let worst = ratio(s.ttft_p95_ms, self.policy.slo_ttft_p95_ms)
            .max(ratio(s.tpot_p95_ms, self.policy.slo_tpot_p95_ms));
        (s.queued > 0 && worst > 0.0).then_some(worst)
    }

    /// The replicas the pool should have now, given it has `current`.
    pub fn decide(&mut self, now: Duration, current: u32) -> Decision {
        let p = &self.policy;
        let last = self.signals.back().copied();
        let planned = last.map_or(0.0, |s| s.capacity_per_replica * p.target_utilisation);
        let stable = self.mean_demand(now, p.stable_window);
        let burst = self.mean_demand(now, p.panic_window);
        let need = |demand: f64| -> u32 {
            if planned <= 0.0 {
                return 0;
            }
            (demand / planned).ceil().min(f64::from(u32::MAX)) as u32
        };
        let floor = p.min_replicas.max(1);
        let clamp = |n: u32| n.clamp(floor, p.max_replicas.max(floor));
        let busy = last.map_or(0, |s| match s.slots_per_replica {
            0 => 0,
            slots => s.in_flight.div_ceil(slots) + u32::from(s.queued > 0),
        });
        // Batches' need counts only where the pool would not serve it
        // beside the interactive demand.
        let batch = last.map_or(0.0, |s| s.batch_tokens_per_s);
        let interactive_need = clamp(need(stable).max(busy));
        let stable_need = interactive_need.max(clamp(need(stable + batch)));
        let panic_need = clamp(need(burst));
        let waiting = last.is_some_and(|s| s.in_flight > 0 || s.queued > 0 || s.batch_lines > 0);
        let decision = |desired: u32, reason: Reason| Decision {
            at: now,
            current,
            desired,
            reason,
            stable_demand: stable,
            panic_demand: burst,
            planned_per_replica: planned,
        };

        // Idle long enough: to zero (and nothing is remembered as wanted).
        let idle_for = now.saturating_sub(self.last_request.unwrap_or_default());
        if let Some(after) = p.scale_to_zero_after {
            if !waiting && idle_for >= after && (self.last_request.is_some() || now >= after) {
                self.wanted.clear();
                self.panic_until = None;
                let reason = if current == 0 {
                    Reason::Hold
                } else {
                    Reason::ToZero
                };
                return decision(0, reason);
            }
        }
        if current == 0 {
            if !waiting && burst <= 0.0 {
                return decision(0, Reason::Hold);
            }
            self.wanted.push_back((now, stable_need));
            return decision(stable_need.max(panic_need), Reason::FromZero);
        }

        // A burst: scale up on the short window and stay there a while —
        // when requests wait. (Prompt tokens count when requests end, so a
        // replica that just came up and cleared a queue reads as a burst.)
        let pressed = last.is_some_and(|s| s.queued > 0);
        if pressed
            && f64::from(panic_need) >= p.panic_threshold * f64::from(current)
            && panic_need > current
        {
            self.panic_until = Some(now + p.stable_window);
        }
        let panicking = self.panic_until.is_some_and(|until| now < until);
        self.wanted.push_back((now, stable_need));
        while self
            .wanted
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) > p.scale_down_delay)
        {
            self.wanted.pop_front();
        }
        if panicking {
            // What the burst asked for is remembered, so the scale-down
            // delay counts from it.
            if let Some(last) = self.wanted.back_mut() {
                last.1 = last.1.max(panic_need);
            }
            let desired = current.max(panic_need).max(stable_need);
            let reason = if desired > current {
                Reason::Panic
            } else {
                Reason::Hold
            };
            return decision(desired, reason);
        }
        if stable_need > current {
            let reason = if interactive_need > current {
                Reason::ScaleUp
            } else {
                Reason::BatchWindow
            };
            return decision(stable_need, reason);
        }
        let started = last.is_none_or(|s| s.ready.is_none_or(|r| r >= current));
        let miss = self.slo_miss();
        if miss.is_none() {
            self.last_slo_miss = None;
        }
        if let Some(miss) = miss.filter(|_| started && current < p.max_replicas) {
            let since = self.last_slo_step.map(|at| now.saturating_sub(at));
            let due = since.is_none_or(|s| s >= p.panic_window);
            // Judged once a latency window has passed since the last step:
            // not 10% better means the latency is not queueing (long
            // prompts' prefill, say) and more replicas would not bring it
            // down; tried again after the scale-down delay.
            let futile = match (since, self.last_slo_miss) {
                (Some(s), Some(before)) => {
                    s >= strata_core::latency::LatencyWindow::SPAN
                        && s < p.scale_down_delay
                        && miss > 0.9 * before
                }
                _ => false,
            };
            if due && !futile {
                self.last_slo_step = Some(now);
                self.last_slo_miss = Some(miss);
                if let Some(last) = self.wanted.back_mut() {
                    last.1 = last.1.max(current + 1);
                }
                return decision(current + 1, Reason::SloMiss);
            }
        }
        // Down only to the most asked for during the whole delay.
        let held = self
            .wanted
            .iter()
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(stable_need);
        let covered = self.wanted.front().is_some_and(|(at, _)| {
            now.saturating_sub(*at) + Duration::from_secs(1) >= p.scale_down_delay
        });
        if held < current && covered {
            return decision(clamp(held), Reason::ScaleDown);
        }
        decision(clamp(current), Reason::Hold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CAP: f64 = 100.0; // tokens/s per replica; planned at 70.

    fn policy() -> ScalePolicy {
        ScalePolicy {
            min_replicas: 1,
            max_replicas: 8,
            scale_to_zero_after: Some(Duration::from_secs(300)),
            ..ScalePolicy::default()
        }
    }

    /// Runs `demand(t)` (tokens/s, sampled every 2 s) for `secs`, applying
    /// each decision at once; returns the decisions.
    fn run(
        scaler: &mut Autoscaler,
        start: u64,
        secs: u64,
        replicas: &mut u32,
        demand: impl Fn(u64) -> f64,
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        for t in (start..start + secs).step_by(2) {
            let d = demand(t);
            let at = Duration::from_secs(t);
            // Demand beyond what the replicas serve queues.
            let short = d > f64::from(*replicas) * CAP;
            scaler.observe(Signal {
                in_flight: u32::from(d > 0.0),
                queued: u32::from(short),
                ..Signal::demand(at, d, CAP)
            });
            let decision = scaler.decide(at, *replicas);
            *replicas = decision.desired;
            out.push(decision);
        }
        out
    }

    #[test]
    fn a_step_up_is_followed_at_once_and_a_step_down_only_after_the_delay() {
        let mut s = Autoscaler::new(policy());
        let mut n = 1;
        run(&mut s, 0, 120, &mut n, |_| 60.0);
        assert_eq!(n, 1);
        // 280 tokens/s needs 4 replicas at 70 each; the burst triggers panic.
        let up = run(&mut s, 120, 20, &mut n, |_| 280.0);
        assert_eq!(n, 4);
        assert!(up.iter().any(|d| d.reason == Reason::Panic), "{up:?}");
        let down = run(&mut s, 140, 100, &mut n, |_| 60.0);
        assert!(
            down.iter().all(|d| d.desired == 4),
            "scaled down inside the delay"
        );
        run(&mut s, 240, 120, &mut n, |_| 60.0);
        assert_eq!(n, 1);
    }

    #[test]
    fn a_short_burst_scales_up_and_holds_through_the_delay() {
        let mut s = Autoscaler::new(policy());
        let mut n = 1;
        run(&mut s, 0, 60, &mut n, |_| 50.0);
        let burst = run(&mut s, 60, 10, &mut n, |_| 500.0);
        assert!(burst.iter().any(|d| d.reason == Reason::Panic));
        assert_eq!(n, 8, "500 tokens/s needs 8 replicas at 70 each (max 8)");
        let after = run(&mut s, 70, 100, &mut n, |_| 50.0);
        assert!(
            after.iter().all(|d| d.desired >= 2),
            "dropped capacity right after a burst"
        );
        run(&mut s, 170, 200, &mut n, |_| 50.0);
        assert_eq!(n, 1);
    }

    #[test]
    fn a_slow_decline_steps_down_and_never_below_need() {
        let mut s = Autoscaler::new(policy());
        let mut n = 1;
        run(&mut s, 0, 60, &mut n, |_| 420.0);
        assert_eq!(n, 6);
        let decline = run(&mut s, 60, 900, &mut n, |t| {
            (420.0 - (t - 60) as f64 * 0.4).max(0.1)
        });
        for d in &decline {
            let need = (d.stable_demand / 70.0).ceil() as u32;
            assert!(d.desired >= need.max(1), "{d:?}");
        }
        assert!(n <= 2, "ended with {n}");
    }

    #[test]
    fn idle_goes_to_zero_and_a_request_brings_one_back() {
        let mut s = Autoscaler::new(policy());
        let mut n = 2;
        run(&mut s, 0, 30, &mut n, |_| 100.0);
        let idle = run(&mut s, 30, 400, &mut n, |_| 0.0);
        assert_eq!(n, 0);
        assert!(idle.iter().any(|d| d.reason == Reason::ToZero));
        assert!(idle
            .iter()
            .filter(|d| d.at < Duration::from_secs(320))
            .all(|d| d.desired >= 1));
        // One queued request at zero: a replica at once.
        let at = Duration::from_secs(500);
        s.observe(Signal {
            queued: 1,
            ..Signal::demand(at, 0.0, CAP)
        });
        let d = s.decide(at, 0);
        assert_eq!((d.desired, d.reason), (1, Reason::FromZero));
    }

    #[test]
    fn long_requests_in_flight_hold_the_replicas_their_slots_need() {
        let mut s = Autoscaler::new(policy());
        let mut n = 3;
        // 20 long requests run (8 slots a replica), but no token is counted
        // until they end: the token demand reads 0.
        for t in (0..600).step_by(2) {
            let at = Duration::from_secs(t);
            s.observe(Signal {
                in_flight: 20,
                slots_per_replica: 8,
                ..Signal::demand(at, 0.0, CAP)
            });
            n = s.decide(at, n).desired;
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn a_missed_latency_objective_adds_a_replica_per_panic_window_while_requests_wait() {
        let mut s = Autoscaler::new(ScalePolicy {
            slo_ttft_p95_ms: Some(1000.0),
            ..policy()
        });
        let mut n = 1;
        let mut reasons = Vec::new();
        // Demand the token estimate finds small, but requests queue and
        // p95 TTFT is 3 s: +1 now, +1 after 6 s, not in between.
        for t in 0..14 {
            let at = Duration::from_secs(t);
            s.observe(Signal {
                in_flight: 4,
                queued: 3,
                ttft_p95_ms: Some(3000.0),
                ..Signal::demand(at, 10.0, CAP)
            });
            let d = s.decide(at, n);
            n = d.desired;
            reasons.push(d.reason);
        }
        assert_eq!(n, 4, "{reasons:?}");
        assert_eq!(reasons.iter().filter(|r| **r == Reason::SloMiss).count(), 3);
        assert_eq!(reasons[1], Reason::Hold);
        // Latency back under the objective, nobody waiting, or the last
        // replica asked for not serving yet: no more steps.
        for (t, queued, ttft, ready) in [
            (20, 0, 3000.0, None),
            (27, 3, 500.0, None),
            (34, 3, 3000.0, Some(3)),
        ] {
            let at = Duration::from_secs(t);
            s.observe(Signal {
                in_flight: 4,
                queued,
                ttft_p95_ms: Some(ttft),
                ready,
                ..Signal::demand(at, 10.0, CAP)
            });
            assert_eq!(s.decide(at, n).desired, 4);
        }
        // Once it serves, the objective still missed: the next step.
        let at = Duration::from_secs(41);
        s.observe(Signal {
            in_flight: 4,
            queued: 3,
            ttft_p95_ms: Some(3000.0),
            ready: Some(4),
            ..Signal::demand(at, 10.0, CAP)
        });
        assert_eq!(
            (s.decide(at, n).desired, s.decide(at, 5).reason),
            (5, Reason::Hold)
        );
    }

    #[test]
    fn a_step_that_did_not_bring_the_latency_down_is_not_repeated_until_the_delay() {
        let mut s = Autoscaler::new(ScalePolicy {
            slo_ttft_p95_ms: Some(1000.0),
            ..policy()
        });
        let mut n = 1;
        let at_ttft = |s: &mut Autoscaler, t: u64, ttft: f64, n: u32| {
            let at = Duration::from_secs(t);
            s.observe(Signal {
                in_flight: 4,
                queued: 3,
                ttft_p95_ms: Some(ttft),
                ready: Some(n),
                ..Signal::demand(at, 10.0, CAP)
            });
            s.decide(at, n)
        };
        // A step at 0 s; 40 s later (its replica serving, a latency window
        // judged) p95 is as bad: long prefills, not queueing. No step.
        n = at_ttft(&mut s, 0, 5000.0, n).desired;
        assert_eq!(n, 2);
        for t in [40, 60, 100] {
            assert_eq!(at_ttft(&mut s, t, 4800.0, n).desired, 2, "at {t} s");
        }
        // After the scale-down delay (120 s) it is tried again.
        let d = at_ttft(&mut s, 130, 4800.0, n);
        assert_eq!((d.desired, d.reason), (3, Reason::SloMiss));
        n = d.desired;
        // That step helped (p95 down by a third): the next one is taken.
        let d = at_ttft(&mut s, 170, 3200.0, n);
        assert_eq!((d.desired, d.reason), (4, Reason::SloMiss));
    }

    #[test]
    fn a_burst_queue_asks_for_one_more_replica_not_one_per_slots_waiting() {
        let mut s = Autoscaler::new(policy());
        // Two replicas' slots busy and 400 requests queued: three, not 52.
        let at = Duration::from_secs(10);
        s.observe(Signal {
            in_flight: 16,
            queued: 400,
            slots_per_replica: 8,
            ..Signal::demand(at, 0.0, CAP)
        });
        assert_eq!(s.decide(at, 2).desired, 3);
    }

    #[test]
    fn a_running_batch_keeps_one_replica_and_asks_for_no_more() {
        let mut s = Autoscaler::new(policy());
        let mut n = 2;
        run(&mut s, 0, 30, &mut n, |_| 100.0);
        // No interactive demand, but batch lines run for 20 minutes, well
        // past the 300 s to zero: one replica, never more, never none.
        let mut during = Vec::new();
        for t in (30..1230).step_by(2) {
            let at = Duration::from_secs(t);
            s.observe(Signal {
                batch_lines: 40,
                ..Signal::demand(at, 0.0, CAP)
            });
            let d = s.decide(at, n);
            n = d.desired;
            during.push(d);
        }
        assert!(during
            .iter()
            .all(|d| d.desired == 1 || d.at < Duration::from_secs(200)));
        assert_eq!(n, 1);
        assert!(during.iter().all(|d| d.reason != Reason::ToZero));
        // The batch done, the pool goes to zero after the idle time.
        let after = run(&mut s, 1230, 400, &mut n, |_| 0.0);
        assert_eq!(n, 0, "{:?}", after.last());
        // A batch line waiting at zero brings one replica back.
        let at = Duration::from_secs(2000);
        s.observe(Signal {
            batch_lines: 1,
            ..Signal::demand(at, 0.0, CAP)
        });
        assert_eq!(s.decide(at, 0).desired, 1);
    }

    #[test]
    fn a_batch_that_would_miss_its_window_adds_replicas_and_no_more() {
        let mut s = Autoscaler::new(policy());
        let mut n = 2;
        let planned = CAP * policy().target_utilisation;
        // Interactive demand for 1.5 replicas; a batch that needs half a
        // replica's planned rate fits beside it: no replica for it.
        let fits = |s: &mut Autoscaler, t: u64, batch: f64, n: u32| {
            let at = Duration::from_secs(t);
            s.observe(Signal {
                batch_lines: 40,
                batch_tokens_per_s: batch,
                ..Signal::demand(at, 1.5 * planned, CAP)
            });
            s.decide(at, n)
        };
        for t in (0..120).step_by(2) {
            let d = fits(&mut s, t, 0.4 * planned, n);
            n = d.desired;
        }
        assert_eq!(n, 2);
        // Its window nears: it needs two replicas' rate; the pool grows
        // to what both need, and says the batch drove it.
        let d = fits(&mut s, 120, 2.0 * planned, n);
        assert_eq!((d.desired, d.reason), (4, Reason::BatchWindow), "{d:?}");
        n = d.desired;
        // And holds while the batch needs it.
        for t in (122..300).step_by(2) {
            n = fits(&mut s, t, 2.0 * planned, n).desired;
        }
        assert_eq!(n, 4);
        // The batch finishes: back to what interactive work needs after
        // the scale-down delay.
        for t in (300..1200).step_by(2) {
            n = fits(&mut s, t, 0.0, n).desired;
        }
        assert_eq!(n, 2);
        // Never beyond max_replicas, whatever a batch needs.
        let d = fits(&mut s, 1200, 1000.0 * planned, n);
        assert_eq!(d.desired, policy().max_replicas);
    }

    #[test]
    fn a_pool_at_zero_stays_there_until_a_request_comes() {
        let mut s = Autoscaler::new(policy());
        let mut n = 0;
        let quiet = run(&mut s, 0, 30, &mut n, |_| 0.0);
        assert!(quiet.iter().all(|d| d.desired == 0), "{quiet:?}");
    }

    #[test]
    fn without_scale_to_zero_the_floor_is_min() {
        let mut s = Autoscaler::new(ScalePolicy {
            min_replicas: 2,
            ..policy()
        });
        s.policy.scale_to_zero_after = None;
        let mut n = 2;
        run(&mut s, 0, 1000, &mut n, |_| 0.0);
        assert_eq!(n, 2);
    }

    proptest! {
        #[test]
        fn bounded_never_short_and_no_flapping(
            levels in proptest::collection::vec(0.0f64..900.0, 1..8),
            noise in proptest::collection::vec(-0.2f64..0.2, 64),
        ) {
            let p = policy();
            let mut s = Autoscaler::new(p.clone());
            let mut n = 1;
            let mut last_up: Option<Duration> = None;
            for (i, level) in levels.iter().enumerate() {
                let start = i as u64 * 300;
                let decisions = run(&mut s, start, 300, &mut n, |t| (level * (1.0 + noise[(t / 2) as usize % 64])).max(0.0));
                for d in decisions {
                    prop_assert!(d.desired <= p.max_replicas);
                    if d.desired == 0 {
                        prop_assert!(matches!(d.reason, Reason::ToZero | Reason::Hold));
                        prop_assert!(d.stable_demand == 0.0, "zero while demand remained");
                    } else {
                        prop_assert!(d.desired >= p.min_replicas);
                        // Never fewer than the stable demand needs.
                        let need = ((d.stable_demand / 70.0).ceil() as u32).min(p.max_replicas);
                        prop_assert!(d.desired >= need, "{:?}", d);
                    }
                    if d.desired > d.current {
                        last_up = Some(d.at);
                    }
                    if d.desired < d.current && d.reason == Reason::ScaleDown {
                        // Never down within the delay after going up.
                        let up = last_up.unwrap_or_default();
                        prop_assert!(d.at.saturating_sub(up) + Duration::from_secs(1) >= p.scale_down_delay,
                            "down at {:?} after up at {:?}", d.at, up);
                    }
                }
            }
        }
    }
}
