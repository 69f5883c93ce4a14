//! The SQLite store against a real database file.

use strata_core::store::{InstanceRecord, InstanceState, Store, UsageRecord};
use strata_store::SqliteStore;

fn usage(id: &str, model: &str, p: u32, c: u32) -> UsageRecord {
    UsageRecord {
        request_id: id.into(),
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

#[tokio::test]
async fn ledger_rows_survive_reopening_and_sum_per_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("strata.db");
    {
        let store = SqliteStore::open(&path).await.unwrap();
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
    let store = SqliteStore::open(&path).await.unwrap();
    let totals = store.usage_totals().await.unwrap();
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
}

#[tokio::test]
async fn an_instance_is_updated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("s.db")).await.unwrap();
    let mut i = InstanceRecord {
        id: "local-0-x".into(),
        provider: "local".into(),
        endpoint: "http://127.0.0.1:1".into(),
        state: InstanceState::Starting,
        started_at_ms: 5,
        ended_at_ms: None,
        detail: None,
    };
    store.upsert_instance(&i).await.unwrap();
    i.state = InstanceState::Exited;
    i.ended_at_ms = Some(9);
    i.detail = Some("signal: 9 (SIGKILL)".into());
    store.upsert_instance(&i).await.unwrap();
    assert_eq!(store.instances().await.unwrap(), vec![i]);
}

#[tokio::test]
async fn an_unwritable_path_is_a_clear_error() {
    let e = SqliteStore::open(std::path::Path::new("/proc/strata/nope.db"))
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("/proc/strata"), "{e}");
}
