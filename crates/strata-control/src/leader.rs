//! Leader election over a `LeaseStore`, so that several controller copies
//! can run and only one acts: each contends for one named lease and
//! renews it every third of its term; the holder is the leader. A standby
//! takes over when the leader's term runs out (it died) or at once when
//! the leader lets go (it shut down). A copy that cannot renew in time
//! (store unreachable, renewal slow) stops calling itself leader before
//! its term can have run out, so two never act at once by its own clock.

use std::sync::Arc;
use std::time::Duration;

use strata_core::store::LeaseStore;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct Elector {
    pub store: Arc<dyn LeaseStore>,
    /// The lease's name (one per thing to lead, e.g. `controller/default`).
    pub name: String,
    /// This copy's name (host and process, say); shown as the holder.
    pub holder: String,
    pub term: Duration,
}

impl Elector {
    /// Contends until `cancel`, then lets go if it led. The receiver says
    /// whether this copy leads now.
    pub fn spawn(self, cancel: CancellationToken) -> (watch::Receiver<bool>, JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move { self.contend(tx, cancel).await });
        (rx, task)
    }

    async fn contend(self, leading: watch::Sender<bool>, cancel: CancellationToken) {
        let every = self.term / 3;
        let term_ms = self.term.as_millis() as i64;
        loop {
            let asked = Instant::now();
            let claim = tokio::time::timeout(
                every,
                self.store.claim_lease(&self.name, &self.holder, term_ms),
            )
            .await;
            let holds = match claim {
                Ok(Ok(holds)) => holds,
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot renew the lease");
                    false
                }
                Err(_) => {
                    tracing::warn!(lease = %self.name, "renewing the lease timed out");
                    false
                }
            };
            if holds != *leading.borrow() {
                tracing::info!(lease = %self.name, holder = %self.holder, leading = holds, "leadership changed");
            }
            leading.send_replace(holds);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(asked + every) => {}
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            if let Err(e) = self.store.release_lease(&self.name, &self.holder).await {
                tracing::warn!(lease = %self.name, error = %e, "cannot release the lease");
            }
        }
    }
}
