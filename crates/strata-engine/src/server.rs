//! `strata engine`: the OpenAI-compatible HTTP server in front of one
//! embedded engine. It listens at once and reports ready on `/health` once
//! the model is loaded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use strata_core::openai::{
    parse_body, response_id, ChatCompletionRequest, CompletionRequest, FinishReason, Generation,
    ModelList, Usage,
};
use strata_core::{
    read_body, ApiError, CACHE_SCOPE_HEADER, KV_EXPORT_PATH, KV_FORGET_PATH, KV_IMPORT_PATH,
    PRIORITY_HEADER, SESSION_HEADER,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use crate::engine::{CacheTag, Class, Engine, EngineSettings, Event};
use crate::error::EngineError;
use crate::linger::{self, Activity};
use strata_core::snapshot::{frame, Snapshot, SnapshotError};
use strata_core::tls::Caller;

struct ServerState {
    engine: OnceLock<Arc<Engine>>,
    load_error: OnceLock<String>,
    model_name: String,
    max_body_bytes: usize,
    started: u64,
    trust: Trust,
}

/// Whom the engine takes for a gateway: a TLS client whose certificate the
/// client CA signed (`mtls`), or one that sends the replica token
/// (`Authorization: Bearer`; how an engine strata did not write is told the
/// same). Where either is set, every route but `/health` answers only a
/// gateway. Where neither is (an engine started by hand), anyone may
/// generate, but cache scopes and session ids are not honoured (every
/// request shares the one unscoped cache) and `/internal/*` is refused.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub mtls: bool,
    /// SHA-256 of the replica token.
    token: Option<[u8; 32]>,
}

impl Trust {
    /// `mtls` when the listener asks for client certificates; `token` from
    /// `STRATA_REPLICA_TOKEN` (never a command-line flag: those are public
    /// to every process on the machine).
    pub fn new(mtls: bool, token: Option<&str>) -> Trust {
        use sha2::Digest;
        Trust {
            mtls,
            token: token
                .filter(|t| !t.is_empty())
                .map(|t| sha2::Sha256::digest(t.as_bytes()).into()),
        }
    }

    fn guarded(&self) -> bool {
        self.mtls || self.token.is_some()
    }

    /// Whether `req` comes from a gateway: a verified client certificate, or
    /// the token. Compared as SHA-256 digests, so how long the comparison
    /// takes says nothing about the token's own bytes.
    fn is_gateway(&self, req: &Request) -> bool {
        use sha2::Digest;
        if req.extensions().get::<Caller>() == Some(&Caller::Verified) {
            return true;
        }
        let Some(want) = &self.token else {
            return false;
        };
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| sha2::Sha256::digest(t.as_bytes()).as_slice() == want)
    }
}

/// Put on a request the trust layer let through: whether a gateway sent it.
#[derive(Debug, Clone, Copy)]
struct FromGateway(bool);

async fn trust(
    State(state): State<Arc<ServerState>>,
    mut req: Request,
    next: axum::middleware::Next,
) -> Response {
    let from_gateway = state.trust.is_gateway(&req);
    if !from_gateway {
        let path = req.uri().path();
        if state.trust.guarded() && path != "/health" {
            return ApiError::gateway_only().into_response();
        }
        if path.starts_with("/internal/") {
            return ApiError::forbidden(
                "KV snapshots move only between a gateway and its engines; this engine has no gateway credential configured.",
            )
            .into_response();
        }
    }
    req.extensions_mut().insert(FromGateway(from_gateway));
    next.run(req).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Mutual TLS for the engine's listener: its certificate, and the CA whose
/// client certificates (the gateway's) it accepts; plain HTTP is refused.
#[derive(Debug, Clone)]
pub struct EngineTls {
    pub files: strata_core::tls::TlsFiles,
    pub client_ca: std::path::PathBuf,
}

/// Binds `listen`, loads the model in the background, serves until
/// `shutdown`, and after it for up to `linger` while gateways still send
/// requests (`crate::linger`).
pub async fn serve(
    settings: EngineSettings,
    listen: SocketAddr,
    max_body_bytes: usize,
    tls: Option<EngineTls>,
    token: Option<&str>,
    shutdown: CancellationToken,
    linger: Duration,
) -> Result<(), EngineError> {
    let acceptor = tls
        .as_ref()
        .map(|t| strata_core::tls::acceptor(&t.files, Some(&t.client_ca)))
        .transpose()
        .map_err(|e| EngineError::Tls(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| EngineError::Listen(listen.to_string(), e))?;
    let state = Arc::new(ServerState {
        engine: OnceLock::new(),
        load_error: OnceLock::new(),
        model_name: settings.model_name.clone(),
        max_body_bytes,
        started: unix_now(),
        trust: Trust::new(tls.is_some(), token),
    });
    if !state.trust.guarded() {
        tracing::warn!("no client CA and no STRATA_REPLICA_TOKEN: this engine answers anyone, without cache scopes, sessions or snapshots");
    }
    tracing::info!(%listen, model = %settings.model_path.display(), "engine listening; loading model");
    // A model that cannot load is fatal: the server stops and the supervisor sees the exit.
    let load_failed = CancellationToken::new();
    let loader = {
        let (state, load_failed) = (state.clone(), load_failed.clone());
        tokio::task::spawn_blocking(move || match Engine::load(settings) {
            Ok(engine) => {
                tracing::info!("model loaded; engine ready");
                let _ = state.engine.set(Arc::new(engine));
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "engine failed to load");
                let _ = state.load_error.set(e.to_string());
                load_failed.cancel();
                Err(e)
            }
        })
    };
    let stop = CancellationToken::new();
    let activity = Arc::new(Activity::default());
    // Counted only where it matters: the count makes every answer a stream.
    let counted = (!linger.is_zero()).then(|| activity.clone());
    {
        let (stop, activity) = (stop.clone(), activity.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => linger::until_unused(&activity, linger).await,
                _ = load_failed.cancelled() => {}
            }
            stop.cancel();
        });
    }
    let mutual = acceptor.is_some();
    strata_core::tls::serve(listener, router(state, counted), acceptor, mutual, stop).await;
    if loader.is_finished() {
        if let Ok(Err(e)) = loader.await {
            return Err(e);
        }
    }
    Ok(())
}

/// `activity` (with a linger) counts what the trust layer lets through, so
/// requests the engine refuses keep no lingering engine alive.
fn router(state: Arc<ServerState>, activity: Option<Arc<Activity>>) -> Router {
    let routes = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route(KV_EXPORT_PATH, post(export_snapshots))
        .route(KV_IMPORT_PATH, post(import_snapshot))
        .route(KV_FORGET_PATH, post(forget_scope))
        .fallback(|| async { ApiError::not_found("Unknown route.") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() });
    let routes = match activity {
        Some(activity) => routes.layer(axum::middleware::from_fn_with_state(
            activity,
            linger::track,
        )),
        None => routes,
    };
    routes
        .layer(axum::middleware::from_fn_with_state(state.clone(), trust))
        .with_state(state)
}

async fn completions(State(state): State<Arc<ServerState>>, req: Request) -> Response {
    generate(state, req, Api::Completions)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(state): State<Arc<ServerState>>, req: Request) -> Response {
    generate(state, req, Api::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn models(State(state): State<Arc<ServerState>>) -> Json<ModelList> {
    Json(ModelList::of([state.model_name.clone()], state.started))
}

async fn health(State(state): State<Arc<ServerState>>) -> Response {
    if state.engine.get().is_some() {
        return Json(json!({"status": "ok", "model": state.model_name})).into_response();
    }
    let status = match state.load_error.get() {
        Some(e) => json!({"status": "failed", "error": e}),
        None => json!({"status": "loading"}),
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(status)).into_response()
}

async fn metrics(State(state): State<Arc<ServerState>>) -> Response {
    let body = state
        .engine
        .get()
        .map(|e| e.metrics.render())
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// A short ASCII header value, if present.
fn header_value(req: &Request, name: &str) -> Result<Option<String>, ApiError> {
    req.headers()
        .get(name)
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|s| s.len() <= 128)
                .map(str::to_owned)
                .ok_or_else(|| {
                    ApiError::invalid_request(
                        None,
                        format!("The {name} header must be short ASCII."),
                    )
                })
        })
        .transpose()
}

fn ready_engine(state: &ServerState) -> Result<&Arc<Engine>, ApiError> {
    state
        .engine
        .get()
        .ok_or_else(|| ApiError::unavailable("The model is still loading."))
}

/// `POST /internal/kv/export`: every kept session sequence, each as a u64
/// LE length and an encoded snapshot.
async fn export_snapshots(State(state): State<Arc<ServerState>>) -> Result<Response, ApiError> {
    let engine = ready_engine(&state)?;
    let mut body = Vec::new();
    for snapshot in engine.export().await? {
        frame(&mut body, &snapshot.encode(engine.fingerprint()));
    }
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// `POST /internal/kv/import`: one encoded snapshot. One from another model
/// or other context settings is refused (409) before llama.cpp sees it.
async fn import_snapshot(
    State(state): State<Arc<ServerState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let engine = ready_engine(&state)?;
    // The largest snapshot this engine could have written: a header, the
    // context's tokens and their state. Nothing longer is read.
    let context = engine.settings().context_size as usize;
    let most = 64 * 1024 + 4 * context + engine.state_size().bound(context);
    let body = read_body(req.into_body(), most).await?;
    let snapshot = Snapshot::decode(&body, engine.fingerprint()).map_err(|e| match e {
        SnapshotError::Malformed => ApiError::invalid_request(None, e.to_string()),
        SnapshotError::Mismatch(_) => ApiError::conflict(e.to_string()),
    })?;
    if snapshot.tokens.len() > context
        || snapshot.state.len() > engine.state_size().bound(snapshot.tokens.len())
    {
        return Err(ApiError::invalid_request(
            None,
            format!(
                "The snapshot holds {} bytes of state for {} tokens; an engine like this one writes at most {}.",
                snapshot.state.len(),
                snapshot.tokens.len(),
                engine.state_size().bound(snapshot.tokens.len().min(context))
            ),
        ));
    }
    let restored = engine.import(snapshot).await?;
    Ok(Json(json!({"restored_tokens": restored})).into_response())
}

/// `POST /internal/kv/forget` `{"scope": …}`: a deleted tenant's kept
/// cells leave the prefix cache.
async fn forget_scope(
    State(state): State<Arc<ServerState>>,
    req: Request,
) -> Result<Response, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Forget {
        scope: String,
    }
    let engine = ready_engine(&state)?;
    let body = read_body(req.into_body(), 4096).await?;
    let forget: Forget = parse_body(&body)?;
    let cells = engine.forget_scope(&forget.scope).await?;
    Ok(Json(json!({"forgotten_tokens": cells})).into_response())
}

async fn generate(state: Arc<ServerState>, req: Request, api: Api) -> Result<Response, ApiError> {
    // A scope or session only a gateway may name: from anyone else, the
    // unscoped cache (no tenant's cells can be reached or probed from it).
    let from_gateway = req.extensions().get::<FromGateway>().is_some_and(|g| g.0);
    let (tag, class) = if from_gateway {
        let class = match header_value(&req, PRIORITY_HEADER)?.as_deref() {
            Some("batch") => Class::Batch,
            _ => Class::Interactive,
        };
        let tag = CacheTag {
            scope: header_value(&req, CACHE_SCOPE_HEADER)?.unwrap_or_default(),
            session: header_value(&req, SESSION_HEADER)?,
        };
        (tag, class)
    } else {
        (CacheTag::default(), Class::Interactive)
    };
    let body = read_body(req.into_body(), state.max_body_bytes).await?;
    let generation: Generation = match api {
        Api::Completions => parse_body::<CompletionRequest>(&body)?.validate()?,
        Api::Chat => parse_body::<ChatCompletionRequest>(&body)?.validate()?,
    };
    if generation.model != state.model_name {
        return Err(ApiError::model_not_found(&generation.model));
    }
    let engine = ready_engine(&state)?;
    let stream = generation.stream;
    let include_usage = generation.include_usage;
    let submitted = engine.submit(generation, tag, class).await?;
    let reply = Reply {
        api,
        id: response_id(match api {
            Api::Completions => "cmpl",
            Api::Chat => "chatcmpl",
        }),
        model: state.model_name.clone(),
        created: unix_now(),
        include_usage,
    };
    if stream {
        Ok(Sse::new(reply.stream(submitted.events)).into_response())
    } else {
        reply
            .collect(submitted.events)
            .await
            .map(|v| Json(v).into_response())
    }
}

/// Shapes engine events into OpenAI completion or chat-completion objects.
struct Reply {
    api: Api,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

impl Reply {
    async fn collect(&self, mut events: UnboundedReceiver<Event>) -> Result<Value, ApiError> {
        let mut text = String::new();
        while let Some(event) = events.recv().await {
            match event {
                Event::Text(t) => text.push_str(&t),
                Event::Failed(e) => {
                    return Err(ApiError::internal(format!("generation failed: {e}")))
                }
                Event::Done { finish, usage } => {
                    let choice = match self.api {
                        Api::Completions => {
                            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
                        }
                        Api::Chat => {
                            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
                        }
                    };
                    return Ok(json!({
                        "id": self.id, "object": self.object(false), "created": self.created,
                        "model": self.model, "choices": [choice], "usage": usage,
                    }));
                }
            }
        }
        Err(ApiError::internal(
            "the engine stopped before the generation finished",
        ))
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completions, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<FinishReason>) -> Value {
        let choice = match self.api {
            Api::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
            Api::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        let mut v = json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn usage_chunk(&self, usage: Usage) -> Value {
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [], "usage": usage,
        })
    }

    /// SSE: (chat: a role chunk,) text chunks, a finish chunk, the usage chunk
    /// when asked for, then `[DONE]`.
    fn stream(
        self,
        events: UnboundedReceiver<Event>,
    ) -> impl Stream<Item = Result<SseEvent, Infallible>> {
        let opening = (self.api == Api::Chat).then(|| self.chunk(Some(""), true, None));
        let state = (self, events, opening, Vec::<Value>::new(), false);
        stream::unfold(
            state,
            |(reply, mut events, opening, mut queue, mut ended)| async move {
                if let Some(first) = opening {
                    return Some((Ok(data(&first)), (reply, events, None, queue, ended)));
                }
                if !queue.is_empty() {
                    let v = queue.remove(0);
                    return Some((Ok(data(&v)), (reply, events, None, queue, ended)));
                }
                if ended {
                    return None;
                }
                match events.recv().await {
                    Some(Event::Text(t)) => {
                        let v = reply.chunk(Some(&t), false, None);
                        Some((Ok(data(&v)), (reply, events, None, queue, ended)))
                    }
                    Some(Event::Done { finish, usage }) => {
                        let last = reply.chunk(None, false, Some(finish));
                        if reply.include_usage {
                            queue.push(reply.usage_chunk(usage));
                        }
                        ended = true;
                        let sse = Ok(data(&last));
                        queue.push(Value::String("[DONE]".into()));
                        Some((sse, (reply, events, None, queue, ended)))
                    }
                    Some(Event::Failed(message)) => {
                        let e = ApiError::internal(format!("generation failed: {message}"));
                        ended = true;
                        queue.push(Value::String("[DONE]".into()));
                        Some((
                            Ok(SseEvent::default().data(e.to_json())),
                            (reply, events, None, queue, ended),
                        ))
                    }
                    None => None,
                }
            },
        )
    }
}

fn data(v: &Value) -> SseEvent {
    match v {
        Value::String(s) => SseEvent::default().data(s),
        other => SseEvent::default().data(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(caller: Option<Caller>, authorization: Option<&str>) -> Request {
        let mut req = axum::http::Request::builder().uri("/v1/models");
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        let mut req = req.body(axum::body::Body::empty()).unwrap();
        if let Some(c) = caller {
            req.extensions_mut().insert(c);
        }
        req
    }

    #[test]
    fn a_gateway_is_a_verified_certificate_or_the_token_and_nothing_else() {
        let token = Trust::new(false, Some("s3cret"));
        assert!(token.guarded());
        assert!(token.is_gateway(&request(None, Some("Bearer s3cret"))));
        assert!(!token.is_gateway(&request(None, Some("Bearer s3cre"))));
        assert!(!token.is_gateway(&request(None, Some("Bearer s3cret "))));
        assert!(!token.is_gateway(&request(None, Some("s3cret"))));
        assert!(!token.is_gateway(&request(Some(Caller::Anonymous), None)));
        let mtls = Trust::new(true, None);
        assert!(mtls.guarded());
        assert!(mtls.is_gateway(&request(Some(Caller::Verified), None)));
        assert!(!mtls.is_gateway(&request(Some(Caller::Anonymous), Some("Bearer "))));
        // Nothing configured: nobody is the gateway, and an empty token is none.
        for open in [Trust::default(), Trust::new(false, Some(""))] {
            assert!(!open.guarded());
            assert!(!open.is_gateway(&request(None, Some("Bearer "))));
            assert!(!open.is_gateway(&request(Some(Caller::Anonymous), None)));
        }
    }

    #[test]
    fn a_state_bound_grows_with_tokens_and_leaves_room_for_what_was_measured() {
        let size = crate::engine::StateSize {
            fixed: 1000,
            per_token: 18_432,
        };
        assert!(size.bound(1) >= 1000 + 18_432);
        assert!(size.bound(100) >= 1000 + 100 * 18_432);
        assert!(size.bound(100) < 1000 + 120 * 18_432);
        assert_eq!(size.bound(usize::MAX), usize::MAX);
    }
}
