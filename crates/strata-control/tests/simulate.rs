//! The simulator end to end on small hand-made scenarios: a static pool's
//! timings and bill come out as computed by hand, strata's controller
//! scales a step of load up and back down, and a run is deterministic.

use std::collections::BTreeMap;
use std::time::Duration;

use strata_control::autoscale::ScalePolicy;
use strata_control::controller::PoolSpec;
use strata_control::provider::sim::{SimSettings, SpotTrace};
use strata_control::simulate::baselines::{RateTarget, SkyTiming, SpotHedge};
use strata_control::simulate::trace::TraceRequest;
use strata_control::simulate::{lower_bound, simulate, BatchBacklog, Scenario, Static, Strata};
use strata_core::config::{CapacityType, InstanceType, Offering};

fn profile() -> InstanceType {
    // 1,000 prompt tokens/s; 50 tokens/s alone, 100 with four together.
    InstanceType {
        threads: 0,
        prefill_tokens_per_s: 1000.0,
        decode_tokens_per_s: vec![50.0, 70.0, 85.0, 100.0],
        launch_secs: None,
        gpus: 0,
    }
}

fn scenario(trace: Vec<TraceRequest>) -> Scenario {
    let o = Offering {
        instance_type: "small".into(),
        zone: "z".into(),
        capacity: CapacityType::OnDemand,
        price_per_hour: 3.6,
    };
    Scenario {
        trace,
        offers: vec![(o, profile())],
        cloud: SimSettings {
            spot: BTreeMap::new(),
            offset: Duration::ZERO,
            launch_delay: Duration::from_secs(10),
            launch_delays: Default::default(),
            notice: Duration::from_secs(60),
            drain: Duration::from_secs(30),
        },
        slo_ttft: Duration::from_secs(1),
        dt: Duration::from_millis(10),
        warmup: Duration::ZERO,
        batch: None,
    }
}

/// `lines` batch lines of 200 prompt and 100 output tokens at `at`, run
/// with the gateway's defaults (32 lines in flight, 1/8 of the slots reserved).
fn backlog(at: u64, lines: u32, window: Duration) -> BatchBacklog {
    BatchBacklog {
        at: Duration::from_secs(at),
        lines,
        prompt_tokens: 200,
        output_tokens: 100,
        window,
        lines_in_flight: 32,
        reserved_share: 0.125,
    }
}

/// strata's controller on `s`'s offers, 1 to 10 replicas, never at zero.
fn strata_spec(s: &Scenario) -> PoolSpec {
    let mut spec = PoolSpec {
        name: "default".into(),
        offers: s.offers.clone(),
        unit: profile(),
        scale: Some(ScalePolicy {
            min_replicas: 1,
            max_replicas: 10,
            stable_window: Duration::from_secs(30),
            scale_down_delay: Duration::from_secs(60),
            ..ScalePolicy::default()
        }),
        fixed_replicas: 1,
        spot_hedge: 0,
        spot_cooldown: Duration::from_secs(300),
        spot_zone_premium: 0.25,
        spot_max_zone_share: 1.0,
        spot_risk_window: Duration::ZERO,
        notice: Duration::from_secs(120),
        preemption_drain: None,
        slots_per_replica: 4,
        batch_spot: Default::default(),
    };
    spec.scale.as_mut().unwrap().scale_to_zero_after = None;
    spec
}

/// `s` with spot in zone z too, at a third of on demand's price, there
/// while `data` (one figure per `gap`) is above zero.
fn with_spot(mut s: Scenario, gap: Duration, data: Vec<u32>) -> Scenario {
    s.offers.push((
        Offering {
            instance_type: "small".into(),
            zone: "z".into(),
            capacity: CapacityType::Spot,
            price_per_hour: 1.2,
        },
        profile(),
    ));
    s.cloud.spot.insert(
        "z".into(),
        SpotTrace {
            gap,
            data,
            capped: false,
        },
    );
    s
}

/// One request every `every` from `from` for `count` requests.
fn steady(from: u64, every: Duration, count: u32, prompt: u32, output: u32) -> Vec<TraceRequest> {
    (0..count)
        .map(|i| TraceRequest {
            at: Duration::from_secs(from) + every * i,
            prompt_tokens: prompt,
            output_tokens: output,
        })
        .collect()
}

#[tokio::test]
async fn a_static_replica_serves_a_light_trace_at_its_profile_rates() {
    // One request every 2 s from t = 20 s (the replica is up at 10 s):
    // 100 prompt tokens (0.1 s) and 51 output tokens (50 more at 50/s: 1 s).
    let s = scenario(steady(20, Duration::from_secs(2), 30, 100, 51));
    let offer = s.priced_offers()[0].clone();
    let mut p = Static { offer, replicas: 1 };
    let o = simulate(&s, &mut p, Duration::from_secs(60)).await;
    assert_eq!((o.finished, o.unserved, o.restarted), (30, 0, 0));
    assert!((o.ttft_ms[1] - 100.0).abs() <= 10.0, "{:?}", o.ttft_ms);
    assert!((o.tpot_ms[1] - 20.0).abs() <= 1.0, "{:?}", o.tpot_ms);
    assert_eq!(o.slo_attainment, 1.0);
    assert_eq!(o.tokens, 30 * 151);
    // Billed from launch (0 s) to the end of the run (last request at 78 s, done ~79.1 s).
    let hours = o.replica_hours["small (on_demand)"];
    assert!((hours * 3600.0 - 79.1).abs() < 1.0, "{hours}");
    assert!((o.cost - 3.6 * hours).abs() < 1e-9);
}

#[tokio::test]
async fn strata_scales_a_step_of_load_up_and_back_down_and_runs_are_deterministic() {
    // 60 s quiet, then 4 requests/s of 200 + 100 tokens for 120 s (1,200
    // tokens/s, about 4 replicas at 70%), then quiet again for 300 s.
    let mut trace = steady(0, Duration::from_secs(30), 2, 50, 10);
    trace.extend(steady(60, Duration::from_millis(250), 480, 200, 100));
    trace.extend(steady(480, Duration::from_secs(1), 1, 50, 10));
    let s = scenario(trace);
    let spec = || strata_spec(&s);
    let o = simulate(&s, &mut Strata::new(spec()), Duration::from_secs(60)).await;
    assert_eq!(o.unserved, 0);
    let most = o.timeline.iter().map(|t| t.replicas).max().unwrap();
    let last = o.timeline.last().unwrap().replicas;
    assert!(most >= 3, "scaled up: {:?}", o.timeline);
    assert!(last <= 2, "and back down: {:?}", o.timeline);
    // A static pool sized for the step costs more over the whole run.
    let offer = s.priced_offers()[0].clone();
    let fixed = simulate(
        &s,
        &mut Static {
            offer,
            replicas: most,
        },
        Duration::from_secs(60),
    )
    .await;
    assert!(o.cost < fixed.cost, "{} vs {}", o.cost, fixed.cost);
    assert!(lower_bound(&s) <= o.cost);
    // The same run again gives the same numbers.
    let again = simulate(&s, &mut Strata::new(spec()), Duration::from_secs(60)).await;
    assert_eq!(
        serde_json::to_string(&o).unwrap(),
        serde_json::to_string(&again).unwrap()
    );
}

#[tokio::test]
async fn runs_with_reclaims_are_deterministic() {
    // Four spot replicas in one zone that loses its spot from 60 s to 120 s
    // (10 s notice): every replica goes at once with long requests on it,
    // which start over elsewhere. Two runs in one process (so two hash
    // seeds) give the same outcome to the last request.
    let mut trace = steady(0, Duration::from_millis(500), 360, 400, 1000);
    for (i, r) in trace.iter_mut().enumerate() {
        r.output_tokens += (i as u32 * 37) % 800; // unlike, so order matters
    }
    let mut s = with_spot(
        scenario(trace),
        Duration::from_secs(60),
        vec![1, 0, 1, 1, 1, 1],
    );
    s.cloud.notice = Duration::from_secs(10);
    let spot = s
        .priced_offers()
        .into_iter()
        .find(|o| o.capacity == CapacityType::Spot)
        .unwrap();
    let run = || async {
        let mut p = Static {
            offer: spot.clone(),
            replicas: 4,
        };
        let o = simulate(&s, &mut p, Duration::from_secs(600)).await;
        serde_json::to_string(&o).unwrap()
    };
    let (a, b) = (run().await, run().await);
    let o: serde_json::Value = serde_json::from_str(&a).unwrap();
    assert!(o["restarted"].as_u64().unwrap() >= 8, "{}", o["restarted"]);
    assert_eq!(a, b);
}

#[tokio::test]
async fn a_batch_backlog_takes_the_slots_interactive_requests_leave_and_costs_less_than_its_own_pool(
) {
    // Two replicas (4 slots each) and one interactive request a second
    // (100 + 51 tokens, about 1.1 s each) for 300 s; a batch of 200 lines
    // submitted at 10 s with an hour to finish.
    let mut s = scenario(steady(20, Duration::from_secs(1), 300, 100, 51));
    s.dt = Duration::from_millis(20);
    let offer = s.priced_offers()[0].clone();
    let run = |s: Scenario, replicas| {
        let offer = offer.clone();
        async move {
            let mut p = Static { offer, replicas };
            simulate(&s, &mut p, Duration::from_secs(60)).await
        }
    };
    let alone = run(s.clone(), 2).await;
    s.batch = Some(backlog(10, 200, Duration::from_secs(3600)));
    let shared = run(s.clone(), 2).await;
    let b = shared.batch.expect("a batch ran");
    assert_eq!((b.lines, b.finished), (200, 200), "{b:?}");
    assert!(b.within_window, "{b:?}");
    assert_eq!(b.tokens, 200 * 300);
    // The interactive requests are served as without it: every one, none
    // of the batch's tokens counted as theirs, time to first token within
    // a step of the run without the batch (their prompts are read first,
    // and a batch line gives up its slot when one waits).
    assert_eq!((shared.finished, shared.unserved), (300, 0));
    assert_eq!(shared.tokens, alone.tokens);
    assert_eq!(shared.slo_attainment, alone.slo_attainment);
    assert!(
        shared.ttft_ms[1] <= alone.ttft_ms[1] + 20.0,
        "TTFT p95 {} with the batch, {} without",
        shared.ttft_ms[1],
        alone.ttft_ms[1]
    );
    // The same batch on a pool of its own (one replica) costs more than
    // what it adds to the shared one.
    let mut own = scenario(Vec::new());
    own.dt = s.dt;
    own.batch = s.batch;
    let separate = run(own, 1).await;
    assert_eq!(separate.batch.unwrap().finished, 200);
    assert!(
        shared.cost < alone.cost + separate.cost,
        "shared {:.4} vs {:.4} + {:.4}",
        shared.cost,
        alone.cost,
        separate.cost
    );
}

#[tokio::test]
async fn cheap_spot_works_a_batch_backlog_off_sooner_and_goes_when_it_is_done() {
    // Spot at a third of on demand's price in zone z; a light interactive
    // trace and a backlog of 2,000 lines (600,000 tokens): strata's pool
    // with up to three spot replicas for the backlog against none.
    use strata_control::controller::BatchSpot;
    let trace = steady(0, Duration::from_secs(5), 400, 100, 51);
    let mut s = with_spot(scenario(trace), Duration::from_secs(3600), vec![1; 4]);
    s.dt = Duration::from_millis(50);
    s.batch = Some(backlog(30, 2_000, Duration::from_secs(7200)));
    let run = |max_replicas| {
        let mut spec = strata_spec(&s);
        // One spot replica for each 300 s of a replica's work left.
        spec.batch_spot = BatchSpot {
            max_replicas,
            work: Duration::from_secs(300),
            ..BatchSpot::default()
        };
        let s = s.clone();
        async move { simulate(&s, &mut Strata::new(spec), Duration::from_secs(60)).await }
    };
    let without = run(0).await;
    let with = run(3).await;
    let (w, o) = (with.batch.unwrap(), without.batch.unwrap());
    assert!(w.within_window && o.within_window, "{w:?} {o:?}");
    let (w_done, o_done) = (w.done_after_s.unwrap(), o.done_after_s.unwrap());
    assert!(
        w_done < 0.6 * o_done,
        "with spot for the backlog done after {w_done:.0} s, without {o_done:.0} s"
    );
    // All of it spot, none on demand; the extra replicas kept busy: they
    // cost less than the whole batch at spot's full-load price per token.
    assert!(
        with.replica_hours.keys().all(|k| k.contains("(spot)")),
        "{:?}",
        with.replica_hours
    );
    let spot = s
        .priced_offers()
        .into_iter()
        .find(|o| o.capacity == CapacityType::Spot)
        .unwrap();
    let at_full_load = w.tokens as f64 / spot.tokens_per_s * spot.price_per_hour / 3600.0;
    assert!(
        with.cost - without.cost < at_full_load,
        "{} vs {} (the batch at full load on spot: {at_full_load})",
        with.cost,
        without.cost
    );
    // The backlog done, the extra replicas go: the last minutes hold what
    // the interactive trace needs.
    let last = with.timeline.last().unwrap().replicas;
    assert!(last <= 2, "{:?}", with.timeline);
    assert_eq!((with.finished, with.unserved), (400, 0));
}

/// A light trace (one small request a second) on spot in zone z with 40 s
/// launches; z sells out at 90 s: the notice then (60 s), the replica gone
/// at 150 s, and the replacement launched at the notice not up before 130 s.
fn reclaimed_at_90_s() -> Scenario {
    let mut s = with_spot(
        scenario(steady(0, Duration::from_secs(1), 200, 50, 10)),
        Duration::from_secs(30),
        vec![1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    );
    s.cloud.notice = Duration::from_secs(60);
    s.cloud.launch_delay = Duration::from_secs(40);
    s
}

#[tokio::test]
async fn a_policy_that_hears_no_notice_routes_to_a_reclaimed_replica_until_it_is_gone() {
    // One spot replica in zone z, reclaimed with notice at 90 s.
    let s = reclaimed_at_90_s();
    let offers = s.priced_offers();
    let of = |c| offers.iter().find(|o| o.capacity == c).unwrap().clone();
    let run = |timing: SkyTiming| {
        let s = &s;
        let (spot, on_demand) = (of(CapacityType::Spot), of(CapacityType::OnDemand));
        async move {
            let rate = RateTarget::new(1.0, 1, 1);
            let mut p = SpotHedge::new(rate, vec![spot], on_demand, 0, 0, timing);
            simulate(s, &mut p, Duration::from_secs(60)).await
        }
    };
    // The minute sampled at 120 s falls within the notice, before any
    // replacement is up. SkyServe hears no notice: its load balancer still
    // sends the replica requests, so it still counts as capacity; one that
    // heeds the notice (strata's way, the simulator's earlier model) has
    // stopped routing to it.
    let sky = run(SkyTiming::skyserve()).await;
    let ideal = run(SkyTiming::ideal()).await;
    let at_120 = |o: &strata_control::simulate::Outcome| o.timeline[2].capacity;
    assert!(at_120(&sky) > 0.0, "{:?}", sky.timeline);
    assert!(at_120(&ideal) <= 0.0, "{:?}", ideal.timeline);
    // What it held when it went started over elsewhere; nothing is lost.
    assert_eq!((sky.unserved, ideal.unserved), (0, 0));
}

#[tokio::test]
async fn skyserve_keeps_sending_a_lost_replica_requests_until_a_probe_times_out_and_its_load_balancer_syncs(
) {
    // Three spot replicas (zones z, y and x; y and x never reclaimed) of
    // SpotHedge pinned at three, up at 40 s; z reclaimed with notice at
    // 90 s, gone at 150 s. From 60 s on, ten small requests a second,
    // which the two replicas left serve within the 1 s objective.
    let mut s = reclaimed_at_90_s();
    s.trace = steady(60, Duration::from_millis(100), 2400, 50, 10);
    let (o, t) = s.offers[1].clone();
    for (zone, price) in [("y", 1.5), ("x", 1.8)] {
        s.offers.push((
            Offering {
                zone: zone.into(),
                price_per_hour: price,
                ..o.clone()
            },
            t.clone(),
        ));
    }
    let offers = s.priced_offers();
    let spot: Vec<_> = offers
        .iter()
        .filter(|o| o.capacity == CapacityType::Spot)
        .cloned()
        .collect();
    let on_demand = offers
        .iter()
        .find(|o| o.capacity == CapacityType::OnDemand)
        .unwrap()
        .clone();
    let run = |timing: SkyTiming| {
        let mut p = SpotHedge::new(
            RateTarget::new(1.0, 3, 3),
            spot.clone(),
            on_demand.clone(),
            0,
            0,
            timing,
        );
        let s = &s;
        async move { simulate(s, &mut p, Duration::from_secs(60)).await }
    };
    let missed = |o: &strata_control::simulate::Outcome| {
        ((1.0 - o.slo_attainment) * o.requests as f64).round() as usize
    };
    // With the notice, the reclaimed replica is drained and nothing misses.
    let ideal = run(SkyTiming::ideal()).await;
    assert_eq!((missed(&ideal), ideal.restarted), (0, 0), "{ideal:?}");
    // SkyServe: the probe at 150 s times out at 165 s and the load
    // balancer syncs at 170 s. Its least-loaded choice sent z a request
    // after it was gone (one: hung there, it stays the busier replica);
    // the request started over at 170 s, 20 s past the objective.
    let sky = run(SkyTiming::skyserve()).await;
    assert_eq!(
        (missed(&sky), sky.restarted, sky.unserved),
        (1, 1, 0),
        "{sky:?}"
    );
    assert!(sky.ttft_ms[2] < 1000.0, "the rest within: {sky:?}");
    // Had the probe failed at once, the sync at 150 s would have dropped
    // z before anything was sent to it.
    let quick = run(SkyTiming {
        probe_timeout: Duration::ZERO,
        ..SkyTiming::skyserve()
    })
    .await;
    assert_eq!((missed(&quick), quick.restarted), (0, 0), "{quick:?}");
}

#[tokio::test]
async fn strata_with_a_drain_before_reclaim_serves_on_a_reclaimed_replica_until_then() {
    // strata's one spot replica in zone z, reclaimed with notice at 90 s.
    let s = reclaimed_at_90_s();
    let run = |drain: Option<Duration>| {
        let mut spec = strata_spec(&s);
        spec.preemption_drain = drain;
        let s = &s;
        async move { simulate(s, &mut Strata::new(spec), Duration::from_secs(60)).await }
    };
    // At 120 s (the second minute sampled) the replacement launched at the
    // notice is not up yet. Drained from the notice on (the default), the
    // reclaimed replica takes nothing; with a 10 s drain before the
    // reclaim it still serves until 140 s.
    let at_notice = run(None).await;
    let late = run(Some(Duration::from_secs(10))).await;
    assert_eq!(
        at_notice.timeline[2].capacity, 0.0,
        "{:?}",
        at_notice.timeline
    );
    assert!(late.timeline[2].capacity > 0.0, "{:?}", late.timeline);
    // Both moved to the replacement; nothing lost either way.
    assert_eq!((at_notice.unserved, late.unserved), (0, 0));
    assert!(late.slo_attainment >= at_notice.slo_attainment);
}
