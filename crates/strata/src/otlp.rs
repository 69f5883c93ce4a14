//! An OpenTelemetry trace exporter: with `OTEL_EXPORTER_OTLP_ENDPOINT` set
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, the whole URL), every closed
//! span (a gateway request with its tenant, key, model, replica, retries
//! and status, say) goes to that collector as OTLP/HTTP JSON
//! (`POST …/v1/traces`), in batches, from a thread of its own that takes
//! them every 250 ms (closing a span is a push under a lock: no wake-up,
//! no JSON on the request path). Events inside a span (a retry's warning)
//! travel as its span events. When the collector is slow or away, spans
//! beyond a bounded buffer are dropped and counted, never waited for.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Spans waiting to be sent (a quarter second of 65,000 a second); more are dropped.
const QUEUE: usize = 16_384;
/// Spans per export request.
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// The share of traces to keep, from `OTEL_TRACES_SAMPLER` (`always_on`,
/// `always_off`, `traceidratio` or `parentbased_traceidratio`) and
/// `OTEL_TRACES_SAMPLER_ARG`; all of them when neither is set.
pub fn sampler_from_env() -> anyhow::Result<f64> {
    let sampler = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
    let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok();
    match sampler.as_str() {
        "" | "always_on" | "parentbased_always_on" => Ok(1.0),
        "always_off" | "parentbased_always_off" => Ok(0.0),
        "traceidratio" | "parentbased_traceidratio" => {
            match arg.as_deref().map(str::parse::<f64>) {
                None => Ok(1.0),
                Some(Ok(r)) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => anyhow::bail!(
                    "OTEL_TRACES_SAMPLER_ARG: `{}` is not a ratio from 0 to 1",
                    arg.unwrap_or_default()
                ),
            }
        }
        other => anyhow::bail!(
            "OTEL_TRACES_SAMPLER: `{other}` is not one strata knows (always_on, always_off, \
             traceidratio, parentbased_traceidratio)"
        ),
    }
}

/// Where to send spans, from OpenTelemetry's standard variables; `None`
/// when neither is set.
pub fn endpoint_from_env() -> anyhow::Result<Option<String>> {
    let traces = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok();
    let base = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok();
    let url = match (traces, base) {
        (Some(t), _) if !t.is_empty() => t,
        (_, Some(b)) if !b.is_empty() => format!("{}/v1/traces", b.trim_end_matches('/')),
        _ => return Ok(None),
    };
    match reqwest::Url::parse(&url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(Some(url)),
        _ => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: `{url}` is not an http(s) URL"
        ),
    }
}

/// A span's ids and what it carries, kept in the registry until it closes.
struct Data {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    start_ns: u64,
    attributes: Vec<(String, Value)>,
    events: Vec<Value>,
}

pub struct OtlpLayer {
    buffer: Buffer,
    dropped: Arc<AtomicU64>,
    /// A trace is kept when its root span's draw is below this (of u64::MAX).
    keep_below: u64,
}

/// Marks a span (and so its children) left out by the sampler.
struct Unsampled;

/// The layer; a thread of its own exports what it gathers (and ends, after
/// sending what is left, once the layer is dropped).
pub fn layer(url: String, service: &str, ratio: f64) -> OtlpLayer {
    let buffer = Buffer::default();
    let dropped = Arc::new(AtomicU64::new(0));
    let resource = json!({"attributes": [
        attribute("service.name", json!(service)),
        attribute("service.version", json!(env!("CARGO_PKG_VERSION"))),
        attribute("process.pid", json!(std::process::id())),
    ]});
    let counter = dropped.clone();
    std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn({
            let buffer = buffer.clone();
            move || export(url, resource, buffer, counter)
        })
        .expect("a thread can be started");
    OtlpLayer {
        buffer,
        dropped,
        keep_below: (ratio.clamp(0.0, 1.0) * u64::MAX as f64) as u64,
    }
}

fn attribute(key: &str, value: Value) -> Value {
    let v = match value {
        Value::Bool(b) => json!({"boolValue": b}),
        // OTLP's JSON carries 64-bit integers as strings.
        Value::Number(n) if n.is_i64() || n.is_u64() => json!({"intValue": n.to_string()}),
        Value::Number(n) => json!({"doubleValue": n.as_f64()}),
        Value::String(s) => json!({"stringValue": s}),
        other => json!({"stringValue": other.to_string()}),
    };
    json!({"key": key, "value": v})
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Trace and span ids: unique, not secret, so a per-thread generator
/// seeded once from the OS (splitmix64) rather than a system call per id.
fn random<const N: usize>() -> [u8; N] {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            let mut seed = [0u8; 8];
            getrandom::getrandom(&mut seed).expect("the OS random source is available");
            u64::from_le_bytes(seed)
        });
    }
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        let z = STATE.with(|s| {
            let next = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            s.set(next);
            let mut z = next;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        });
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
    out
}

#[derive(Default)]
struct Fields(Vec<(String, Value)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .push((field.name().to_owned(), json!(format!("{value:?}"))));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), json!(value)));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.push((field.name().to_owned(), json!(value)));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.push((field.name().to_owned(), json!(value)));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.push((field.name().to_owned(), json!(value)));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.push((field.name().to_owned(), json!(value)));
    }
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let parent = match span.parent() {
            Some(p) if p.extensions().get::<Unsampled>().is_some() => {
                span.extensions_mut().insert(Unsampled);
                return;
            }
            Some(p) => p
                .extensions()
                .get::<Data>()
                .map(|d| (d.trace_id, d.span_id)),
            None => None,
        };
        // A trace's root decides for the whole trace.
        if parent.is_none() && u64::from_le_bytes(random::<8>()) > self.keep_below {
            span.extensions_mut().insert(Unsampled);
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        span.extensions_mut().insert(Data {
            trace_id: parent.map_or_else(random::<16>, |p| p.0),
            span_id: random::<8>(),
            parent: parent.map(|p| p.1),
            start_ns: now_ns(),
            attributes: fields.0,
            events: Vec::new(),
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        values.record(&mut fields);
        let mut extensions = span.extensions_mut();
        if let Some(data) = extensions.get_mut::<Data>() {
            for (k, v) in fields.0 {
                data.attributes.retain(|(old, _)| *old != k);
                data.attributes.push((k, v));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        let message = fields
            .0
            .iter()
            .position(|(k, _)| k == "message")
            .map(|i| fields.0.remove(i).1);
        let name = match message {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => event.metadata().name().to_owned(),
        };
        let mut attributes: Vec<Value> = fields
            .0
            .into_iter()
            .map(|(k, v)| attribute(&k, v))
            .collect();
        attributes.push(attribute("level", json!(event.metadata().level().as_str())));
        let mut extensions = span.extensions_mut();
        if let Some(data) = extensions.get_mut::<Data>() {
            data.events.push(json!({
                "timeUnixNano": now_ns().to_string(),
                "name": name,
                "attributes": attributes,
            }));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(data) = span.extensions_mut().remove::<Data>() else {
            return;
        };
        let closed = Closed {
            data,
            meta: span.metadata(),
            end_ns: now_ns(),
        };
        // A lock held for a push: no wake-up per span; the exporter takes
        // the whole buffer once a second.
        let mut buffer = self.buffer.lock().expect("span buffer lock");
        if buffer.len() < QUEUE {
            buffer.push(closed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A closed span, turned into OTLP JSON on the exporter's thread.
struct Closed {
    data: Data,
    meta: &'static tracing::Metadata<'static>,
    end_ns: u64,
}

impl Closed {
    fn into_json(self) -> Value {
        let Closed { data, meta, end_ns } = self;
        // An HTTP status of 500 or more marks the span an error.
        let failed = data
            .attributes
            .iter()
            .any(|(k, v)| k == "status" && v.as_u64().is_some_and(|s| s >= 500));
        let mut attributes: Vec<Value> = data
            .attributes
            .into_iter()
            .map(|(k, v)| attribute(&k, v))
            .collect();
        attributes.push(attribute("code.namespace", json!(meta.target())));
        let mut out = json!({
            "traceId": hex(&data.trace_id),
            "spanId": hex(&data.span_id),
            "name": meta.name(),
            // SERVER for the gateway's requests, INTERNAL for the rest.
            "kind": if meta.name() == "request" { 2 } else { 1 },
            "startTimeUnixNano": data.start_ns.to_string(),
            "endTimeUnixNano": end_ns.to_string(),
            "attributes": attributes,
            "events": data.events,
            "status": {"code": if failed { 2 } else { 0 }},
        });
        if let Some(parent) = data.parent {
            out["parentSpanId"] = json!(hex(&parent));
        }
        out
    }
}

type Buffer = Arc<Mutex<Vec<Closed>>>;

/// Sends what the layer gathered every 250 ms, in batches, until the
/// layer is gone (then once more).
fn export(url: String, resource: Value, buffer: Buffer, dropped: Arc<AtomicU64>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata: the OTLP exporter cannot start: {e}");
            return;
        }
    };
    runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("a default HTTP client builds");
        let mut failures: HashMap<String, u64> = HashMap::new();
        loop {
            tokio::time::sleep(FLUSH_EVERY).await;
            let last = Arc::strong_count(&buffer) == 1;
            let spans = std::mem::take(&mut *buffer.lock().expect("span buffer lock"));
            let mut spans = spans.into_iter().peekable();
            while spans.peek().is_some() {
                let batch: Vec<Value> = spans.by_ref().take(BATCH).map(Closed::into_json).collect();
                let body = json!({"resourceSpans": [{
                    "resource": resource,
                    "scopeSpans": [{"scope": {"name": "strata", "version": env!("CARGO_PKG_VERSION")}, "spans": batch}],
                }]});
                let sent = client.post(&url).json(&body).send().await;
                let problem = match sent {
                    Ok(r) if r.status().is_success() => None,
                    Ok(r) => Some(format!("the collector answered {}", r.status())),
                    Err(e) => Some(format!("cannot reach the collector: {e}")),
                };
                // Say so once per kind of trouble, not once per batch.
                if let Some(p) = problem {
                    let seen = failures.entry(p.clone()).or_default();
                    if *seen == 0 {
                        eprintln!("strata: OTLP export to {url} failed ({p}); spans are dropped while it fails");
                    }
                    *seen += 1;
                }
            }
            if last {
                break;
            }
        }
        let lost = dropped.load(Ordering::Relaxed);
        if lost > 0 {
            eprintln!("strata: {lost} spans were dropped (the OTLP buffer was full)");
        }
    });
}
