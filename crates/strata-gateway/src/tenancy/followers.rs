//! How many background-response streams each tenant follows on this
//! gateway (`GET /v1/responses/{id}?stream=true`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use strata_core::tenant::TenantId;

/// The resumed streams each tenant follows on this gateway, at most
/// `cap` at once: each reads the store every 50 ms while its response
/// runs, so one tenant's many would load everyone's database.
pub struct Followers {
    cap: usize,
    by_tenant: Mutex<HashMap<TenantId, usize>>,
}

/// One stream followed; its place is given back when it is dropped (the
/// stream ended, or its client went away).
pub struct Following {
    followers: Arc<Followers>,
    /// Whose stream it is.
    pub tenant: TenantId,
}

impl Followers {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Followers {
            cap,
            by_tenant: Default::default(),
        })
    }

    /// A place for one more of `tenant`'s streams, unless it holds `cap`.
    pub fn enter(self: &Arc<Self>, tenant: &TenantId) -> Option<Following> {
        let mut by = self.by_tenant.lock().expect("followers lock");
        let n = by.entry(tenant.clone()).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(Following {
            followers: self.clone(),
            tenant: tenant.clone(),
        })
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut by = self.followers.by_tenant.lock().expect("followers lock");
        if let Some(n) = by.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_follows_at_most_its_cap_and_a_dropped_stream_gives_its_place_back() {
        let followers = Followers::new(2);
        let (a, b) = (TenantId("ten_a".into()), TenantId("ten_b".into()));
        let first = followers.enter(&a).expect("one");
        let _second = followers.enter(&a).expect("two");
        assert!(followers.enter(&a).is_none(), "a third for the same tenant");
        let _theirs = followers
            .enter(&b)
            .expect("another tenant has places of its own");
        drop(first);
        assert!(followers.enter(&a).is_some(), "a place again once one ends");
    }
}
