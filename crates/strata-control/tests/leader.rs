//! Leader election on the real store (SQLite, and PostgreSQL when
//! DATABASE_URL names one): one of two contenders leads; the standby takes
//! over when the leader lets go (shut down) or stops renewing (killed).

use std::sync::Arc;
use std::time::Duration;

use strata_control::leader::Elector;
use strata_core::store::LeaseStore;
use strata_store::SqlStore;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

async fn stores() -> Vec<Arc<dyn LeaseStore>> {
    let dir = tempfile::tempdir().unwrap().keep();
    let mut out: Vec<Arc<dyn LeaseStore>> = vec![Arc::new(
        SqlStore::open_without_vault(&dir.join("s.db"))
            .await
            .unwrap(),
    )];
    match std::env::var("DATABASE_URL") {
        Ok(url) => out.push(Arc::new(
            SqlStore::open_any(&fresh_schema(&url).await, None)
                .await
                .unwrap(),
        )),
        Err(_) => assert!(
            std::env::var_os("STRATA_SKIP_POSTGRES").is_some(),
            "DATABASE_URL is not set: the PostgreSQL half cannot run; set it (scripts/test \
             does), or STRATA_SKIP_POSTGRES=1 to skip it knowingly"
        ),
    }
    out
}

/// A schema of this run's own at `base`: the database's public schema
/// keeps whatever migrations an older or newer build applied there (CI's
/// database outlives its runs), which this build must not trip over.
async fn fresh_schema(base: &str) -> String {
    use sqlx::Executor;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!(
        "strata_leader_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000
    );
    let pool = sqlx::PgPool::connect(base)
        .await
        .expect("PostgreSQL at DATABASE_URL");
    pool.execute(format!("CREATE SCHEMA {schema}").as_str())
        .await
        .unwrap();
    pool.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}

fn elector(store: &Arc<dyn LeaseStore>, name: &str, holder: &str) -> Elector {
    Elector {
        store: store.clone(),
        name: name.into(),
        holder: holder.into(),
        term: Duration::from_millis(600),
    }
}

async fn becomes(rx: &mut watch::Receiver<bool>, want: bool, within: Duration) -> bool {
    tokio::time::timeout(within, rx.wait_for(|v| *v == want))
        .await
        .is_ok()
}

#[tokio::test]
async fn the_standby_takes_over_when_the_leader_lets_go_or_dies() {
    for store in stores().await {
        let name = format!("controller/test-{}", std::process::id());
        // a leads; b stands by.
        let a_stop = CancellationToken::new();
        let (mut a, _) = elector(&store, &name, "a").spawn(a_stop.clone());
        assert!(becomes(&mut a, true, Duration::from_secs(2)).await);
        let b_stop = CancellationToken::new();
        let (mut b, b_task) = elector(&store, &name, "b").spawn(b_stop.clone());
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(*a.borrow() && !*b.borrow(), "one leader at a time");

        // a shuts down and lets go: b leads within one renewal (200 ms).
        a_stop.cancel();
        assert!(becomes(&mut a, false, Duration::from_secs(1)).await);
        assert!(becomes(&mut b, true, Duration::from_millis(500)).await);
        assert_eq!(store.lease(&name).await.unwrap().unwrap().holder, "b");

        // c stands by while b renews.
        let c_stop = CancellationToken::new();
        let (mut c, _) = elector(&store, &name, "c").spawn(c_stop.clone());
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!*c.borrow(), "b still renews");

        // b dies (its task ends without letting go, as a killed process):
        // c leads once b's 600 ms term has run out, not before.
        b_task.abort();
        let died = tokio::time::Instant::now();
        assert!(becomes(&mut c, true, Duration::from_secs(2)).await);
        let took = died.elapsed();
        assert!(
            took >= Duration::from_millis(350),
            "took over after {took:?}, inside b's term"
        );
        let lease = store.lease(&name).await.unwrap().unwrap();
        assert_eq!((lease.holder.as_str(), lease.transitions), ("c", 2));
        c_stop.cancel();
        assert!(becomes(&mut c, false, Duration::from_secs(1)).await);
    }
}
