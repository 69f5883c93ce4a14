//! The `local` provider: engine replicas as child processes of this one, on
//! free loopback ports. It restarts a replica that dies, publishes the live
//! endpoints to the gateway, records each instance in the store, and on
//! shutdown stops every child (SIGTERM, then SIGKILL) so none is orphaned.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_core::store::{InstanceRecord, InstanceState, Store};
use strata_core::{now_ms, ReplicaEndpoint};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ControlError;

/// How to launch replicas: this program with `engine` and these arguments.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    pub program: PathBuf,
    /// Arguments after `engine`, without `--port`.
    pub engine_args: Vec<String>,
    /// Replicas in the shared pool.
    pub replicas: u32,
    /// Replicas speak HTTPS (mutual TLS; `engine_args` carry the certificates).
    pub https: bool,
    /// Replicas reserved per dedicated tenant (by name), launched after the shared ones.
    pub dedicated: BTreeMap<String, u32>,
    pub startup_timeout: Duration,
}

impl LocalSettings {
    /// The tenant slot `index` is reserved for, if any.
    fn reserved_for(&self, index: u32) -> Option<String> {
        let mut next = self.replicas;
        for (tenant, count) in &self.dedicated {
            if index < next + count && index >= next {
                return Some(tenant.clone());
            }
            next += count;
        }
        None
    }

    fn total(&self) -> u32 {
        self.replicas + self.dedicated.values().sum::<u32>()
    }
}

struct Slot {
    index: u32,
    /// The dedicated tenant this replica is reserved for, if any.
    reserved_for: Option<String>,
    instance: InstanceRecord,
    child: Child,
    launched: Instant,
    restarts: u32,
}

/// Supervises the replicas until `shutdown`; endpoints go out on `publish`.
pub struct LocalProvider {
    settings: LocalSettings,
    store: Arc<dyn Store>,
    publish: watch::Sender<Vec<ReplicaEndpoint>>,
    http: reqwest::Client,
    /// The shared replica count to keep, when an autoscaler sets it.
    desired: Option<watch::Receiver<u32>>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl LocalProvider {
    /// `http` checks the replicas' health; with `settings.https` it must
    /// present the client certificate the replicas require.
    pub fn new(
        settings: LocalSettings,
        store: Arc<dyn Store>,
        publish: watch::Sender<Vec<ReplicaEndpoint>>,
        http: reqwest::Client,
    ) -> Self {
        LocalProvider {
            settings,
            store,
            publish,
            http,
            desired: None,
        }
    }

    /// Keep as many shared replicas as `desired` says (dedicated ones stay).
    pub fn with_desired(mut self, desired: watch::Receiver<u32>) -> Self {
        self.desired = Some(desired);
        self
    }

    async fn launch(
        &self,
        index: u32,
        reserved_for: Option<String>,
        restarts: u32,
    ) -> Result<Slot, ControlError> {
        let port = free_port().map_err(ControlError::Launch)?;
        let mut cmd = Command::new(&self.settings.program);
        cmd.arg("engine")
            .args(&self.settings.engine_args)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only sets this child's
        // parent-death signal, so a SIGKILLed `strata serve` orphans nothing.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(ControlError::Launch)?;
        let instance = InstanceRecord {
            id: format!("local-{index}-{:x}", now_ms()),
            provider: "local".into(),
            endpoint: format!(
                "{}://127.0.0.1:{port}",
                if self.settings.https { "https" } else { "http" }
            ),
            state: InstanceState::Starting,
            started_at_ms: now_ms(),
            ended_at_ms: None,
            detail: child.id().map(|pid| format!("pid {pid}")),
        };
        tracing::info!(instance = %instance.id, endpoint = %instance.endpoint, "engine replica launched");
        self.record(&instance).await;
        Ok(Slot {
            index,
            reserved_for,
            instance,
            child,
            launched: Instant::now(),
            restarts,
        })
    }

    async fn record(&self, instance: &InstanceRecord) {
        if let Err(e) = self.store.upsert_instance(instance).await {
            tracing::warn!(error = %e, "cannot record instance");
        }
    }

    fn publish(&self, slots: &[Slot]) {
        let endpoints = slots
            .iter()
            .map(|s| ReplicaEndpoint {
                id: s.instance.id.clone(),
                url: s.instance.endpoint.clone(),
                reserved_for: s.reserved_for.clone(),
            })
            .collect();
        self.publish.send_replace(endpoints);
    }

    /// Stops the replica's process and records why.
    async fn stop(&self, slot: &mut Slot, why: &str) {
        stop_child(&mut slot.child).await;
        slot.instance.state = InstanceState::Stopped;
        slot.instance.ended_at_ms = Some(now_ms());
        slot.instance.detail = Some(why.into());
        self.record(&slot.instance).await;
    }

    /// Waits (up to `limit`) until the replica runs and queues nothing.
    async fn wait_idle(&self, slot: &Slot, limit: Duration) {
        let url = format!("{}/metrics", slot.instance.endpoint);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let busy = match self.http.get(&url).send().await {
                Ok(r) => r.text().await.unwrap_or_default().lines().any(|l| {
                    (l.starts_with("strata_engine_running_sequences ")
                        || l.starts_with("strata_engine_queued_requests "))
                        && !l.ends_with(" 0")
                }),
                Err(_) => false,
            };
            if !busy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn healthy(&self, slot: &Slot) -> bool {
        let url = format!("{}/health", slot.instance.endpoint);
        matches!(self.http.get(url).send().await, Ok(r) if r.status().is_success())
    }

    /// Runs until `shutdown`, then stops every replica.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ControlError> {
        let mut slots = Vec::new();
        let shared = match &self.desired {
            Some(d) => *d.borrow(),
            None => self.settings.replicas,
        };
        for index in 0..self.settings.total() {
            let reserved = self.settings.reserved_for(index);
            if reserved.is_none() && index >= shared {
                continue;
            }
            slots.push(self.launch(index, reserved, 0).await?);
        }
        self.publish(&slots);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let mut changed = self.follow_desired(&mut slots).await?;
            for slot in slots.iter_mut() {
                let exited = match slot.child.try_wait() {
                    Ok(Some(status)) => Some(status.to_string()),
                    Ok(None)
                        if slot.instance.state == InstanceState::Starting
                            && slot.launched.elapsed() > self.settings.startup_timeout =>
                    {
                        let _ = slot.child.start_kill();
                        let _ = slot.child.wait().await;
                        Some("did not become healthy in time".into())
                    }
                    Ok(None) => None,
                    Err(e) => Some(format!("cannot wait on it: {e}")),
                };
                if let Some(detail) = exited {
                    tracing::warn!(instance = %slot.instance.id, %detail, "engine replica exited; launching a replacement");
                    slot.instance.state = InstanceState::Exited;
                    slot.instance.ended_at_ms = Some(now_ms());
                    slot.instance.detail = Some(detail);
                    self.record(&slot.instance).await;
                    // Back off a little if a replica keeps dying at start.
                    let restarts = slot.restarts + 1;
                    if slot.launched.elapsed() < Duration::from_secs(2) {
                        tokio::time::sleep(Duration::from_millis(
                            500 * u64::from(restarts.min(10)),
                        ))
                        .await;
                    }
                    *slot = self
                        .launch(slot.index, slot.reserved_for.clone(), restarts)
                        .await?;
                    changed = true;
                } else if slot.instance.state == InstanceState::Starting && self.healthy(slot).await
                {
                    slot.instance.state = InstanceState::Ready;
                    tracing::info!(instance = %slot.instance.id, secs = slot.launched.elapsed().as_secs_f64(), "engine replica ready");
                    self.record(&slot.instance).await;
                }
            }
            if changed {
                self.publish(&slots);
            }
        }
        self.publish.send_replace(Vec::new());
        for slot in &mut slots {
            self.stop(slot, "shut down").await;
        }
        Ok(())
    }
}

impl LocalProvider {
    /// Launches or stops shared replicas to match the desired count; true
    /// when the set changed. The newest replicas stop first.
    async fn follow_desired(&self, slots: &mut Vec<Slot>) -> Result<bool, ControlError> {
        let Some(desired) = &self.desired else {
            return Ok(false);
        };
        let want = *desired.borrow() as usize;
        let shared = slots.iter().filter(|s| s.reserved_for.is_none()).count();
        if want > shared {
            for _ in shared..want {
                let index = slots
                    .iter()
                    .map(|s| s.index + 1)
                    .max()
                    .unwrap_or(0)
                    .max(self.settings.total());
                slots.push(self.launch(index, None, 0).await?);
            }
            return Ok(true);
        }
        if want < shared {
            for _ in want..shared {
                let newest = slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.reserved_for.is_none())
                    .max_by_key(|(_, s)| s.index)
                    .map(|(i, _)| i)
                    .expect("a shared replica to stop");
                let mut slot = slots.remove(newest);
                // Out of the gateway's list first, idle next, then stopped.
                self.publish(slots);
                self.wait_idle(&slot, Duration::from_secs(30)).await;
                self.stop(&mut slot, "scaled down").await;
                tracing::info!(instance = %slot.instance.id, "engine replica stopped: scaled down");
            }
            return Ok(true);
        }
        Ok(false)
    }
}

/// SIGTERM, a few seconds to finish, then SIGKILL; always reaped.
async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child by the pid tokio gave us; it is not reaped yet.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}
