//! Leader election on the real store (SQLite, and PostgreSQL when
//! DATABASE_URL names one): one of two contenders leads; the standby takes
//! over when the leader lets go (shut down) or stops renewing (killed).
//!
//! The term is long (4.5 s, renewed every 1.5 s) so that the two ways of
//! taking over stay apart on a loaded machine: after a let-go the standby
//! leads at its next claim (within 1.5 s), while an unrenewed lease runs at
//! least 3 s past the holder's end (its last renewal was at most 1.5 s
//! before). A 600 ms term left 300 ms of slack, and a busy CI run missed it.

use std::sync::Arc;
use std::time::Duration;

use strata_control::leader::Elector;
use strata_core::store::LeaseStore;
use strata_store::SqlStore;

// The store tests' PostgreSQL schema per test.
#[path = "../../strata-store/tests/common/mod.rs"]
mod common;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The stores, and the PostgreSQL schema to drop at the end.
async fn stores() -> (Vec<Arc<dyn LeaseStore>>, Option<common::PgSchema>) {
    let dir = tempfile::tempdir().unwrap().keep();
    let mut out: Vec<Arc<dyn LeaseStore>> = vec![Arc::new(
        SqlStore::open_without_vault(&dir.join("s.db"))
            .await
            .unwrap(),
    )];
    // A schema of this test's own, never the database's public one: that
    // keeps whatever migrations an older or newer build applied there
    // (CI's database outlives its runs), which this build must not trip
    // over.
    let pg = common::PgSchema::create("leader").await;
    if let Some(pg) = &pg {
        out.push(Arc::new(SqlStore::open_any(&pg.url(), None).await.unwrap()));
    }
    (out, pg)
}

const TERM: Duration = Duration::from_millis(4500);
/// The earliest an unrenewed lease can pass to another after its holder
/// stops: the term less one renewal interval.
const EARLIEST_EXPIRY: Duration = Duration::from_millis(3000);

fn elector(store: &Arc<dyn LeaseStore>, name: &str, holder: &str) -> Elector {
    Elector {
        store: store.clone(),
        name: name.into(),
        holder: holder.into(),
        term: TERM,
    }
}

async fn becomes(rx: &mut watch::Receiver<bool>, want: bool, within: Duration) -> bool {
    tokio::time::timeout(within, rx.wait_for(|v| *v == want))
        .await
        .is_ok()
}

#[tokio::test]
async fn the_standby_takes_over_when_the_leader_lets_go_or_dies() {
    let (stores, pg) = stores().await;
    for store in stores {
        let name = format!("controller/test-{}", std::process::id());
        // a leads; b stands by.
        let a_stop = CancellationToken::new();
        let (mut a, _) = elector(&store, &name, "a").spawn(a_stop.clone());
        assert!(becomes(&mut a, true, Duration::from_secs(2)).await);
        let b_stop = CancellationToken::new();
        let (mut b, b_task) = elector(&store, &name, "b").spawn(b_stop.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(*a.borrow() && !*b.borrow(), "one leader at a time");

        // a shuts down and lets go: b leads at its next claim, sooner than
        // a's lease could have run out.
        a_stop.cancel();
        assert!(becomes(&mut a, false, Duration::from_secs(1)).await);
        let let_go = tokio::time::Instant::now();
        assert!(becomes(&mut b, true, EARLIEST_EXPIRY).await);
        assert!(let_go.elapsed() < EARLIEST_EXPIRY);
        assert_eq!(store.lease(&name).await.unwrap().unwrap().holder, "b");

        // c stands by while b renews.
        let c_stop = CancellationToken::new();
        let (mut c, _) = elector(&store, &name, "c").spawn(c_stop.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!*c.borrow(), "b still renews");

        // b dies (its task ends without letting go, as a killed process):
        // c leads once b's term has run out, not before.
        b_task.abort();
        let died = tokio::time::Instant::now();
        assert!(becomes(&mut c, true, TERM * 2).await);
        let took = died.elapsed();
        assert!(
            took >= EARLIEST_EXPIRY - Duration::from_millis(100),
            "took over after {took:?}, inside b's term"
        );
        let lease = store.lease(&name).await.unwrap().unwrap();
        assert_eq!((lease.holder.as_str(), lease.transitions), ("c", 2));
        c_stop.cancel();
        assert!(becomes(&mut c, false, Duration::from_secs(1)).await);
    }
    if let Some(pg) = pg {
        pg.drop().await;
    }
}
