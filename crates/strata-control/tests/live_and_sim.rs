//! The live control loop (`controller::run`, on tokio's clock) and the
//! simulator's (`Driver::tick` on a virtual clock) take the same decisions
//! for the same sequence of gateway loads: both are the same code, and this
//! keeps it so. The live loop runs on a paused tokio clock against the `sim`
//! provider, its decisions kept in memory.

use std::collections::BTreeMap;
use std::time::Duration;

use strata_control::autoscale::ScalePolicy;
use strata_control::controller::{self, Controller, Driver, PoolSpec};
use strata_control::provider::sim::{SimProvider, SimSettings};
use strata_core::config::{CapacityType, InstanceType, Offering};
use strata_core::store::{DecisionRecord, DecisionStore, StoreError};
use strata_core::Load;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The decisions the live loop stores.
#[derive(Default)]
struct Kept(std::sync::Mutex<Vec<DecisionRecord>>);

#[async_trait::async_trait]
impl DecisionStore for Kept {
    async fn record_decision(&self, d: &DecisionRecord) -> Result<(), StoreError> {
        self.0.lock().unwrap().push(d.clone());
        Ok(())
    }

    async fn decisions(&self, _limit: u32) -> Result<Vec<DecisionRecord>, StoreError> {
        Ok(self.0.lock().unwrap().clone())
    }
}

fn spec() -> PoolSpec {
    let t = InstanceType {
        threads: 0,
        prefill_tokens_per_s: 1000.0,
        decode_tokens_per_s: vec![100.0],
        launch_secs: None,
        gpus: 0,
    };
    let offer = |zone: &str, capacity, price| {
        (
            Offering {
                instance_type: "small".into(),
                zone: zone.into(),
                capacity,
                price_per_hour: price,
            },
            t.clone(),
        )
    };
    PoolSpec {
        name: "default".into(),
        offers: vec![
            offer("a", CapacityType::Spot, 0.1),
            offer("b", CapacityType::Spot, 0.1),
            offer("a", CapacityType::OnDemand, 0.3),
        ],
        unit: t,
        scale: Some(ScalePolicy {
            min_replicas: 1,
            max_replicas: 8,
            stable_window: Duration::from_secs(10),
            panic_window: Duration::from_secs(3),
            scale_down_delay: Duration::from_secs(10),
            scale_to_zero_after: Some(Duration::from_secs(30)),
            ..ScalePolicy::default()
        }),
        fixed_replicas: 1,
        spot_hedge: 0,
        spot_cooldown: Duration::from_secs(60),
        spot_zone_premium: 0.25,
        spot_max_zone_share: 1.0,
        spot_risk_window: Duration::ZERO,
        notice: Duration::from_secs(120),
        preemption_drain: None,
        slots_per_replica: 4,
        batch_spot: Default::default(),
    }
}

fn cloud() -> SimSettings {
    SimSettings {
        spot: BTreeMap::new(),
        offset: Duration::ZERO,
        launch_delay: Duration::from_secs(2),
        launch_delays: Default::default(),
        notice: Duration::from_secs(30),
        drain: Duration::from_secs(5),
    }
}

/// The gateway's load at `t`: quiet, a ramp with queueing, quiet again.
fn load_at(t: Duration) -> Load {
    let s = t.as_secs_f64();
    let rate = match s {
        s if s < 5.0 => 0.0,
        s if s < 40.0 => 50.0 * (s - 5.0).min(10.0),
        _ => 0.0,
    };
    // Tokens served so far: the integral of the rate.
    let served = |s: f64| {
        50.0 * ((s.min(15.0) - 5.0).max(0.0).powi(2) / 2.0) + 500.0 * (s.min(40.0) - 15.0).max(0.0)
    };
    Load {
        requests_total: (served(s) / 100.0) as u64,
        tokens_total: served(s) as u64,
        prompt_tokens_total: (served(s) * 0.3) as u64,
        in_flight: if rate > 0.0 { 4 } else { 0 },
        waiting: usize::from(rate > 300.0) * 3,
        batch_lines: 0,
        batch_tokens_per_s: 0.0,
        batch_backlog_tokens: 0.0,
        routable: 1,
        ttft_p95_ms: None,
        tpot_p95_ms: None,
    }
}

/// Load changes land between the loops' 250 ms ticks, never on them.
fn load_times() -> impl Iterator<Item = Duration> {
    (0..400).map(|i| Duration::from_millis(125 + 250 * i))
}

#[tokio::test(start_paused = true)]
async fn the_live_loop_and_the_simulators_take_the_same_decisions() {
    // Live: controller::run on tokio's (paused, auto-advancing) clock.
    let store = std::sync::Arc::new(Kept::default());
    let (tx, rx) = watch::channel(load_at(Duration::ZERO));
    let stop = CancellationToken::new();
    let started = tokio::time::Instant::now();
    let metrics = std::sync::Arc::new(strata_control::metrics::ControllerMetrics::new());
    let live = tokio::spawn(controller::run(
        Controller::new(spec()),
        SimProvider::new(cloud()),
        rx,
        store.clone() as std::sync::Arc<dyn DecisionStore>,
        Some(metrics.clone()),
        stop.clone(),
    ));
    for at in load_times() {
        tokio::time::sleep_until(started + at).await;
        tx.send_replace(load_at(at));
    }
    stop.cancel();
    live.await.unwrap().unwrap();
    // Oldest first.
    let live_decisions: Vec<(u32, u32, String)> = store
        .decisions(1000)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.from_replicas, d.to_replicas, d.reason))
        .collect();

    // Simulated: Driver::tick every 250 ms of a virtual clock.
    let mut driver = Driver::new(Controller::new(spec()));
    let mut provider = SimProvider::new(cloud());
    let mut sim_decisions = Vec::new();
    for i in 0..400u32 {
        let now = Duration::from_millis(250) * i;
        provider.advance_to(now);
        // The load the live loop saw at this tick: the last change before it.
        let seen = load_times()
            .take_while(|t| *t < now)
            .last()
            .map_or(load_at(Duration::ZERO), load_at);
        if let Some(t) = driver.tick(&mut provider, now, &seen).await {
            if t.changed {
                sim_decisions.push(t.step.change());
            }
        }
    }
    assert!(
        sim_decisions.len() >= 3,
        "the load makes the pool change: {sim_decisions:?}"
    );
    assert_eq!(live_decisions, sim_decisions);
    // The metrics counted the same decisions, by reason.
    let text = metrics.render();
    let mut reasons = std::collections::BTreeMap::<&str, usize>::new();
    for (_, _, reason) in &live_decisions {
        *reasons.entry(reason.as_str()).or_default() += 1;
    }
    for (reason, n) in reasons {
        let line = format!(
            "strata_controller_decisions_total{{pool=\"default\",reason=\"{reason}\"}} {n}"
        );
        assert!(text.contains(&line), "{line} not in\n{text}");
    }
}
