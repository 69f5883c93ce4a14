//! Background responses (`background: true`). The turn runs in a task of
//! its own, whatever happens to the client's connection, while its gateway
//! holds the response's lease (`response/<id>`). Every event is kept in the
//! store before anyone hears it, so a client resumes the stream
//! (`GET /v1/responses/{id}?stream=true&starting_after=N`) from any gateway.
//! When the gateway dies, its lease runs out and another gateway takes the
//! response over: it reads the events kept, asks a replica for the rest of
//! the answer after the text streamed so far, and numbers its events on
//! from the last one kept. An event's sequence number is kept once (the
//! store refuses a second), so two gateways that both think they run a
//! response cannot both write it: the one refused stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};
use strata_core::openai::{parse_body, ChatCompletionRequest};
use strata_core::responses::{response_object, EventWriter, Outcome};
use strata_core::store::{BackgroundStore, Running, UsageRecord};
use strata_core::tenant::TenantId;
use strata_core::ApiError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::generate::Inference;
use crate::api::leased::Lease;
use crate::api::responses::kept::{
    data_of, document, end, items_of, kind_of, Log, Run, Stop, ENDS,
};
use crate::api::responses::turn::{Reply, Sink, Turn};
use crate::api::running::Background;
use crate::http::error::{event_stream, store_error};
use crate::relay::answer::Answer;
use crate::relay::forward::{Exchange, ReplicaRequest};
use crate::relay::resume::continued;
use crate::tenancy::fairq::Class;
use crate::tenancy::followers::Following;
use crate::tenancy::principal::Principal;

/// How long a gateway's claim on a running response lasts unless renewed:
/// a response whose gateway died goes on elsewhere within about this long.
const LEASE_MS: i64 = 4_000;
const RENEW_EVERY: Duration = Duration::from_millis(1_000);
/// How often gateways look for responses whose gateway died.
const LOOK_EVERY: Duration = Duration::from_millis(1_000);
/// How often a resumed stream looks for new events.
const FOLLOW_EVERY: Duration = Duration::from_millis(50);
/// Events read from the store at once by a resumed stream.
const PAGE: u32 = 256;
/// How long a cancel waits for the response to stop before answering.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

fn lease_name(id: &str) -> String {
    format!("response/{id}")
}

/// Holds the response's lease while `run` runs (it stops when the lease
/// is lost), then lets it go.
async fn holding<F>(bg: Arc<Background>, id: String, lost: CancellationToken, run: F)
where
    F: std::future::Future<Output = ()>,
{
    let lease = Lease {
        leases: bg.leases.clone(),
        name: lease_name(&id),
        holder: bg.holder.clone(),
        ttl_ms: LEASE_MS,
        renew_every: RENEW_EVERY,
    };
    lease.hold(lost, run).await;
    bg.done(&id);
}

/// Starts a background response admitted as `exchange` (its request for
/// the replica made): keeps it as `queued`, answers at once (the response
/// object, or its event stream with `stream`), and runs it in a task of its
/// own.
pub(super) async fn start(
    g: Arc<Inference>,
    run: Run,
    request: ReplicaRequest,
    exchange: Exchange,
    prefer: Option<String>,
    stream: bool,
) -> Result<Response, ApiError> {
    let bg = g.background.clone();
    let tenant = request.principal.tenant.id.clone();
    let id = run.meta.id.clone();
    // Marked as run here first: this gateway's look for responses to take
    // over must not take it too.
    bg.take(&id);
    let kept = async {
        let claimed = bg
            .leases
            .claim_lease(&lease_name(&id), &bg.holder, LEASE_MS)
            .await
            .map_err(store_error)?;
        if !claimed {
            return Err(ApiError::internal("A new response's id is taken."));
        }
        bg.store
            .put_running(&tenant, &run.row(&Outcome::Queued, None))
            .await
            .map_err(store_error)
    }
    .await;
    if let Err(e) = kept {
        bg.done(&id);
        return Err(e);
    }
    let (tx, rx) = if stream {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let log = Log {
        store: bg.store.clone(),
        tenant,
        id: id.clone(),
        resume_at: 0,
        client: tx,
        lost: bg.stopping().child_token(),
    };
    let queued = response_object(&run.meta, &Outcome::Queued, &[], None);
    let lost = log.lost.clone();
    let span = tracing::Span::current();
    tokio::spawn(
        holding(
            bg,
            id,
            lost,
            go(
                g,
                run,
                request,
                exchange,
                prefer,
                log,
                EventWriter::default(),
                Reply::new(None),
            ),
        )
        .instrument(span),
    );
    Ok(match rx {
        Some(rx) => {
            let events = futures_util::stream::unfold(rx, |mut rx| async move {
                let event = rx.recv().await?;
                Some((Ok::<_, std::io::Error>(event), rx))
            });
            event_stream(StatusCode::OK, Body::from_stream(events))
        }
        None => Json(queued).into_response(),
    })
}

/// Sends the turn to a replica (`request`, with its body continued after
/// what `reply` holds already) and streams the answer into the log to the
/// end; a response refused before any answer ends failed.
#[allow(clippy::too_many_arguments)]
async fn go(
    g: Arc<Inference>,
    run: Run,
    request: ReplicaRequest,
    exchange: Exchange,
    prefer: Option<String>,
    mut log: Log,
    events: EventWriter,
    mut reply: Reply,
) {
    let mut first = request.clone();
    if reply.deltas > 0 {
        first.body = Bytes::from(continued(&run.chat, &reply.text, reply.deltas).to_string());
    }
    let upstream = match g.relay.send(&first, prefer.as_deref()).await {
        Ok((flight, upstream)) if upstream.status().is_success() => Ok((flight, upstream)),
        Ok((_, upstream)) => {
            let status = upstream.status();
            let body = upstream.bytes().await.unwrap_or_default();
            Err(refusal(status, &body))
        }
        Err(refused) => {
            let status = refused.status();
            let body = axum::body::to_bytes(refused.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            Err(refusal(status, &body))
        }
    };
    let (flight, upstream) = match upstream {
        Ok(sent) => sent,
        Err(e) => return end_early(&g, &run, &mut log, events, Outcome::Failed(e)).await,
    };
    let replica = flight.replica().endpoint.id.clone();
    let _ = g
        .background
        .store
        .put_running(&log.tenant, &run.row(&Outcome::InProgress, Some(replica)))
        .await;
    reply.item_id = run.item_id.clone();
    let text = reply.text.clone();
    let answer = Answer::continuing(
        g.relay.clone(),
        request,
        flight,
        upstream,
        text,
        reply.deltas.into(),
    );
    let turn = Turn {
        meter: g.relay.ledger.meter(&answer.request().model),
        answer,
        g,
        meta: run.meta,
        input: run.input,
        context: run.context,
        exchange,
        events,
        sink: Sink::Kept(log),
    };
    let _ = turn.pump(reply).await;
}

/// A refusal (the relay's or the replica's) as the response's error.
fn refusal(status: StatusCode, body: &[u8]) -> ApiError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("The replica answered {status}."));
    let mut e = ApiError::bad_gateway(message);
    e.status = status.as_u16();
    e
}

/// Ends a response that never reached a replica (or may not go on): its
/// last event, then its row.
async fn end_early(
    g: &Inference,
    run: &Run,
    log: &mut Log,
    mut events: EventWriter,
    outcome: Outcome,
) {
    events.skip_to(log.resume_at);
    let response = response_object(&run.meta, &outcome, &[], None);
    let kind = match outcome {
        Outcome::Cancelled => "response.cancelled",
        _ => "response.failed",
    };
    let seq = events.next();
    let event = events.event(kind, json!({"response": response}));
    if let Err(Stop::Lost) = log.keep(seq, event).await {
        return;
    }
    let doc = document(&response, &run.input, &run.context);
    end(g, &log.tenant, &run.meta, None, doc, &[]).await;
}

/// Looks for background responses whose gateway died and takes them over,
/// until `cancel`.
pub async fn take_over(g: Arc<Inference>, cancel: CancellationToken) {
    let bg = g.background.clone();
    loop {
        match bg.store.running_responses().await {
            Ok(open) => {
                for (tenant, id) in open {
                    if !bg.take(&id) {
                        continue;
                    }
                    match bg
                        .leases
                        .claim_lease(&lease_name(&id), &bg.holder, LEASE_MS)
                        .await
                    {
                        Ok(true) => {
                            let (g, bg, lost) =
                                (g.clone(), bg.clone(), bg.stopping().child_token());
                            let span =
                                tracing::info_span!("background", response = %id, tenant = %tenant);
                            tokio::spawn(
                                holding(bg, id.clone(), lost.clone(), async move {
                                    if let Err(e) = adopt(&g, &tenant, &id, lost).await {
                                        tracing::warn!(error = %e, "cannot take a background response over; trying again later");
                                    }
                                })
                                .instrument(span),
                            );
                        }
                        Ok(false) => bg.done(&id),
                        Err(e) => {
                            bg.done(&id);
                            tracing::warn!(error = %e, response = %id, "background response lease");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list running background responses"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(LOOK_EVERY) => {}
        }
    }
}

/// Goes on with a running response whose gateway died: from its kept
/// events (ending it as they say, when its last event was kept already),
/// as the key that created it, through admission again.
async fn adopt(
    g: &Arc<Inference>,
    tenant: &TenantId,
    id: &str,
    lost: CancellationToken,
) -> Result<(), String> {
    let bg = &g.background;
    let stored = g
        .objects
        .conversations
        .response(tenant, id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the response is gone")?;
    let run = serde_json::from_slice::<Value>(&stored.content)
        .ok()
        .as_ref()
        .and_then(Run::read);
    let Some(run) = run else {
        // Marked as running without what it takes to run (a row put back
        // from an older copy): it ends as it is, and is not run again.
        let mut ended = stored;
        ended.conversation_id = None;
        g.objects
            .conversations
            .put_response(tenant, &ended, &[])
            .await
            .map_err(|e| e.to_string())?;
        return Err("the response cannot be run (no run kept); ended as it was".into());
    };
    let mut kept = Vec::new();
    loop {
        let after = kept.last().map(|(seq, _)| *seq);
        let page = bg
            .store
            .events(tenant, id, after, PAGE)
            .await
            .map_err(|e| e.to_string())?;
        if page.is_empty() {
            break;
        }
        kept.extend(page);
    }
    let resume_at = kept.last().map_or(0, |(seq, _)| seq + 1);
    tracing::info!(response = %id, events = resume_at, "taking a background response over");
    let mut log = Log {
        store: bg.store.clone(),
        tenant: tenant.clone(),
        id: id.to_owned(),
        resume_at,
        client: None,
        lost,
    };
    // Its last event was kept: its gateway died before it wrote its row,
    // and maybe before it metered it.
    if let Some((_, last)) = kept.last().filter(|(_, e)| ENDS.contains(&kind_of(e))) {
        let response = data_of(last)["response"].clone();
        let status = match kind_of(last) {
            "response.failed" => 502,
            _ => 200,
        };
        meter_ended(g, tenant, &run, &response, status, stored.replica.clone()).await;
        let output = items_of(&response["output"]);
        let items: Vec<_> = match kind_of(last) {
            "response.completed" | "response.incomplete" => run
                .input
                .iter()
                .chain(&output)
                .map(|i| crate::api::objects::stored_item(i, strata_core::now_ms()))
                .collect(),
            _ => Vec::new(),
        };
        let doc = document(&response, &run.input, &run.context);
        end(g, tenant, &run.meta, stored.replica, doc, &items).await;
        return Ok(());
    }
    let events = EventWriter::default();
    if bg
        .store
        .running(tenant, id)
        .await
        .map_err(|e| e.to_string())?
        == Some(Running::Cancelling)
    {
        end_early(g, &run, &mut log, events, Outcome::Cancelled).await;
        return Ok(());
    }
    let mut reply = Reply::new(Some(run.item_id.clone()));
    for (_, e) in &kept {
        if kind_of(e) == "response.output_text.delta" {
            if let Some(delta) = data_of(e)["delta"].as_str() {
                reply.text.push_str(delta);
                reply.deltas += 1;
            }
        }
    }
    let Some(principal) = principal(bg, tenant, &run.key_id).await? else {
        let e = ApiError::forbidden("The API key that created the response was revoked.");
        end_early(g, &run, &mut log, events, Outcome::Failed(e)).await;
        return Ok(());
    };
    let body = Bytes::from(run.chat.to_string());
    let generation = match parse_body::<ChatCompletionRequest>(&body).and_then(|c| c.validate()) {
        Ok(generation) => generation,
        Err(e) => {
            end_early(g, &run, &mut log, events, Outcome::Failed(e)).await;
            return Ok(());
        }
    };
    let (charge, estimated_tokens) = match g.admit(&principal, &generation, None, body.len()).await
    {
        Ok(admitted) => admitted,
        Err(e) => {
            end_early(g, &run, &mut log, events, Outcome::Failed(e)).await;
            return Ok(());
        }
    };
    let request = ReplicaRequest {
        path: "/v1/chat/completions",
        prefix: g
            .relay
            .replicas
            .prefix_of(tenant.as_str(), &generation.input),
        principal,
        session: run.session.clone(),
        body,
        model: generation.model,
        estimated_tokens,
    };
    let exchange = Exchange {
        charge,
        request_id: strata_core::openai::request_id(),
        arrived: Instant::now(),
        stream: true,
    };
    go(
        g.clone(),
        run,
        request,
        exchange,
        stored.replica,
        log,
        events,
        reply,
    )
    .await;
    Ok(())
}

/// The ledger row of a response whose last event was kept when its
/// gateway died: the usage that event holds, under the response's id, as
/// its gateway writes it (the ledger keeps one row per id: a row the dead
/// gateway did write is not written again), priced as its key's class.
async fn meter_ended(
    g: &Inference,
    tenant: &TenantId,
    run: &Run,
    response: &Value,
    status: u16,
    replica: Option<String>,
) {
    let tokens = |k: &str| {
        response["usage"][k]
            .as_u64()
            .unwrap_or(0)
            .min(u64::from(u32::MAX)) as u32
    };
    let (prompt_tokens, completion_tokens) = (tokens("input_tokens"), tokens("output_tokens"));
    let class = match principal(&g.background, tenant, &run.key_id).await {
        Ok(Some(p)) => p.class,
        _ => Class::Interactive,
    };
    let cost_usd = g
        .gate
        .price(&run.meta.model, class)
        .cost(prompt_tokens.into(), completion_tokens.into());
    let row = UsageRecord {
        request_id: run.meta.id.clone(),
        tenant_id: tenant.to_string(),
        key_id: run.key_id.clone(),
        at_ms: run.meta.created_at * 1000,
        model: run.meta.model.clone(),
        replica: replica.unwrap_or_default(),
        status,
        prompt_tokens,
        completion_tokens,
        ttft_ms: 0.0,
        latency_ms: 0.0,
        stream: true,
        cost_usd,
        batch: class == Class::Batch,
    };
    g.relay.ledger.record_late(row).await;
}

/// The principal a taken-over response runs as: its key, if it still works.
async fn principal(
    bg: &Background,
    tenant: &TenantId,
    key_id: &str,
) -> Result<Option<Arc<Principal>>, String> {
    let key = bg
        .keys
        .key(tenant, key_id)
        .await
        .map_err(|e| e.to_string())?;
    let t = bg.tenants.tenant(tenant).await.map_err(|e| e.to_string())?;
    Ok(match (key, t) {
        (Some(key), Some(tenant)) if key.is_active(strata_core::now_ms()) => {
            let class = Class::of(key.priority, tenant.priority);
            Some(Arc::new(Principal { key, tenant, class }))
        }
        _ => None,
    })
}

/// `GET /v1/responses/{id}?stream=true`: the response's events after
/// `after` as they were kept, then those that follow, until its last one;
/// `place` is held until the stream ends or its client goes.
pub(super) fn follow(
    store: Arc<dyn BackgroundStore>,
    place: Following,
    id: String,
    after: Option<u64>,
) -> Response {
    struct At {
        store: Arc<dyn BackgroundStore>,
        place: Following,
        id: String,
        after: Option<u64>,
        ended: bool,
    }
    let at = At {
        store,
        place,
        id,
        after,
        ended: false,
    };
    let events = futures_util::stream::unfold(at, |mut at| async move {
        if at.ended {
            return None;
        }
        loop {
            let page = match at
                .store
                .events(&at.place.tenant, &at.id, at.after, PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, response = %at.id, "cannot read a background response's events");
                    return None;
                }
            };
            if let Some((last, _)) = page.last() {
                at.after = Some(*last);
                at.ended = page.iter().any(|(_, e)| ENDS.contains(&kind_of(e)));
                let bytes: Vec<u8> = page.into_iter().flat_map(|(_, e)| e).collect();
                return Some((Ok::<_, std::io::Error>(Bytes::from(bytes)), at));
            }
            // Nothing new: the response still runs, or it ended with
            // nothing more to send (deleted, or ended without its event).
            match at.store.running(&at.place.tenant, &at.id).await {
                Ok(Some(_)) => tokio::time::sleep(FOLLOW_EVERY).await,
                _ => {
                    // One more read: its last events may have been kept
                    // just before it ended.
                    at.ended = true;
                    let page = at
                        .store
                        .events(&at.place.tenant, &at.id, at.after, PAGE)
                        .await
                        .unwrap_or_default();
                    if page.is_empty() {
                        return None;
                    }
                    at.after = page.last().map(|(seq, _)| *seq);
                    let bytes: Vec<u8> = page.into_iter().flat_map(|(_, e)| e).collect();
                    return Some((Ok(Bytes::from(bytes)), at));
                }
            }
        }
    });
    event_stream(StatusCode::OK, Body::from_stream(events))
}

/// Asks a background response to stop and waits (a while) for it to; the
/// response as it stands then.
pub(super) async fn cancel(
    store: &dyn BackgroundStore,
    tenant: &TenantId,
    id: &str,
) -> Result<Option<bool>, ApiError> {
    let asked = store
        .cancel_running(tenant, id)
        .await
        .map_err(store_error)?;
    if asked == Some(true) {
        let until = Instant::now() + CANCEL_WAIT;
        while Instant::now() < until {
            if store
                .running(tenant, id)
                .await
                .map_err(store_error)?
                .is_none()
            {
                break;
            }
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    }
    Ok(asked)
}
