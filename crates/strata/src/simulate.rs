//! `strata simulate`: replays a request trace against the policies on the
//! simulated cloud and prints what each would have cost and how it served.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use strata_control::controller::PoolSpec;
use strata_control::planner::{cheapest, cheapest_alone, Offer};
use strata_control::provider::sim::{SimSettings, SpotTrace};
use strata_control::simulate::baselines::{RateTarget, RequestRate, SkyTiming, SpotHedge};
use strata_control::simulate::{
    self, lower_bound, BatchBacklog, Outcome, Scenario, Static, Strata,
};
use strata_core::config::{CapacityType, Config, YEAR_SECS};

use crate::cli::SimulateArgs;

fn spot_traces(dir: &PathBuf) -> Result<std::collections::BTreeMap<String, SpotTrace>> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let zone = stem.split('_').next().unwrap_or(stem).to_owned();
        out.insert(zone, SpotTrace::load(&path)?);
    }
    if out.is_empty() {
        bail!("no spot traces (*.json) in {}", dir.display());
    }
    Ok(out)
}

pub async fn run(config: Config, args: SimulateArgs) -> Result<()> {
    for (flag, v) in [
        ("--time-scale", args.time_scale),
        ("--rate", args.rate),
        ("--launch-delay-secs", args.launch_delay_secs + 1.0),
        ("--notice-secs", args.notice_secs + 1.0),
        ("--offset-hours", args.offset_hours + 1.0),
        ("--warmup-mins", args.warmup_mins + 1.0),
        ("--batch-at-mins", args.batch_at_mins + 1.0),
        ("--batch-window-hours", args.batch_window_hours),
        (
            "--skyserve-qps-per-replica",
            args.skyserve_qps_per_replica.unwrap_or(1.0),
        ),
    ] {
        if !(v.is_finite() && v > 0.0) {
            bail!("{flag} must be a positive number");
        }
    }
    for (flag, secs) in [
        ("--offset-hours", args.offset_hours * 3600.0),
        ("--launch-delay-secs", args.launch_delay_secs),
        ("--notice-secs", args.notice_secs),
        ("--warmup-mins", args.warmup_mins * 60.0),
        ("--slo-ttft-ms", args.slo_ttft_ms.unwrap_or(0.0) / 1000.0),
        ("--batch-at-mins", args.batch_at_mins * 60.0),
        ("--batch-window-hours", args.batch_window_hours * 3600.0),
        (
            "--skyserve-upscale-delay-secs",
            args.skyserve_upscale_delay_secs,
        ),
        (
            "--skyserve-downscale-delay-secs",
            args.skyserve_downscale_delay_secs,
        ),
    ] {
        up_to_a_year(flag, secs)?;
    }
    for (flag, v) in [("--time-scale", args.time_scale), ("--rate", args.rate)] {
        if v > 1000.0 {
            bail!("{flag} must be at most 1000");
        }
    }
    if args.dt_ms == 0 || args.dt_ms > 10_000 {
        bail!("--dt-ms must be between 1 and 10000");
    }
    let issues = config.check();
    if let Some(i) = issues.first() {
        bail!("config: {}: {}", i.key, i.message);
    }
    let spot = spot_availability(&config, &args)?;
    let Some(trace) = &args.trace else {
        return run_fleet(&config, &args, &spot).await;
    };
    let report = simulate_pool(&config, "--trace", trace, &args, spot).await?;
    if let Some(dir) = &args.plot {
        plot(dir, &report.outcomes)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
        return Ok(());
    }
    report.print();
    Ok(())
}

/// `NAME=FILE` as `flag` takes it (both sides given).
fn named_file<'a>(arg: &'a str, flag: &str, name: &str) -> Result<(&'a str, &'a str)> {
    arg.split_once('=')
        .filter(|(n, f)| !n.is_empty() && !f.is_empty())
        .with_context(|| format!("{flag} takes {name}=FILE, not `{arg}`"))
}

/// The spot availability the arguments give, by zone.
fn spot_availability(
    config: &Config,
    args: &SimulateArgs,
) -> Result<std::collections::BTreeMap<String, SpotTrace>> {
    let mut spot = match &args.spot_dir {
        Some(dir) => spot_traces(dir)?,
        None => Default::default(),
    };
    for arg in &args.spot_trace {
        let (zone, path) = named_file(arg, "--spot-trace", "ZONE")?;
        spot.insert(
            zone.to_owned(),
            SpotTrace::load(std::path::Path::new(path))?,
        );
    }
    if let Some(path) = &args.spot_events {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let trace = SpotTrace::from_node_events(&text, Duration::from_secs(60))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let zone = match &args.spot_events_zone {
            Some(z) => z.clone(),
            None => config
                .pool_offerings()
                .into_iter()
                .find(|o| o.capacity == CapacityType::Spot)
                .map(|o| o.zone.clone())
                .context("--spot-events needs a spot offer in the catalog")?,
        };
        spot.insert(zone, trace);
    }
    Ok(spot)
}

/// What one pool's trace cost under each policy.
struct Report {
    requests: usize,
    hours: f64,
    peak: f64,
    bound: f64,
    slo_ttft: Duration,
    outcomes: Vec<Outcome>,
    /// With a batch: strata on the trace alone, and on the batch alone.
    separate: Option<(Outcome, Outcome)>,
    batch: Option<BatchBacklog>,
}

impl Report {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "peak_tokens_per_s": self.peak,
            "lower_bound_cost": self.bound,
            "policies": self.outcomes,
            "separate_pools": self.separate.as_ref().map(|(i, b)| serde_json::json!({
                "interactive": i,
                "batch": b,
            })),
        })
    }

    /// With a batch: how each policy ran it, and strata's one pool
    /// against a pool for the trace and another for the batch.
    fn print_batch(&self) {
        let (Some(b), Some((alone, own))) = (&self.batch, &self.separate) else {
            return;
        };
        println!();
        println!(
            "Batch: {} lines of {} + {} tokens at minute {:.0}, window {:.1} h, {} lines in flight, {:.3} of the slots reserved",
            b.lines,
            b.prompt_tokens,
            b.output_tokens,
            b.at.as_secs_f64() / 60.0,
            b.window.as_secs_f64() / 3600.0,
            b.lines_in_flight,
            b.reserved_share
        );
        println!("| policy | batch lines done | done after | within window | lines preempted |");
        println!("|---|---|---|---|---|");
        for o in self.outcomes.iter().chain([own]) {
            let Some(r) = &o.batch else { continue };
            let name = if std::ptr::eq(o, own) {
                "strata, the batch on a pool of its own"
            } else {
                o.policy.as_str()
            };
            println!(
                "| {name} | {} / {} | {} | {} | {} |",
                r.finished,
                r.lines,
                r.done_after_s
                    .map_or("-".into(), |s| format!("{:.1} min", s / 60.0)),
                if r.within_window { "yes" } else { "no" },
                r.preempted
            );
        }
        if let Some(shared) = self.outcomes.iter().find(|o| o.policy == "strata") {
            let separate = alone.cost + own.cost;
            println!(
                "strata, one pool: ${:.2} at {:.2}% within the TTFT objective; separate pools: ${:.2} (the trace alone, {:.2}% within) + ${:.2} (the batch alone) = ${:.2}; one pool costs {:.2}x separate pools",
                shared.cost,
                shared.slo_attainment * 100.0,
                alone.cost,
                alone.slo_attainment * 100.0,
                own.cost,
                separate,
                shared.cost / separate
            );
        }
    }

    fn print(&self) {
        println!(
            "{} requests over {:.1} h, peak {:.0} tokens/s (60 s windows), TTFT objective {:.0} ms",
            self.requests,
            self.hours,
            self.peak,
            self.slo_ttft.as_secs_f64() * 1000.0
        );
        println!(
            "| policy | cost $ | x lower bound | $/1M tokens | TTFT p50/p95/p99 ms | TPOT p50/p95/p99 ms | within TTFT SLO | restarted | unserved | replica-hours |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for o in &self.outcomes {
            let hours: Vec<String> = o
                .replica_hours
                .iter()
                .map(|(k, h)| format!("{k} {h:.2}"))
                .collect();
            println!(
                "| {} | {:.2} | {:.2} | {:.3} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:.2}% | {} | {} | {} |",
                o.policy,
                o.cost,
                o.cost / self.bound,
                o.cost_per_million_tokens,
                o.ttft_ms[0],
                o.ttft_ms[1],
                o.ttft_ms[2],
                o.tpot_ms[0],
                o.tpot_ms[1],
                o.tpot_ms[2],
                o.slo_attainment * 100.0,
                o.restarted,
                o.unserved,
                hours.join(", ")
            );
        }
        println!(
            "| lower bound (perfect foresight, no losses) | {:.2} | 1.00 | | | | | | | |",
            self.bound
        );
        self.print_batch();
    }
}

/// Several models at once (`--model-trace MODEL=FILE`, repeated): each
/// model's pool, as its `[[models]]` entry makes it (its own pool settings
/// and throughput profile), replays its own trace under every policy; the
/// fleet's cost under each policy is the sum, set against static
/// provisioning of each model at its own peak.
async fn run_fleet(
    config: &Config,
    args: &SimulateArgs,
    spot: &std::collections::BTreeMap<String, SpotTrace>,
) -> Result<()> {
    let served = config.served().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut reports: Vec<(String, Report)> = Vec::new();
    for arg in &args.model_trace {
        let (model, path) = named_file(arg, "--model-trace", "MODEL")?;
        let Some(entry) = served.iter().find(|m| m.id.as_deref() == Some(model)) else {
            let ids: Vec<&str> = served.iter().filter_map(|m| m.id.as_deref()).collect();
            bail!(
                "--model-trace {model}: not a model of the config's [[models]] ({})",
                ids.join(", ")
            );
        };
        if reports.iter().any(|(m, _)| m == model) {
            bail!("--model-trace {model}: given twice");
        }
        let report = simulate_pool(
            &entry.config,
            &format!("--model-trace {model}="),
            std::path::Path::new(path),
            args,
            spot.clone(),
        )
        .await?;
        if let Some(dir) = &args.plot {
            plot(&dir.join(model), &report.outcomes)?;
        }
        reports.push((model.to_owned(), report));
    }
    let fleet = fleet_rows(&reports);
    let bound: f64 = reports.iter().map(|(_, r)| r.bound).sum();
    if args.json {
        let models: Vec<serde_json::Value> = reports
            .iter()
            .map(|(model, r)| {
                let mut v = r.json();
                v["model"] = model.as_str().into();
                v
            })
            .collect();
        let fleet: Vec<serde_json::Value> = fleet
            .iter()
            .map(|row| {
                serde_json::json!({
                    "policy": row.policy,
                    "cost": row.cost,
                    "x_static": row.x_static,
                    "slo_attainment": row.slo_attainment,
                    "unserved": row.unserved,
                })
            })
            .collect();
        let v = serde_json::json!({
            "models": models,
            "fleet": fleet,
            "lower_bound_cost": bound,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for (model, r) in &reports {
        println!("## {model}");
        r.print();
        println!();
    }
    println!("## The fleet ({} models)", reports.len());
    println!(
        "| policy | cost $ | x static per model | x lower bound | within TTFT SLO | unserved |"
    );
    println!("|---|---|---|---|---|---|");
    for row in &fleet {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2}% | {} |",
            row.policy,
            row.cost,
            row.x_static,
            row.cost / bound,
            row.slo_attainment * 100.0,
            row.unserved
        );
    }
    println!("| lower bound (perfect foresight, no losses) | {bound:.2} | | 1.00 | | |");
    Ok(())
}

/// One policy over every model of the fleet.
struct FleetRow {
    policy: String,
    cost: f64,
    /// Against static provisioning of each model at its own peak.
    x_static: f64,
    /// Of every model's requests, the share within its TTFT objective.
    slo_attainment: f64,
    unserved: u64,
}

/// Each policy's outcomes summed over the models (static provisioning,
/// sized per model, is one row), in the order of the first model's.
fn fleet_rows(reports: &[(String, Report)]) -> Vec<FleetRow> {
    const STATIC: &str = "static per model at its peak (on demand)";
    let name = |o: &Outcome| match o.policy.starts_with("static") {
        true => STATIC.to_owned(),
        false => o.policy.clone(),
    };
    let mut rows: Vec<FleetRow> = Vec::new();
    for (_, r) in reports {
        for o in &r.outcomes {
            let policy = name(o);
            let at = match rows.iter().position(|row| row.policy == policy) {
                Some(at) => at,
                None => {
                    rows.push(FleetRow {
                        policy,
                        cost: 0.0,
                        x_static: 0.0,
                        slo_attainment: 0.0,
                        unserved: 0,
                    });
                    rows.len() - 1
                }
            };
            let row = &mut rows[at];
            row.cost += o.cost;
            row.slo_attainment += o.slo_attainment * r.requests as f64;
            row.unserved += o.unserved as u64;
        }
    }
    let requests: f64 = reports.iter().map(|(_, r)| r.requests as f64).sum();
    let fixed = rows
        .iter()
        .find(|r| r.policy == STATIC)
        .map_or(f64::NAN, |r| r.cost);
    for row in &mut rows {
        row.slo_attainment /= requests.max(1.0);
        row.x_static = row.cost / fixed;
    }
    rows
}

/// Every policy on one pool's trace: `config` is the pool's (its catalog,
/// instance types and `[pool]`).
async fn simulate_pool(
    config: &Config,
    flag: &str,
    trace_path: &std::path::Path,
    args: &SimulateArgs,
    spot: std::collections::BTreeMap<String, SpotTrace>,
) -> Result<Report> {
    let trace = simulate::trace::load(trace_path)
        .with_context(|| format!("{flag} {}: cannot load the trace", trace_path.display()))?;
    let trace = simulate::trace::reshape(&trace, args.time_scale, args.rate);
    if trace.is_empty() {
        bail!("the trace {} has no requests", trace_path.display());
    }
    let scenario = Scenario {
        trace,
        offers: PoolSpec::from_config(config, 1).offers,
        cloud: SimSettings {
            spot,
            offset: Duration::from_secs_f64(args.offset_hours * 3600.0),
            launch_delay: Duration::from_secs_f64(args.launch_delay_secs),
            launch_delays: config
                .instance_types
                .iter()
                .filter_map(|(name, t)| {
                    Some((name.clone(), Duration::from_secs_f64(t.launch_secs?)))
                })
                .collect(),
            notice: Duration::from_secs_f64(args.notice_secs),
            drain: Duration::from_secs(30),
        },
        slo_ttft: Duration::from_secs_f64(
            args.slo_ttft_ms
                .or(config.pool.slo_ttft_p95_ms)
                .unwrap_or(2000.0)
                / 1000.0,
        ),
        dt: Duration::from_millis(args.dt_ms),
        warmup: Duration::from_secs_f64(args.warmup_mins * 60.0),
        batch: match args.batch_lines {
            0 => None,
            lines => Some(BatchBacklog {
                at: up_to_a_year("--batch-at-mins", args.batch_at_mins * 60.0)?,
                lines,
                prompt_tokens: args.batch_prompt_tokens,
                output_tokens: args.batch_output_tokens,
                window: up_to_a_year("--batch-window-hours", args.batch_window_hours * 3600.0)?,
                lines_in_flight: config.gateway.batch_lines_in_flight,
                reserved_share: config.gateway.batch_reserved_share,
            }),
        },
    };
    let offers = scenario.priced_offers();
    let peak = scenario
        .demand(Duration::from_secs(60))
        .into_iter()
        .fold(0.0, f64::max);
    // The baselines run one on-demand type (SkyServe's replica): the one
    // that covers the peak alone for least (the cheapest per token may be
    // a big machine the trace would run mostly idle).
    let Some((on_demand, peak_replicas)) =
        cheapest_alone(&offers, CapacityType::OnDemand, None, peak)
    else {
        bail!("the catalog offers no on-demand capacity to compare with");
    };
    let on_demand = on_demand.clone();
    let mut strata_config = config.clone();
    strata_config.pool.autoscale = true;
    // The controller knows the simulated cloud's notice (it weighs a
    // zone's launch time against it: `pool.spot_risk_window_secs`).
    strata_config.pool.preemption_notice_secs = args.notice_secs;
    let tail = Duration::from_secs(1800);
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut static_peak = Static {
        offer: on_demand.clone(),
        replicas: peak_replicas,
    };
    outcomes.push(run_one(&scenario, &mut static_peak, tail).await);
    // SkyServe's policies get the same capacity, by queries: a replica's
    // tokens/s at the target utilisation over the mean tokens of a request
    // (unless --skyserve-qps-per-replica sets it, as a SkyServe user would
    // after a load test).
    let tokens_per_request = scenario
        .trace
        .iter()
        .map(|r| f64::from(r.prompt_tokens + r.output_tokens))
        .sum::<f64>()
        / scenario.trace.len() as f64;
    let qps = args
        .skyserve_qps_per_replica
        .unwrap_or(on_demand.tokens_per_s * config.pool.target_utilisation / tokens_per_request);
    let pool = &config.pool;
    let (upscale, downscale) = (
        up_to_a_year(
            "--skyserve-upscale-delay-secs",
            args.skyserve_upscale_delay_secs,
        )?,
        up_to_a_year(
            "--skyserve-downscale-delay-secs",
            args.skyserve_downscale_delay_secs,
        )?,
    );
    let rate = || {
        let mut r = RateTarget::new(qps, pool.min_replicas.max(1), pool.max_replicas);
        (r.upscale_delay, r.downscale_delay) = (upscale, downscale);
        r
    };
    let mut request_rate = RequestRate::new(
        rate(),
        on_demand.clone(),
        pool.spot_hedge,
        SkyTiming::skyserve(),
    );
    outcomes.push(run_one(&scenario, &mut request_rate, tail).await);
    // SpotHedge as a SkyServe user sets it up: its replica's type pinned
    // (the on-demand one), in every zone that offers it as spot; then
    // unpinned, the cheapest spot type of each zone (SkyServe's choice for
    // an accelerator without a type), where that differs; then unpinned
    // with the simulator's earlier, generous timing.
    // The cheapest spot offer of `of` in each zone, zones in catalog order.
    let spot_of = |of: &[Offer]| -> Vec<Offer> {
        let mut per_zone: Vec<Offer> = Vec::new();
        for o in of.iter().filter(|o| o.capacity == CapacityType::Spot) {
            if per_zone.iter().all(|s| s.zone != o.zone) {
                per_zone.extend(cheapest(of, CapacityType::Spot, Some(&o.zone)).cloned());
            }
        }
        per_zone
    };
    let same_type: Vec<Offer> = offers
        .iter()
        .filter(|o| o.instance_type == on_demand.instance_type)
        .cloned()
        .collect();
    let (pinned, any_type) = (spot_of(&same_type), spot_of(&offers));
    let hedge = |spot: Vec<Offer>, timing: SkyTiming| {
        SpotHedge::new(rate(), spot, on_demand.clone(), pool.spot_hedge, 0, timing)
    };
    if !pinned.is_empty() {
        let mut fair = hedge(pinned.clone(), SkyTiming::skyserve()).named(format!(
            "SpotHedge ({}, SkyServe timing)",
            on_demand.instance_type
        ));
        outcomes.push(run_one(&scenario, &mut fair, tail).await);
    }
    if !any_type.is_empty() && any_type != pinned {
        let mut unpinned = hedge(any_type.clone(), SkyTiming::skyserve())
            .named("SpotHedge (cheapest type per zone, SkyServe timing)");
        outcomes.push(run_one(&scenario, &mut unpinned, tail).await);
    }
    if !any_type.is_empty() {
        let mut ideal = hedge(any_type.clone(), SkyTiming::ideal())
            .named("SpotHedge (cheapest type per zone, ideal timing)");
        outcomes.push(run_one(&scenario, &mut ideal, tail).await);
    }
    let strata = || Strata::new(PoolSpec::from_config(&strata_config, 1));
    outcomes.push(run_one(&scenario, &mut strata(), tail).await);
    // Against separate pools: strata on the trace alone, and on the
    // batch alone.
    let separate = match scenario.batch {
        None => None,
        Some(_) => {
            let alone = Scenario {
                batch: None,
                ..scenario.clone()
            };
            let own = Scenario {
                trace: Vec::new(),
                ..scenario.clone()
            };
            Some((
                run_one(&alone, &mut strata(), tail).await,
                run_one(&own, &mut strata(), tail).await,
            ))
        }
    };
    let bound = lower_bound(&scenario);
    Ok(Report {
        requests: scenario.trace.len(),
        hours: scenario
            .trace
            .last()
            .map_or(0.0, |r| r.at.as_secs_f64() / 3600.0),
        peak,
        bound,
        slo_ttft: scenario.slo_ttft,
        outcomes,
        separate,
        batch: scenario.batch,
    })
}

/// `secs` of a flag as a duration: from zero to a year (a simulated year
/// takes hours to run; far beyond, no duration holds it).
fn up_to_a_year(flag: &str, secs: f64) -> Result<Duration> {
    match secs {
        s if (0.0..=YEAR_SECS).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => bail!("{flag} must be from 0 to a year"),
    }
}

/// One policy's run, with a progress bar on a terminal.
async fn run_one(s: &Scenario, policy: &mut dyn simulate::Policy, tail: Duration) -> Outcome {
    let mut bar = crate::progress::Bar::new(format!("{:<40}", policy.name()));
    let outcome =
        simulate::simulate_with_progress(s, policy, tail, &mut |done| bar.set(done, "")).await;
    bar.finish("done");
    outcome
}

/// demand_capacity, replicas and cost charts in `dir`, each as .svg and .png.
fn plot(dir: &PathBuf, outcomes: &[Outcome]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let minutes = |o: &Outcome, f: &dyn Fn(&simulate::Minute) -> f64| -> Vec<(f64, f64)> {
        o.timeline
            .iter()
            .enumerate()
            .map(|(i, t)| (i as f64, f(t)))
            .collect()
    };
    let mut capacity = vec![(
        "demand".to_string(),
        outcomes
            .first()
            .map(|o| minutes(o, &|t| t.demand))
            .unwrap_or_default(),
    )];
    capacity.extend(
        outcomes
            .iter()
            .map(|o| (o.policy.clone(), minutes(o, &|t| t.capacity))),
    );
    let replicas: Vec<_> = outcomes
        .iter()
        .map(|o| (o.policy.clone(), minutes(o, &|t| f64::from(t.replicas))))
        .collect();
    let cost: Vec<_> = outcomes
        .iter()
        .map(|o| (o.policy.clone(), minutes(o, &|t| t.cost)))
        .collect();
    for (file, title, y, series) in [
        (
            "demand_capacity",
            "Token demand and ready capacity",
            "tokens/s",
            capacity,
        ),
        (
            "replicas",
            "Replicas (starting, serving and draining)",
            "replicas",
            replicas,
        ),
        ("cost", "Cost so far", "dollars", cost),
    ] {
        let chart = crate::chart::chart(title, "minutes", y, &series);
        for (path, bytes) in [
            (dir.join(format!("{file}.svg")), chart.svg().into_bytes()),
            (dir.join(format!("{file}.png")), chart.png()),
        ] {
            std::fs::write(&path, bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}
