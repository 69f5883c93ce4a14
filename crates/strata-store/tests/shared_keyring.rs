//! The keyring kept in PostgreSQL, shared by several gateways: each test
//! opens two or three stores on one schema, each with a vault of its own (as
//! separate gateway processes do), against the real PostgreSQL at
//! `DATABASE_URL` (see `common`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{kek, tenant, PgSchema};
use strata_core::store::{ConversationStore, Order, StoredConversation, StoredItem, TenantStore};
use strata_store::{Kek, KekSource, SqlStore, Vault};

/// A gateway's store on `pg` with its own vault over the shared table.
async fn gateway(pg: &PgSchema, kek: Kek, rotate_after: u64, refresh: Duration) -> SqlStore {
    let store = SqlStore::connect_postgres(&pg.url(), None).await.unwrap();
    let vault = Vault::open_shared(store.raw_pool(), kek, KekSource::Environment, None)
        .await
        .unwrap()
        .with_rotation_after(rotate_after)
        .with_refresh(refresh);
    store.with_vault(Arc::new(vault))
}

fn item(id: &str, text: &str) -> StoredItem {
    StoredItem {
        id: id.into(),
        created_at_ms: 1,
        content: text.as_bytes().to_vec(),
    }
}

fn conversation(id: &str) -> StoredConversation {
    StoredConversation {
        id: id.into(),
        created_at_ms: 1,
        content: b"{}".to_vec(),
    }
}

async fn texts(store: &SqlStore, t: &strata_core::tenant::TenantId, conv: &str) -> Vec<String> {
    store
        .items(t, conv, None, 100, Order::Asc)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|i| String::from_utf8(i.content).unwrap())
        .collect()
}

async fn scalar(pg: &PgSchema, sql: &str) -> i64 {
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap()
}

#[tokio::test]
async fn a_conversation_continues_on_any_gateway() {
    let Some(pg) = PgSchema::create("keyring_any").await else {
        return;
    };
    let (a, b) = (
        gateway(&pg, kek(), u64::MAX, Duration::from_secs(30)).await,
        gateway(&pg, kek(), u64::MAX, Duration::from_secs(30)).await,
    );
    // A tenant created on one gateway, after the other opened its keyring.
    let t = tenant("anywhere");
    a.create_tenant(&t).await.unwrap();
    a.create_conversation(&t.id, &conversation("conv_1"), &[item("m0", "one")])
        .await
        .unwrap();
    b.append_items(&t.id, "conv_1", &[item("m1", "two")])
        .await
        .unwrap();
    a.append_items(&t.id, "conv_1", &[item("m2", "three")])
        .await
        .unwrap();
    assert_eq!(texts(&b, &t.id, "conv_1").await, ["one", "two", "three"]);
    assert_eq!(texts(&a, &t.id, "conv_1").await, ["one", "two", "three"]);
    // One data key for the tenant, in the table, and no plaintext key there.
    assert_eq!(scalar(&pg, "SELECT COUNT(*) FROM data_keys").await, 1);
    // Each gateway reserved its own range of encryptions under it.
    assert_eq!(
        scalar(&pg, "SELECT MAX(reserved) FROM data_keys").await,
        2 << 16
    );
    pg.drop().await;
}

#[tokio::test]
async fn data_key_versions_added_by_one_gateway_open_on_another() {
    let Some(pg) = PgSchema::create("keyring_versions").await else {
        return;
    };
    // A reservation is 65536 encryptions: rotating after 1 makes every
    // reservation start a new version.
    let a = gateway(&pg, kek(), 1, Duration::from_secs(3600)).await;
    let b = gateway(&pg, kek(), 1, Duration::from_secs(3600)).await;
    let t = tenant("versions");
    a.create_tenant(&t).await.unwrap();
    a.create_conversation(&t.id, &conversation("conv_v"), &[item("m0", "v1")])
        .await
        .unwrap();
    b.append_items(&t.id, "conv_v", &[item("m1", "by b")])
        .await
        .unwrap();
    a.append_items(&t.id, "conv_v", &[item("m2", "by a")])
        .await
        .unwrap();
    assert!(scalar(&pg, "SELECT COUNT(*) FROM data_keys").await >= 2);
    // Neither gateway's hour-long refresh has passed: the version each has
    // not seen is read when a sealed value names it.
    assert_eq!(texts(&a, &t.id, "conv_v").await, ["v1", "by b", "by a"]);
    assert_eq!(texts(&b, &t.id, "conv_v").await, ["v1", "by b", "by a"]);
    pg.drop().await;
}

#[tokio::test]
async fn shredding_on_one_gateway_reaches_the_others() {
    let Some(pg) = PgSchema::create("keyring_shred").await else {
        return;
    };
    let a = gateway(&pg, kek(), u64::MAX, Duration::from_secs(30)).await;
    let b = gateway(&pg, kek(), u64::MAX, Duration::from_millis(200)).await;
    let t = tenant("shredded");
    a.create_tenant(&t).await.unwrap();
    a.create_conversation(&t.id, &conversation("conv_s"), &[item("m0", "secret")])
        .await
        .unwrap();
    assert_eq!(texts(&b, &t.id, "conv_s").await, ["secret"]);
    // Keep a copy of the sealed row, as a backup would.
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT sealed FROM conversation_items")
        .fetch_one(&pool)
        .await
        .unwrap();
    let sealed_conv: Vec<u8> = sqlx::query_scalar("SELECT sealed FROM conversations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(a.delete_tenant(&t.id).await.unwrap());
    assert_eq!(scalar(&pg, "SELECT COUNT(*) FROM data_keys").await, 0);
    // Restore the row behind the stores' backs: once b's copy is older than
    // its refresh, b cannot open it either.
    sqlx::query(
        "INSERT INTO tenants (id, name, isolation, created_at_ms) VALUES ($1, 'back', 'shared', 1)",
    )
    .bind(t.id.as_str())
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO conversations (tenant_id, id, created_at_ms, sealed) VALUES ($1, 'conv_s', 1, $2)")
        .bind(t.id.as_str())
        .bind(sealed_conv)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO conversation_items (tenant_id, conversation_id, seq, id, created_at_ms, sealed) VALUES ($1, 'conv_s', 0, 'm0', 1, $2)")
        .bind(t.id.as_str())
        .bind(sealed)
        .execute(&pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = b.items(&t.id, "conv_s", None, 10, Order::Asc).await;
    assert!(read.is_err(), "a shredded key still opened: {read:?}");
    pg.drop().await;
}

#[tokio::test]
async fn a_gateway_with_another_kek_does_not_start() {
    let Some(pg) = PgSchema::create("keyring_kek").await else {
        return;
    };
    let a = gateway(&pg, kek(), u64::MAX, Duration::from_secs(30)).await;
    a.create_tenant(&tenant("k")).await.unwrap();
    let store = SqlStore::connect_postgres(&pg.url(), None).await.unwrap();
    let other = Kek::from_hex(&"77".repeat(32)).unwrap();
    let err = Vault::open_shared(store.raw_pool(), other, KekSource::Environment, None)
        .await
        .err()
        .expect("another KEK must be refused");
    assert!(err.to_string().contains("KEK"), "{err}");
    pg.drop().await;
}

#[tokio::test]
async fn kek_rotation_rewraps_the_shared_table() {
    let Some(pg) = PgSchema::create("keyring_rotate").await else {
        return;
    };
    let a = gateway(&pg, kek(), u64::MAX, Duration::from_secs(30)).await;
    let t = tenant("rotated");
    a.create_tenant(&t).await.unwrap();
    a.create_conversation(&t.id, &conversation("conv_r"), &[item("m0", "kept")])
        .await
        .unwrap();
    let store = SqlStore::connect_postgres(&pg.url(), None).await.unwrap();
    let vault = Vault::open_shared(store.raw_pool(), kek(), KekSource::Environment, None)
        .await
        .unwrap();
    let new = Kek::from_hex(&"55".repeat(32)).unwrap();
    let new_id = new.id().to_owned();
    assert_eq!(vault.rotate_kek(new).await.unwrap(), new_id);
    // The old KEK no longer opens the table; the new one does, and content
    // sealed before the rotation still reads.
    let again = SqlStore::connect_postgres(&pg.url(), None).await.unwrap();
    assert!(
        Vault::open_shared(again.raw_pool(), kek(), KekSource::Environment, None)
            .await
            .is_err()
    );
    let b = gateway(
        &pg,
        Kek::from_hex(&"55".repeat(32)).unwrap(),
        u64::MAX,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(texts(&b, &t.id, "conv_r").await, ["kept"]);
    pg.drop().await;
}

#[tokio::test]
async fn a_keyring_file_is_imported_once() {
    let Some(pg) = PgSchema::create("keyring_import").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Content written by a single-machine start (file keyring) on this
    // database, then the same database opened as a cluster.
    let t = tenant("imported");
    {
        let store = SqlStore::connect_postgres(&pg.url(), Some(common::vault(dir.path())))
            .await
            .unwrap();
        store.create_tenant(&t).await.unwrap();
        store
            .create_conversation(&t.id, &conversation("conv_i"), &[item("m0", "old")])
            .await
            .unwrap();
    }
    let store = common::open(&pg.url(), dir.path()).await;
    assert_eq!(texts(&store, &t.id, "conv_i").await, ["old"]);
    assert!(!dir.path().join("keyring.json").exists());
    assert!(dir.path().join("keyring.json.imported").exists());
    assert_eq!(scalar(&pg, "SELECT COUNT(*) FROM data_keys").await, 1);
    pg.drop().await;
}
