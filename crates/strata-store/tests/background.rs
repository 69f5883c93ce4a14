//! Background responses and their events through the `Store` trait,
//! against a real SQLite file and a real PostgreSQL database (see
//! `common`).

mod common;

use common::tenant;
use strata_core::store::{Running, Store, StoredResponse};
use strata_store::SqlStore;

const CANARY: &[u8] = b"CANARY-background-28";

fn response(id: &str, content: &str) -> StoredResponse {
    StoredResponse {
        id: id.into(),
        created_at_ms: 5,
        model: "m".into(),
        conversation_id: None,
        replica: Some("r1".into()),
        content: [CANARY, content.as_bytes()].concat(),
    }
}

fn event(n: u64) -> Vec<u8> {
    [CANARY, format!(" event {n}").as_bytes()].concat()
}

/// The behaviour every backend must show.
async fn background_behaves(store: &dyn Store) {
    let (a, b) = (tenant("bg-a"), tenant("bg-b"));
    store.create_tenant(&a).await.unwrap();
    store.create_tenant(&b).await.unwrap();

    assert!(store
        .put_running(&a.id, &response("resp_1", "queued"))
        .await
        .unwrap());
    assert_eq!(
        store.running(&a.id, "resp_1").await.unwrap(),
        Some(Running::Running)
    );
    assert_eq!(store.running(&b.id, "resp_1").await.unwrap(), None);
    assert_eq!(
        store.running_responses().await.unwrap(),
        vec![(a.id.clone(), "resp_1".to_owned())]
    );

    // Events go in as numbered, once: a second writer of a number (a
    // gateway that lost the response to another) writes nothing.
    let kept = store
        .append_events(&a.id, "resp_1", 0, &[event(0), event(1)])
        .await
        .unwrap();
    assert!(kept.kept && kept.running == Some(Running::Running));
    let again = store
        .append_events(&a.id, "resp_1", 1, &[event(1), event(2)])
        .await
        .unwrap();
    assert!(!again.kept, "sequence number 1 is kept already");
    let all = store.events(&a.id, "resp_1", None, 100).await.unwrap();
    assert_eq!(
        all,
        vec![(0, event(0)), (1, event(1))],
        "event 2 was not kept either"
    );
    store
        .append_events(&a.id, "resp_1", 2, &[event(2)])
        .await
        .unwrap();
    assert_eq!(
        store.events(&a.id, "resp_1", Some(0), 1).await.unwrap(),
        vec![(1, event(1))]
    );
    // Another tenant reads nothing of them.
    assert!(store
        .events(&b.id, "resp_1", None, 100)
        .await
        .unwrap()
        .is_empty());

    // The content of a running response can be replaced; its cancel stays.
    assert_eq!(store.cancel_running(&b.id, "resp_1").await.unwrap(), None);
    assert_eq!(
        store.cancel_running(&a.id, "resp_1").await.unwrap(),
        Some(true)
    );
    assert!(store
        .put_running(&a.id, &response("resp_1", "in_progress"))
        .await
        .unwrap());
    assert_eq!(
        store.running(&a.id, "resp_1").await.unwrap(),
        Some(Running::Cancelling)
    );
    let appended = store
        .append_events(&a.id, "resp_1", 3, &[event(3)])
        .await
        .unwrap();
    assert_eq!(appended.running, Some(Running::Cancelling));

    // The end (`put_response`) clears the running state: no more events,
    // no more cancels, and `put_running` no longer writes.
    store
        .put_response(&a.id, &response("resp_1", "cancelled"), &[])
        .await
        .unwrap();
    assert_eq!(store.running(&a.id, "resp_1").await.unwrap(), None);
    assert!(store.running_responses().await.unwrap().is_empty());
    let late = store
        .append_events(&a.id, "resp_1", 4, &[event(4)])
        .await
        .unwrap();
    assert!(!late.kept && late.running.is_none());
    assert_eq!(
        store.cancel_running(&a.id, "resp_1").await.unwrap(),
        Some(false)
    );
    assert!(!store
        .put_running(&a.id, &response("resp_1", "again"))
        .await
        .unwrap());
    let stored = store.response(&a.id, "resp_1").await.unwrap().unwrap();
    assert!(stored.content.ends_with(b"cancelled"));
    assert_eq!(
        store
            .events(&a.id, "resp_1", None, 100)
            .await
            .unwrap()
            .len(),
        4
    );

    // Deleting the response takes its events.
    assert!(store.delete_response(&a.id, "resp_1").await.unwrap());
    assert!(store
        .events(&a.id, "resp_1", None, 100)
        .await
        .unwrap()
        .is_empty());

    // And deleting the tenant takes a running one's.
    store
        .put_running(&a.id, &response("resp_2", "queued"))
        .await
        .unwrap();
    store
        .append_events(&a.id, "resp_2", 0, &[event(0)])
        .await
        .unwrap();
    assert!(store.delete_tenant(&a.id).await.unwrap());
    assert!(store.running_responses().await.unwrap().is_empty());
    assert!(store
        .events(&a.id, "resp_2", None, 100)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn sqlite_background_responses_behave() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqlStore::open(&dir.path().join("s.db"), common::vault(dir.path()))
        .await
        .unwrap();
    background_behaves(&store).await;
    drop(store);
    // Nothing stored reached the disk in the clear.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes.windows(CANARY.len()).any(|w| w == CANARY));
    }
}

#[tokio::test]
async fn postgres_background_responses_behave() {
    let Some(pg) = common::PgSchema::create("background").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    background_behaves(&pg.store(dir.path()).await).await;
    pg.drop().await;
}
