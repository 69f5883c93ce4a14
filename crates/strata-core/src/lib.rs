//! strata's vocabulary, shared by every other crate: the OpenAI wire types,
//! the one error type that becomes an OpenAI-shaped HTTP error, request
//! validation, the chat template, the config schema and the `Store` trait.
//! Nothing here does I/O, except behind the `axum` and `tls` features: the
//! HTTP plumbing (error rendering, body limits, the TLS listener) that the
//! gateway and the engine share.

pub mod config;
pub mod error;
pub mod openai;
pub mod responses;
pub mod sampling;
pub mod store;
pub mod template;
pub mod tenant;
#[cfg(feature = "tls")]
pub mod tls;

#[cfg(feature = "axum")]
pub use error::read_body;
pub use error::ApiError;

/// Request header from the gateway to an engine naming whose cached prompt
/// prefixes the request may reuse: the tenant id. Requests without it share
/// one unnamed scope. The gateway always sets it, so a client cannot.
pub const CACHE_SCOPE_HEADER: &str = "x-strata-cache-scope";

/// Request header from the gateway to an engine naming the session (a
/// conversation or response chain) whose next turn the request is; the
/// engine keeps the finished cells under it, for snapshots.
pub const SESSION_HEADER: &str = "x-strata-session";

/// Engine routes for KV snapshots, reached only by the gateway.
pub const KV_EXPORT_PATH: &str = "/internal/kv/export";
pub const KV_IMPORT_PATH: &str = "/internal/kv/import";

/// (year, month, day) of a day counted from 1970-01-01, proleptic Gregorian
/// (Howard Hinnant's civil-calendar algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for Unix milliseconds.
pub fn utc_timestamp(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A replica endpoint as a provider publishes it to the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaEndpoint {
    /// Stable name for logs and the ledger (`local-0`, a pod name, a URL).
    pub id: String,
    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    /// The tenant (by name) this replica is reserved for; `None` is the
    /// shared pool. Dedicated tenants use only their replicas, and no other
    /// tenant's request ever reaches those.
    pub reserved_for: Option<String>,
}
