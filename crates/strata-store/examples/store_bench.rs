//! Store throughput: conversation turns written per second (each turn: a
//! sealed response plus its two sealed items, one transaction) until the
//! store holds `--conversations` conversations, then the latency of reading
//! a random conversation's items back (opened), p50 and p99.
//!
//!     cargo run --release -p strata-store --example store_bench -- \
//!         --db /tmp/bench.db --conversations 100000
//!     cargo run --release -p strata-store --example store_bench -- \
//!         --db 'postgres://postgres@127.0.0.1:5432/test' --conversations 100000
//! (`--keyring file` keeps the keyring in a file on PostgreSQL too, as
//! before the shared keyring, for comparison.)
//!
//! A PostgreSQL run works in a fresh schema of its own and drops it after.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Executor;
use strata_core::store::{
    ConversationStore, Order, StoredConversation, StoredItem, StoredResponse, TenantStore,
};
use strata_core::tenant::{Isolation, RateLimits, Tenant, TenantId};
use strata_store::{Kek, KekSource, SqlStore, Vault};

struct Args {
    db: String,
    conversations: usize,
    writers: usize,
    reads: usize,
    /// `file`: the keyring file beside the store even on PostgreSQL (as
    /// before the shared keyring), for comparison; default: as strata opens it.
    file_keyring: bool,
}

fn args() -> Args {
    let mut a = Args {
        db: "/tmp/strata-store-bench.db".into(),
        conversations: 100_000,
        writers: 8,
        reads: 2000,
        file_keyring: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--db" => a.db = value,
            "--conversations" => a.conversations = value.parse().expect("a number"),
            "--writers" => a.writers = value.parse().expect("a number"),
            "--reads" => a.reads = value.parse().expect("a number"),
            "--keyring" => a.file_keyring = value == "file",
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn item(id: String, text: &str) -> StoredItem {
    let doc = serde_json::json!({"id": id, "type": "message", "status": "completed", "role": "user",
        "content": [{"type": "input_text", "text": text}]});
    StoredItem {
        id,
        created_at_ms: 1,
        content: serde_json::to_vec(&doc).unwrap(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let a = args();
    let dir = tempfile::tempdir().unwrap();
    let mut schema = None;
    let url = if a.db.starts_with("postgres") {
        let name = format!("strata_store_bench_{}", std::process::id());
        let pool = sqlx::PgPool::connect(&a.db).await.unwrap();
        pool.execute(format!("CREATE SCHEMA {name}").as_str())
            .await
            .unwrap();
        let sep = if a.db.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}options=-c%20search_path%3D{name}", a.db);
        schema = Some((pool, name));
        url
    } else {
        let _ = std::fs::remove_file(&a.db);
        a.db.clone()
    };
    let kek = || Kek::from_hex(&"42".repeat(32)).unwrap();
    let keyring = dir.path().join("keyring.json");
    let store = if a.file_keyring {
        let vault = Vault::open(&keyring, kek(), KekSource::Environment).unwrap();
        SqlStore::open_any(&url, Some(Arc::new(vault)))
            .await
            .unwrap()
    } else {
        SqlStore::open_with_keyring(&url, kek(), KekSource::Environment, &keyring)
            .await
            .unwrap()
            .0
    };
    let store = Arc::new(store);
    let tenant = Tenant {
        id: TenantId::new(),
        name: "bench".into(),
        isolation: Isolation::Shared,
        limits: RateLimits::default(),
        priority: Default::default(),
        monthly_budget_usd: None,
        created_at_ms: 1,
    };
    store.create_tenant(&tenant).await.unwrap();
    let text = "How many GPUs does the batch job need tonight, and can it run on spot capacity? "
        .repeat(4);

    // Writes: every conversation is created with one item, then gets one turn.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..a.writers {
        let (store, tenant, text) = (store.clone(), tenant.id.clone(), text.clone());
        let n = a.conversations;
        let writers = a.writers;
        tasks.spawn(async move {
            for c in (w..n).step_by(writers) {
                let conv = format!("conv_{c}");
                store
                    .create_conversation(
                        &tenant,
                        &StoredConversation {
                            id: conv.clone(),
                            created_at_ms: 1,
                            content: b"{\"metadata\":{}}".to_vec(),
                        },
                        &[item(format!("msg_{c}_0"), &text)],
                    )
                    .await
                    .unwrap();
                let response = StoredResponse {
                    id: format!("resp_{c}"),
                    created_at_ms: 1,
                    model: "m".into(),
                    conversation_id: Some(conv),
                    replica: Some("local-0".into()),
                    content: text.as_bytes().repeat(3),
                };
                let items = [
                    item(format!("msg_{c}_1"), &text),
                    item(format!("msg_{c}_2"), &text),
                ];
                assert!(store
                    .put_response(&tenant, &response, &items)
                    .await
                    .unwrap());
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let turns = a.conversations as f64;
    println!(
        "{}: {} conversations, each created with 1 item and given 1 turn (2 transactions), in {:.1} s: \
         {:.0} conversations + turns per second, {} writers",
        if schema.is_some() { "postgres" } else { "sqlite" },
        a.conversations,
        elapsed,
        turns / elapsed,
        a.writers
    );

    // Reads: a random conversation's items, opened.
    let mut latencies = Vec::with_capacity(a.reads);
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..a.reads {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let c = (seed % a.conversations as u64) as usize;
        let t = Instant::now();
        let items = store
            .items(&tenant.id, &format!("conv_{c}"), None, 100, Order::Asc)
            .await
            .unwrap()
            .unwrap();
        latencies.push(t.elapsed());
        assert_eq!(items.len(), 3);
    }
    latencies.sort();
    println!(
        "read a random conversation's 3 items ({} reads at {} conversations): p50 {:.3} ms, p99 {:.3} ms",
        a.reads,
        a.conversations,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    if let Some((pool, name)) = schema {
        pool.execute(format!("DROP SCHEMA {name} CASCADE").as_str())
            .await
            .unwrap();
    }
}
