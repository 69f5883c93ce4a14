//! The gateway: OpenAI-compatible routes in front of engine replicas.
//!
//! Its modules stack the way a request passes through them, each layer
//! importing only from the ones below it (docs/architecture.md draws it):
//!
//! - `http`: OpenAI-shaped errors, extractors, the OpenAPI shapes;
//! - `metrics`: the gateway's Prometheus metrics;
//! - `tenancy`: who asks (keys, principals, audit) and whether it may run
//!   now (admission: limits, budget, fair queue);
//! - `fleet`: the replicas (health, the pure pick policy, the prefix index,
//!   the replica client, KV snapshots and drains);
//! - `relay`: sending to a replica with retries, the SSE codec and the
//!   resumable answer stream, metering, answer capture;
//! - `api`: the OpenAI routes, each a short list of named phases;
//!   `ops` beside it: the admin API, the dashboard, health and metrics;
//! - `app`: one application state, the router, start-up and shutdown.

pub mod api;
pub mod app;
pub mod fleet;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod relay;
pub mod tenancy;

pub use api::catalog::CatalogModel;
pub use app::{serve, BatchSettings, Gateway, GatewayError, GatewaySettings, Links, SnapshotPlace};
pub use metrics::MoreMetrics;
pub use strata_core::{Load, Loads};
