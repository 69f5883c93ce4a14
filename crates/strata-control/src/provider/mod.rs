//! What the controller asks of a provider (the thing that owns machines):
//! launch a replica from a catalog offer, let one go, list what runs, and
//! report what happened since the last look (an event stream, polled).
//! `local` runs engine child processes, `sim` is a simulated cloud on a
//! virtual clock; the Kubernetes provider (strata-k8s) answers the same
//! calls.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;

use crate::planner::{Offer, Slot};
use crate::ControlError;

pub mod local;
pub mod sim;

/// A reclaimed replica serving through its notice until `drain` before
/// its machine goes at `end` (`pool.preemption_drain_secs`): at `now`,
/// whether it must drain, with the time left and what its record says.
pub fn drain_due(end: Instant, drain: Duration, now: Instant) -> Option<(Duration, String)> {
    (now + drain >= end).then(|| {
        let left = end.saturating_duration_since(now);
        let why = format!(
            "preempted (served through its notice, {}s left to drain)",
            left.as_secs_f64().round()
        );
        (left, why)
    })
}

/// A replica of the pool as the provider sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Instance {
    pub id: String,
    pub slot: Slot,
    pub ready: bool,
    /// Work it has in hand (tokens), when the provider knows; the least
    /// busy replica of a kind is let go first.
    pub busy: Option<f64>,
}

/// What happened to an instance.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProviderEvent {
    /// Passed its health check; takes requests.
    Ready { id: String },
    /// Died or never became healthy; it is gone from `list`.
    Failed { id: String, detail: String },
    /// Will be reclaimed after `notice`: it is draining and gone from
    /// `list`, so the controller plans its replacement at once.
    Preempting {
        id: String,
        slot: Slot,
        notice: Duration,
    },
    /// Stopped (let go, or reclaimed) and no longer billed.
    Gone { id: String },
    /// A launch found no capacity for this slot (spot sold out in the zone).
    Unavailable { slot: Slot },
}

#[async_trait]
pub trait Provider: Send {
    /// Starts a replica for `offer`; it shows in `list` at once, not ready.
    async fn launch(&mut self, offer: &Offer) -> Result<String, ControlError>;
    /// Lets an instance go: it leaves `list` at once, drains, then stops
    /// (`Gone` follows).
    async fn terminate(&mut self, id: &str, why: &str);
    /// The pool's instances that are starting or serving (not those leaving).
    fn list(&self) -> Vec<Instance>;
    /// Checks health, exits and notices; the events since the last call.
    async fn poll(&mut self) -> Vec<ProviderEvent>;
    /// Stops every instance, leaving nothing behind.
    async fn shutdown(&mut self);
}
