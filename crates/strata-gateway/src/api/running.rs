//! The background responses a gateway runs (`api::responses::background`
//! runs them): the stores they need, the lease holder, which ones run here,
//! and the stop of them all when the gateway stops. Apart from the runner
//! so the generation routes' state can hold it without depending on the
//! Responses routes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_core::store::{BackgroundStore, KeyStore, LeaseStore, TenantStore};
use tokio_util::sync::CancellationToken;

/// What background responses need: the store of their rows and events,
/// the leases, and what it takes to act as the key that created one.
pub struct Background {
    pub store: Arc<dyn BackgroundStore>,
    pub leases: Arc<dyn LeaseStore>,
    pub keys: Arc<dyn KeyStore>,
    pub tenants: Arc<dyn TenantStore>,
    /// Who holds the leases (unique per gateway process).
    pub holder: String,
    /// The responses this gateway runs.
    running: Mutex<HashSet<String>>,
    /// Cancelled when the gateway stops: its responses stop where they
    /// are, unended, for the next gateway (or this one restarted).
    stopping: CancellationToken,
}

impl Background {
    pub fn new(
        store: Arc<dyn BackgroundStore>,
        leases: Arc<dyn LeaseStore>,
        keys: Arc<dyn KeyStore>,
        tenants: Arc<dyn TenantStore>,
        holder: String,
    ) -> Background {
        Background {
            store,
            leases,
            keys,
            tenants,
            holder,
            running: Mutex::default(),
            stopping: CancellationToken::new(),
        }
    }

    /// Cancelled when the gateway stops (each response's own token is a
    /// child of it).
    pub(crate) fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    /// Stops the responses this gateway runs where they are (each at its
    /// next event), lets their leases go, and waits (a while) for that: a
    /// gateway taking them over need not wait for the leases to run out.
    pub async fn stop(&self) {
        self.stopping.cancel();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until
            && !self
                .running
                .lock()
                .expect("running responses lock")
                .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Marks `id` as run here; false when it is already.
    pub(crate) fn take(&self, id: &str) -> bool {
        self.running
            .lock()
            .expect("running responses lock")
            .insert(id.to_owned())
    }

    pub(crate) fn done(&self, id: &str) {
        self.running
            .lock()
            .expect("running responses lock")
            .remove(id);
    }
}
