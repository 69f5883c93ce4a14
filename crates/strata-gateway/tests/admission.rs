//! The admission path against a real SQLite store: what a refused request
//! leaves behind in the limits and the fair queue.

use std::sync::Arc;
use std::time::Duration;

use strata_core::openai::Usage;
use strata_core::store::Store;
use strata_core::tenant::{Isolation, RateLimits, Role, Tenant, TenantId};
use strata_gateway::tenancy::admission::{Estimate, Gate, GateSettings};
use strata_gateway::tenancy::principal::Principal;
use strata_store::{Kek, KekSource, SqlStore, Vault};

async fn gate(dir: &std::path::Path) -> Arc<Gate> {
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
    Gate::new(
        GateSettings {
            slots_per_replica: 1,
            max_waiting_per_tenant: 1,
            queue_timeout: Duration::from_millis(100),
            pricing: Default::default(),
            batch_price_factor: 0.5,
            batch_reserved_share: 0.125,
            budget_refresh: None,
        },
        store,
        None,
        Default::default(),
    )
}

fn principal() -> Arc<Principal> {
    let tenant = Tenant {
        id: TenantId::new(),
        name: "t".into(),
        isolation: Isolation::Shared,
        limits: RateLimits::default(),
        priority: Default::default(),
        monthly_budget_usd: None,
        created_at_ms: 0,
    };
    let (key, _) =
        strata_gateway::tenancy::keys::new_key_record(&tenant.id, "k".into(), Role::Member);
    Arc::new(Principal {
        key,
        tenant,
        class: Default::default(),
    })
}

#[tokio::test]
async fn a_refused_request_gives_the_tenant_no_fair_queue_credit() {
    let dir = tempfile::tempdir().unwrap();
    let gate = gate(dir.path()).await;
    let p = principal();
    let tenant = p.tenant.id.to_string();
    let queue = gate.pools().queue(None, None, || 1);
    let estimate = Estimate {
        prompt_tokens: 10,
        output_tokens: 20,
    };
    // One request served exactly as estimated: the tenant's counter is its service.
    let mut served = gate.admit(&p, 1, "m", "m", None, estimate).await.unwrap();
    served.record(Usage::new(10, 20));
    drop(served);
    let counted = queue.counter(&tenant);
    assert_eq!(counted, 10.0 + 2.0 * 20.0);
    // No slots: one request waits until it times out, the next finds the queue full.
    queue.set_capacity(0);
    let waiting = {
        let (gate, p) = (gate.clone(), p.clone());
        tokio::spawn(async move {
            gate.admit(&p, 1, "m", "m", None, estimate)
                .await
                .map(|_| ())
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let full = gate
        .admit(&p, 1, "m", "m", None, estimate)
        .await
        .err()
        .unwrap();
    assert_eq!(full.status, 429);
    let timed_out = waiting.await.unwrap().unwrap_err();
    assert_eq!(timed_out.status, 429);
    assert_eq!(
        queue.counter(&tenant),
        counted,
        "requests that never ran must not lower the tenant's counter"
    );
}
