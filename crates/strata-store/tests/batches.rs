//! Files and batches through the `Store` trait, against a real SQLite file
//! and a real PostgreSQL database (see `common`).

mod common;

use common::tenant;
use strata_core::store::{BatchLine, Order, Store, StoredBatch, StoredFile};
use strata_store::SqlStore;

const CANARY: &[u8] = b"CANARY-batch-38";

fn file(id: &str, at: i64, purpose: &str) -> StoredFile {
    StoredFile {
        id: id.into(),
        created_at_ms: at,
        purpose: purpose.into(),
        filename: "CANARY-batch-38.jsonl".into(),
        bytes: 20,
        content: [CANARY, b" line\n"].concat(),
    }
}

fn batch(id: &str, status: &str) -> StoredBatch {
    StoredBatch {
        id: id.into(),
        created_at_ms: 7,
        status: status.into(),
        content: [b"{\"canary\":\"".as_slice(), CANARY, b"\"}"].concat(),
    }
}

fn line(n: u32, ok: bool, text: &str) -> BatchLine {
    BatchLine {
        line: n,
        ok,
        content: [CANARY, text.as_bytes()].concat(),
    }
}

/// The behaviour every backend must show.
async fn files_and_batches_behave(store: &dyn Store) {
    let (a, b) = (tenant("batch-a"), tenant("batch-b"));
    store.create_tenant(&a).await.unwrap();
    store.create_tenant(&b).await.unwrap();

    // Files: read back whole or without content, listed by purpose and
    // page, and only by their tenant.
    store
        .put_file(&a.id, &file("file_1", 1, "batch"))
        .await
        .unwrap();
    store
        .put_file(&a.id, &file("file_2", 2, "batch_output"))
        .await
        .unwrap();
    store
        .put_file(&a.id, &file("file_3", 3, "batch"))
        .await
        .unwrap();
    let whole = store.file(&a.id, "file_1", true).await.unwrap().unwrap();
    assert_eq!(whole, file("file_1", 1, "batch"));
    let bare = store.file(&a.id, "file_1", false).await.unwrap().unwrap();
    assert!(bare.content.is_empty() && bare.filename == whole.filename);
    // Writing a kept id again changes nothing (a batch's output after a crash).
    let mut again = file("file_1", 9, "batch");
    again.content = b"other".to_vec();
    store.put_file(&a.id, &again).await.unwrap();
    assert_eq!(
        store.file(&a.id, "file_1", true).await.unwrap().unwrap(),
        whole
    );
    let ids = |fs: Vec<StoredFile>| fs.into_iter().map(|f| f.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store
            .files(&a.id, None, None, 10, Order::Desc)
            .await
            .unwrap()),
        ["file_3", "file_2", "file_1"]
    );
    assert_eq!(
        ids(store
            .files(&a.id, Some("batch"), Some("file_1"), 10, Order::Asc)
            .await
            .unwrap()),
        ["file_3"]
    );
    assert!(store.file(&b.id, "file_1", true).await.unwrap().is_none());
    assert!(store
        .files(&b.id, None, None, 10, Order::Desc)
        .await
        .unwrap()
        .is_empty());
    assert!(!store.delete_file(&b.id, "file_1").await.unwrap());
    assert!(store.delete_file(&a.id, "file_2").await.unwrap());

    // Batches: a status change happens only from the status read.
    store
        .create_batch(&a.id, &batch("batch_1", "validating"))
        .await
        .unwrap();
    store
        .create_batch(&a.id, &batch("batch_2", "completed"))
        .await
        .unwrap();
    let unfinished = store.unfinished_batches().await.unwrap();
    assert_eq!(unfinished, [(a.id.clone(), "batch_1".to_owned())]);
    assert!(store
        .update_batch(&a.id, &batch("batch_1", "in_progress"), "validating")
        .await
        .unwrap());
    assert!(!store
        .update_batch(&a.id, &batch("batch_1", "cancelling"), "validating")
        .await
        .unwrap());
    assert!(!store
        .update_batch(&b.id, &batch("batch_1", "cancelling"), "in_progress")
        .await
        .unwrap());
    assert_eq!(
        store.batch(&a.id, "batch_1").await.unwrap().unwrap().status,
        "in_progress"
    );
    assert!(store.batch(&b.id, "batch_1").await.unwrap().is_none());
    let listed: Vec<_> = store
        .batches(&a.id, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(listed, ["batch_2", "batch_1"]);

    // A line finishes once: the second result of the same line is dropped.
    assert!(store
        .finish_line(&a.id, "batch_1", &line(2, true, "two"))
        .await
        .unwrap());
    assert!(store
        .finish_line(&a.id, "batch_1", &line(0, false, "zero"))
        .await
        .unwrap());
    assert!(!store
        .finish_line(&a.id, "batch_1", &line(2, false, "again"))
        .await
        .unwrap());
    let lines = store.finished_lines(&a.id, "batch_1", true).await.unwrap();
    assert_eq!(lines, [line(0, false, "zero"), line(2, true, "two")]);
    let bare = store.finished_lines(&a.id, "batch_1", false).await.unwrap();
    assert_eq!(
        (bare[1].line, bare[1].ok, bare[1].content.len()),
        (2, true, 0)
    );
    assert_eq!(store.line_counts(&a.id, "batch_1").await.unwrap(), (1, 1));
    assert_eq!(store.line_counts(&b.id, "batch_1").await.unwrap(), (0, 0));
    assert!(store
        .finished_lines(&b.id, "batch_1", true)
        .await
        .unwrap()
        .is_empty());

    // Deleting the tenant takes its files, batches and lines.
    assert!(store.delete_tenant(&a.id).await.unwrap());
    assert!(store.unfinished_batches().await.unwrap().is_empty());
    assert_eq!(store.line_counts(&a.id, "batch_1").await.unwrap(), (0, 0));
}

#[tokio::test]
async fn sqlite_files_and_batches_behave() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqlStore::open(&dir.path().join("s.db"), common::vault(dir.path()))
        .await
        .unwrap();
    files_and_batches_behave(&store).await;
    drop(store);
    // Nothing stored reached the disk in the clear.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes.windows(CANARY.len()).any(|w| w == CANARY));
    }
}

#[tokio::test]
async fn postgres_files_and_batches_behave() {
    let Some(pg) = common::PgSchema::create("batches").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    files_and_batches_behave(&pg.store(dir.path()).await).await;
    pg.drop().await;
}
