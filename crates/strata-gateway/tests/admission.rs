//! The admission path against a real SQLite store: what a refused request
//! leaves behind in the limits and the fair queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_core::openai::Usage;
use strata_core::store::Store;
use strata_core::tenant::{Isolation, RateLimits, Role, Tenant, TenantId};
use strata_gateway::admission::{Estimate, Policy};
use strata_gateway::auth::Principal;
use strata_gateway::fairq::Pools;
use strata_gateway::replicas::ReplicaSet;
use strata_store::{Kek, KekSource, SqlStore, Vault};

async fn policy(dir: &std::path::Path) -> Arc<Policy> {
    let vault = Vault::open(
        &dir.join("keyring.json"),
        Kek::generate(),
        KekSource::Environment,
    )
    .unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqlStore::open(&dir.join("s.db"), Arc::new(vault))
            .await
            .unwrap(),
    );
    Arc::new(Policy {
        limiter: Default::default(),
        shared_limits: None,
        budgets: Default::default(),
        budget_refresh: None,
        metrics: Default::default(),
        pools: Pools::new(1),
        replicas: Arc::new(ReplicaSet::default()),
        slots_per_replica: 1,
        pricing: Default::default(),
        store,
        queue_timeout: Duration::from_millis(100),
        epoch: Instant::now(),
    })
}

fn principal() -> Arc<Principal> {
    let tenant = Tenant {
        id: TenantId::new(),
        name: "t".into(),
        isolation: Isolation::Shared,
        limits: RateLimits::default(),
        monthly_budget_usd: None,
        created_at_ms: 0,
    };
    let (key, _) = strata_gateway::admin::new_key_record(&tenant.id, "k".into(), Role::Member);
    Arc::new(Principal { key, tenant })
}

#[tokio::test]
async fn a_refused_request_gives_the_tenant_no_fair_queue_credit() {
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path()).await;
    let p = principal();
    let tenant = p.tenant.id.to_string();
    let queue = policy.pools.queue(None, || 1);
    let estimate = Estimate {
        prompt_tokens: 10,
        output_tokens: 20,
    };
    // One request served exactly as estimated: the tenant's counter is its service.
    let mut served = policy.admit(&p, None, "m", estimate).await.unwrap();
    served.record(Usage::new(10, 20));
    drop(served);
    let counted = queue.counter(&tenant);
    assert_eq!(counted, 10.0 + 2.0 * 20.0);
    // No slots: one request waits until it times out, the next finds the queue full.
    queue.set_capacity(0);
    let waiting = {
        let (policy, p) = (policy.clone(), p.clone());
        tokio::spawn(async move { policy.admit(&p, None, "m", estimate).await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let full = policy.admit(&p, None, "m", estimate).await.err().unwrap();
    assert_eq!(full.status, 429);
    let timed_out = waiting.await.unwrap().unwrap_err();
    assert_eq!(timed_out.status, 429);
    assert_eq!(
        queue.counter(&tenant),
        counted,
        "requests that never ran must not lower the tenant's counter"
    );
}
