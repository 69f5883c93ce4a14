//! What authentication, rate limits, the budget check and the fair queue add
//! to each request, measured in-process on the real code: a real SQLite
//! store, a cached key, limits and a budget that never refuse, and a fair
//! queue with free slots. Prints p50/p99 per request and the rate reached.
//!
//! Run: `cargo bench -p strata-gateway --bench admission`

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_core::openai::Usage;
use strata_core::store::Store;
use strata_core::tenant::{Isolation, RateLimits, Role, Tenant, TenantId};
use strata_gateway::tenancy::admission::{Estimate, Gate, GateSettings};
use strata_gateway::tenancy::auth::Authenticator;
use strata_store::{Kek, KekSource, SqlStore, Vault};

const TASKS: usize = 32;
const PER_TASK: usize = 5_000;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let vault = Arc::new(
        Vault::open(
            &dir.path().join("keyring.json"),
            Kek::generate(),
            KekSource::Environment,
        )
        .expect("keyring"),
    );
    let store: Arc<dyn Store> = Arc::new(
        SqlStore::open(&dir.path().join("bench.db"), vault)
            .await
            .expect("store"),
    );
    let generous = RateLimits {
        requests_per_minute: Some(1_000_000_000),
        tokens_per_minute: Some(1_000_000_000),
        batch_tokens_per_minute: None,
    };
    let mut secrets = Vec::new();
    for t in 0..4 {
        let tenant = Tenant {
            id: TenantId::new(),
            name: format!("bench-{t}"),
            isolation: Isolation::Shared,
            limits: generous,
            priority: Default::default(),
            monthly_budget_usd: Some(1e9),
            created_at_ms: 0,
        };
        store.create_tenant(&tenant).await.expect("tenant");
        let (mut key, secret) =
            strata_gateway::tenancy::keys::new_key_record(&tenant.id, "bench".into(), Role::Member);
        key.limits = generous;
        store.create_key(&key).await.expect("key");
        secrets.push(format!("Bearer {secret}"));
    }
    let mut pricing = std::collections::BTreeMap::new();
    pricing.insert(
        "m".to_owned(),
        strata_core::config::ModelPrice {
            prompt_per_million: 0.1,
            completion_per_million: 0.4,
        },
    );
    let gate = Gate::new(
        GateSettings {
            slots_per_replica: 64,
            max_waiting_per_tenant: 1024,
            queue_timeout: Duration::from_secs(10),
            pricing,
            batch_price_factor: 0.5,
            batch_reserved_share: 0.125,
            budget_refresh: None,
        },
        store.clone(),
        None,
        Default::default(),
    );
    // The shared pool's queue with more slots than tasks: nobody waits.
    gate.pools().queue(None, None, || 4 * TASKS);
    let auth = Arc::new(Authenticator::new(store.clone(), store.clone()));
    let estimate = Estimate {
        prompt_tokens: 40,
        output_tokens: 64,
    };

    for round in ["warm-up", "measured"] {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let (auth, gate, header) = (auth.clone(), gate.clone(), secrets[t % 4].clone());
            tasks.spawn(async move {
                let mut took = Vec::with_capacity(PER_TASK);
                for _ in 0..PER_TASK {
                    let t0 = Instant::now();
                    let p = auth.authenticate(Some(&header)).await.expect("valid key");
                    let mut charge = gate
                        .admit(&p, 1, "m", "m", None, estimate)
                        .await
                        .expect("admitted");
                    charge.record(Usage::new(38, 60));
                    drop(charge);
                    took.push(t0.elapsed());
                }
                took
            });
        }
        let mut all = Vec::with_capacity(TASKS * PER_TASK);
        while let Some(r) = tasks.join_next().await {
            all.extend(r.expect("task"));
        }
        let wall = started.elapsed().as_secs_f64();
        all.sort();
        if round == "measured" {
            println!(
                "auth+limits+budget+fair queue: {} requests, {TASKS} concurrent, {:.0} req/s; p50 {:.1} us, p99 {:.1} us, max {:.1} us",
                all.len(),
                all.len() as f64 / wall,
                percentile(&all, 0.50),
                percentile(&all, 0.99),
                percentile(&all, 1.0),
            );
        }
    }
}
