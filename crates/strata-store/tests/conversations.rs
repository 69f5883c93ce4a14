//! Responses and conversations through the `Store` trait, against a real
//! SQLite file and a real PostgreSQL database (see `common`).

mod common;

use common::tenant;
use strata_core::store::{Order, Store, StoredConversation, StoredItem, StoredResponse};
use strata_store::SqlStore;

fn item(id: &str, text: &str) -> StoredItem {
    StoredItem {
        id: id.into(),
        created_at_ms: 5,
        content: format!("{{\"text\":\"{text}\"}}").into_bytes(),
    }
}

fn response(id: &str, conversation: Option<&str>) -> StoredResponse {
    StoredResponse {
        id: id.into(),
        created_at_ms: 9,
        model: "m".into(),
        conversation_id: conversation.map(str::to_owned),
        replica: Some("replica-0".into()),
        content: b"{\"answer\":\"CANARY-conv-91\"}".to_vec(),
    }
}

fn ids(items: &[StoredItem]) -> Vec<&str> {
    items.iter().map(|i| i.id.as_str()).collect()
}

/// The behaviour every backend must show.
async fn conversations_behave(store: &dyn Store) {
    let (a, b) = (tenant("conv-a"), tenant("conv-b"));
    store.create_tenant(&a).await.unwrap();
    store.create_tenant(&b).await.unwrap();
    let conv = StoredConversation {
        id: "conv_1".into(),
        created_at_ms: 3,
        content: b"{\"metadata\":{}}".to_vec(),
    };
    store
        .create_conversation(&a.id, &conv, &[item("msg_0", "hello")])
        .await
        .unwrap();

    // A turn appends its items after the existing ones, in order.
    let turn = [item("msg_1", "question"), item("msg_2", "CANARY-conv-91")];
    assert!(store
        .put_response(&a.id, &response("resp_1", Some("conv_1")), &turn)
        .await
        .unwrap());
    let all = store
        .items(&a.id, "conv_1", None, 100, Order::Asc)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&all), ["msg_0", "msg_1", "msg_2"]);
    assert_eq!(all[2].content, turn[1].content);
    let page = store
        .items(&a.id, "conv_1", Some("msg_2"), 1, Order::Desc)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&page), ["msg_1"]);
    let page = store
        .items(&a.id, "conv_1", Some("msg_0"), 10, Order::Asc)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&page), ["msg_1", "msg_2"]);

    // A turn for a conversation that does not exist writes nothing at all.
    assert!(!store
        .put_response(
            &a.id,
            &response("resp_x", Some("conv_none")),
            &[item("msg_x", "x")]
        )
        .await
        .unwrap());
    assert!(store.response(&a.id, "resp_x").await.unwrap().is_none());

    // Another tenant sees none of it, not even through known ids.
    assert!(store.conversation(&b.id, "conv_1").await.unwrap().is_none());
    assert!(store.response(&b.id, "resp_1").await.unwrap().is_none());
    assert!(store
        .items(&b.id, "conv_1", None, 10, Order::Asc)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .item(&b.id, "conv_1", "msg_1")
        .await
        .unwrap()
        .is_none());
    assert!(!store
        .put_response(
            &b.id,
            &response("resp_b", Some("conv_1")),
            &[item("msg_b", "b")]
        )
        .await
        .unwrap());
    assert!(!store.delete_item(&b.id, "conv_1", "msg_1").await.unwrap());
    assert!(!store.delete_response(&b.id, "resp_1").await.unwrap());
    assert!(!store.delete_conversation(&b.id, "conv_1").await.unwrap());

    assert_eq!(
        store.conversation_replica(&a.id, "conv_1").await.unwrap(),
        Some("replica-0".into())
    );
    assert_eq!(
        store.conversation_replica(&b.id, "conv_1").await.unwrap(),
        None
    );
    let got = store.response(&a.id, "resp_1").await.unwrap().unwrap();
    assert_eq!(got, response("resp_1", Some("conv_1")));

    // Items can be added, read one by one and deleted.
    assert!(store
        .append_items(&a.id, "conv_1", &[item("msg_3", "more")])
        .await
        .unwrap());
    assert!(store.delete_item(&a.id, "conv_1", "msg_1").await.unwrap());
    assert!(store
        .item(&a.id, "conv_1", "msg_1")
        .await
        .unwrap()
        .is_none());
    let all = store
        .items(&a.id, "conv_1", None, 100, Order::Desc)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&all), ["msg_3", "msg_2", "msg_0"]);

    let renamed = StoredConversation {
        content: b"{\"metadata\":{\"topic\":\"x\"}}".to_vec(),
        ..conv.clone()
    };
    assert!(store.update_conversation(&a.id, &renamed).await.unwrap());
    assert!(!store.update_conversation(&b.id, &renamed).await.unwrap());
    assert_eq!(
        store.conversation(&a.id, "conv_1").await.unwrap().unwrap(),
        renamed
    );

    // Deleting the conversation deletes its items; the response stays.
    assert!(store.delete_conversation(&a.id, "conv_1").await.unwrap());
    assert!(store
        .item(&a.id, "conv_1", "msg_2")
        .await
        .unwrap()
        .is_none());
    assert!(store.response(&a.id, "resp_1").await.unwrap().is_some());
    assert!(store.delete_response(&a.id, "resp_1").await.unwrap());
    assert!(store.response(&a.id, "resp_1").await.unwrap().is_none());

    // Crypto-shredding the tenant takes responses and conversations with it.
    store
        .create_conversation(&a.id, &conv, &[item("msg_9", "z")])
        .await
        .unwrap();
    assert!(store.delete_tenant(&a.id).await.unwrap());
    assert!(store.conversation(&a.id, "conv_1").await.unwrap().is_none());
}

#[tokio::test]
async fn sqlite_conversations_behave() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqlStore::open(&dir.path().join("s.db"), common::vault(dir.path()))
        .await
        .unwrap();
    conversations_behave(&store).await;
    drop(store);
    // Nothing stored reached the disk in the clear.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes.windows(14).any(|w| w == b"CANARY-conv-91"));
    }
}

#[tokio::test]
async fn postgres_conversations_behave() {
    let Some(pg) = common::PgSchema::create("conversations").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    conversations_behave(&pg.store(dir.path()).await).await;
    pg.drop().await;
}

/// Turns (which read the conversation before they write) and ledger rows
/// written at once from many tasks over SQLite's connection pool: none may
/// fail. A deferred transaction that reads first cannot take the write lock
/// once another connection has written (SQLITE_BUSY_SNAPSHOT), so writes
/// begin `IMMEDIATE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_turns_and_ledger_writes_all_succeed_on_sqlite() {
    use std::sync::Arc;
    use strata_core::store::{ConversationStore, TenantStore, UsageRecord, UsageStore};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqlStore::open(&dir.path().join("s.db"), common::vault(dir.path()))
            .await
            .unwrap(),
    );
    let t = tenant("busy");
    store.create_tenant(&t).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..6 {
        let (store, tid) = (store.clone(), t.id.clone());
        tasks.spawn(async move {
            let conv = StoredConversation {
                id: format!("conv_{c}"),
                created_at_ms: 1,
                content: b"{}".to_vec(),
            };
            store.create_conversation(&tid, &conv, &[]).await.unwrap();
            for n in 0..40 {
                let turn = [item(&format!("m_{c}_{n}"), "x")];
                assert!(store
                    .append_items(&tid, &conv.id, &turn)
                    .await
                    .unwrap_or_else(|e| panic!("turn {n} of conversation {c}: {e}")));
            }
        });
    }
    for w in 0..4 {
        let store = store.clone();
        tasks.spawn(async move {
            for b in 0..60 {
                let rows: Vec<UsageRecord> = (0..5)
                    .map(|i| UsageRecord {
                        request_id: format!("r{w}_{b}_{i}"),
                        tenant_id: "busy".into(),
                        key_id: "k".into(),
                        at_ms: 1,
                        model: "m".into(),
                        replica: "r".into(),
                        status: 200,
                        prompt_tokens: 1,
                        completion_tokens: 1,
                        ttft_ms: 1.0,
                        latency_ms: 1.0,
                        stream: false,
                        cost_usd: 0.0,
                        batch: false,
                    })
                    .collect();
                store
                    .record_usage(&rows)
                    .await
                    .unwrap_or_else(|e| panic!("ledger batch {b}: {e}"));
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    for c in 0..6 {
        let items = store
            .items(&t.id, &format!("conv_{c}"), None, 100, Order::Asc)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(items.len(), 40);
    }
}
