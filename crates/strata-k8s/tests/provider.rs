//! The Kubernetes provider and Lease election against the fake API server
//! (`fake_api`: kube's tower-test mock with an in-memory cluster), asserting
//! the exact calls for scale-up, scale-down, a preemption taint, a Pod
//! deleted by someone else, adoption by a new leader, and leader hand-over.

mod fake_api;

use std::sync::Arc;
use std::time::Duration;

use fake_api::{Cluster, Shared};
use strata_control::leader::Elector;
use strata_control::planner::{Offer, Slot};
use strata_control::provider::{Provider, ProviderEvent};
use strata_core::config::{CapacityType, Config};
use strata_core::store::{InstanceState, InstanceStore, LeaseStore};
use strata_k8s::lease::KubeLeases;
use strata_k8s::provider::KubeProvider;
use strata_k8s::render::{ExternalServer, ModelFile, PoolModel, Variant};
use strata_store::SqlStore;
use tokio_util::sync::CancellationToken;

const SPOT_TAINT: &str = "aws-node-termination-handler/spot-itn";

fn offer(zone: &str, capacity: CapacityType, price: f64) -> Offer {
    Offer {
        instance_type: "g5.xlarge".into(),
        zone: zone.into(),
        capacity,
        price_per_hour: price,
        tokens_per_s: 900.0,
    }
}

/// The one model of `[engine]`, as the controller serves it.
fn gemma() -> PoolModel {
    model("default", "gemma-3-270m-q4_k_m")
}

/// A pool serving the built-in `source` as `pool`.
fn model(pool: &str, source: &str) -> PoolModel {
    PoolModel {
        pool: pool.into(),
        name: if pool == "default" { source } else { pool }.into(),
        file: ModelFile::Builtin {
            name: source.into(),
            file_name: format!("{source}.gguf"),
            sha256: "00".repeat(32),
        },
        engine: (pool != "default").then(|| "{}".into()),
        external: None,
    }
}

fn deployment(zone: &str, capacity: CapacityType) -> String {
    Variant {
        pool: "default".into(),
        instance_type: "g5.xlarge".into(),
        zone: zone.into(),
        capacity,
    }
    .name()
}

struct Setup {
    cluster: Shared,
    provider: KubeProvider,
    store: Arc<SqlStore>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let cluster = Cluster::shared();
    {
        let mut c = cluster.lock().unwrap();
        c.add_node("ip-10-0-1-10", "g5.xlarge", "us-east-1a", "spot");
        c.add_node("ip-10-0-2-20", "g5.xlarge", "us-east-1b", "on-demand");
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqlStore::open_without_vault(&dir.path().join("s.db"))
            .await
            .unwrap(),
    );
    let provider = KubeProvider::new(
        fake_api::client(cluster.clone()),
        Arc::new(Config::default()),
        gemma(),
        store.clone(),
    )
    .with_poll_every(Duration::ZERO)
    .with_drain_wait(Duration::ZERO);
    Setup {
        cluster,
        provider,
        store,
        _dir: dir,
    }
}

/// A provider of `model`'s pool under `config` on `s`'s cluster and store,
/// polling the cluster at every call.
fn provider_on(s: &Setup, config: Config, model: PoolModel, drain_wait: Duration) -> KubeProvider {
    KubeProvider::new(
        fake_api::client(s.cluster.clone()),
        Arc::new(config),
        model,
        s.store.clone(),
    )
    .with_poll_every(Duration::ZERO)
    .with_drain_wait(drain_wait)
}

fn calls(s: &Setup) -> Vec<String> {
    s.cluster.lock().unwrap().take_calls()
}

fn reconcile(s: &Setup, ready: bool) {
    s.cluster.lock().unwrap().reconcile(ready);
}

fn ready_ids(events: &[ProviderEvent]) -> Vec<String> {
    let mut ids: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            ProviderEvent::Ready { id } => Some(id.clone()),
            _ => None,
        })
        .collect();
    ids.sort();
    ids
}

/// Three replicas: two spot in us-east-1a, one on demand in us-east-1b.
async fn three_ready(s: &mut Setup) -> Vec<String> {
    let spot = offer("us-east-1a", CapacityType::Spot, 0.45);
    let od = offer("us-east-1b", CapacityType::OnDemand, 1.006);
    let a = s.provider.launch(&spot).await.unwrap();
    let b = s.provider.launch(&spot).await.unwrap();
    let c = s.provider.launch(&od).await.unwrap();
    reconcile(s, true);
    let events = s.provider.poll().await;
    let mut ids = vec![a, b, c];
    ids.sort();
    assert_eq!(ready_ids(&events), ids);
    ids
}

#[tokio::test]
async fn scale_up_applies_one_deployment_per_variant_and_records_pod_endpoints() {
    let mut s = setup().await;
    let spot = offer("us-east-1a", CapacityType::Spot, 0.45);
    let od = offer("us-east-1b", CapacityType::OnDemand, 1.006);
    let a = s.provider.launch(&spot).await.unwrap();
    s.provider.launch(&spot).await.unwrap();
    s.provider.launch(&od).await.unwrap();
    let (ds, dod) = (
        deployment("us-east-1a", CapacityType::Spot),
        deployment("us-east-1b", CapacityType::OnDemand),
    );
    assert_eq!(
        calls(&s),
        [
            format!("apply {ds} replicas=1"),
            format!("apply {ds} replicas=2"),
            format!("apply {dod} replicas=1"),
        ]
    );
    // Launched, not ready yet; no Pod exists.
    assert_eq!(s.provider.list().len(), 3);
    assert!(s.provider.list().iter().all(|i| !i.ready));

    // The Pods come up, not ready: bound, still not ready.
    reconcile(&s, false);
    assert!(ready_ids(&s.provider.poll().await).is_empty());
    assert_eq!(calls(&s), ["list deployments", "list pods", "list nodes"]);
    // Ready: one event each, endpoints from the Pod IPs in the store.
    {
        let mut c = s.cluster.lock().unwrap();
        let names: Vec<String> = c.pods.keys().cloned().collect();
        for n in names {
            let p = c.pods.get_mut(&n).unwrap();
            p["status"]["conditions"][2]["status"] = serde_json::json!("True");
        }
    }
    assert_eq!(ready_ids(&s.provider.poll().await).len(), 3);
    assert_eq!(calls(&s), ["list pods", "list nodes"]);
    assert!(s.provider.list().iter().all(|i| i.ready));
    let recorded = s.store.instances().await.unwrap();
    let first = recorded.iter().find(|r| r.id == a).unwrap();
    assert_eq!(first.state, InstanceState::Ready);
    assert!(
        // Mutual TLS by default: the gateway dials the Pod over HTTPS.
        first.endpoint.starts_with("https://10.244.1."),
        "{}",
        first.endpoint
    );
    assert!(first.endpoint.ends_with(":8000"));
    assert_eq!(first.kind.price_per_hour, 0.45);
    assert_eq!(first.kind.capacity, CapacityType::Spot);
    // The spot Pods sit on the spot node of their zone.
    let c = s.cluster.lock().unwrap();
    for pod in c.pods_of(&ds) {
        assert_eq!(c.pods[&pod]["spec"]["nodeName"], "ip-10-0-1-10");
    }
}

#[tokio::test]
async fn scale_down_removes_the_pod_of_the_instance_let_go() {
    let mut s = setup().await;
    let ids = three_ready(&mut s).await;
    calls(&s);
    let ds = deployment("us-east-1a", CapacityType::Spot);
    // Which Pod fills which instance: the one let go must be the one removed.
    let before = s.cluster.lock().unwrap().pods_of(&ds);
    assert_eq!(before.len(), 2);
    let spot_ids: Vec<String> = s
        .provider
        .list()
        .into_iter()
        .filter(|i| i.slot.capacity == CapacityType::Spot)
        .map(|i| i.id)
        .collect();
    let victim = spot_ids[1].clone();
    let recorded = s.store.instances().await.unwrap();
    let victim_ip = recorded
        .iter()
        .find(|r| r.id == victim)
        .unwrap()
        .endpoint
        .clone();
    s.provider.terminate(&victim, "scale down").await;
    let c = calls(&s);
    assert_eq!(c.len(), 2, "{c:?}");
    assert!(
        c[0].starts_with("annotate ") && c[0].ends_with(" deletion-cost=-1000"),
        "{c:?}"
    );
    assert_eq!(c[1], format!("apply {ds} replicas=1"));
    assert!(!s.provider.list().iter().any(|i| i.id == victim));
    // The gateways drain it (no new requests) before its Pod goes.
    let recorded = s.store.instances().await.unwrap();
    let leaving = recorded.iter().find(|r| r.id == victim).unwrap();
    assert_eq!(
        (leaving.state, leaving.ended_at_ms),
        (InstanceState::Stopped, None)
    );
    assert!(strata_control::cluster::endpoints(&recorded)
        .iter()
        .any(|e| e.id == victim && e.draining));
    reconcile(&s, true);
    let events = s.provider.poll().await;
    assert_eq!(events, [ProviderEvent::Gone { id: victim.clone() }]);
    // The Pod that stayed is the other instance's: its endpoint is unchanged.
    let after = s.cluster.lock().unwrap().pods_of(&ds);
    assert_eq!(after.len(), 1);
    let removed: Vec<&String> = before.iter().filter(|p| !after.contains(p)).collect();
    assert_eq!(format!("annotate {} deletion-cost=-1000", removed[0]), c[0]);
    let recorded = s.store.instances().await.unwrap();
    let gone = recorded.iter().find(|r| r.id == victim).unwrap();
    assert_eq!(gone.state, InstanceState::Stopped);
    assert!(gone.ended_at_ms.is_some());
    assert_eq!(gone.endpoint, victim_ip);
    assert_eq!(s.provider.list().len(), ids.len() - 1);
}

#[tokio::test]
async fn a_pod_let_go_stays_until_a_gateway_has_kept_its_sessions() {
    let mut s = setup().await;
    s.provider = provider_on(&s, Config::default(), gemma(), Duration::from_secs(60));
    three_ready(&mut s).await;
    calls(&s);
    let victim = s.provider.list()[0].id.clone();
    s.provider.terminate(&victim, "scale down").await;
    // Recorded as leaving (gateways drain it), the Pod untouched.
    assert!(calls(&s).is_empty());
    let recorded = s.store.instances().await.unwrap();
    let leaving = strata_control::cluster::endpoints(&recorded);
    assert!(leaving.iter().any(|e| e.id == victim && e.draining));
    assert!(s.provider.poll().await.is_empty());
    assert_eq!(calls(&s), ["list pods", "list nodes"]);
    // A gateway kept its sessions: now the Pod goes.
    assert!(s
        .store
        .claim_lease(&strata_core::drained_lease(&victim), "gateway-1", 60_000)
        .await
        .unwrap());
    s.provider.poll().await;
    let c = calls(&s);
    assert!(
        c[0].starts_with("annotate ") && c[1].starts_with("apply "),
        "{c:?}"
    );
    reconcile(&s, true);
    assert_eq!(
        s.provider.poll().await,
        [ProviderEvent::Gone { id: victim }]
    );
}

#[tokio::test]
async fn a_preemption_taint_drains_the_nodes_replicas_and_frees_their_slots() {
    let mut s = setup().await;
    three_ready(&mut s).await;
    calls(&s);
    let ds = deployment("us-east-1a", CapacityType::Spot);
    s.cluster.lock().unwrap().taint("ip-10-0-1-10", SPOT_TAINT);
    let events = s.provider.poll().await;
    let preempted: Vec<(&String, &Slot, Duration)> = events
        .iter()
        .filter_map(|e| match e {
            ProviderEvent::Preempting { id, slot, notice } => Some((id, slot, *notice)),
            _ => None,
        })
        .collect();
    assert_eq!(preempted.len(), 2, "{events:?}");
    for (_, slot, notice) in &preempted {
        assert_eq!(slot.zone, "us-east-1a");
        assert_eq!(slot.capacity, CapacityType::Spot);
        assert_eq!(*notice, Duration::from_secs(120));
    }
    let c = calls(&s);
    assert_eq!(&c[..3], ["list pods", "list nodes", c[2].as_str()]);
    assert_eq!(
        c.iter().filter(|x| x.starts_with("annotate ")).count(),
        2,
        "{c:?}"
    );
    assert_eq!(c.last().unwrap(), &format!("apply {ds} replicas=0"));
    // Only the on-demand replica is left in the pool; the controller plans
    // the replacements, and the gateways route to the on-demand one alone
    // while the preempted Pods wait for their node to go.
    assert_eq!(s.provider.list().len(), 1);
    let recorded = s.store.instances().await.unwrap();
    let known = strata_control::cluster::endpoints(&recorded);
    assert_eq!(known.iter().filter(|e| !e.draining).count(), 1);
    assert_eq!(known.iter().filter(|e| e.draining).count(), 2);
    reconcile(&s, true);
    let gone: Vec<ProviderEvent> = s.provider.poll().await;
    assert_eq!(gone.len(), 2);
    assert!(gone.iter().all(|e| matches!(e, ProviderEvent::Gone { .. })));
    let recorded = s.store.instances().await.unwrap();
    assert_eq!(
        recorded
            .iter()
            .filter(|r| r.state == InstanceState::Preempted && r.ended_at_ms.is_some())
            .count(),
        2
    );
}

/// Three ready replicas (`three_ready`) of a pool of `model` that serves
/// through a 1.5 s notice until 0.5 s before the reclaim
/// (`pool.preemption_drain_secs`).
async fn three_serving_through(model: PoolModel) -> Setup {
    let mut s = setup().await;
    s.provider = provider_on(&s, serving_through(), model, Duration::ZERO);
    three_ready(&mut s).await;
    s
}

/// A 1.5 s notice, served through until 0.5 s before the reclaim.
fn serving_through() -> Config {
    let mut config = Config::default();
    config.kubernetes.preemption_notice_secs = 1.5;
    config.pool.preemption_drain_secs = Some(0.5);
    config
}

/// A standby takes the Lease over `three_serving_through`'s pool of
/// strata's engine: it closes what the previous leader recorded, and its
/// provider (same settings) adopts what it finds at its first poll.
async fn standby_takes_over(s: &Setup) -> KubeProvider {
    strata_control::cluster::close_orphans(&*s.store).await;
    provider_on(s, serving_through(), gemma(), Duration::ZERO)
}

/// vLLM's server (engine kind `openai`) as the `default` pool.
fn vllm() -> PoolModel {
    PoolModel {
        external: Some(ExternalServer {
            image: "vllm/vllm-openai:v0.11.0".into(),
            command: vec!["vllm".into(), "serve".into(), "{model_path}".into()],
            env: Vec::new(),
            threads: 4,
            key_of: "default".into(),
        }),
        ..gemma()
    }
}

fn draining(recorded: &[strata_core::store::InstanceRecord]) -> (usize, usize) {
    let known = strata_control::cluster::endpoints(recorded);
    let draining = known.iter().filter(|e| e.draining).count();
    (known.len() - draining, draining)
}

#[tokio::test]
async fn with_a_drain_before_the_reclaim_a_tainted_nodes_replicas_serve_until_then() {
    let mut s = three_serving_through(gemma()).await;
    calls(&s);
    let ds = deployment("us-east-1a", CapacityType::Spot);
    s.cluster.lock().unwrap().taint("ip-10-0-1-10", SPOT_TAINT);
    let events = s.provider.poll().await;
    let preempted = events
        .iter()
        .filter(|e| matches!(e, ProviderEvent::Preempting { .. }))
        .count();
    assert_eq!(preempted, 2, "{events:?}");
    // Out of the pool at once (the controller plans their replacements)
    // and their Pods removed (their engines linger), but the gateways
    // still route to all three.
    assert_eq!(s.provider.list().len(), 1);
    let c = calls(&s);
    // Each says when its node goes, for a controller that takes over.
    assert_eq!(
        c.iter()
            .filter(|x| x.starts_with("annotate ") && x.ends_with(" reclaim-at"))
            .count(),
        2,
        "{c:?}"
    );
    assert_eq!(c.last().unwrap(), &format!("apply {ds} replicas=0"));
    assert_eq!(draining(&s.store.instances().await.unwrap()), (3, 0));
    // Still serving shortly after.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(s.provider.poll().await.is_empty());
    assert_eq!(draining(&s.store.instances().await.unwrap()), (3, 0));
    // Within the drain of the reclaim: drained, recorded preempted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(s.provider.poll().await.is_empty());
    let recorded = s.store.instances().await.unwrap();
    assert_eq!(draining(&recorded), (1, 2));
    assert_eq!(
        recorded
            .iter()
            .filter(|r| r.state == InstanceState::Preempted && r.ended_at_ms.is_none())
            .count(),
        2
    );
    // Their Pods go with the node: gone, once each.
    reconcile(&s, true);
    let gone = s.provider.poll().await;
    assert_eq!(gone.len(), 2, "{gone:?}");
    assert!(gone.iter().all(|e| matches!(e, ProviderEvent::Gone { .. })));
    assert!(s.provider.poll().await.is_empty());
    let recorded = s.store.instances().await.unwrap();
    assert_eq!(
        recorded
            .iter()
            .filter(|r| r.state == InstanceState::Preempted && r.ended_at_ms.is_some())
            .count(),
        2
    );
}

#[tokio::test]
async fn a_replica_serving_through_its_notice_that_goes_early_is_recorded_preempted() {
    let mut s = three_serving_through(gemma()).await;
    s.cluster.lock().unwrap().taint("ip-10-0-1-10", SPOT_TAINT);
    assert_eq!(s.provider.poll().await.len(), 2);
    // The node went before the drain began.
    reconcile(&s, true);
    let gone = s.provider.poll().await;
    assert_eq!(gone.len(), 2, "{gone:?}");
    assert!(gone.iter().all(|e| matches!(e, ProviderEvent::Gone { .. })));
    let recorded = s.store.instances().await.unwrap();
    let ended: Vec<InstanceState> = recorded
        .iter()
        .filter(|r| r.ended_at_ms.is_some())
        .map(|r| r.state)
        .collect();
    assert_eq!(ended, [InstanceState::Preempted; 2]);
    // Nothing is drained later for them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(s.provider.poll().await.is_empty());
}

#[tokio::test]
async fn another_servers_pod_sleeps_through_a_notice_but_not_through_a_scale_down() {
    let mut s = three_serving_through(vllm()).await;
    calls(&s);
    let ds = deployment("us-east-1a", CapacityType::Spot);
    let od = deployment("us-east-1b", CapacityType::OnDemand);
    // Let go by strata: drained already, so its Pod's sleep is cut short.
    let on_demand = s
        .provider
        .list()
        .into_iter()
        .find(|i| i.slot.capacity == CapacityType::OnDemand)
        .unwrap()
        .id;
    let pod = s.cluster.lock().unwrap().pods_of(&od)[0].clone();
    s.provider.terminate(&on_demand, "scale down").await;
    assert_eq!(
        calls(&s),
        [
            format!("annotate {pod} deletion-cost=-1000"),
            format!("apply {od} replicas=0"),
            format!("delete pod {pod} grace=5"),
        ]
    );
    // Evicted at a notice: the Pod keeps its whole grace and serves on.
    s.cluster.lock().unwrap().taint("ip-10-0-1-10", SPOT_TAINT);
    let events = s.provider.poll().await;
    assert_eq!(events.len(), 3, "{events:?}");
    let c = calls(&s);
    assert!(!c.iter().any(|x| x.starts_with("delete pod")), "{c:?}");
    assert_eq!(c.last().unwrap(), &format!("apply {ds} replicas=0"));
    let recorded = s.store.instances().await.unwrap();
    // The two serve on; the one let go is gone.
    assert_eq!(draining(&recorded), (2, 0));
}

#[tokio::test]
async fn a_configured_node_condition_also_preempts() {
    let mut s = setup().await;
    let mut config = Config::default();
    config.kubernetes.preemption_conditions = vec!["SpotInterruption".into()];
    s.provider = provider_on(&s, config, gemma(), Duration::ZERO);
    three_ready(&mut s).await;
    // A condition not configured means nothing.
    s.cluster
        .lock()
        .unwrap()
        .flag("ip-10-0-2-20", "SomethingElse");
    assert!(s.provider.poll().await.is_empty());
    s.cluster
        .lock()
        .unwrap()
        .flag("ip-10-0-2-20", "SpotInterruption");
    let events = s.provider.poll().await;
    assert!(
        matches!(events.as_slice(), [ProviderEvent::Preempting { slot, .. }] if slot.capacity == CapacityType::OnDemand),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_pod_deleted_by_someone_else_is_a_failure_replaced_once() {
    let mut s = setup().await;
    three_ready(&mut s).await;
    calls(&s);
    let dod = deployment("us-east-1b", CapacityType::OnDemand);
    let pod = s.cluster.lock().unwrap().pods_of(&dod)[0].clone();
    s.cluster.lock().unwrap().pods.remove(&pod);
    let events = s.provider.poll().await;
    assert!(
        matches!(events.as_slice(), [ProviderEvent::Failed { detail, .. }] if detail.contains("deleted")),
        "{events:?}"
    );
    // The variant shrinks, so the controller's replacement is the only one.
    assert_eq!(
        calls(&s),
        [
            "list pods".to_string(),
            "list nodes".to_string(),
            format!("apply {dod} replicas=0")
        ]
    );
    assert_eq!(s.provider.list().len(), 2);
}

#[tokio::test]
async fn a_new_leader_adopts_the_deployments_and_pods_it_finds() {
    let mut s = setup().await;
    three_ready(&mut s).await;
    // Another controller process: same cluster, nothing in memory.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqlStore::open_without_vault(&dir.path().join("s.db"))
            .await
            .unwrap(),
    );
    let mut next = KubeProvider::new(
        fake_api::client(s.cluster.clone()),
        Arc::new(Config::default()),
        gemma(),
        store,
    )
    .with_poll_every(Duration::ZERO);
    calls(&s);
    let events = next.poll().await;
    assert_eq!(ready_ids(&events).len(), 3);
    assert_eq!(calls(&s), ["list deployments", "list pods", "list nodes"]);
    // It counts on from the replicas it found, not from zero.
    next.launch(&offer("us-east-1a", CapacityType::Spot, 0.45))
        .await
        .unwrap();
    let ds = deployment("us-east-1a", CapacityType::Spot);
    assert_eq!(calls(&s), [format!("apply {ds} replicas=3")]);
}

#[tokio::test]
async fn the_lease_has_one_holder_and_passes_on_release_and_on_expiry() {
    let cluster = Cluster::shared();
    let leases = |c: &Shared| Arc::new(KubeLeases::new(fake_api::client(c.clone()), "strata"));
    let (a, b) = (leases(&cluster), leases(&cluster));
    assert!(a
        .claim_lease("controller/default", "ctl-a", 1000)
        .await
        .unwrap());
    assert!(!b
        .claim_lease("controller/default", "ctl-b", 1000)
        .await
        .unwrap());
    assert!(a
        .claim_lease("controller/default", "ctl-a", 1000)
        .await
        .unwrap());
    assert_eq!(
        cluster.lock().unwrap().take_calls(),
        [
            "get lease strata-controller-default",
            "create lease strata-controller-default holder=ctl-a",
            "get lease strata-controller-default",
            "get lease strata-controller-default",
            "replace lease strata-controller-default holder=ctl-a",
        ]
    );
    // The term ran out (its renewal is long past).
    {
        let mut c = cluster.lock().unwrap();
        let l = c.leases.get_mut("strata-controller-default").unwrap();
        l["spec"]["renewTime"] = serde_json::json!("2020-01-01T00:00:00.000000Z");
    }
    // Expired: b takes it (one transition).
    assert!(b
        .claim_lease("controller/default", "ctl-b", 1000)
        .await
        .unwrap());
    let held = b.lease("controller/default").await.unwrap().unwrap();
    assert_eq!((held.holder.as_str(), held.transitions), ("ctl-b", 1));
    assert!(!a
        .claim_lease("controller/default", "ctl-a", 1000)
        .await
        .unwrap());
    // Released: a gets it at once.
    b.release_lease("controller/default", "ctl-b")
        .await
        .unwrap();
    assert!(a
        .claim_lease("controller/default", "ctl-a", 1000)
        .await
        .unwrap());
    assert_eq!(
        a.lease("controller/default")
            .await
            .unwrap()
            .unwrap()
            .transitions,
        2
    );
}

#[tokio::test]
async fn a_write_that_loses_a_race_does_not_lead() {
    let cluster = Cluster::shared();
    let a = KubeLeases::new(fake_api::client(cluster.clone()), "strata");
    let b = KubeLeases::new(fake_api::client(cluster.clone()), "strata");
    assert!(a
        .claim_lease("controller/default", "ctl-a", 1000)
        .await
        .unwrap());
    {
        let mut c = cluster.lock().unwrap();
        let l = c.leases.get_mut("strata-controller-default").unwrap();
        l["spec"]["renewTime"] = serde_json::json!("2020-01-01T00:00:00.000000Z");
        // Someone else writes between b's read and b's write.
        c.race_next_replace = true;
    }
    assert!(!b
        .claim_lease("controller/default", "ctl-b", 1000)
        .await
        .unwrap());
    let calls = cluster.lock().unwrap().take_calls();
    assert_eq!(
        calls.last().unwrap(),
        "replace lease strata-controller-default holder=ctl-b"
    );
    // Nothing changed hands: the holder is still a.
    assert_eq!(
        b.lease("controller/default").await.unwrap().unwrap().holder,
        "ctl-a"
    );
}

#[tokio::test]
async fn electors_hand_over_when_the_leader_stops() {
    let cluster = Cluster::shared();
    let elector = |holder: &str| Elector {
        store: Arc::new(KubeLeases::new(fake_api::client(cluster.clone()), "strata")),
        name: "controller/default".into(),
        holder: holder.into(),
        term: Duration::from_millis(1500),
    };
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let (mut a, task_a) = elector("ctl-a").spawn(stop_a.clone());
    a.wait_for(|l| *l).await.unwrap();
    let (mut b, task_b) = elector("ctl-b").spawn(stop_b.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!*b.borrow(), "two leaders at once");
    // The leader shuts down: it lets go and the standby leads within a
    // renewal period (a third of the term), not a whole term.
    let stopped = std::time::Instant::now();
    stop_a.cancel();
    task_a.await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), b.wait_for(|l| *l))
        .await
        .expect("the standby took over")
        .unwrap();
    assert!(
        stopped.elapsed() < Duration::from_millis(1200),
        "{:?}",
        stopped.elapsed()
    );
    assert!(!*a.borrow());
    stop_b.cancel();
    task_b.await.unwrap();
}

/// The provider of `pool` (serving SmolLM2) on `s`'s cluster and store.
fn pool_on(s: &Setup, pool: &str, drain_wait: Duration) -> KubeProvider {
    provider_on(
        s,
        Config::default(),
        model(pool, "SmolLM2-135M-Instruct.Q4_1"),
        drain_wait,
    )
}

fn pool_of(d: &serde_json::Value) -> &str {
    d["metadata"]["labels"]["strata.dev/pool"].as_str().unwrap()
}

#[tokio::test]
async fn each_model_has_its_own_pool_of_deployments_and_pods() {
    let mut s = setup().await;
    let mut chat = pool_on(&s, "chat", Duration::ZERO);
    let spot = offer("us-east-1a", CapacityType::Spot, 0.45);
    let a = s.provider.launch(&spot).await.unwrap();
    let b = chat.launch(&spot).await.unwrap();
    let c = chat.launch(&spot).await.unwrap();
    reconcile(&s, true);
    // Each provider sees its own Pods only, though they share a variant.
    assert_eq!(
        ready_ids(&s.provider.poll().await),
        std::slice::from_ref(&a)
    );
    let mut mine = vec![b, c];
    mine.sort();
    assert_eq!(ready_ids(&chat.poll().await), mine);
    let chat_args = {
        let cluster = s.cluster.lock().unwrap();
        let pools: Vec<(&str, u64)> = cluster
            .deployments
            .values()
            .map(|d| (pool_of(d), d["spec"]["replicas"].as_u64().unwrap()))
            .collect();
        assert_eq!(pools, [("chat", 2), ("default", 1)]);
        cluster
            .deployments
            .values()
            .find(|d| pool_of(d) == "chat")
            .unwrap()["spec"]["template"]["spec"]["containers"][0]["args"]
            .to_string()
    };
    assert!(
        chat_args.contains(r#""--model-name","chat""#),
        "{chat_args}"
    );
    // The ledger knows which model each replica served.
    let recorded = s.store.instances().await.unwrap();
    let model_of = |id: &str| {
        let r = recorded.iter().find(|r| r.id == id).unwrap();
        (r.kind.pool.clone(), r.kind.model.clone())
    };
    assert_eq!(
        model_of(&a),
        ("default".into(), "gemma-3-270m-q4_k_m".into())
    );
    assert_eq!(model_of(&mine[0]), ("chat".into(), "chat".into()));
}

#[tokio::test]
async fn a_retiring_pool_drains_then_deletes_its_deployments_a_stopping_one_keeps_them() {
    let mut s = setup().await;
    let mut chat = pool_on(&s, "chat", Duration::from_secs(60));
    let spot = offer("us-east-1a", CapacityType::Spot, 0.45);
    s.provider.launch(&spot).await.unwrap();
    chat.launch(&spot).await.unwrap();
    chat.launch(&spot).await.unwrap();
    reconcile(&s, true);
    s.provider.poll().await;
    chat.poll().await;
    // A controller that stops (lost lease, restart) leaves the engines serving.
    chat.shutdown().await;
    calls(&s);
    reconcile(&s, true);
    assert_eq!(s.cluster.lock().unwrap().pods.len(), 3);
    // Its model undeployed: the next leader's provider drains, then deletes.
    let retiring = CancellationToken::new();
    let mut chat = pool_on(&s, "chat", Duration::from_secs(60)).retiring(retiring.clone());
    chat.poll().await;
    let adopted: Vec<String> = chat.list().iter().map(|i| i.id.clone()).collect();
    assert_eq!(adopted.len(), 2);
    for id in &adopted {
        s.store
            .claim_lease(&strata_core::drained_lease(id), "gateway-1", 60_000)
            .await
            .unwrap();
    }
    calls(&s);
    retiring.cancel();
    let started = std::time::Instant::now();
    chat.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it waited for drains already done"
    );
    let c = calls(&s);
    let chat_deployment = Variant {
        pool: "chat".into(),
        instance_type: "g5.xlarge".into(),
        zone: "us-east-1a".into(),
        capacity: CapacityType::Spot,
    }
    .name();
    assert_eq!(
        c,
        [
            "list deployments".to_string(),
            format!("delete {chat_deployment}")
        ]
    );
    reconcile(&s, true);
    {
        let cluster = s.cluster.lock().unwrap();
        let left: Vec<&str> = cluster.deployments.values().map(pool_of).collect();
        assert_eq!(left, ["default"]);
        assert_eq!(cluster.pods.len(), 1, "the pool's Pods went with it");
    }
    let recorded = s.store.instances().await.unwrap();
    for id in adopted {
        let r = recorded.iter().find(|r| r.id == id).unwrap();
        assert_eq!(r.state, InstanceState::Stopped);
        assert!(r.ended_at_ms.is_some());
        assert_eq!(r.detail.as_deref(), Some("its model was undeployed"));
    }
}

#[tokio::test]
async fn engines_of_models_that_left_while_no_controller_acted_are_removed() {
    let mut s = setup().await;
    let spot = offer("us-east-1a", CapacityType::Spot, 0.45);
    s.provider.launch(&spot).await.unwrap();
    pool_on(&s, "chat", Duration::ZERO)
        .launch(&spot)
        .await
        .unwrap();
    pool_on(&s, "old/v1", Duration::ZERO)
        .launch(&spot)
        .await
        .unwrap();
    // Another object strata manages, not an engine: untouched.
    s.cluster.lock().unwrap().deployments.insert(
        "strata-gateway".into(),
        serde_json::json!({"metadata": {"name": "strata-gateway", "labels": {
            "app.kubernetes.io/managed-by": "strata", "app.kubernetes.io/component": "gateway"}},
            "spec": {"replicas": 2}}),
    );
    calls(&s);
    let deleted = strata_k8s::provider::remove_other_pools(
        fake_api::client(s.cluster.clone()),
        &Config::default(),
        &["default".to_string(), "chat".to_string()],
    )
    .await
    .unwrap();
    assert_eq!(deleted.len(), 1);
    assert_eq!(
        calls(&s),
        [
            "list deployments".to_string(),
            format!("delete {}", deleted[0])
        ]
    );
    let cluster = s.cluster.lock().unwrap();
    let mut left: Vec<&str> = cluster.deployments.keys().map(String::as_str).collect();
    left.retain(|d| *d != "strata-gateway");
    assert_eq!(left.len(), 2);
    assert!(cluster.deployments.contains_key("strata-gateway"));
    assert!(cluster
        .deployments
        .values()
        .all(|d| d["metadata"]["labels"]["strata.dev/pool"] != "old_v1"));
}

#[tokio::test]
async fn a_pod_deleted_by_someone_else_and_replaced_by_its_deployment_costs_no_other_pod() {
    let mut s = setup().await;
    three_ready(&mut s).await;
    let ds = deployment("us-east-1a", CapacityType::Spot);
    let before = s.cluster.lock().unwrap().pods_of(&ds);
    assert_eq!(before.len(), 2);
    // Deleted by hand; the Deployment makes its replacement before the
    // provider looks.
    s.cluster.lock().unwrap().pods.remove(&before[0]);
    reconcile(&s, true);
    for _ in 0..4 {
        s.provider.poll().await;
        reconcile(&s, true);
    }
    let after = s.cluster.lock().unwrap().pods_of(&ds);
    assert!(
        after.contains(&before[1]),
        "the other Pod was removed: {after:?}"
    );
    // The Deployment's replacement is adopted and kept: two spot replicas
    // again, and no replacement for the controller to add.
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(s.provider.list().len(), 3);
}

#[tokio::test]
async fn a_pod_evicted_by_someone_else_is_drained_while_it_still_runs_and_replaced_once() {
    let mut s = setup().await;
    let ids = three_ready(&mut s).await;
    calls(&s);
    let ds = deployment("us-east-1a", CapacityType::Spot);
    let before = s.cluster.lock().unwrap().pods_of(&ds);
    // A node drained by hand: the Pod terminates (a lingering engine, a
    // preStop sleep) while its Deployment makes another.
    s.cluster.lock().unwrap().evict(&before[0]);
    reconcile(&s, true);
    let events = s.provider.poll().await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ProviderEvent::Failed { detail, .. } if detail.contains("being deleted"))),
        "{events:?}"
    );
    assert_eq!(ready_ids(&events).len(), 1, "{events:?}");
    // Drained at once; the Deployment's new Pod is the replacement, so
    // the count is not touched and nothing else goes.
    let recorded = s.store.instances().await.unwrap();
    assert_eq!(draining(&recorded), (3, 1));
    assert_eq!(s.provider.list().len(), 3);
    assert!(!calls(&s).iter().any(|c| c.starts_with("apply")));
    // The Pod goes: gone, once.
    s.cluster.lock().unwrap().pods.remove(&before[0]);
    let events = s.provider.poll().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(matches!(&events[0], ProviderEvent::Gone { id } if ids.contains(id)));
    reconcile(&s, true);
    assert!(s.provider.poll().await.is_empty());
    let after = s.cluster.lock().unwrap().pods_of(&ds);
    assert_eq!(after.len(), 2);
    assert!(after.contains(&before[1]));
}

/// A provider whose Pods get 0.3 s to find a node.
fn with_schedule_timeout(s: &mut Setup) {
    let mut config = Config::default();
    config.kubernetes.schedule_timeout_secs = 0.3;
    s.provider = provider_on(s, config, gemma(), Duration::ZERO);
}

#[tokio::test]
async fn a_spot_pod_no_node_takes_in_time_is_its_zone_sold_out_and_is_removed() {
    let mut s = setup().await;
    with_schedule_timeout(&mut s);
    // No node of this kind in us-east-1c, and none comes (the node
    // autoscaler cannot get g5.xlarge spot there).
    let spot = offer("us-east-1c", CapacityType::Spot, 0.40);
    let id = s.provider.launch(&spot).await.unwrap();
    let dc = deployment("us-east-1c", CapacityType::Spot);
    reconcile(&s, true);
    assert!(s.provider.poll().await.is_empty());
    assert_eq!(s.provider.list().len(), 1, "still starting");
    let pod = s.cluster.lock().unwrap().pods_of(&dc)[0].clone();
    calls(&s);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let events = s.provider.poll().await;
    assert_eq!(
        events,
        [ProviderEvent::Unavailable {
            slot: Slot::from(&spot)
        }]
    );
    assert!(s.provider.list().is_empty());
    let c = calls(&s);
    assert!(
        c.contains(&format!("annotate {pod} deletion-cost=-1000")),
        "{c:?}"
    );
    assert_eq!(c.last().unwrap(), &format!("apply {dc} replicas=0"));
    let record = s.store.instances().await.unwrap();
    let r = record.iter().find(|r| r.id == id).unwrap();
    assert_eq!(r.state, InstanceState::Exited);
    assert!(
        r.detail
            .as_deref()
            .unwrap()
            .contains("no node took its Pod"),
        "{r:?}"
    );
    // The Pod goes with the lowered count; gone once, and nothing more.
    reconcile(&s, true);
    assert!(s.cluster.lock().unwrap().pods_of(&dc).is_empty());
    assert_eq!(
        s.provider.poll().await,
        [ProviderEvent::Gone { id: id.clone() }]
    );
    let record = s.store.instances().await.unwrap();
    assert!(record
        .iter()
        .find(|r| r.id == id)
        .unwrap()
        .ended_at_ms
        .is_some());
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(s.provider.poll().await.is_empty());
}

#[tokio::test]
async fn a_pod_a_node_comes_for_in_time_serves_and_an_on_demand_one_that_waits_too_long_is_unavailable(
) {
    let mut s = setup().await;
    with_schedule_timeout(&mut s);
    let spot = offer("us-east-1c", CapacityType::Spot, 0.40);
    let od = offer("us-east-1c", CapacityType::OnDemand, 1.006);
    let a = s.provider.launch(&spot).await.unwrap();
    let b = s.provider.launch(&od).await.unwrap();
    reconcile(&s, true);
    assert!(s.provider.poll().await.is_empty());
    // A spot node comes up for the first within the timeout.
    s.cluster
        .lock()
        .unwrap()
        .add_node("ip-10-0-3-30", "g5.xlarge", "us-east-1c", "spot");
    reconcile(&s, true);
    assert_eq!(ready_ids(&s.provider.poll().await), [a]);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        s.provider.poll().await,
        [ProviderEvent::Unavailable {
            slot: Slot::from(&od)
        }]
    );
    let record = s.store.instances().await.unwrap();
    let r = record.iter().find(|r| r.id == b).unwrap();
    assert!(
        r.detail
            .as_deref()
            .unwrap()
            .contains("no on_demand g5.xlarge capacity in us-east-1c"),
        "{r:?}"
    );
    assert_eq!(s.provider.list().len(), 1);
    assert!(s.provider.list()[0].ready);
}

/// One replica of g5.xlarge under the controller (`Driver`) and the
/// provider on the fake cluster, offered `offers` (zone, capacity, price
/// an hour); a Pod gets 0.3 s to find a node, and an offer that refused a
/// launch cools for a minute.
struct Controlled {
    s: Setup,
    driver: strata_control::controller::Driver,
    started: std::time::Instant,
}

async fn controlled(offers: &[(&str, CapacityType, f64)]) -> Controlled {
    controlled_with(offers, |_| {}).await
}

/// As `controlled`, with `configure` applied to the configuration last.
async fn controlled_with(
    offers: &[(&str, CapacityType, f64)],
    configure: impl FnOnce(&mut Config),
) -> Controlled {
    use strata_control::controller::{Controller, Driver, PoolSpec};
    use strata_core::config::{InstanceType, Offering};

    let mut s = setup().await;
    let mut config = Config::default();
    config.kubernetes.schedule_timeout_secs = 0.3;
    config.pool.spot_cooldown_secs = 60.0;
    config
        .instance_types
        .insert("g5.xlarge".into(), InstanceType::default());
    config.catalog = offers
        .iter()
        .map(|&(zone, capacity, price)| Offering {
            instance_type: "g5.xlarge".into(),
            zone: zone.into(),
            capacity,
            price_per_hour: price,
        })
        .collect();
    configure(&mut config);
    assert_eq!(config.check(), []);
    s.provider = provider_on(&s, config.clone(), gemma(), Duration::ZERO);
    Controlled {
        s,
        driver: Driver::new(Controller::new(PoolSpec::from_config(&config, 1))),
        started: std::time::Instant::now(),
    }
}

impl Controlled {
    /// The cluster reconciles (ready Pods where a node matches), then the
    /// controller ticks.
    async fn tick(&mut self) {
        self.tick_with(true).await;
    }

    /// As `tick`, with the cluster's Pods on nodes but never ready.
    async fn tick_never_ready(&mut self) {
        self.tick_with(false).await;
    }

    async fn tick_with(&mut self, ready: bool) {
        reconcile(&self.s, ready);
        let now = self.started.elapsed();
        self.driver
            .tick(&mut self.s.provider, now, &strata_core::Load::default())
            .await;
    }

    /// Ticks until a replica is ready (3 s at most): when it was.
    async fn until_ready(&mut self) -> Option<Duration> {
        while self.started.elapsed() < Duration::from_secs(3) {
            self.tick().await;
            if self.s.provider.list().iter().any(|i| i.ready) {
                return Some(self.started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    fn replicas(&self, deployment: &str) -> u64 {
        self.s.cluster.lock().unwrap().deployments[deployment]["spec"]["replicas"]
            .as_u64()
            .unwrap()
    }
}

/// The controller and the provider together: the cheapest offer is spot
/// in a zone where no node can be had, so its Pod stays Pending; after
/// the schedule timeout the pool serves from on-demand capacity.
#[tokio::test]
async fn a_pool_whose_spot_zone_has_no_capacity_falls_back_on_demand() {
    let mut c = controlled(&[
        ("us-east-1c", CapacityType::Spot, 0.40),
        ("us-east-1b", CapacityType::OnDemand, 1.006),
    ])
    .await;
    let spot = deployment("us-east-1c", CapacityType::Spot);
    let od = deployment("us-east-1b", CapacityType::OnDemand);
    c.tick().await;
    assert_eq!(c.replicas(&spot), 1, "spot first: it is cheaper");
    let served = c.until_ready().await.expect("a replica serves");
    assert!(served >= Duration::from_millis(300), "{served:?}");
    let list = c.s.provider.list();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].slot.capacity, CapacityType::OnDemand);
    assert_eq!(c.replicas(&spot), 0);
    assert_eq!(c.replicas(&od), 1);
    // The zone stays out while it cools down: no spot Pod is asked for again.
    for _ in 0..10 {
        c.tick().await;
    }
    assert_eq!(c.replicas(&spot), 0);
}

/// The acting controller stops while two replicas serve through their
/// node's notice (their Pods terminating, their engines lingering); the
/// standby that takes over keeps routing to them and drains them in time,
/// instead of dropping them undrained with the previous leader's records.
#[tokio::test]
async fn a_new_leader_keeps_replicas_serving_through_their_notice_and_drains_them_in_time() {
    let mut s = three_serving_through(gemma()).await;
    s.cluster.lock().unwrap().taint("ip-10-0-1-10", SPOT_TAINT);
    assert_eq!(s.provider.poll().await.len(), 2);
    // The ReplicaSet deletes their Pods gracefully: they run on, terminating.
    let ds = deployment("us-east-1a", CapacityType::Spot);
    let pods = s.cluster.lock().unwrap().pods_of(&ds);
    assert_eq!(pods.len(), 2);
    for pod in &pods {
        s.cluster.lock().unwrap().evict(pod);
    }
    // A standby takes the Lease: it closes what the previous leader
    // recorded, then adopts what it finds.
    let mut next = standby_takes_over(&s).await;
    let events = next.poll().await;
    // The on-demand replica is the new leader's pool; the two serving
    // through are not (their replacements were planned already), but the
    // gateways still route to them.
    assert_eq!(ready_ids(&events).len(), 1, "{events:?}");
    assert_eq!(next.list().len(), 1);
    assert_eq!(draining(&s.store.instances().await.unwrap()), (3, 0));
    // Within the drain of the reclaim (1.5 s after the taint): drained.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(next.poll().await.is_empty());
    assert_eq!(draining(&s.store.instances().await.unwrap()), (1, 2));
    // The node goes with its Pods: each gone once, recorded preempted.
    for pod in &pods {
        s.cluster.lock().unwrap().pods.remove(pod);
    }
    let gone = next.poll().await;
    assert_eq!(gone.len(), 2, "{gone:?}");
    assert!(gone.iter().all(|e| matches!(e, ProviderEvent::Gone { .. })));
    let recorded = s.store.instances().await.unwrap();
    let adopted_ended = recorded
        .iter()
        .filter(|r| r.state == InstanceState::Preempted && r.ended_at_ms.is_some())
        .count();
    assert_eq!(adopted_ended, 2);
}

/// A Pod that gets its node but never becomes ready (an image that cannot
/// be pulled, a model that cannot be fetched) is given up after
/// `kubernetes.start_timeout_secs`: the replica no longer holds its place,
/// nor the pool's scale-downs, and the controller launches another.
#[tokio::test]
async fn a_pod_never_ready_within_the_start_timeout_is_a_failed_start() {
    let mut s = setup().await;
    let mut config = Config::default();
    config.kubernetes.schedule_timeout_secs = 0.2;
    config.kubernetes.start_timeout_secs = 0.4;
    assert_eq!(config.check(), []);
    s.provider = provider_on(&s, config, gemma(), Duration::ZERO);
    let od = offer("us-east-1b", CapacityType::OnDemand, 1.006);
    let id = s.provider.launch(&od).await.unwrap();
    let dod = deployment("us-east-1b", CapacityType::OnDemand);
    // On a node, running, never ready.
    reconcile(&s, false);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        s.provider.poll().await.is_empty(),
        "it has a node: not given up at the schedule timeout"
    );
    assert_eq!(s.provider.list().len(), 1);
    let pod = s.cluster.lock().unwrap().pods_of(&dod)[0].clone();
    calls(&s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = s.provider.poll().await;
    assert!(
        matches!(events.as_slice(), [ProviderEvent::Failed { id: failed, detail }]
            if *failed == id && detail.contains("not ready 0.4s after the launch")),
        "{events:?}"
    );
    assert!(s.provider.list().is_empty());
    let c = calls(&s);
    assert!(
        c.contains(&format!("annotate {pod} deletion-cost=-1000")),
        "{c:?}"
    );
    assert_eq!(c.last().unwrap(), &format!("apply {dod} replicas=0"));
    reconcile(&s, false);
    assert_eq!(s.provider.poll().await, [ProviderEvent::Gone { id }]);
}

/// On-demand capacity runs out too (GPUs): an on-demand pool whose
/// cheapest offer is in a zone where no node can be had serves from the
/// same type in another zone once the schedule timeout passes.
#[tokio::test]
async fn an_on_demand_pool_whose_zone_has_no_capacity_moves_to_another_zone() {
    let mut c = controlled(&[
        ("us-east-1c", CapacityType::OnDemand, 0.95),
        ("us-east-1b", CapacityType::OnDemand, 1.006),
    ])
    .await;
    let dc = deployment("us-east-1c", CapacityType::OnDemand);
    let db = deployment("us-east-1b", CapacityType::OnDemand);
    c.tick().await;
    assert_eq!(c.replicas(&dc), 1, "the cheaper zone first");
    c.until_ready().await;
    let list = c.s.provider.list();
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].ready);
    assert_eq!(list[0].slot.zone, "us-east-1b");
    assert_eq!((c.replicas(&dc), c.replicas(&db)), (0, 1));
    // The refused offer stays out while it cools down.
    for _ in 0..10 {
        c.tick().await;
    }
    assert_eq!(c.replicas(&dc), 0);
}

/// Insider: someone who may patch Pods writes a reclaim time an hour
/// ahead on a terminating engine Pod, or garbage on another. A controller
/// that takes over keeps the first no longer than one notice (it is
/// drained within the notice, not served for an hour), and does not
/// adopt the second.
#[tokio::test]
async fn a_forged_reclaim_time_buys_no_more_than_a_notice() {
    let mut s = three_serving_through(gemma()).await;
    s.cluster.lock().unwrap().taint("ip-10-0-1-10", SPOT_TAINT);
    assert_eq!(s.provider.poll().await.len(), 2);
    let ds = deployment("us-east-1a", CapacityType::Spot);
    let pods = s.cluster.lock().unwrap().pods_of(&ds);
    let hour_ahead = strata_core::now_ms() + 3_600_000;
    for (pod, forged) in pods.iter().zip([hour_ahead.to_string(), "soon".into()]) {
        let mut c = s.cluster.lock().unwrap();
        c.pods.get_mut(pod).unwrap()["metadata"]["annotations"]["strata.dev/reclaim-at"] =
            serde_json::json!(forged);
        c.evict(pod);
    }
    let mut next = standby_takes_over(&s).await;
    next.poll().await;
    // The on-demand replica and the one with a time; not the garbage one.
    assert_eq!(draining(&s.store.instances().await.unwrap()), (2, 0));
    // Drained within the notice (1.5 s), though its Pod says an hour.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    next.poll().await;
    assert_eq!(draining(&s.store.instances().await.unwrap()), (1, 1));
}

/// A replica that cannot start (its Pod on a node but never ready: an
/// image that cannot be pulled, a model that will not load) is not
/// relaunched at once, again and again, each try billed: after each
/// failed start its slot waits (doubling), and a replica that is ready at
/// last clears the wait.
#[tokio::test]
async fn a_replica_that_cannot_start_is_relaunched_after_a_doubling_wait() {
    use strata_control::controller::StartBackoff;

    let mut c = controlled_with(&[("us-east-1b", CapacityType::OnDemand, 1.006)], |config| {
        config.kubernetes.schedule_timeout_secs = 0.2;
        config.kubernetes.start_timeout_secs = 0.3;
    })
    .await;
    c.driver.start_backoff = StartBackoff {
        first: Duration::from_millis(400),
        max: Duration::from_millis(1600),
    };
    // Launched at 0, given up at 0.3 s; again at 0.7 s (0.4 s later),
    // given up at 1.0 s; again at 1.8 s (0.8 s later), given up at 2.1 s;
    // the next not before 3.7 s. Relaunched at once, it would have been
    // more than ten times by 3.5 s.
    while c.started.elapsed() < Duration::from_millis(3500) {
        c.tick_never_ready().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let launched = c.s.store.instances().await.unwrap();
    assert_eq!(launched.len(), 3, "{launched:?}");
    assert_eq!(c.driver.failed_starts(), 3);
    let held = c.driver.held_back(c.started.elapsed());
    assert_eq!(held.len(), 1, "{held:?}");
    // The cluster heals (the image can be pulled now): the next launch
    // serves, and the slot no longer waits.
    let healed = c.started.elapsed();
    while c.started.elapsed() < healed + Duration::from_secs(3)
        && !c.s.provider.list().iter().any(|i| i.ready)
    {
        c.tick().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.tick().await;
    assert!(c.s.provider.list().iter().any(|i| i.ready));
    assert!(c.driver.held_back(c.started.elapsed()).is_empty());
    assert_eq!(c.s.store.instances().await.unwrap().len(), 4);
    assert_eq!(c.driver.failed_starts(), 3);
}
