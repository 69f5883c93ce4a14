//! strata's vocabulary, shared by every other crate: the OpenAI wire types,
//! the one error type that becomes an OpenAI-shaped HTTP error, request
//! validation, the chat template, the config schema and the `Store` trait.
//! Nothing here does I/O, except behind the `axum` and `tls` features: the
//! HTTP plumbing (error rendering, body limits, the TLS listener) that the
//! gateway and the engine share.

pub mod config;
pub mod error;
pub mod latency;
#[cfg(feature = "link")]
pub mod link;
pub mod openai;
pub mod responses;
pub mod sampling;
pub mod snapshot;
pub mod store;
pub mod template;
pub mod tenant;
#[cfg(feature = "tls")]
pub mod tls;
pub mod whole;

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

/// Days from 1970-01-01 of a proleptic Gregorian date (the inverse of
/// `civil_from_days`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A moment given on the command line, in Unix milliseconds: a date
/// (`2026-11-29`), a UTC time (`2026-11-29T08:00:00Z` or with a space, `Z`
/// optional), or a span ago (`90s`, `15m`, `2h`, `7d`) counted back from `now_ms`.
pub fn parse_moment(text: &str, now_ms: i64) -> Option<i64> {
    let t = text.trim();
    let unit_ms = match t.chars().last() {
        Some('s') => Some(1e3),
        Some('m') => Some(60e3),
        Some('h') => Some(3_600e3),
        Some('d') => Some(86_400e3),
        _ => None,
    };
    if let Some(unit_ms) = unit_ms {
        let n: f64 = t[..t.len() - 1]
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
        return Some(now_ms - (n * unit_ms) as i64);
    }
    let t = t.strip_suffix('Z').unwrap_or(t);
    let (date, time) = match t.split_once(['T', ' ']) {
        Some((d, tm)) => (d, Some(tm)),
        None => (t, None),
    };
    let mut ymd = date.split('-');
    let (y, m, d) = (
        ymd.next()?.parse::<i64>().ok()?,
        ymd.next()?.parse::<u32>().ok()?,
        ymd.next()?.parse::<u32>().ok()?,
    );
    if ymd.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if let Some(time) = time {
        let parts: Vec<&str> = time.split(':').collect();
        if !(2..=3).contains(&parts.len()) {
            return None;
        }
        let mut unit = 3600;
        for p in parts {
            let max = if unit == 3600 { 24 } else { 60 };
            let v: i64 = p.parse().ok().filter(|v| (0..max).contains(v))?;
            secs += v * unit;
            unit /= 60;
        }
    }
    Some(secs * 1000)
}

/// What a gateway sees of its load: the controller's signals.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Requests received since start (arrivals, before any queueing).
    pub requests_total: u64,
    /// Prompt + completion tokens served since start.
    pub tokens_total: u64,
    /// Of those, prompt tokens.
    pub prompt_tokens_total: u64,
    /// Requests holding a replica slot, and waiting for one.
    pub in_flight: usize,
    pub waiting: usize,
    /// Replicas that take requests.
    pub routable: usize,
    /// p95 time to first token and time per output token (streamed
    /// requests) over the last half minute, in milliseconds; `None`
    /// without requests to measure.
    pub ttft_p95_ms: Option<f64>,
    pub tpot_p95_ms: Option<f64>,
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
    /// On its way out (a cluster's controller let it go): it takes no new
    /// request, and one gateway keeps its sessions' caches as snapshots.
    pub draining: bool,
}

/// The lease a gateway takes to drain a leaving replica (one gateway does).
pub fn drain_lease(replica: &str) -> String {
    format!("drain/{replica}")
}

/// The lease a gateway takes once a leaving replica's sessions are kept:
/// the controller waits for it before it stops the replica.
pub fn drained_lease(replica: &str) -> String {
    format!("drained/{replica}")
}

#[cfg(test)]
mod time_tests {
    use super::*;

    #[test]
    fn moments_parse_as_dates_times_and_spans_ago() {
        let day = 86_400_000;
        assert_eq!(parse_moment("1970-01-02", 0), Some(day));
        assert_eq!(
            parse_moment("2026-11-29T08:30:00Z", 0),
            Some(days_from_civil(2026, 11, 29) * day + 8 * 3_600_000 + 30 * 60_000)
        );
        assert_eq!(
            parse_moment("2026-11-29 08:30", 0),
            parse_moment("2026-11-29T08:30:00", 0)
        );
        assert_eq!(parse_moment("2h", 10 * 3_600_000), Some(8 * 3_600_000));
        assert_eq!(parse_moment("90s", 100_000), Some(10_000));
        for bad in [
            "",
            "h",
            "2w",
            "2026-13-01",
            "2026-11-29T25:00",
            "yesterday",
            "-3h",
        ] {
            assert_eq!(parse_moment(bad, 0), None, "{bad}");
        }
        for days in [-1, 0, 59, 60, 20_000, 20_786] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
