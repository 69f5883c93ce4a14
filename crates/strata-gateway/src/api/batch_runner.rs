//! Runs batches. Every gateway looks for unfinished batches; the one that
//! holds a batch's lease (`batch/<id>`, renewed while it runs) runs its
//! lines through the same routes clients call (admission, limits, budget,
//! ledger), as the key that created the batch in the batch class: each
//! line waits for a slot interactive work leaves. A line's result is kept
//! the moment it finishes, once; a batch taken over after a crash runs
//! only the lines without one. At the end the output and error files are
//! written in input order, and the batch completes (or is cancelled, or
//! expires, with the lines that never ran in its error file).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use serde_json::{json, Value};
use strata_core::batch::{
    failed_line, parse_input, result_line, set_status, Line, Pace, Status, WINDOW_MS,
};
use strata_core::responses::new_id;
use strata_core::store::{
    BatchLine, BatchStore, FileStore, KeyStore, LeaseStore, StoredBatch, StoredFile, TenantStore,
};
use strata_core::tenant::TenantId;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::batches::Doc;
use crate::api::files::BATCH_OUTPUT;
use crate::api::generate::Inference;
use crate::api::leased::Lease;
use crate::tenancy::fairq::{Class, PREEMPT};
use crate::tenancy::principal::Principal;

/// How long a runner's claim on a batch lasts unless renewed.
const LEASE_MS: i64 = 30_000;
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// How often gateways look for batches when nothing wakes them.
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// How often a running batch checks that its key still works.
const KEY_CHECK: Duration = Duration::from_secs(5);
/// Largest answer a line may have.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// What the runner needs.
pub struct BatchRunner {
    pub batches: Arc<dyn BatchStore>,
    pub files: Arc<dyn FileStore>,
    pub keys: Arc<dyn KeyStore>,
    pub tenants: Arc<dyn TenantStore>,
    pub leases: Arc<dyn LeaseStore>,
    /// The generation routes' state: lines go through their handlers as
    /// their batch's principal.
    pub inference: Arc<Inference>,
    /// Who holds the leases (unique per gateway process).
    pub holder: String,
    /// Lines of one batch waiting or running at once.
    pub lines_in_flight: usize,
    /// Rung when a batch is created or cancelled.
    pub wake: Arc<Notify>,
    /// How the batches run here go, for the load report.
    pub paces: Arc<Paces>,
}

/// The pace of the batches a gateway runs, by batch, with each one's
/// model: what the load report tells the controller they need to end
/// within their windows.
#[derive(Default)]
pub struct Paces(std::sync::Mutex<HashMap<String, (String, Pace)>>);

impl Paces {
    fn set(&self, batch: &str, model: &str, pace: Pace) {
        self.0
            .lock()
            .expect("paces lock")
            .insert(batch.to_owned(), (model.to_owned(), pace));
    }

    fn forget(&self, batch: &str) {
        self.0.lock().expect("paces lock").remove(batch);
    }

    /// Tokens a second the batches of `model` (of every model: `None`)
    /// need now.
    pub fn needed_per_s(&self, model: Option<&str>) -> f64 {
        let now = strata_core::now_ms();
        self.sum(model, |pace| pace.needed_per_s(now))
    }

    /// Tokens the batches of `model` (of every model: `None`) have left.
    pub fn backlog_tokens(&self, model: Option<&str>) -> f64 {
        self.sum(model, Pace::backlog_tokens)
    }

    fn sum(&self, model: Option<&str>, of: impl Fn(&Pace) -> f64) -> f64 {
        self.0
            .lock()
            .expect("paces lock")
            .values()
            .filter(|(m, _)| model.is_none_or(|model| model == m))
            .map(|(_, pace)| of(pace))
            .sum()
    }
}

/// Prompt and output tokens of a kept line (0 where it failed).
fn tokens_of(line: &BatchLine) -> u64 {
    serde_json::from_slice::<Value>(&line.content)
        .ok()
        .and_then(|v| v["response"]["body"]["usage"]["total_tokens"].as_u64())
        .unwrap_or(0)
}

/// How one line went.
enum Outcome {
    /// Its result line, for the output (`ok`) or the error file.
    Done(BatchLine),
    /// Not finished (the batch stops, or the gateway): it runs again later.
    Stopped,
}

impl BatchRunner {
    /// Looks for batches to run until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            running.retain(|_, h| !h.is_finished());
            match self.batches.unfinished_batches().await {
                Ok(open) => {
                    for (tenant, id) in open {
                        if running.contains_key(&id) {
                            continue;
                        }
                        let lease = lease_name(&id);
                        match self
                            .leases
                            .claim_lease(&lease, &self.holder, LEASE_MS)
                            .await
                        {
                            Ok(true) => {
                                let me = self.clone();
                                let stop = cancel.child_token();
                                running.insert(
                                    id.clone(),
                                    tokio::spawn(async move { me.hold(tenant, id, stop).await }),
                                );
                            }
                            Ok(false) => {}
                            Err(e) => tracing::warn!(error = %e, batch = %id, "batch lease"),
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list unfinished batches"),
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(LOOK_EVERY) => {}
            }
        }
        for (_, h) in running {
            let _ = h.await;
        }
    }

    /// Runs one batch while the lease is renewed; lets the lease go after.
    async fn hold(self: Arc<Self>, tenant: TenantId, id: String, stop: CancellationToken) {
        let lease = Lease {
            leases: self.leases.clone(),
            name: lease_name(&id),
            holder: self.holder.clone(),
            ttl_ms: LEASE_MS,
            renew_every: RENEW_EVERY,
        };
        let lost = stop.child_token();
        let ran = lease
            .hold(lost.clone(), self.run_batch(&tenant, &id, &lost))
            .await;
        if let Err(e) = ran {
            tracing::warn!(error = %e, batch = %id, "batch stopped; it resumes later");
        }
        self.paces.forget(&id);
    }

    async fn load(&self, tenant: &TenantId, id: &str) -> Result<(StoredBatch, Doc), String> {
        let b = self
            .batches
            .batch(tenant, id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the batch is gone")?;
        let doc = Doc::read(&b).map_err(|e| e.message)?;
        Ok((b, doc))
    }

    /// Moves the batch to `to` (with `edit` applied), from whatever status
    /// it has now unless that has ended; the status it ended in.
    async fn settle(
        &self,
        tenant: &TenantId,
        id: &str,
        to: impl Fn(Status) -> Status,
        edit: impl Fn(&mut Value),
    ) -> Result<Status, String> {
        loop {
            let (b, mut doc) = self.load(tenant, id).await?;
            let from = doc.status();
            if from.ended() {
                return Ok(from);
            }
            let next = to(from);
            if next != from {
                set_status(&mut doc.batch, next, strata_core::now_ms() / 1000);
            }
            edit(&mut doc.batch);
            let row = doc.row(id, b.created_at_ms);
            if self
                .batches
                .update_batch(tenant, &row, from.as_str())
                .await
                .map_err(|e| e.to_string())?
            {
                return Ok(next);
            }
        }
    }

    async fn fail(
        &self,
        tenant: &TenantId,
        id: &str,
        code: &str,
        message: &str,
    ) -> Result<(), String> {
        let errors = json!({"object": "list", "data": [{"code": code, "message": message, "line": null, "param": null}]});
        self.settle(
            tenant,
            id,
            |_| Status::Failed,
            |b| b["errors"] = errors.clone(),
        )
        .await
        .map(|_| ())
    }

    async fn run_batch(
        &self,
        tenant: &TenantId,
        id: &str,
        stop: &CancellationToken,
    ) -> Result<(), String> {
        let (b, doc) = self.load(tenant, id).await?;
        let input_id = doc.batch["input_file_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let Some(file) = self
            .files
            .file(tenant, &input_id, true)
            .await
            .map_err(|e| e.to_string())?
        else {
            return self
                .fail(
                    tenant,
                    id,
                    "invalid_file",
                    "The input file was deleted before the batch ran.",
                )
                .await;
        };
        let lines = match parse_input(&file.content) {
            Ok(lines) => lines,
            Err(errors) => {
                let message = strata_core::batch::input_error(&errors).message;
                return self.fail(tenant, id, "invalid_file", &message).await;
            }
        };
        let principal = match self.principal(tenant, &doc.key_id).await? {
            Some(p) => Arc::new(p),
            None => {
                return self
                    .fail(
                        tenant,
                        id,
                        "key_revoked",
                        "The API key that created the batch was revoked.",
                    )
                    .await
            }
        };
        if doc.status() == Status::Validating {
            self.settle(
                tenant,
                id,
                |s| {
                    if s == Status::Validating {
                        Status::InProgress
                    } else {
                        s
                    }
                },
                |_| {},
            )
            .await?;
        }
        let expires_ms = b.created_at_ms + WINDOW_MS;
        let done: HashSet<u32> = self
            .batches
            .finished_lines(tenant, id, false)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|l| l.line)
            .collect();
        let slots = Arc::new(Semaphore::new(self.lines_in_flight.max(1)));
        let mut running = JoinSet::new();
        // What the batch needs to end in time: reported from its first
        // finished line on, at most what its batch token limit allows.
        let model = lines
            .first()
            .and_then(|l| l.body["model"].as_str())
            .unwrap_or_default()
            .to_owned();
        let limits = [&principal.key.limits, &principal.tenant.limits];
        let cap_per_s = limits
            .iter()
            .filter_map(|l| l.batch_tokens_per_minute)
            .min()
            .map(|per_minute| f64::from(per_minute) / 60.0);
        let mut pace = Pace {
            lines_left: (lines.len() - done.len()) as u64,
            finished: 0,
            finished_tokens: 0,
            deadline_ms: expires_ms,
            cap_per_s,
        };
        let mut cancelled = false;
        let mut revoked = false;
        let mut key_checked = std::time::Instant::now();
        for (n, line) in lines.iter().enumerate() {
            let n = n as u32;
            if done.contains(&n) {
                continue;
            }
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("never closed"),
                _ = stop.cancelled() => break,
            };
            // Between lines, the batch may have been cancelled.
            let (_, now) = self.load(tenant, id).await?;
            if now.status() == Status::Cancelling || now.status().ended() {
                cancelled = true;
                break;
            }
            if strata_core::now_ms() >= expires_ms {
                break;
            }
            // A key revoked (or a tenant's key expired) while its batch
            // runs stops the batch within KEY_CHECK.
            if key_checked.elapsed() >= KEY_CHECK {
                key_checked = std::time::Instant::now();
                if self.principal(tenant, &doc.key_id).await?.is_none() {
                    revoked = true;
                    break;
                }
            }
            let (inference, principal, line, stop) = (
                self.inference.clone(),
                principal.clone(),
                line.clone(),
                stop.clone(),
            );
            running.spawn(async move {
                let outcome = run_line(&inference, principal, n, &line, expires_ms, &stop).await;
                drop(permit);
                outcome
            });
            self.keep_finished(tenant, id, &mut running, &mut pace, false)
                .await?;
            self.paces.set(id, &model, pace);
        }
        // Let what runs finish (a stopping gateway's lines end at once).
        self.keep_finished(tenant, id, &mut running, &mut pace, true)
            .await?;
        if stop.is_cancelled() {
            return Ok(());
        }
        if revoked {
            return self
                .fail(
                    tenant,
                    id,
                    "key_revoked",
                    "The API key that created the batch was revoked while it ran.",
                )
                .await;
        }
        self.finish(
            tenant,
            id,
            &lines,
            cancelled || strata_core::now_ms() < expires_ms,
        )
        .await
    }

    /// Keeps the results of lines that have finished (all of them, waiting,
    /// with `all`).
    async fn keep_finished(
        &self,
        tenant: &TenantId,
        id: &str,
        running: &mut JoinSet<Outcome>,
        pace: &mut Pace,
        all: bool,
    ) -> Result<(), String> {
        loop {
            let next = if all {
                running.join_next().await
            } else {
                running.try_join_next()
            };
            let Some(joined) = next else { return Ok(()) };
            if let Ok(Outcome::Done(line)) = joined {
                self.batches
                    .finish_line(tenant, id, &line)
                    .await
                    .map_err(|e| e.to_string())?;
                pace.lines_left = pace.lines_left.saturating_sub(1);
                pace.finished += 1;
                pace.finished_tokens += tokens_of(&line);
            }
        }
    }

    /// The principal the lines run as: the batch's key, if it still works.
    async fn principal(
        &self,
        tenant: &TenantId,
        key_id: &str,
    ) -> Result<Option<Principal>, String> {
        let key = self
            .keys
            .key(tenant, key_id)
            .await
            .map_err(|e| e.to_string())?;
        let t = self
            .tenants
            .tenant(tenant)
            .await
            .map_err(|e| e.to_string())?;
        Ok(match (key, t) {
            (Some(key), Some(tenant)) if key.is_active(strata_core::now_ms()) => Some(Principal {
                key,
                tenant,
                class: Class::Batch,
            }),
            _ => None,
        })
    }

    /// Writes the output and error files in input order and ends the batch:
    /// `completed`, or `cancelled` / `expired` (`in_time` false) with the
    /// lines that never ran in the error file.
    async fn finish(
        &self,
        tenant: &TenantId,
        id: &str,
        lines: &[Line],
        in_time: bool,
    ) -> Result<(), String> {
        let status = self
            .settle(
                tenant,
                id,
                |s| match s {
                    Status::Cancelling => Status::Cancelling,
                    _ => Status::Finalizing,
                },
                |_| {},
            )
            .await?;
        if status.ended() {
            return Ok(());
        }
        let cancelling = status == Status::Cancelling;
        let finished = self
            .batches
            .finished_lines(tenant, id, true)
            .await
            .map_err(|e| e.to_string())?;
        let by_line: HashMap<u32, &BatchLine> = finished.iter().map(|l| (l.line, l)).collect();
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        for (n, line) in lines.iter().enumerate() {
            match by_line.get(&(n as u32)) {
                Some(l) if l.ok => push_line(&mut output, &l.content),
                Some(l) => push_line(&mut errors, &l.content),
                None => {
                    let (code, message) = if cancelling {
                        (
                            "batch_cancelled",
                            "The batch was cancelled before this request ran.",
                        )
                    } else {
                        (
                            "batch_expired",
                            "The batch's window ended before this request ran.",
                        )
                    };
                    let v = failed_line(&new_id("batch_req"), &line.custom_id, code, message);
                    push_line(&mut errors, v.to_string().as_bytes());
                }
            }
        }
        // The files' ids come from the batch's, so a runner that crashed
        // here and ran again writes the same files, not two of each.
        let mut ids = (None, None);
        for (bytes, name, slot) in [
            (output, "output", &mut ids.0),
            (errors, "errors", &mut ids.1),
        ] {
            if bytes.is_empty() {
                continue;
            }
            let file = StoredFile {
                id: format!("file_{}_{name}", id.trim_start_matches("batch_")),
                created_at_ms: strata_core::now_ms(),
                purpose: BATCH_OUTPUT.to_owned(),
                filename: format!("{id}_{name}.jsonl"),
                bytes: bytes.len() as i64,
                content: bytes,
            };
            self.files
                .put_file(tenant, &file)
                .await
                .map_err(|e| e.to_string())?;
            *slot = Some(file.id);
        }
        let end = if cancelling {
            Status::Cancelled
        } else if in_time {
            Status::Completed
        } else {
            Status::Expired
        };
        self.settle(
            tenant,
            id,
            |_| end,
            |b| {
                b["output_file_id"] = json!(ids.0);
                b["error_file_id"] = json!(ids.1);
            },
        )
        .await
        .map(|_| ())
    }
}

fn lease_name(batch: &str) -> String {
    format!("batch/{batch}")
}

fn push_line(file: &mut Vec<u8>, line: &[u8]) {
    file.extend_from_slice(line);
    file.push(b'\n');
}

/// Runs one line through the generation routes. A refusal that passes
/// (429: the slot wait timed out or a rate limit; 503: no replica) is
/// retried until the batch's window ends; anything else is the line's
/// answer.
async fn run_line(
    inference: &Arc<Inference>,
    principal: Arc<Principal>,
    n: u32,
    line: &Line,
    expires_ms: i64,
    stop: &CancellationToken,
) -> Outcome {
    let body = serde_json::to_vec(&line.body).expect("JSON values serialise");
    let mut backoff = Duration::from_millis(500);
    loop {
        let req = Request::post(&line.url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.clone()))
            .expect("a valid request");
        // An interactive request that needs this line's slot takes it: the
        // line is dropped (the replica stops it) and queued again.
        let preempt = CancellationToken::new();
        let call = PREEMPT.scope(
            preempt.clone(),
            crate::api::generate_line(inference, principal.clone(), &line.url, req),
        );
        let response = tokio::select! {
            r = call => r,
            _ = preempt.cancelled() => {
                tracing::debug!(custom_id = %line.custom_id, "batch line preempted; queued again");
                continue;
            }
            _ = stop.cancelled() => return Outcome::Stopped,
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let bytes = match axum::body::to_bytes(response.into_body(), MAX_ANSWER_BYTES).await {
            Ok(b) => b,
            Err(_) if stop.is_cancelled() => return Outcome::Stopped,
            Err(e) => {
                let v = failed_line(
                    &new_id("batch_req"),
                    &line.custom_id,
                    "server_error",
                    &format!("the answer could not be read: {e}"),
                );
                return Outcome::Done(BatchLine {
                    line: n,
                    ok: false,
                    content: v.to_string().into_bytes(),
                });
            }
        };
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) && strata_core::now_ms() < expires_ms
        {
            let wait = retry_after
                .map_or(backoff, Duration::from_secs)
                .min(Duration::from_secs(30));
            backoff = (backoff * 2).min(Duration::from_secs(30));
            tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = stop.cancelled() => return Outcome::Stopped,
            }
        }
        let answer: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"error": {"message": String::from_utf8_lossy(&bytes)}}));
        let request_id = answer["id"]
            .as_str()
            .map_or_else(|| new_id("req"), str::to_owned);
        let v = result_line(
            &new_id("batch_req"),
            &line.custom_id,
            status.as_u16(),
            &request_id,
            answer,
        );
        return Outcome::Done(BatchLine {
            line: n,
            ok: status.is_success(),
            content: v.to_string().into_bytes(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_report_sums_each_models_batches_needs() {
        // A kept line's tokens come from its answer's usage; a failed
        // line has none.
        let ok = result_line(
            "b1",
            "c1",
            200,
            "r1",
            json!({"usage": {"total_tokens": 120}}),
        );
        let failed = failed_line("b2", "c2", "server_error", "no");
        let kept = |v: Value| BatchLine {
            line: 0,
            ok: true,
            content: v.to_string().into_bytes(),
        };
        assert_eq!((tokens_of(&kept(ok)), tokens_of(&kept(failed))), (120, 0));

        let in_an_hour = strata_core::now_ms() + 3_600_000;
        let pace = |lines_left| Pace {
            lines_left,
            finished: 1,
            finished_tokens: 100,
            deadline_ms: in_an_hour,
            cap_per_s: None,
        };
        let paces = Paces::default();
        paces.set("batch_a", "chat", pace(3_600));
        paces.set("batch_b", "chat", pace(7_200));
        paces.set("batch_c", "code", pace(36));
        // About 100 and 200 tokens a second for chat's two, 1 for code's.
        let near = |got: f64, want: f64| (got - want).abs() < want * 0.01;
        assert!(near(paces.needed_per_s(Some("chat")), 300.0));
        assert!(near(paces.needed_per_s(Some("code")), 1.0));
        assert!(near(paces.needed_per_s(None), 301.0));
        // What they have left, for spot bought for a backlog.
        assert_eq!(paces.backlog_tokens(Some("chat")), 1_080_000.0);
        assert_eq!(paces.backlog_tokens(None), 1_083_600.0);
        paces.forget("batch_b");
        assert!(near(paces.needed_per_s(Some("chat")), 100.0));
        assert_eq!(paces.backlog_tokens(Some("chat")), 360_000.0);
    }
}
