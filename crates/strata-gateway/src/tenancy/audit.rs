//! The audit trail as the routes write it: one row per admin action and per
//! access to a stored object (who, what, whose, which, how it went), then
//! the route's answer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use strata_core::store::AuditStore;
use strata_core::tenant::{AuditCheckpoint, AuditEntry};
use strata_core::ApiError;
use tokio_util::sync::CancellationToken;

use crate::tenancy::principal::Principal;

/// Appends rows to the audit trail.
#[derive(Clone)]
pub struct Audit {
    store: Arc<dyn AuditStore>,
    /// Rows for callers without a valid key, at most `ANONYMOUS_PER_SEC` a
    /// second: each costs a database write, so unbounded they would let
    /// anyone make the trail (and the database) grow as fast as they send.
    anonymous: Arc<std::sync::Mutex<Anonymous>>,
}

/// Rows without a valid key written this second, and those left out since
/// the last one written (which says how many).
#[derive(Default)]
struct Anonymous {
    second: i64,
    written: u32,
    left_out: u64,
}

const ANONYMOUS_PER_SEC: u32 = 10;

impl Audit {
    pub fn new(store: Arc<dyn AuditStore>) -> Audit {
        Audit {
            store,
            anonymous: Arc::default(),
        }
    }

    /// Appends a row for an attempt with no valid key (a refused login):
    /// actor `-`, filed under no tenant, so only platform admins see it.
    /// Beyond `ANONYMOUS_PER_SEC` a second rows are left out and counted;
    /// the next row written says how many.
    pub async fn record_anonymous(&self, action: &str, target: &str, result: &str) {
        let now = strata_core::now_ms();
        let left_out = {
            let mut a = self.anonymous.lock().expect("audit counter lock");
            if a.second != now / 1000 {
                a.second = now / 1000;
                a.written = 0;
            }
            if a.written >= ANONYMOUS_PER_SEC {
                a.left_out += 1;
                return;
            }
            a.written += 1;
            std::mem::take(&mut a.left_out)
        };
        let result = if left_out > 0 {
            format!("{result} ({left_out} more before this one not written)")
        } else {
            result.to_owned()
        };
        let entry = AuditEntry {
            at_ms: now,
            actor_key: "-".into(),
            actor_tenant: "-".into(),
            action: action.to_owned(),
            tenant: "-".into(),
            target: target.to_owned(),
            result,
        };
        if let Err(e) = self.store.append_audit(&entry).await {
            tracing::error!(error = %e, action, "cannot append the audit row");
        }
    }

    /// Appends the row for `action` by `p` on `tenant`'s `target`; a store
    /// that fails is logged (the action itself went as `result` says).
    /// Only an action that went through is filed in `tenant`'s trail: a
    /// refused one (a probe of another tenant's ids, a denied role) is
    /// filed in the acting tenant's own, so no tenant's trail shows what
    /// another tried, nor that tenant's key and tenant ids.
    pub async fn record(
        &self,
        p: &Principal,
        action: &str,
        tenant: &str,
        target: &str,
        result: &str,
    ) {
        let actor = p.tenant.id.as_str();
        let (tenant, target) = if result == "ok" || tenant == actor {
            (tenant.to_owned(), target.to_owned())
        } else {
            // Where the actor aimed stays in the actor's own row.
            (actor.to_owned(), format!("{tenant}/{target}"))
        };
        let entry = AuditEntry {
            at_ms: strata_core::now_ms(),
            actor_key: p.key.id.clone(),
            actor_tenant: actor.to_owned(),
            action: action.to_owned(),
            tenant,
            target,
            result: result.to_owned(),
        };
        if let Err(e) = self.store.append_audit(&entry).await {
            tracing::error!(error = %e, action, "cannot append the audit row");
        }
    }

    /// Audits an action (admin or on a stored object) and renders its result.
    pub async fn finish(
        &self,
        p: &Principal,
        action: &str,
        tenant: &str,
        target: &str,
        result: Result<(StatusCode, Value), ApiError>,
    ) -> Response {
        self.record(p, action, tenant, target, result_label(&result))
            .await;
        match result {
            Ok((status, body)) => (status, Json(body)).into_response(),
            Err(e) => e.into_response(),
        }
    }

    /// Audits an access to one of the caller's own stored objects and
    /// renders it.
    pub async fn answer(
        &self,
        p: &Principal,
        action: &str,
        target: &str,
        result: Result<Value, ApiError>,
    ) -> Response {
        let tenant = p.tenant.id.as_str();
        self.finish(
            p,
            action,
            tenant,
            target,
            result.map(|v| (StatusCode::OK, v)),
        )
        .await
    }
}

/// How an action went, as the trail says it.
pub fn result_label<T>(result: &Result<T, ApiError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => match e.status {
            401 | 403 => "denied",
            404 => "not_found",
            400 | 409 | 413 | 422 => "invalid",
            _ => "error",
        },
    }
}

/// Where and how often a gateway writes checkpoints of the audit trail.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    /// A file to append JSON lines to; the log always gets them too.
    pub file: Option<PathBuf>,
    pub every: Duration,
}

/// Every `place.every`, and once more when `stop` comes: if the trail's head
/// moved, a checkpoint keyed with the audit key, appended to the file and
/// logged. Rows dropped from the end, or rewritten, before a checkpoint
/// show against it (`strata audit verify --checkpoints`).
pub async fn write_checkpoints(
    trail: Arc<dyn AuditStore>,
    place: Checkpoints,
    stop: CancellationToken,
) {
    let mut last = None;
    let mut tick = tokio::time::interval(place.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        if let Err(e) = checkpoint(&*trail, &place, &mut last).await {
            tracing::warn!(error = %e, "cannot write an audit checkpoint");
        }
        if stopping {
            return;
        }
    }
}

async fn checkpoint(
    trail: &dyn AuditStore,
    place: &Checkpoints,
    last: &mut Option<(i64, String)>,
) -> Result<(), String> {
    let Some(head) = trail.audit_head().await.map_err(|e| e.to_string())? else {
        return Ok(());
    };
    if last.as_ref() == Some(&head) {
        return Ok(());
    }
    let key = trail.audit_key().await.map_err(|e| e.to_string())?;
    let c = AuditCheckpoint::new(&key, head.0, &head.1, strata_core::now_ms());
    let line = serde_json::to_string(&c).expect("a checkpoint serialises");
    tracing::info!(audit_checkpoint = %line, "audit checkpoint");
    if let Some(file) = &place.file {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        writeln!(f, "{line}")
            .and_then(|()| f.sync_data())
            .map_err(|e| format!("{}: {e}", file.display()))?;
    }
    *last = Some(head);
    Ok(())
}
