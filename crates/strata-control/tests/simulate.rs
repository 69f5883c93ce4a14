//! The simulator end to end on small hand-made scenarios: a static pool's
//! timings and bill come out as computed by hand, strata's controller
//! scales a step of load up and back down, and a run is deterministic.

use std::collections::BTreeMap;
use std::time::Duration;

use strata_control::autoscale::ScalePolicy;
use strata_control::controller::PoolSpec;
use strata_control::provider::sim::SimSettings;
use strata_control::simulate::trace::TraceRequest;
use strata_control::simulate::{lower_bound, simulate, Scenario, Static, Strata};
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
    }
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
    let spec = || {
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
            slots_per_replica: 4,
        };
        spec.scale.as_mut().unwrap().scale_to_zero_after = None;
        spec
    };
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
    use strata_control::provider::sim::SpotTrace;
    let mut trace = steady(0, Duration::from_millis(500), 360, 400, 1000);
    for (i, r) in trace.iter_mut().enumerate() {
        r.output_tokens += (i as u32 * 37) % 800; // unlike, so order matters
    }
    let mut s = scenario(trace);
    s.offers.push((
        Offering {
            instance_type: "small".into(),
            zone: "z".into(),
            capacity: CapacityType::Spot,
            price_per_hour: 1.2,
        },
        profile(),
    ));
    s.cloud.notice = Duration::from_secs(10);
    s.cloud.spot.insert(
        "z".into(),
        SpotTrace {
            gap: Duration::from_secs(60),
            data: vec![1, 0, 1, 1, 1, 1],
            capped: false,
        },
    );
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
