//! The store against a real SQLite file and, through `common`, a real
//! PostgreSQL database; tests that look at the SQLite file itself (what is
//! on disk, a file backup) run on SQLite only.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{tenant, vault, Backend};
use strata_core::config::CapacityType;
use strata_core::store::{
    AuditStore, CompletionStore, DecisionRecord, DecisionStore, DeployedModel, InstanceKind,
    InstanceRecord, InstanceState, InstanceStore, KeyStore, LeaseStore, LoadStore, ModelStore,
    SnapshotStore, StoreError, StoredCompletion, TenantStore, UsageRecord, UsageStore,
};
use strata_core::tenant::{
    audit_hash, digest_lookup, verify_audit, ApiKeyRecord, AuditEntry, AuditKey, NewKey, Priority,
    RateLimits, Role, TenantId,
};
use strata_store::SqlStore;

async fn open(dir: &Path) -> SqlStore {
    SqlStore::open(&dir.join("s.db"), vault(dir)).await.unwrap()
}

fn usage(id: &str, model: &str, p: u32, c: u32) -> UsageRecord {
    UsageRecord {
        request_id: id.into(),
        tenant_id: "ten_a".into(),
        key_id: "key_a".into(),
        cost_usd: 0.5,
        batch: false,
        at_ms: 1,
        model: model.into(),
        replica: "local-0".into(),
        status: 200,
        prompt_tokens: p,
        completion_tokens: c,
        ttft_ms: 10.0,
        latency_ms: 20.0,
        stream: false,
    }
}

async fn ledger_rows_survive_reopening_and_sum_per_model(backend: &Backend, dir: &Path) {
    {
        let store = backend.open(dir).await;
        store
            .record_usage(&[
                usage("a", "m1", 5, 7),
                usage("b", "m1", 1, 2),
                usage("c", "m2", 3, 3),
            ])
            .await
            .unwrap();
    }
    // Reopening runs the migrations again without harm and keeps the rows.
    let store = backend.open(dir).await;
    let totals = store.usage_totals(None).await.unwrap();
    assert_eq!(totals.len(), 2);
    assert_eq!(
        (
            totals[0].model.as_str(),
            totals[0].requests,
            totals[0].prompt_tokens,
            totals[0].completion_tokens
        ),
        ("m1", 2, 6, 9)
    );
    assert_eq!((totals[1].model.as_str(), totals[1].requests), ("m2", 1));
    let a = TenantId("ten_a".into());
    assert_eq!(store.tenant_spend(&a, 0).await.unwrap(), 1.5);
    assert_eq!(
        store.tenant_spend(&a, 2).await.unwrap(),
        0.0,
        "rows at 1 ms are before 2 ms"
    );
    let other = TenantId("ten_b".into());
    assert!(store.usage_totals(Some(&other)).await.unwrap().is_empty());
}

async fn usage_is_summed_per_replica_tenant_model_and_hour(backend: &Backend, dir: &Path) {
    let store = backend.open(dir).await;
    let hour = 3_600_000;
    let at = |id: &str, tenant: &str, replica: &str, ms: i64, tokens: u32| UsageRecord {
        tenant_id: tenant.into(),
        replica: replica.into(),
        at_ms: ms,
        ..usage(id, "m1", tokens, 1)
    };
    // A batch line's row keeps its class.
    let d = UsageRecord {
        batch: true,
        ..at("d", "ten_a", "r2", 11 * hour, 1)
    };
    store
        .record_usage(&[
            at("a", "ten_a", "r1", 10 * hour + 5, 9),
            // A batch line beside interactive ones: summed apart.
            UsageRecord {
                batch: true,
                ..at("a2", "ten_a", "r1", 10 * hour + 6, 99)
            },
            at("b", "ten_a", "r1", 10 * hour + 7, 19),
            at("c", "ten_b", "r1", 10 * hour + 9, 4),
            d.clone(),
            at("e", "ten_a", "r1", 12 * hour, 1),
        ])
        .await
        .unwrap();
    let rows = store.usage_by_replica(10 * hour, 12 * hour).await.unwrap();
    let got: Vec<(&str, &str, i64, u64, bool)> = rows
        .iter()
        .map(|r| {
            (
                r.replica.as_str(),
                r.tenant_id.as_str(),
                r.hour_ms,
                r.tokens,
                r.batch,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("r1", "ten_a", 10 * hour, 30, false),
            ("r1", "ten_a", 10 * hour, 100, true),
            ("r1", "ten_b", 10 * hour, 5, false),
            ("r2", "ten_a", 11 * hour, 2, true)
        ],
        "the row at 12 h is outside the range"
    );
    // The dashboard's rows: the newest `limit` since a time, oldest first, whole.
    let recent = store.usage_since(10 * hour + 7, 2).await.unwrap();
    let ids: Vec<&str> = recent.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids, ["d", "e"]);
    assert_eq!(recent[0], d);
    assert_eq!(store.usage_since(10 * hour + 7, 10).await.unwrap().len(), 4);
}

async fn an_instance_is_updated_in_place(backend: &Backend, dir: &Path) {
    let store = backend.open(dir).await;
    let mut i = InstanceRecord {
        id: "local-0-x".into(),
        provider: "local".into(),
        endpoint: "http://127.0.0.1:1".into(),
        state: InstanceState::Starting,
        started_at_ms: 5,
        ended_at_ms: None,
        detail: None,
        kind: InstanceKind {
            pool: "default".into(),
            model: "gemma".into(),
            instance_type: "small".into(),
            zone: "zone-b".into(),
            capacity: CapacityType::Spot,
            price_per_hour: 0.25,
            tokens_per_s: 90.5,
        },
    };
    store.upsert_instance(&i).await.unwrap();
    assert_eq!(store.running_instances().await.unwrap(), vec![i.clone()]);
    i.state = InstanceState::Exited;
    i.ended_at_ms = Some(9);
    i.detail = Some("signal: 9 (SIGKILL)".into());
    store.upsert_instance(&i).await.unwrap();
    assert_eq!(store.instances().await.unwrap(), vec![i.clone()]);
    assert!(store.running_instances().await.unwrap().is_empty());
    // Ended at 9: in a window from 9, not in one from 10.
    assert_eq!(store.instances_since(9).await.unwrap(), vec![i]);
    assert!(store.instances_since(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unwritable_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = SqlStore::open(Path::new("/proc/strata/nope.db"), vault(dir.path()))
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("/proc/strata"), "{e}");
}

fn key(tenant: &TenantId, id: &str, seed: u8) -> ApiKeyRecord {
    ApiKeyRecord {
        id: id.into(),
        tenant_id: tenant.clone(),
        name: "ci".into(),
        role: Role::Member,
        models: Some(vec!["m1".into()]),
        limits: RateLimits {
            requests_per_minute: Some(60),
            tokens_per_minute: None,
            batch_tokens_per_minute: Some(5000),
        },
        priority: Default::default(),
        expires_at_ms: Some(99),
        revoked_at_ms: None,
        created_at_ms: 2,
        digest: NewKey::from_random([seed; 32]).digest,
    }
}

fn completion(id: &str, at: i64, text: &str) -> StoredCompletion {
    StoredCompletion {
        id: id.into(),
        created_at_ms: at,
        model: "m1".into(),
        content: text.as_bytes().to_vec(),
    }
}

async fn tenants_and_keys_round_trip_and_names_are_unique(backend: &Backend, dir: &Path) {
    let store = backend.open(dir).await;
    let mut a = tenant("acme");
    store.create_tenant(&a).await.unwrap();
    let dup = store.create_tenant(&tenant("acme")).await.unwrap_err();
    assert!(matches!(dup, StoreError::Conflict(_)), "{dup}");
    a.limits.tokens_per_minute = Some(1000);
    a.monthly_budget_usd = None;
    a.priority = Priority::Sheddable;
    assert!(store.update_tenant(&a).await.unwrap());
    assert_eq!(store.tenant(&a.id).await.unwrap().unwrap(), a);

    let k = ApiKeyRecord {
        priority: Priority::Sheddable,
        ..key(&a.id, "key_1", 1)
    };
    store.create_key(&k).await.unwrap();
    let found = store
        .keys_by_lookup(digest_lookup(&k.digest))
        .await
        .unwrap();
    assert_eq!(found, vec![k.clone()]);
    assert_eq!(found[0].digest, k.digest, "the digest itself round-trips");
    let b = tenant("other");
    store.create_tenant(&b).await.unwrap();
    assert_eq!(
        store.key(&b.id, "key_1").await.unwrap(),
        None,
        "no lookup across tenants"
    );
    assert!(!store.revoke_key(&b.id, "key_1", 5).await.unwrap());
    assert!(store.revoke_key(&a.id, "key_1", 5).await.unwrap());
    assert!(store.revoke_key(&a.id, "key_1", 9).await.unwrap());
    assert_eq!(
        store
            .key(&a.id, "key_1")
            .await
            .unwrap()
            .unwrap()
            .revoked_at_ms,
        Some(5),
        "first revocation wins"
    );
    assert_eq!(store.tenants().await.unwrap().len(), 2);
}

#[tokio::test]
async fn content_is_sealed_on_disk_and_bound_to_its_tenant_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let a = tenant("a");
    let b = tenant("b");
    store.create_tenant(&a).await.unwrap();
    store.create_tenant(&b).await.unwrap();
    let canary = "CANARY-7f3a9c-do-not-leak";
    for i in 0..3 {
        store
            .put_completion(
                &a.id,
                &completion(&format!("c{i}"), i, &format!("{{\"x\":\"{canary}\"}}")),
            )
            .await
            .unwrap();
    }
    let got = store.completion(&a.id, "c1").await.unwrap().unwrap();
    assert!(String::from_utf8(got.content).unwrap().contains(canary));
    assert_eq!(store.completion(&b.id, "c1").await.unwrap(), None);
    let page: Vec<String> = store
        .completions(&a.id, Some("c2"), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(page, ["c1", "c0"]);
    assert!(store.completions(&b.id, None, 10).await.unwrap().is_empty());

    // Nothing of the canary is on disk in the clear (database, WAL, keyring).
    drop(store);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes.windows(canary.len()).any(|w| w == canary.as_bytes()));
    }

    // A ciphertext copied into another tenant's row (or another row) does not open.
    let store = open(dir.path()).await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", dir.path().join("s.db").display()))
        .await
        .unwrap();
    sqlx::query("INSERT INTO stored_completions (tenant_id, id, created_at_ms, model, sealed) \
                 SELECT ?, 'stolen', created_at_ms, model, sealed FROM stored_completions WHERE id = 'c0'")
        .bind(b.id.as_str()).execute(&pool).await.unwrap();
    sqlx::query("UPDATE stored_completions SET sealed = (SELECT sealed FROM stored_completions WHERE id = 'c0' AND tenant_id = ?) WHERE id = 'c1'")
        .bind(a.id.as_str()).execute(&pool).await.unwrap();
    assert!(matches!(
        store.completion(&b.id, "stolen").await,
        Err(StoreError::Crypto(_))
    ));
    assert!(matches!(
        store.completion(&a.id, "c1").await,
        Err(StoreError::Crypto(_))
    ));
    assert!(store.completion(&a.id, "c2").await.unwrap().is_some());
}

#[tokio::test]
async fn deleting_a_tenant_shreds_its_key_so_an_old_backup_stays_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let a = tenant("a");
    store.create_tenant(&a).await.unwrap();
    store.create_key(&key(&a.id, "key_1", 3)).await.unwrap();
    store
        .put_completion(&a.id, &completion("c0", 1, "secret"))
        .await
        .unwrap();
    // A backup taken before the deletion, the way an operator would (VACUUM INTO).
    let backup = dir.path().join("backup.db");
    sqlx::query(&format!("VACUUM INTO '{}'", backup.display()))
        .execute(
            &sqlx::SqlitePool::connect(&format!("sqlite:{}", dir.path().join("s.db").display()))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(store.delete_tenant(&a.id).await.unwrap());
    assert!(!store.delete_tenant(&a.id).await.unwrap());
    assert_eq!(store.tenant(&a.id).await.unwrap(), None);
    assert!(store.keys(&a.id).await.unwrap().is_empty());
    assert_eq!(store.completion(&a.id, "c0").await.unwrap(), None);
    drop(store);

    // Restoring the backup brings the rows back, but not the key: they stay sealed.
    let restored = SqlStore::open(&backup, vault(dir.path())).await.unwrap();
    assert!(restored.tenant(&a.id).await.unwrap().is_some());
    assert!(matches!(
        restored.completion(&a.id, "c0").await,
        Err(StoreError::Crypto(_))
    ));
}

async fn audit_rows_chain_and_an_edit_is_detected(backend: &Backend, dir: &Path) {
    let store = Arc::new(backend.open(dir).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .append_audit(&AuditEntry {
                    at_ms: i,
                    actor_key: "key_1".into(),
                    actor_tenant: if i % 2 == 0 { "ten_a" } else { "ten_b" }.into(),
                    action: "completion.read".into(),
                    tenant: if i % 2 == 0 { "ten_a" } else { "ten_b" }.into(),
                    target: format!("c{i}"),
                    result: "ok".into(),
                })
                .await
                .unwrap()
        });
    }
    while tasks.join_next().await.is_some() {}
    let rows = store.audit(None).await.unwrap();
    assert_eq!(rows.len(), 20);
    let key = store.audit_key().await.unwrap();
    assert_eq!(
        verify_audit(&rows, &key),
        Ok(()),
        "concurrent appends still form one chain"
    );
    // Pages of the same rows, and the head a checkpoint is made of.
    let page = store.audit_page(None, 5, 4).await.unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), [6, 7, 8, 9]);
    let a_page = store
        .audit_page(Some(&TenantId("ten_a".into())), 0, 100)
        .await
        .unwrap();
    assert_eq!(a_page.len(), 10);
    assert_eq!(
        store.audit_head().await.unwrap(),
        Some((20, rows[19].hash.clone()))
    );
    // The key is the keyring's: the same from a second opening.
    let again = backend.open(dir).await;
    assert!(verify_audit(&rows, &again.audit_key().await.unwrap()).is_ok());
    // An insider with write access to the database edits row 7 and chains
    // everything after it again, with a key of their own: caught.
    let forger = AuditKey::from_bytes([3; 32]);
    let mut prev = rows[5].hash.clone();
    for row in &rows[6..] {
        let mut entry = row.entry.clone();
        if row.seq == 7 {
            entry.result = "denied".into();
        }
        let hash = audit_hash(&forger, row.seq, &prev, &entry);
        backend
            .execute_raw(&format!(
                "UPDATE audit SET result = '{}', prev_hash = '{prev}', hash = '{hash}' WHERE seq = {}",
                entry.result, row.seq
            ))
            .await;
        prev = hash;
    }
    assert_eq!(
        verify_audit(&store.audit(None).await.unwrap(), &key)
            .unwrap_err()
            .seq,
        7
    );
    assert_eq!(
        store
            .audit(Some(&TenantId("ten_a".into())))
            .await
            .unwrap()
            .len(),
        10
    );
}

async fn a_large_batch_is_written_whole(backend: &Backend, dir: &Path) {
    let store = backend.open(dir).await;
    let rows: Vec<UsageRecord> = (0..600)
        .map(|i| usage(&format!("r{i}"), "m", 1, 2))
        .collect();
    store.record_usage(&rows).await.unwrap();
    let totals = store.usage_totals(None).await.unwrap();
    assert_eq!(
        (
            totals[0].requests,
            totals[0].prompt_tokens,
            totals[0].completion_tokens
        ),
        (600, 600, 1200)
    );
    assert!((totals[0].cost_usd - 300.0).abs() < 1e-9);
}

async fn snapshots_are_sealed_and_taken_once(backend: &Backend, dir: &Path) {
    let store = backend.open(dir).await;
    let (a, b) = (tenant("snap-a"), tenant("snap-b"));
    store.create_tenant(&a).await.unwrap();
    store.create_tenant(&b).await.unwrap();
    store
        .put_snapshot(&a.id, "conv_1", b"SKV1 cells CANARY-snap")
        .await
        .unwrap();
    store
        .put_snapshot(&a.id, "conv_1", b"SKV1 newer")
        .await
        .unwrap();
    assert!(store.has_snapshot(&a.id, "conv_1").await.unwrap());
    assert!(!store.has_snapshot(&b.id, "conv_1").await.unwrap());
    assert_eq!(store.take_snapshot(&b.id, "conv_1").await.unwrap(), None);
    // A sealed snapshot moved to another tenant's row does not open.
    backend
        .execute_raw(&format!(
            "INSERT INTO kv_snapshots (tenant_id, session, created_at_ms, sealed) \
             SELECT '{}', session, created_at_ms, sealed FROM kv_snapshots WHERE tenant_id = '{}'",
            b.id.as_str(),
            a.id.as_str()
        ))
        .await;
    assert!(store.take_snapshot(&b.id, "conv_1").await.is_err());
    assert_eq!(
        store
            .take_snapshot(&a.id, "conv_1")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"SKV1 newer"[..])
    );
    assert_eq!(store.take_snapshot(&a.id, "conv_1").await.unwrap(), None);
}

async fn decisions_come_back_newest_last(backend: &Backend, dir: &Path) {
    let store = backend.open(dir).await;
    for (i, reason) in ["from_zero", "panic", "scale_down"].iter().enumerate() {
        store
            .record_decision(&DecisionRecord {
                at_ms: i as i64,
                pool: "default".into(),
                from_replicas: i as u32,
                to_replicas: i as u32 + 1,
                reason: reason.to_string(),
                inputs: "{\"stable_demand\":1.5}".into(),
            })
            .await
            .unwrap();
    }
    let last_two: Vec<String> = store
        .decisions(2)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.reason)
        .collect();
    assert_eq!(last_two, ["panic", "scale_down"]);
    assert_eq!(
        store.decisions(10).await.unwrap()[0].inputs,
        "{\"stable_demand\":1.5}"
    );
}

async fn a_lease_has_one_holder_until_it_runs_out_or_is_released(backend: &Backend, dir: &Path) {
    let store = backend.open(dir).await;
    let name = format!("controller-{}", std::process::id());
    assert!(store.claim_lease(&name, "a", 60_000).await.unwrap());
    // Taken: the other contender is refused; the holder extends its term.
    assert!(!store.claim_lease(&name, "b", 60_000).await.unwrap());
    assert!(store.claim_lease(&name, "a", 60_000).await.unwrap());
    let held = store.lease(&name).await.unwrap().unwrap();
    assert_eq!((held.holder.as_str(), held.transitions), ("a", 0));
    // Released: the standby takes it at once.
    store.release_lease(&name, "b").await.unwrap(); // not b's: nothing
    assert!(!store.claim_lease(&name, "b", 60_000).await.unwrap());
    store.release_lease(&name, "a").await.unwrap();
    assert!(store.claim_lease(&name, "b", 200).await.unwrap());
    assert!(!store.claim_lease(&name, "a", 60_000).await.unwrap());
    // A term that runs out (b stopped renewing) goes to whoever asks next.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert!(store.claim_lease(&name, "a", 60_000).await.unwrap());
    let held = store.lease(&name).await.unwrap().unwrap();
    assert_eq!((held.holder.as_str(), held.transitions), ("a", 2));
}

async fn deployed_models_are_kept_replaced_and_removed(backend: &Backend, dir: &Path) {
    let store = backend.open(dir).await;
    let model = |id: &str, spec: &str, at| DeployedModel {
        id: id.into(),
        spec: spec.into(),
        created_at_ms: at,
        updated_at_ms: at,
    };
    store.put_model(&model("b", "{\"v\":1}", 10)).await.unwrap();
    store.put_model(&model("a", "{}", 20)).await.unwrap();
    // Deployed again: the new spec, the first deployment's time.
    store.put_model(&model("b", "{\"v\":2}", 30)).await.unwrap();
    let kept = store.models().await.unwrap();
    assert_eq!(
        kept.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(
        (
            kept[1].spec.as_str(),
            kept[1].created_at_ms,
            kept[1].updated_at_ms
        ),
        ("{\"v\":2}", 10, 30)
    );
    assert!(store.delete_model("b").await.unwrap());
    assert!(!store.delete_model("b").await.unwrap());
    assert_eq!(store.models().await.unwrap().len(), 1);
}

async fn a_gateways_load_is_kept_whole_and_per_model(backend: &Backend, dir: &Path) {
    let store = backend.open(dir).await;
    let load = |requests| strata_core::Load {
        requests_total: requests,
        batch_lines: requests as usize * 10,
        batch_tokens_per_s: requests as f64 * 1.5,
        batch_backlog_tokens: requests as f64 * 1e6,
        ..Default::default()
    };
    store.report_load("gw", "", &load(5)).await.unwrap();
    store.report_load("gw", "chat", &load(3)).await.unwrap();
    store.report_load("gw", "code", &load(2)).await.unwrap();
    // A newer report replaces the same gateway's for the same model only.
    store.report_load("gw", "chat", &load(4)).await.unwrap();
    let kept: Vec<(String, String, u64, usize)> = store
        .gateway_loads(60_000)
        .await
        .unwrap()
        .into_iter()
        .map(|g| {
            (
                g.gateway,
                g.model,
                g.load.requests_total,
                g.load.batch_lines,
            )
        })
        .collect();
    assert_eq!(
        kept,
        [
            ("gw".into(), "".into(), 5, 50),
            ("gw".into(), "chat".into(), 4, 40),
            ("gw".into(), "code".into(), 2, 20)
        ]
    );
    let needs: Vec<(f64, f64)> = store
        .gateway_loads(60_000)
        .await
        .unwrap()
        .iter()
        .map(|g| (g.load.batch_tokens_per_s, g.load.batch_backlog_tokens))
        .collect();
    assert_eq!(needs, [(7.5, 5e6), (6.0, 4e6), (3.0, 2e6)]);
}

on_every_backend!(
    a_gateways_load_is_kept_whole_and_per_model,
    deployed_models_are_kept_replaced_and_removed,
    a_lease_has_one_holder_until_it_runs_out_or_is_released,
    decisions_come_back_newest_last,
    snapshots_are_sealed_and_taken_once,
    ledger_rows_survive_reopening_and_sum_per_model,
    usage_is_summed_per_replica_tenant_model_and_hour,
    an_instance_is_updated_in_place,
    tenants_and_keys_round_trip_and_names_are_unique,
    audit_rows_chain_and_an_edit_is_detected,
    a_large_batch_is_written_whole,
);
