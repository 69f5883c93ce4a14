//! The gateway's HTTP layer in-process: requests go to its router with
//! tower's `oneshot` (no listener, no socket on the client side), against
//! a real SQLite store with real keys. The replicas are scripted HTTP
//! servers on loopback, not engines: these tests need a replica that
//! answers 500, or breaks a stream at an exact event, on cue. (Real
//! engines are killed under real clients in tests/e2e/test_failover.py.)

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use strata_core::config::{ModelPrice, Routing};
use strata_core::store::Store;
use strata_core::tenant::{Isolation, RateLimits, Role, Tenant, TenantId};
use strata_core::ReplicaEndpoint;
use strata_gateway::ops::dashboard::Slo;
use strata_gateway::tenancy::keys::{bootstrap, new_key_record};
use strata_gateway::{CatalogModel, Gateway, GatewaySettings, Links, SnapshotPlace};
use strata_store::{Kek, KekSource, SqlStore, Vault};
use tokio::sync::watch;
use tower::ServiceExt;

/// What a scripted replica does with a chat completion.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Script {
    /// Answers: whole, or streamed as `words` chunks then a finish, usage
    /// and `[DONE]`.
    Answer,
    /// 500 before anything is sent.
    Fail,
    /// Streams the role and two words, then breaks the connection.
    DieMidStream,
}

/// A request a replica was sent: its body and its cache-scope header.
type Sent = (Value, Option<String>);

/// Scripts for the next chat requests, whichever replica they reach;
/// then each replica's own.
type Plan = Arc<Mutex<VecDeque<Script>>>;

#[derive(Clone)]
struct Stub {
    name: &'static str,
    script: Arc<Mutex<Script>>,
    plan: Plan,
    /// The bodies and cache-scope headers it was sent.
    seen: Arc<Mutex<Vec<Sent>>>,
}

fn chunk(id: &str, delta: Value, finish: Value) -> String {
    let v = json!({"id": id, "object": "chat.completion.chunk", "created": 7, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {v}\n\n")
}

async fn chat(State(stub): State<Stub>, req: Request<Body>) -> Response {
    let scope = req
        .headers()
        .get("x-strata-cache-scope")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    stub.seen.lock().unwrap().push((v.clone(), scope));
    let planned = stub.plan.lock().unwrap().pop_front();
    let script = planned.unwrap_or(*stub.script.lock().unwrap());
    let id = format!("chatcmpl-{}", stub.name);
    match script {
        Script::Fail => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Script::Answer if v["stream"] != json!(true) => Json(json!({
            "id": id, "object": "chat.completion", "created": 7, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("from {}", stub.name)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }))
        .into_response(),
        Script::Answer => {
            let events = [
                chunk(&id, json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(&id, json!({"content": " a"}), Value::Null),
                chunk(&id, json!({"content": " time"}), Value::Null),
                chunk(&id, json!({}), json!("stop")),
                format!("data: {}\n\n", json!({"id": id, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})),
                "data: [DONE]\n\n".to_owned(),
            ];
            sse(events.into_iter().map(Ok).collect())
        }
        Script::DieMidStream => {
            let events = vec![
                Ok(chunk(&id, json!({"role": "assistant", "content": ""}), Value::Null)),
                Ok(chunk(&id, json!({"content": "Once"}), Value::Null)),
                Ok(chunk(&id, json!({"content": " upon"}), Value::Null)),
                Err(std::io::Error::other("the replica died")),
            ];
            sse(events)
        }
    }
}

fn sse(events: Vec<Result<String, std::io::Error>>) -> Response {
    use futures_util::StreamExt;
    // A moment before each event, so that what was sent before a failure
    // leaves the replica before its connection breaks.
    let stream = futures_util::stream::iter(events).then(|e| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        e.map(Bytes::from)
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// A scripted replica on a loopback port.
async fn replica(name: &'static str, script: Script) -> (Stub, ReplicaEndpoint) {
    planned_replica(name, script, Plan::default()).await
}

async fn planned_replica(
    name: &'static str,
    script: Script,
    plan: Plan,
) -> (Stub, ReplicaEndpoint) {
    let stub = Stub {
        name,
        plan,
        script: Arc::new(Mutex::new(script)),
        seen: Arc::default(),
    };
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/v1/models",
            get(|| async { Json(json!({"object": "list", "data": [{"id": "m"}]})) }),
        )
        .route("/v1/chat/completions", post(chat))
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let endpoint = ReplicaEndpoint {
        id: name.into(),
        url,
        reserved_for: None,
        draining: false,
        model: None,
        external: None,
    };
    (stub, endpoint)
}

struct Harness {
    gateway: Gateway,
    _endpoints: watch::Sender<Vec<ReplicaEndpoint>>,
    store: Arc<dyn Store>,
    /// A member key of tenant `acme`, and the tenant.
    key: String,
    tenant: Tenant,
    /// A reader key of the platform tenant: what Prometheus scrapes with.
    platform_reader: String,
    /// The platform admin key.
    admin: String,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new(replicas: Vec<ReplicaEndpoint>, limits: RateLimits, budget: Option<f64>) -> Self {
        Harness::build(replicas, limits, budget, None).await
    }

    /// A gateway whose pools serve a catalog of models, one pool each,
    /// whose requests wait for a replica of their own pool when it has none.
    async fn with_catalog(replicas: Vec<ReplicaEndpoint>, models: &[&str]) -> Self {
        let catalog = models.iter().map(|m| CatalogModel::model(*m, 64)).collect();
        Harness::build(replicas, RateLimits::default(), None, Some(catalog)).await
    }

    /// The ids `GET /v1/models` lists for the member key.
    async fn model_ids(&self) -> Vec<String> {
        let (_, list, _) = self
            .call(
                Request::get("/v1/models")
                    .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// `with_catalog`, plus aliases for its models.
    async fn with_aliases(
        replicas: Vec<ReplicaEndpoint>,
        models: &[&str],
        aliases: Vec<CatalogModel>,
    ) -> Self {
        let catalog = models
            .iter()
            .map(|m| CatalogModel::model(*m, 64))
            .chain(aliases)
            .collect();
        Harness::build(replicas, RateLimits::default(), None, Some(catalog)).await
    }

    async fn build(
        replicas: Vec<ReplicaEndpoint>,
        limits: RateLimits,
        budget: Option<f64>,
        catalog: Option<Vec<CatalogModel>>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let vault = Arc::new(
            Vault::open(
                &dir.path().join("keyring.json"),
                Kek::generate(),
                KekSource::Environment,
            )
            .unwrap(),
        );
        let store: Arc<dyn Store> = Arc::new(
            SqlStore::open(&dir.path().join("s.db"), vault.clone())
                .await
                .unwrap(),
        );
        let admin = bootstrap(&*store, None)
            .await
            .unwrap()
            .expect("a new platform admin key");
        let tenant = Tenant {
            id: TenantId::new(),
            name: "acme".into(),
            isolation: Isolation::Shared,
            limits,
            priority: Default::default(),
            monthly_budget_usd: budget,
            created_at_ms: 0,
        };
        store.create_tenant(&tenant).await.unwrap();
        let (record, key) = new_key_record(&tenant.id, "app".into(), Role::Member);
        store.create_key(&record).await.unwrap();
        let (record, platform_reader) =
            new_key_record(&TenantId::platform(), "prometheus".into(), Role::Reader);
        store.create_key(&record).await.unwrap();
        let mut pricing = BTreeMap::new();
        pricing.insert(
            "m".to_owned(),
            ModelPrice {
                prompt_per_million: 1000.0,
                completion_per_million: 1000.0,
            },
        );
        let settings = GatewaySettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            max_body_bytes: 1 << 20,
            default_max_tokens: 512,
            health_interval: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(1),
            slots_per_replica: 4,
            max_waiting_per_tenant: 8,
            queue_timeout: Duration::from_secs(2),
            pricing,
            tls: None,
            require_tls: false,
            replica_auth: Default::default(),
            snapshots: SnapshotPlace::Off,
            drain_on_shutdown: false,
            // Load only: which replica a request goes to first is the
            // least loaded, ties rotating.
            routing: Routing::LeastLoad,
            hold_when_empty: catalog.is_some(),
            metrics_tenant_labels: false,
            shared_limits_url: None,
            budget_refresh: None,
            slo: Slo::default(),
            audit_checkpoints: None,
            rotate_kek_on_shred: true,
            batch: Default::default(),
        };
        let (endpoints, rx) = watch::channel(replicas.clone());
        let links = Links {
            catalog: catalog.map(|c| watch::channel(c).1),
            ..Links::endpoints(rx)
        };
        let gateway = Gateway::start(settings, links, store.clone(), Some(vault))
            .await
            .unwrap();
        let h = Harness {
            gateway,
            _endpoints: endpoints,
            store,
            key,
            tenant,
            platform_reader,
            admin,
            _dir: dir,
        };
        // Every replica ready (its health checked, its models known).
        for _ in 0..100 {
            let health = h
                .call(Request::get("/health").body(Body::empty()).unwrap())
                .await;
            if health.1["replicas_ready"] == json!(replicas.len()) {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the replicas never became ready");
    }

    async fn call(&self, req: Request<Body>) -> (StatusCode, Value, axum::http::HeaderMap) {
        let (status, bytes, headers) = self.raw(req).await;
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, v, headers)
    }

    async fn raw(&self, req: Request<Body>) -> (StatusCode, Bytes, axum::http::HeaderMap) {
        let response = self.gateway.router().oneshot(req).await.unwrap();
        let (parts, body) = response.into_parts();
        (
            parts.status,
            body.collect().await.unwrap().to_bytes(),
            parts.headers,
        )
    }

    fn chat(&self, key: Option<&str>, body: Value) -> Request<Body> {
        let mut req =
            Request::post("/v1/chat/completions").header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        req.body(Body::from(body.to_string())).unwrap()
    }

    async fn metric(&self, name: &str) -> f64 {
        let (status, text, _) = self
            .raw(
                Request::get("/metrics")
                    .header(
                        header::AUTHORIZATION,
                        format!("Bearer {}", self.platform_reader),
                    )
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        String::from_utf8(text.to_vec())
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

fn hello(stream: bool) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 16, "stream": stream})
}

fn assert_openai_error(status: StatusCode, body: &Value, expected: StatusCode) {
    assert_eq!(status, expected, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "not an OpenAI error: {body}"
    );
}

#[tokio::test]
async fn every_kind_of_bad_key_is_the_same_401_and_a_good_one_generates() {
    let (_a, endpoint) = replica("a", Script::Answer).await;
    let h = Harness::new(vec![endpoint], RateLimits::default(), None).await;
    let mut refusals = Vec::new();
    for key in [
        None,
        Some("sk-strata-short"),
        Some(&*format!("{}x", &h.key[..h.key.len() - 1])),
    ] {
        let (status, body, _) = h.call(h.chat(key, hello(false))).await;
        assert_openai_error(status, &body, StatusCode::UNAUTHORIZED);
        refusals.push(body);
    }
    assert!(refusals.windows(2).all(|w| w[0] == w[1]), "{refusals:?}");
    let (status, body, _) = h.call(h.chat(Some(&h.key), hello(false))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "from a");

    // Revoked: refused at once on this gateway.
    let keys = h.store.keys(&h.tenant.id).await.unwrap();
    let (status, _, _) = h
        .call(
            Request::delete(format!(
                "/admin/v1/tenants/{}/keys/{}",
                h.tenant.id, keys[0].id
            ))
            .header(header::AUTHORIZATION, format!("Bearer {}", h.key))
            .body(Body::empty())
            .unwrap(),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a member may not revoke keys"
    );
    h.store
        .revoke_key(&h.tenant.id, &keys[0].id, strata_core::now_ms())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await; // the key cache's TTL
    let (status, body, _) = h.call(h.chat(Some(&h.key), hello(false))).await;
    assert_openai_error(status, &body, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_replica_gets_the_tenant_from_the_key_never_from_the_client() {
    let (a, endpoint) = replica("a", Script::Answer).await;
    let h = Harness::new(vec![endpoint], RateLimits::default(), None).await;
    let mut req = h.chat(Some(&h.key), hello(false));
    req.headers_mut()
        .insert("x-strata-cache-scope", "ten_victim".parse().unwrap());
    let (status, _, _) = h.call(req).await;
    assert_eq!(status, StatusCode::OK);
    let seen = a.seen.lock().unwrap();
    assert_eq!(seen[0].1.as_deref(), Some(h.tenant.id.as_str()));
}

#[tokio::test]
async fn admission_refuses_with_rate_limits_and_budgets_as_openai_errors() {
    let (_a, endpoint) = replica("a", Script::Answer).await;
    let limited = RateLimits {
        requests_per_minute: Some(1),
        tokens_per_minute: None,
        batch_tokens_per_minute: None,
    };
    let h = Harness::new(vec![endpoint.clone()], limited, None).await;
    let (status, _, _) = h.call(h.chat(Some(&h.key), hello(false))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body, headers) = h.call(h.chat(Some(&h.key), hello(false))).await;
    assert_openai_error(status, &body, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");

    // A budget smaller than one request's cost: 402, and nothing reaches a replica.
    let (b, endpoint) = replica("b", Script::Answer).await;
    let h = Harness::new(vec![endpoint], RateLimits::default(), Some(0.000_001)).await;
    let (status, body, _) = h.call(h.chat(Some(&h.key), hello(false))).await;
    assert_openai_error(status, &body, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(body["error"]["code"], "budget_exhausted");
    assert!(b.seen.lock().unwrap().is_empty());

    // Bad input: a 400 naming the field, and nothing reaches a replica.
    let (status, body, _) = h
        .call(h.chat(
            Some(&h.key),
            json!({"model": "m", "messages": [], "temperature": 9}),
        ))
        .await;
    assert_openai_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(b.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_chat_without_max_tokens_reserves_what_the_engine_may_generate() {
    // The engines' default_max_tokens is 512: a chat without max_tokens
    // may generate that many, so it counts that many against the
    // tokens-per-minute allowance (it once counted 256, and a tenant's
    // requests generated up to twice what its limits and budget allowed).
    let (a, endpoint) = replica("a", Script::Answer).await;
    let limited = RateLimits {
        requests_per_minute: None,
        tokens_per_minute: Some(400),
        batch_tokens_per_minute: None,
    };
    let h = Harness::new(vec![endpoint], limited, None).await;
    let open = json!({"model": "m", "messages": [{"role": "user", "content": "Tell me a story."}]});
    let (status, body, _) = h.call(h.chat(Some(&h.key), open)).await;
    assert_openai_error(status, &body, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_tokens")),
        "{body}"
    );
    assert!(a.seen.lock().unwrap().is_empty());
    // With max_tokens set below the allowance it is served.
    let (status, _, _) = h.call(h.chat(Some(&h.key), hello(false))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_replica_that_fails_before_answering_is_replaced_by_another() {
    let (a, ea) = replica("a", Script::Fail).await;
    let (b, eb) = replica("b", Script::Fail).await;
    let h = Harness::new(vec![ea, eb], RateLimits::default(), None).await;
    // Both fail: the client gets the replica's failure, once each was tried.
    let (status, _, _) = h.call(h.chat(Some(&h.key), hello(false))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        (a.seen.lock().unwrap().len(), b.seen.lock().unwrap().len()),
        (1, 1)
    );
    let retries = h.metric("strata_gateway_retries_total").await;
    assert_eq!(retries, 1.0);
    // One heals: whichever is asked first, the answer comes from it.
    *b.script.lock().unwrap() = Script::Answer;
    for _ in 0..4 {
        let (status, body, _) = h.call(h.chat(Some(&h.key), hello(false))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], "from b");
    }
}

#[tokio::test]
async fn a_stream_whose_replica_dies_goes_on_from_another_as_one_answer() {
    // The first request, whichever replica takes it, dies after "Once
    // upon"; the other, answering, takes the rest.
    let plan = Plan::new(Mutex::new(VecDeque::from([Script::DieMidStream])));
    let (a, ea) = planned_replica("a", Script::Answer, plan.clone()).await;
    let (b, eb) = planned_replica("b", Script::Answer, plan).await;
    let h = Harness::new(vec![ea, eb], RateLimits::default(), None).await;
    let (status, bytes, headers) = h.raw(h.chat(Some(&h.key), hello(true))).await;
    let first = if a.seen.lock().unwrap().is_empty() {
        "b"
    } else {
        "a"
    };
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    // One answer: the first replica's id throughout, its text then the rest.
    assert!(
        events
            .iter()
            .all(|e| e["id"] == format!("chatcmpl-{first}")),
        "{events:?}"
    );
    let said: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(said, "Once upon a time");
    assert_eq!(
        events
            .iter()
            .filter(|e| e["choices"][0]["delta"]["role"].is_string())
            .count(),
        1,
        "one role opening"
    );
    // The client did not ask for usage: it gets none.
    assert!(events.iter().all(|e| e["usage"].is_null()));
    // The second replica was asked to continue the open answer, for what
    // was left of max_tokens.
    let second = if first == "a" { &b } else { &a };
    let (continued, scope) = second.seen.lock().unwrap()[0].clone();
    assert_eq!(continued["continue_final_message"], true);
    assert_eq!(
        continued["messages"][1],
        json!({"role": "assistant", "content": "Once upon"})
    );
    assert_eq!(continued["max_tokens"], 14);
    assert_eq!(scope.as_deref(), Some(h.tenant.id.as_str()));
    assert_eq!(h.metric("strata_gateway_retries_total").await, 1.0);
}

#[tokio::test]
async fn a_stream_that_may_not_move_ends_with_an_error_event() {
    // One replica, which dies mid-answer every time: after the stalled
    // moves the stream ends with an in-band error, not a hang.
    let (a, ea) = replica("a", Script::DieMidStream).await;
    let h = Harness::new(vec![ea], RateLimits::default(), None).await;
    let (status, bytes, _) = tokio::time::timeout(
        Duration::from_secs(60),
        h.raw(h.chat(Some(&h.key), hello(true))),
    )
    .await
    .expect("the stream ends");
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let last: Value =
        serde_json::from_str(text.trim_end().rsplit("data: ").next().unwrap()).unwrap();
    assert!(
        last["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not moved again")),
        "{text}"
    );
    assert!(!text.contains("[DONE]"));
    // The first try and the moves after it, each brought back by a health check.
    assert!(a.seen.lock().unwrap().len() >= 2);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_openai_errors() {
    let (_a, endpoint) = replica("a", Script::Answer).await;
    let h = Harness::new(vec![endpoint], RateLimits::default(), None).await;
    let (status, body, _) = h
        .call(Request::get("/v1/nothing").body(Body::empty()).unwrap())
        .await;
    assert_openai_error(status, &body, StatusCode::NOT_FOUND);
    let (status, body, _) = h
        .call(Request::get("/v1/completions").body(Body::empty()).unwrap())
        .await;
    assert_openai_error(status, &body, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn health_says_only_whether_the_gateway_serves_and_metrics_need_a_platform_key() {
    let (_a, ea) = replica("a", Script::Answer).await;
    let h = Harness::new(vec![ea], RateLimits::default(), None).await;
    let (status, health, _) = h
        .call(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health, json!({"status": "ok", "replicas_ready": 1}));
    let metrics = |key: Option<&str>| {
        let mut req = Request::get("/metrics");
        if let Some(k) = key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        req.body(Body::empty()).unwrap()
    };
    assert_eq!(h.raw(metrics(None)).await.0, StatusCode::UNAUTHORIZED);
    // A tenant's own member key: valid, but metrics name other tenants.
    assert_eq!(h.raw(metrics(Some(&h.key))).await.0, StatusCode::FORBIDDEN);
    let (status, text, _) = h.raw(metrics(Some(&h.platform_reader))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&text).contains("strata_gateway_replicas_ready 1"));
    // Replica detail is the platform admin's, not a reader's.
    let (status, _, _) = h
        .call(
            Request::get("/admin/v1/replicas")
                .header(
                    header::AUTHORIZATION,
                    format!("Bearer {}", h.platform_reader),
                )
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

impl Harness {
    fn get(&self, path: &str, key: &str) -> Request<Body> {
        Request::get(path)
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap()
    }

    /// A tenant with an admin key: its id and the key.
    async fn tenant_with_admin(&self, name: &str) -> (TenantId, String) {
        let tenant = Tenant {
            id: TenantId::new(),
            name: name.into(),
            isolation: Isolation::Shared,
            limits: RateLimits::default(),
            priority: Default::default(),
            monthly_budget_usd: None,
            created_at_ms: 0,
        };
        self.store.create_tenant(&tenant).await.unwrap();
        let (record, key) = new_key_record(&tenant.id, "admin".into(), Role::Admin);
        self.store.create_key(&record).await.unwrap();
        (tenant.id, key)
    }
}

#[tokio::test]
async fn one_tenants_probes_of_another_land_in_its_own_trail_only() {
    let (_a, ea) = replica("a", Script::Answer).await;
    let h = Harness::new(vec![ea], RateLimits::default(), None).await;
    let (a, a_admin) = h.tenant_with_admin("victim").await;
    let (b, b_admin) = h.tenant_with_admin("prober").await;
    // B reads A's tenant, keys and usage: 404 each (another tenant's ids).
    for path in [
        format!("/admin/v1/tenants/{a}"),
        format!("/admin/v1/tenants/{a}/keys"),
        format!("/admin/v1/tenants/{a}/usage"),
    ] {
        let (status, _, _) = h.call(h.get(&path, &b_admin)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    // A's own action, for A's trail to hold something.
    let (status, _, _) = h
        .call(h.get(&format!("/admin/v1/tenants/{a}/keys"), &a_admin))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, a_trail, _) = h.call(h.get("/admin/v1/audit", &a_admin)).await;
    let text = a_trail.to_string();
    assert!(!a_trail["data"].as_array().unwrap().is_empty());
    assert!(
        !text.contains(b.as_str()),
        "B's probes are in A's trail: {text}"
    );
    // B sees its own probes, with where they aimed.
    let (_, b_trail, _) = h.call(h.get("/admin/v1/audit", &b_admin)).await;
    let probes: Vec<&Value> = b_trail["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["result"] == "not_found")
        .collect();
    assert_eq!(probes.len(), 3, "{b_trail}");
    assert!(probes.iter().all(
        |r| r["tenant"] == b.as_str() && r["target"].as_str().unwrap().starts_with(a.as_str())
    ));
}

#[tokio::test]
async fn the_audit_trail_comes_a_page_at_a_time() {
    let (_a, ea) = replica("a", Script::Answer).await;
    let h = Harness::new(vec![ea], RateLimits::default(), None).await;
    for _ in 0..5 {
        h.call(h.get("/admin/v1/tenants", &h.admin)).await;
    }
    let (status, first, _) = h.call(h.get("/admin/v1/audit?limit=2", &h.admin)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["data"].as_array().unwrap().len(), 2);
    assert_eq!(first["has_more"], true);
    let after = first["last_id"].as_i64().unwrap();
    let (_, next, _) = h
        .call(h.get(&format!("/admin/v1/audit?limit=2&after={after}"), &h.admin))
        .await;
    assert_eq!(next["first_id"].as_i64().unwrap(), after + 1);
    // Every row, one page after another, and then no more.
    let (mut seen, mut after) = (0, 0);
    loop {
        let (_, page, _) = h
            .call(h.get(&format!("/admin/v1/audit?limit=3&after={after}"), &h.admin))
            .await;
        seen += page["data"].as_array().unwrap().len();
        if page["has_more"] == false {
            break;
        }
        after = page["last_id"].as_i64().unwrap();
    }
    assert!(seen >= 5, "{seen}");
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=many",
        "after=x",
        "colour=red",
    ] {
        let (status, body, _) = h
            .call(h.get(&format!("/admin/v1/audit?{bad}"), &h.admin))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn dashboard_logins_with_bad_keys_are_audited_and_cookies_are_secure_behind_tls() {
    let (_a, ea) = replica("a", Script::Answer).await;
    let h = Harness::new(vec![ea], RateLimits::default(), None).await;
    let login = |key: &str, forwarded: Option<&str>| {
        let mut req = Request::post("/ui/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(proto) = forwarded {
            req = req.header("x-forwarded-proto", proto);
        }
        req.body(Body::from(format!("key={key}"))).unwrap()
    };
    let cookie =
        |headers: &axum::http::HeaderMap| headers[header::SET_COOKIE].to_str().unwrap().to_owned();
    let (status, _, plain) = h.raw(login(&h.admin, None)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(!cookie(&plain).contains("Secure"), "{}", cookie(&plain));
    let (_, _, proxied) = h.raw(login(&h.admin, Some("https"))).await;
    assert!(
        cookie(&proxied).contains("; Secure"),
        "{}",
        cookie(&proxied)
    );
    // 30 refused logins with keys that do not exist: audited, a bounded
    // number of rows a second (the rest counted in the next row).
    for _ in 0..30 {
        let (status, _, _) = h.raw(login("sk-strata-nonsense", None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (_, trail, _) = h.call(h.get("/admin/v1/audit?limit=1000", &h.admin)).await;
    let refused: Vec<&Value> = trail["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "ui.login" && r["actor_key"] == "-")
        .collect();
    assert!(
        !refused.is_empty() && refused.len() < 30,
        "{}",
        refused.len()
    );
    assert!(refused
        .iter()
        .all(|r| r["result"].as_str().unwrap().starts_with("invalid_key")));
}

#[tokio::test]
async fn an_address_sending_bad_keys_is_slowed_but_its_good_keys_still_pass() {
    let (_a, ea) = replica("a", Script::Answer).await;
    let h = Harness::new(vec![ea], RateLimits::default(), None).await;
    let models = |key: &str, peer: &str| {
        let mut req = Request::get("/v1/models")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(strata_core::tls::Peer(peer.parse().unwrap()));
        req
    };
    // The good key once, so it is known.
    assert_eq!(
        h.raw(models(&h.key, "10.0.0.1:1000")).await.0,
        StatusCode::OK
    );
    let mut statuses = Vec::new();
    for i in 0..80 {
        // Well-formed keys that do not exist: each would cost a lookup.
        let bad = format!("sk-strata-{:0>43}", i);
        statuses.push(h.raw(models(&bad, "10.0.0.1:1000")).await.0);
    }
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let slowed = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(
        (64..=65).contains(&refused) && refused + slowed == 80,
        "{statuses:?}"
    );
    // The same address's good key still passes; another address is not slowed.
    assert_eq!(
        h.raw(models(&h.key, "10.0.0.1:1001")).await.0,
        StatusCode::OK
    );
    let other = format!("sk-strata-{:0>43}", 99);
    assert_eq!(
        h.raw(models(&other, "10.0.0.2:1000")).await.0,
        StatusCode::UNAUTHORIZED
    );
    // The refusals are in the trail (a bounded number a second).
    let (_, trail, _) = h.call(h.get("/admin/v1/audit?limit=1000", &h.admin)).await;
    let rows = trail["data"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["action"] == "auth"
        && r["actor_key"] == "-"
        && r["target"] == "/v1/models from 10.0.0.1"));
}

/// The replica of `model`'s pool, as a provider of one pool per model publishes it.
async fn replica_of(name: &'static str, model: &str) -> (Stub, ReplicaEndpoint) {
    let (stub, endpoint) = replica(name, Script::Answer).await;
    let endpoint = ReplicaEndpoint {
        model: Some(model.to_owned()),
        external: None,
        ..endpoint
    };
    (stub, endpoint)
}

#[tokio::test]
async fn a_model_of_the_catalog_goes_to_its_own_pool_only() {
    let (a, ea) = replica_of("a", "m").await;
    let (b, eb) = replica_of("b", "n").await;
    let h = Harness::with_catalog(vec![ea.clone(), eb.clone()], &["m", "n"]).await;
    let ask = |model: &str| {
        h.chat(Some(&h.key), json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}))
    };
    for _ in 0..3 {
        for (model, from) in [("m", "from a"), ("n", "from b")] {
            let (status, body, _) = h.call(ask(model)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["choices"][0]["message"]["content"], from, "{model}");
        }
    }
    // A model outside the catalog: 404, and no replica hears of it.
    let seen = a.seen.lock().unwrap().len() + b.seen.lock().unwrap().len();
    let (status, body, _) = h.call(ask("x")).await;
    assert_openai_error(status, &body, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(
        a.seen.lock().unwrap().len() + b.seen.lock().unwrap().len(),
        seen
    );
    assert_eq!(h.model_ids().await, ["m", "n"]);
    // `n`'s pool at zero: its request waits for `n`'s replica, and is not
    // sent to `m`'s, which is ready.
    h._endpoints.send_replace(vec![ea.clone()]);
    let back = {
        let endpoints = h._endpoints.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            endpoints.send_replace(vec![ea, eb]);
        })
    };
    let a_before = a.seen.lock().unwrap().len();
    let (status, body, _) = h.call(ask("n")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "from b");
    assert_eq!(a.seen.lock().unwrap().len(), a_before);
    back.await.unwrap();
}

#[tokio::test]
async fn an_alias_sends_each_conversation_to_one_of_its_models_by_its_id() {
    let (a, ea) = replica_of("a", "m").await;
    let (b, eb) = replica_of("b", "n").await;
    let alias = CatalogModel::alias("c", BTreeMap::from([("m".into(), 1), ("n".into(), 1)]));
    let h = Harness::with_aliases(vec![ea, eb], &["m", "n"], vec![alias]).await;
    let ask = |opening: String, turns: usize| {
        let mut messages = vec![json!({"role": "user", "content": opening})];
        for _ in 1..turns {
            messages.push(json!({"role": "assistant", "content": "ok"}));
            messages.push(json!({"role": "user", "content": "more"}));
        }
        h.chat(
            Some(&h.key),
            json!({"model": "c", "messages": messages, "max_tokens": 4}),
        )
    };
    for i in 0..16 {
        let mut answered = Vec::new();
        for turns in 1..=3 {
            let (status, body, _) = h.call(ask(format!("thread {i}"), turns)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            answered.push(body["choices"][0]["message"]["content"].clone());
        }
        assert!(answered.iter().all(|x| *x == answered[0]), "{answered:?}");
    }
    // Each replica got the model it serves, never the alias, and both
    // versions took conversations.
    for (stub, model) in [(&a, "m"), (&b, "n")] {
        let seen = stub.seen.lock().unwrap();
        assert!(!seen.is_empty(), "no conversation went to {model}");
        assert!(seen.iter().all(|(body, _)| body["model"] == model));
    }
    assert_eq!(h.model_ids().await, ["c", "m", "n"]);
}
