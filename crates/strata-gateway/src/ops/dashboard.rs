//! The operators' dashboard at `/ui`: one page and its script and styles,
//! embedded in the binary (no CDN, works offline), behind a login with a
//! platform admin key. The login makes a session (an HttpOnly, SameSite
//! cookie holding a random token; the key itself is never stored in the
//! browser); the page then reads `/ui/data`, which gathers load against
//! capacity (sampled by this gateway), replicas and their cost over time
//! (from the instance history), latency percentiles and spend per tenant
//! (from the usage ledger), the controller's decisions and the tenants'
//! keys (no secrets).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRef, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use strata_core::store::{
    DecisionStore, InstanceRecord, InstanceStore, KeyStore, TenantStore, UsageRecord, UsageStore,
};
use strata_core::{read_body, ApiError};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::error::store_error;
use crate::http::extract::{Path, Query};
use crate::tenancy::audit::Audit;
use crate::tenancy::auth::Authenticator;

const PAGE: &str = include_str!("dashboard/index.html");
const LOGIN: &str = include_str!("dashboard/login.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

const COOKIE: &str = "strata_ui";
/// How long a dashboard session lasts without logging in again.
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Load samples kept: one every two seconds for an hour.
const HISTORY: usize = 1800;
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Points of the bucketed series (replicas, cost, latency).
const BUCKETS: i64 = 60;
/// Ledger rows read for one window (the newest).
const MAX_ROWS: u32 = 50_000;

/// One sample of this gateway's load.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LoadSample {
    pub at_ms: i64,
    /// Requests holding a replica slot, and waiting for one.
    pub in_flight: usize,
    pub waiting: usize,
    /// Ready replicas × slots per replica.
    pub capacity: usize,
    pub tokens_per_s: f64,
}

/// The pool's latency objectives (p95, milliseconds), drawn on the charts.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Slo {
    pub ttft_p95_ms: Option<f64>,
    pub tpot_p95_ms: Option<f64>,
}

struct Session {
    tenant: strata_core::tenant::TenantId,
    key_id: String,
    until: Instant,
}

/// What the dashboard reads from the store.
pub struct Reads {
    pub tenants: Arc<dyn TenantStore>,
    pub keys: Arc<dyn KeyStore>,
    pub usage: Arc<dyn UsageStore>,
    pub instances: Arc<dyn InstanceStore>,
    pub decisions: Arc<dyn DecisionStore>,
}

pub struct Dashboard {
    reads: Reads,
    audit: Audit,
    auth: Arc<Authenticator>,
    slo: Slo,
    /// Mark the cookie `Secure` (the gateway speaks TLS).
    secure: bool,
    history: Mutex<VecDeque<LoadSample>>,
    sessions: Mutex<HashMap<String, Session>>,
}

impl Dashboard {
    pub fn new(
        reads: Reads,
        audit: Audit,
        auth: Arc<Authenticator>,
        slo: Slo,
        secure: bool,
    ) -> Self {
        Dashboard {
            reads,
            audit,
            auth,
            slo,
            secure,
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            sessions: Mutex::default(),
        }
    }

    pub fn record(&self, sample: LoadSample) {
        let mut h = self.history.lock().expect("history lock");
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(sample);
    }

    fn token(headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .map(str::to_owned)
            .next()
    }

    /// The session's key, if the cookie names a live session whose key is
    /// still active (revoking the key ends its sessions).
    async fn session(&self, headers: &HeaderMap) -> Option<String> {
        let token = Self::token(headers)?;
        let (tenant, key_id) = {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            sessions.retain(|_, s| s.until > Instant::now());
            let s = sessions.get(&token)?;
            (s.tenant.clone(), s.key_id.clone())
        };
        match self.reads.keys.key(&tenant, &key_id).await {
            Ok(Some(k)) if k.is_active(strata_core::now_ms()) => Some(key_id),
            Ok(_) => {
                self.sessions.lock().expect("sessions lock").remove(&token);
                None
            }
            // The store is away for a moment: refuse now, keep the session.
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a dashboard session's key");
                None
            }
        }
    }

    /// The session cookie: `Secure` when this gateway serves TLS or the
    /// request reached a TLS-terminating proxy first (`X-Forwarded-Proto:
    /// https`, which can only make the cookie stricter).
    fn cookie(&self, value: &str, max_age: u64, headers: &axum::http::HeaderMap) -> HeaderValue {
        let behind_tls = headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"));
        let secure = if self.secure || behind_tls {
            "; Secure"
        } else {
            ""
        };
        HeaderValue::from_str(&format!(
            "{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
        ))
        .expect("a cookie of token characters")
    }
}

/// The dashboard's routes, for a router whose state holds a `Dashboard`.
pub fn routes<S>() -> OpenApiRouter<S>
where
    Arc<Dashboard>: FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    OpenApiRouter::new()
        .routes(routes!(page))
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(data))
        .routes(routes!(asset))
}

/// Headers of every dashboard answer: nothing from elsewhere, no framing.
fn guarded(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn login_page(status: StatusCode, message: &str) -> Response {
    let message = if message.is_empty() {
        String::new()
    } else {
        format!("<p class=\"refused\" role=\"alert\">{message}</p>")
    };
    guarded(
        status,
        "text/html; charset=utf-8",
        LOGIN.replace("{{message}}", &message),
    )
}

#[utoipa::path(
    get,
    path = "/ui",
    tag = "dashboard",
    summary = "The dashboard (after logging in), else the login form",
    responses(
        (status = 200, description = "The dashboard page", content_type = "text/html", body = String),
        (status = 401, description = "The login form", content_type = "text/html", body = String),
    )
)]
async fn page(State(d): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    if d.session(&headers).await.is_some() {
        guarded(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_owned())
    } else {
        login_page(StatusCode::UNAUTHORIZED, "")
    }
}

/// The value of `name` in a form body (`application/x-www-form-urlencoded`).
fn form_field(body: &[u8], name: &str) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    let raw = body
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))?;
    let raw = raw.replace('+', " ");
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[utoipa::path(
    post,
    path = "/ui/login",
    tag = "dashboard",
    summary = "Log in with a platform admin key (form field `key`)",
    request_body(content_type = "application/x-www-form-urlencoded", content = String, description = "`key=sk-strata-…`"),
    responses(
        (status = 303, description = "Logged in: a session cookie, and on to /ui"),
        (status = 401, description = "Refused: the login form again", content_type = "text/html", body = String),
    )
)]
async fn login(State(d): State<Arc<Dashboard>>, req: Request) -> Response {
    let headers = req.headers().clone();
    let Ok(body) = read_body(req.into_body(), 4096).await else {
        return login_page(StatusCode::PAYLOAD_TOO_LARGE, "That is not a key.");
    };
    let key = form_field(&body, "key").unwrap_or_default();
    let principal = d
        .auth
        .authenticate(Some(&format!("Bearer {}", key.trim())))
        .await;
    let p = match principal {
        Ok(p) if p.is_platform_admin() => p,
        Ok(p) => {
            let tenant = p.tenant.id.to_string();
            d.audit
                .record(&p, "ui.login", &tenant, "/ui", "denied")
                .await;
            return login_page(
                StatusCode::UNAUTHORIZED,
                "Refused: the dashboard takes a platform admin key.",
            );
        }
        Err(_) => {
            d.audit
                .record_anonymous("ui.login", "/ui", "invalid_key")
                .await;
            return login_page(StatusCode::UNAUTHORIZED, "Refused: that key is not valid.");
        }
    };
    let mut random = [0u8; 32];
    getrandom::getrandom(&mut random).expect("the OS random source is available");
    let token = hex(&random);
    d.sessions.lock().expect("sessions lock").insert(
        token.clone(),
        Session {
            tenant: p.tenant.id.clone(),
            key_id: p.key.id.clone(),
            until: Instant::now() + SESSION_TTL,
        },
    );
    d.audit
        .record(&p, "ui.login", p.tenant.id.as_str(), "/ui", "ok")
        .await;
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                d.cookie(&token, SESSION_TTL.as_secs(), &headers),
            ),
            (header::LOCATION, HeaderValue::from_static("/ui")),
        ],
    )
        .into_response()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[utoipa::path(
    post,
    path = "/ui/logout",
    tag = "dashboard",
    summary = "End the dashboard session",
    responses((status = 303, description = "Logged out, on to /ui"))
)]
async fn logout(State(d): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    if let Some(token) = Dashboard::token(&headers) {
        d.sessions.lock().expect("sessions lock").remove(&token);
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, d.cookie("", 0, &headers)),
            (header::LOCATION, HeaderValue::from_static("/ui")),
        ],
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/ui/assets/{name}",
    tag = "dashboard",
    summary = "The dashboard's script and styles",
    params(("name" = String, Path, description = "`app.js` or `app.css`")),
    responses(
        (status = 200, description = "The file", body = String),
        (status = 404, description = "No such file", body = crate::http::openapi::ErrorBody),
    )
)]
async fn asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => guarded(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            SCRIPT.to_owned(),
        ),
        "app.css" => guarded(StatusCode::OK, "text/css; charset=utf-8", STYLE.to_owned()),
        _ => ApiError::not_found("No such dashboard file.").into_response(),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct Window {
    /// Minutes back from now (1 to 1440; 60 when not given).
    minutes: Option<String>,
}

#[utoipa::path(
    get,
    path = "/ui/data",
    tag = "dashboard",
    summary = "The dashboard's data (needs the session cookie)",
    params(Window),
    responses(
        (status = 200, description = "Series and tables for the charts", body = Object),
        (status = "4XX", description = "No session, or a bad window", body = crate::http::openapi::ErrorBody),
        (status = "5XX", description = "The store failed", body = crate::http::openapi::ErrorBody),
    )
)]
async fn data(
    State(d): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Query(w): Query<Window>,
) -> Response {
    if d.session(&headers).await.is_none() {
        return ApiError::unauthorized().into_response();
    }
    let minutes = match w.minutes.as_deref().map(str::parse::<i64>) {
        None => 60,
        Some(Ok(m)) if (1..=1440).contains(&m) => m,
        _ => {
            return ApiError::invalid_request(
                Some("minutes"),
                "`minutes` must be a whole number from 1 to 1440.",
            )
            .into_response()
        }
    };
    match gather(&d, minutes * 60_000).await {
        Ok(v) => ([(header::CACHE_CONTROL, "no-store")], Json(v)).into_response(),
        Err(e) => store_error(e).into_response(),
    }
}

async fn gather(d: &Dashboard, window_ms: i64) -> Result<Value, strata_core::store::StoreError> {
    let now = strata_core::now_ms();
    let since = now - window_ms;
    let load: Vec<LoadSample> = d
        .history
        .lock()
        .expect("history lock")
        .iter()
        .filter(|s| s.at_ms >= since)
        .copied()
        .collect();
    let instances = d.reads.instances.instances_since(since).await?;
    let usage = d.reads.usage.usage_since(since, MAX_ROWS).await?;
    let decisions = d.reads.decisions.decisions(50).await?;
    let tenants = d.reads.tenants.tenants().await?;
    let mut names = BTreeMap::new();
    let mut tenant_rows = Vec::new();
    for t in &tenants {
        names.insert(t.id.as_str().to_owned(), t.name.clone());
        let keys = d.reads.keys.keys(&t.id).await?;
        tenant_rows.push(json!({
            "id": t.id, "name": t.name, "isolation": t.isolation,
            "requests_per_minute": t.limits.requests_per_minute,
            "tokens_per_minute": t.limits.tokens_per_minute,
            "monthly_budget_usd": t.monthly_budget_usd,
            "keys": keys.iter().map(|k| json!({
                "id": k.id, "name": k.name, "role": k.role,
                "created_at_ms": k.created_at_ms, "expires_at_ms": k.expires_at_ms,
                "revoked_at_ms": k.revoked_at_ms,
            })).collect::<Vec<_>>(),
        }));
    }
    let step = (window_ms / BUCKETS).max(1000);
    let times: Vec<i64> = (0..=BUCKETS).map(|i| since + i * step).collect();
    Ok(json!({
        "now_ms": now,
        "window_ms": window_ms,
        "slo": d.slo,
        "load": load,
        "replicas": replicas_over_time(&instances, &times),
        "cost": cost_over_time(&instances, &usage, &times, step),
        "tenants_spend": spend_by_tenant(&usage, &names),
        "models": by_model(&instances, &usage, since, now),
        "latency": latency_over_time(&usage, &times, step),
        "decisions": decisions.iter().rev().map(|r| json!({
            "at_ms": r.at_ms, "pool": r.pool, "from": r.from_replicas, "to": r.to_replicas,
            "reason": r.reason,
            "inputs": serde_json::from_str::<Value>(&r.inputs).unwrap_or(Value::Null),
        })).collect::<Vec<_>>(),
        "tenants": tenant_rows,
    }))
}

/// Instances running at each time, by instance type and capacity.
fn replicas_over_time(instances: &[InstanceRecord], times: &[i64]) -> Value {
    let mut series: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for i in instances {
        series
            .entry(format!("{} {}", i.kind.instance_type, capacity(i)))
            .or_insert_with(|| vec![0; times.len()]);
    }
    for i in instances {
        let counts = series
            .get_mut(&format!("{} {}", i.kind.instance_type, capacity(i)))
            .expect("every kind has a series");
        for (n, &t) in times.iter().enumerate() {
            if i.started_at_ms <= t && i.ended_at_ms.is_none_or(|e| e > t) {
                counts[n] += 1;
            }
        }
    }
    json!({"t": times, "series": series})
}

fn capacity(i: &InstanceRecord) -> &'static str {
    match i.kind.capacity {
        strata_core::config::CapacityType::Spot => "spot",
        strata_core::config::CapacityType::OnDemand => "on-demand",
    }
}

/// Dollars spent in each bucket: on instances (price × the time each ran
/// in it), by pool; and billed for tokens (the ledger).
fn cost_over_time(
    instances: &[InstanceRecord],
    usage: &[UsageRecord],
    times: &[i64],
    step: i64,
) -> Value {
    let now = strata_core::now_ms();
    let mut pools: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for i in instances {
        let dollars = pools
            .entry(i.kind.pool.clone())
            .or_insert_with(|| vec![0.0; times.len()]);
        let end = i.ended_at_ms.unwrap_or(now);
        for (n, &t) in times.iter().enumerate() {
            let (from, to) = (t - step, t);
            let overlap = (end.min(to) - i.started_at_ms.max(from)).max(0);
            dollars[n] += i.kind.price_per_hour * overlap as f64 / 3_600_000.0;
        }
    }
    let mut billed = vec![0.0; times.len()];
    for u in usage {
        billed[bucket(u.at_ms, times, step)] += u.cost_usd;
    }
    json!({"t": times, "instances_by_pool": pools, "billed": billed})
}

/// The bucket ending at or after `at` (times are bucket ends).
fn bucket(at: i64, times: &[i64], step: i64) -> usize {
    let first = times[0];
    (((at - first) + step - 1).max(0) / step).min(times.len() as i64 - 1) as usize
}

/// Each model's window: requests, tokens, dollars billed to tenants and
/// p95 time to first token (the ledger), its pools' instance dollars and
/// the replicas running now (the instances).
fn by_model(instances: &[InstanceRecord], usage: &[UsageRecord], since: i64, now: i64) -> Value {
    #[derive(Default)]
    struct Row {
        pools: std::collections::BTreeSet<String>,
        requests: u64,
        tokens: u64,
        billed: f64,
        instances: f64,
        running: u32,
        ttft: Vec<f64>,
    }
    let mut rows: BTreeMap<&str, Row> = BTreeMap::new();
    for u in usage {
        let r = rows.entry(u.model.as_str()).or_default();
        r.requests += 1;
        r.tokens += u64::from(u.prompt_tokens + u.completion_tokens);
        r.billed += u.cost_usd;
        if u.stream && u.status < 400 {
            r.ttft.push(u.ttft_ms);
        }
    }
    for i in instances.iter().filter(|i| !i.kind.model.is_empty()) {
        let r = rows.entry(i.kind.model.as_str()).or_default();
        r.pools.insert(i.kind.pool.clone());
        let end = i.ended_at_ms.unwrap_or(now);
        let ran = (end.min(now) - i.started_at_ms.max(since)).max(0);
        r.instances += i.kind.price_per_hour * ran as f64 / 3_600_000.0;
        r.running += u32::from(i.ended_at_ms.is_none());
    }
    rows.into_iter()
        .map(|(model, mut r)| {
            r.ttft.sort_by(f64::total_cmp);
            let p95 = (!r.ttft.is_empty())
                .then(|| r.ttft[((r.ttft.len() - 1) as f64 * 0.95).round() as usize]);
            json!({
                "model": model, "pools": r.pools, "requests": r.requests, "tokens": r.tokens,
                "billed_usd": r.billed, "instances_usd": r.instances,
                "replicas_running": r.running, "ttft_p95_ms": p95,
            })
        })
        .collect()
}

fn spend_by_tenant(usage: &[UsageRecord], names: &BTreeMap<String, String>) -> Value {
    let mut by: BTreeMap<&str, (u64, u64, f64)> = BTreeMap::new();
    for u in usage {
        let e = by.entry(u.tenant_id.as_str()).or_default();
        e.0 += 1;
        e.1 += u64::from(u.prompt_tokens + u.completion_tokens);
        e.2 += u.cost_usd;
    }
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by(|a, b| b.1 .2.total_cmp(&a.1 .2));
    rows.into_iter()
        .map(|(id, (requests, tokens, cost))| {
            json!({
                "tenant_id": id, "name": names.get(id).cloned().unwrap_or_default(),
                "requests": requests, "tokens": tokens, "cost_usd": cost,
            })
        })
        .collect()
}

/// p50/p95/p99 of time to first token (streamed requests) and of whole
/// latency (all) in each bucket; `null` where a bucket had no request.
fn latency_over_time(usage: &[UsageRecord], times: &[i64], step: i64) -> Value {
    let mut ttft: Vec<Vec<f64>> = vec![Vec::new(); times.len()];
    let mut whole: Vec<Vec<f64>> = vec![Vec::new(); times.len()];
    for u in usage.iter().filter(|u| u.status < 400) {
        let b = bucket(u.at_ms, times, step);
        if u.stream {
            ttft[b].push(u.ttft_ms);
        }
        whole[b].push(u.latency_ms);
    }
    let percentiles = |samples: &mut Vec<Vec<f64>>, q: f64| -> Vec<Option<f64>> {
        samples
            .iter_mut()
            .map(|s| {
                s.sort_by(f64::total_cmp);
                (!s.is_empty()).then(|| s[((s.len() - 1) as f64 * q).round() as usize])
            })
            .collect()
    };
    json!({
        "t": times,
        "ttft_ms": {"p50": percentiles(&mut ttft, 0.5), "p95": percentiles(&mut ttft, 0.95), "p99": percentiles(&mut ttft, 0.99)},
        "latency_ms": {"p50": percentiles(&mut whole, 0.5), "p95": percentiles(&mut whole, 0.95), "p99": percentiles(&mut whole, 0.99)},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_field_is_percent_decoded() {
        assert_eq!(
            form_field(b"key=sk-strata-a%2Bb&x=1", "key").unwrap(),
            "sk-strata-a+b"
        );
        assert_eq!(form_field(b"x=1&key=a+b", "key").unwrap(), "a b");
        assert_eq!(form_field(b"x=1", "key"), None);
        assert_eq!(form_field(b"key=%zz", "key"), None);
        assert_eq!(form_field(b"key=%4", "key").unwrap(), "%4");
    }

    #[test]
    fn requests_land_in_the_bucket_that_ends_after_them() {
        let times = [0, 10, 20, 30];
        assert_eq!(bucket(0, &times, 10), 0);
        assert_eq!(bucket(1, &times, 10), 1);
        assert_eq!(bucket(10, &times, 10), 1);
        assert_eq!(bucket(29, &times, 10), 3);
        assert_eq!(bucket(99, &times, 10), 3, "late rows go to the last bucket");
        assert_eq!(bucket(-5, &times, 10), 0);
    }
}
