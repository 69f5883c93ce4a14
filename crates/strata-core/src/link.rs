//! The link between a gateway and the controller of its replicas: the
//! controller asks the gateway to drain a replica before it goes (scale
//! down, preemption), and the gateway's admin API passes preemption
//! notices (`strata chaos preempt`) to the provider.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Mutex};

/// Drain `replica`: no new requests, running ones finish (up to `wait`),
/// its sessions' KV caches are saved; `done` is answered when that is over.
#[derive(Debug)]
pub struct DrainRequest {
    pub replica: String,
    pub wait: Duration,
    pub done: oneshot::Sender<()>,
}

/// The replica's machine is reclaimed after `notice` (`None`: the pool's
/// configured notice period).
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptNotice {
    pub replica: String,
    pub notice: Option<Duration>,
}

/// The gateway's ends of the link.
#[derive(Debug, Clone)]
pub struct GatewayLink {
    pub drains: Arc<Mutex<mpsc::Receiver<DrainRequest>>>,
    pub notices: mpsc::Sender<PreemptNotice>,
}

/// The controller's ends of the link.
#[derive(Debug)]
pub struct ControllerLink {
    pub drains: mpsc::Sender<DrainRequest>,
    pub notices: mpsc::Receiver<PreemptNotice>,
}

/// Both ends of a new link.
pub fn link() -> (GatewayLink, ControllerLink) {
    let (drain_tx, drain_rx) = mpsc::channel(64);
    let (notice_tx, notice_rx) = mpsc::channel(64);
    (
        GatewayLink {
            drains: Arc::new(Mutex::new(drain_rx)),
            notices: notice_tx,
        },
        ControllerLink {
            drains: drain_tx,
            notices: notice_rx,
        },
    )
}
