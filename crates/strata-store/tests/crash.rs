//! Crash consistency of turn writes: a child process (this test binary,
//! re-run in writer mode) writes conversation turns through the store as
//! fast as it can, and is SIGKILLed at a random moment, many times over.
//! After every kill the database must hold whole turns only: each
//! conversation has its first item plus exactly two items (input, output)
//! per response stored for it, and everything still opens.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use strata_core::store::{
    ConversationStore, Order, StoredConversation, StoredItem, StoredResponse, TenantStore,
};
use strata_core::tenant::{Isolation, RateLimits, Tenant, TenantId};
use strata_store::SqlStore;

const CHILD_DB: &str = "STRATA_CRASH_CHILD_DB";
const CHILD_DIR: &str = "STRATA_CRASH_CHILD_DIR";
const TENANT: &str = "ten_crash";

fn item(id: String) -> StoredItem {
    StoredItem {
        id,
        created_at_ms: 1,
        content: br#"{"type":"message","role":"user","content":"turn"}"#.to_vec(),
    }
}

/// Writer mode: turns forever, until killed. A no-op in a normal test run.
#[tokio::test]
async fn crash_writer_child() {
    let (Ok(db), Ok(dir)) = (std::env::var(CHILD_DB), std::env::var(CHILD_DIR)) else {
        return;
    };
    let store = common::open(&db, Path::new(&dir)).await;
    let tenant = TenantId(TENANT.into());
    let run = std::process::id();
    for n in 0.. {
        let conv = format!("conv_{run}_{n}");
        let first = StoredConversation {
            id: conv.clone(),
            created_at_ms: 1,
            content: b"{\"metadata\":{}}".to_vec(),
        };
        store
            .create_conversation(&tenant, &first, &[item(format!("first_{conv}"))])
            .await
            .unwrap();
        if n == 0 {
            // The parent's random kill moment counts from here: under load
            // a child can take longer than that moment just to start.
            std::fs::write(Path::new(&dir).join(format!("started_{run}")), b"").unwrap();
        }
        for turn in 0..4 {
            let id = format!("resp_{conv}_{turn}");
            let response = StoredResponse {
                id: id.clone(),
                created_at_ms: 1,
                model: "m".into(),
                conversation_id: Some(conv.clone()),
                replica: None,
                content: vec![b'x'; 2000],
            };
            let turn_items = [item(format!("in_{id}")), item(format!("out_{id}"))];
            assert!(store
                .put_response(&tenant, &response, &turn_items)
                .await
                .unwrap());
        }
    }
}

/// Checks the conversations of one writer run (`conv_<pid>_…`), or all.
async fn check(store: &SqlStore, run: Option<u32>) -> (usize, usize) {
    let tenant = TenantId(TENANT.into());
    let pattern = run.map_or("conv_%".to_owned(), |pid| format!("conv_{pid}_%"));
    let like = store.sql("SELECT id FROM conversations WHERE id LIKE ?");
    let convs: Vec<String> = sqlx::query_scalar(&like)
        .bind(pattern)
        .fetch_all(&store.raw_pool())
        .await
        .unwrap();
    let mut responses = 0;
    for conv in &convs {
        let items = store
            .items(&tenant, conv, None, 1000, Order::Asc)
            .await
            .unwrap()
            .unwrap();
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        let turns = (ids.len().max(1) - 1) / 2;
        let mut expected = vec![format!("first_{conv}")];
        for t in 0..turns {
            let id = format!("resp_{conv}_{t}");
            assert!(
                store.response(&tenant, &id).await.unwrap().is_some(),
                "{id} missing"
            );
            expected.push(format!("in_{id}"));
            expected.push(format!("out_{id}"));
        }
        assert_eq!(ids, expected, "conversation {conv} holds a partial turn");
        let next = format!("resp_{conv}_{turns}");
        assert!(
            store.response(&tenant, &next).await.unwrap().is_none(),
            "{next} without its items"
        );
        responses += turns;
    }
    (convs.len(), responses)
}

/// Waits until no other session of the database is inside a transaction.
/// A killed client's last COMMIT may still be running on the PostgreSQL
/// server after the process is gone; a check that read the items before
/// it and the response after it would see half a turn that no reader of
/// one snapshot can see.
async fn settled(store: &SqlStore) {
    if store.dialect() != strata_store::Dialect::Postgres {
        return;
    }
    let busy = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                AND pid <> pg_backend_pid() AND state IN ('active', 'idle in transaction')";
    for _ in 0..1000 {
        let n: i64 = sqlx::query_scalar(busy)
            .fetch_one(&store.raw_pool())
            .await
            .unwrap();
        if n == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("another session stayed inside a transaction for 10 s");
}

async fn crash_many_times(db: &str, dir: &Path, kills: usize) {
    let store = common::open(db, dir).await;
    store
        .create_tenant(&Tenant {
            id: TenantId(TENANT.into()),
            name: "crash".into(),
            isolation: Isolation::Shared,
            limits: RateLimits::default(),
            priority: Default::default(),
            monthly_budget_usd: None,
            created_at_ms: 1,
        })
        .await
        .unwrap();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..kills {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_writer_child", "--nocapture"])
            .env(CHILD_DB, db)
            .env(CHILD_DIR, dir)
            .spawn()
            .unwrap();
        let started = dir.join(format!("started_{}", child.id()));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !started.exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // xorshift: a different moment every round, the same run every time.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(60 + seed % 240)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        settled(&store).await;
        let (convs, responses) = check(&store, Some(child.id())).await;
        assert!(convs > 0, "the writer never started a conversation");
        eprintln!("kill {round}: {convs} conversations, {responses} whole turns");
    }
    let (convs, responses) = check(&store, None).await;
    assert!(
        responses > kills,
        "too few turns written to mean anything: {responses}"
    );
    eprintln!(
        "after {kills} kills: {convs} conversations, {responses} whole turns, all consistent"
    );
}

#[tokio::test]
async fn sqlite_turns_survive_kill_9_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    crash_many_times(&db.to_string_lossy(), dir.path(), 25).await;
}

#[tokio::test]
async fn postgres_turns_survive_kill_9_whole_or_not_at_all() {
    let Some(pg) = common::PgSchema::create("crash").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    crash_many_times(&pg.url(), dir.path(), 10).await;
    pg.drop().await;
}
