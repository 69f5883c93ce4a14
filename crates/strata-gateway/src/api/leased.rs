//! Work a gateway does while it holds a lease of the store (a batch, a
//! background response): the lease renewed while the work runs, the work
//! told to stop when a renewal fails (another gateway holds it now), and
//! the lease let go after, so the next holder need not wait for it to run
//! out.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use strata_core::store::LeaseStore;
use tokio_util::sync::CancellationToken;

/// A lease held by one gateway process.
pub struct Lease {
    pub leases: Arc<dyn LeaseStore>,
    pub name: String,
    pub holder: String,
    /// How long a claim lasts unless renewed, and how often it is.
    pub ttl_ms: i64,
    pub renew_every: Duration,
}

impl Lease {
    /// Runs `work` (which watches `lost`) while the lease is renewed;
    /// `lost` is cancelled when a renewal fails, and once `work` is done.
    pub async fn hold<F: Future>(self, lost: CancellationToken, work: F) -> F::Output {
        let Lease {
            leases,
            name,
            holder,
            ttl_ms,
            renew_every,
        } = self;
        let renew = {
            let (leases, name, holder, lost) =
                (leases.clone(), name.clone(), holder.clone(), lost.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = lost.cancelled() => return,
                        _ = tokio::time::sleep(renew_every) => {}
                    }
                    if !matches!(leases.claim_lease(&name, &holder, ttl_ms).await, Ok(true)) {
                        tracing::warn!(lease = %name, "lost a lease; its work stops here");
                        lost.cancel();
                        return;
                    }
                }
            })
        };
        let out = work.await;
        lost.cancel();
        let _ = renew.await;
        let _ = leases.release_lease(&name, &holder).await;
        out
    }
}
