//! The `local` provider: engine replicas as child processes of this one, on
//! free loopback ports, each sized by its instance type (engine threads).
//! It publishes the live endpoints to the gateway, records each instance
//! (with its price) in the store, lets replicas go through the gateway's
//! drain (their sessions' KV caches are kept), emulates spot reclaims
//! (`strata chaos preempt`, or at random), and on shutdown stops every
//! child (SIGTERM, then SIGKILL) so none is orphaned. Replicas reserved for
//! dedicated tenants are kept up by the provider itself, outside the pool.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use strata_core::config::{CapacityType, InstanceType};
use strata_core::link::{ControllerLink, DrainRequest};
use strata_core::store::{InstanceKind, InstanceRecord, InstanceState, Store};
use strata_core::{now_ms, ExternalEngine, ReplicaEndpoint};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::planner::{Offer, Slot};
use crate::provider::{Instance, Provider, ProviderEvent};
use crate::ControlError;

/// How to launch replicas: this program with `engine` and these arguments.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    pub program: PathBuf,
    /// Arguments after `engine`, without `--threads` and `--port`.
    pub engine_args: Vec<String>,
    /// Engine threads for an instance type that names none.
    pub default_threads: u32,
    /// The pool's instance types (their thread counts size the processes).
    pub instance_types: BTreeMap<String, InstanceType>,
    pub pool: String,
    pub model: String,
    /// Replicas speak HTTPS (mutual TLS; `engine_args` carry the certificates).
    pub https: bool,
    /// Environment the engines get beside this process's own (the replica
    /// token: never an argument, which every process may read).
    pub engine_env: Vec<(String, String)>,
    /// Replicas reserved per dedicated tenant (by name), outside the pool.
    pub dedicated: BTreeMap<String, u32>,
    pub startup_timeout: Duration,
    /// Notice a preempted replica gets (when the notice names none).
    pub preemption_notice: Duration,
    /// A preempted replica takes requests until this long before its
    /// notice ends, then drains (`pool.preemption_drain_secs`); `None`:
    /// it drains from the notice on.
    pub preemption_drain: Option<Duration>,
    /// Spot replicas preempted at random, per replica-hour (0: never).
    pub random_preemptions_per_hour: f64,
    /// Longest a replica being let go waits for its requests to end.
    pub drain_wait: Duration,
    /// Cluster mode: no gateway shares this process, so a replica that goes
    /// is recorded as stopping and stopped once a gateway has kept its
    /// sessions (the `drained/<id>` lease), or after `drain_wait`.
    pub drain_via_store: bool,
    /// Replicas of another server (engine kind `openai`) instead of
    /// `program engine …`.
    pub external: Option<ExternalLaunch>,
}

/// What another server gets of this process's environment: what finds
/// programs, libraries, devices and a place to write; the rest it gets only
/// through `engine.env`.
const PASSED_ON: [&str; 10] = [
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "XDG_CACHE_HOME",
];

/// How to launch another OpenAI-compatible server as a replica.
#[derive(Debug, Clone)]
pub struct ExternalLaunch {
    /// Its command line, with `{model_path}`, `{model}`, `{host}`,
    /// `{port}`, `{threads}` and `{api_key}` to fill in.
    pub command: Vec<String>,
    /// Its environment beside this process's own, filled in alike (an
    /// API key is better here than in the arguments, which every process
    /// on the machine may read).
    pub env: Vec<(String, String)>,
    pub model_path: PathBuf,
    /// What the gateway gets: the pool's API key, the readiness path and
    /// what the server does.
    pub engine: ExternalEngine,
}

impl ExternalLaunch {
    /// `template` with this replica's values in place of the placeholders.
    fn fill(&self, template: &str, model: &str, port: u16, threads: u32) -> String {
        strata_core::config::Placeholders {
            model_path: &self.model_path.display().to_string(),
            model,
            host: "127.0.0.1",
            port,
            threads,
            api_key: &self.engine.api_key,
        }
        .fill(template)
    }
}

struct Proc {
    record: InstanceRecord,
    /// The pool slot it fills; `None` for a dedicated tenant's replica.
    slot: Option<Slot>,
    reserved_for: Option<String>,
    child: Child,
    launched: Instant,
    /// Under a preemption notice, serving on until it drains: when its
    /// machine goes. Out of `list` (its replacement is planned) but still
    /// published as taking requests.
    reclaim_at: Option<Instant>,
}

impl Proc {
    fn endpoint(&self, settings: &LocalSettings) -> ReplicaEndpoint {
        ReplicaEndpoint {
            id: self.record.id.clone(),
            url: self.record.endpoint.clone(),
            reserved_for: self.reserved_for.clone(),
            draining: false,
            model: Some(settings.model.clone()),
            external: settings.external.as_ref().map(|x| x.engine.clone()),
        }
    }
}

pub struct LocalProvider {
    settings: LocalSettings,
    store: Arc<dyn Store>,
    publish: watch::Sender<Vec<ReplicaEndpoint>>,
    http: reqwest::Client,
    link: ControllerLink,
    running: Vec<Proc>,
    /// Replicas draining on their way out: still published until gone.
    leaving: Vec<ReplicaEndpoint>,
    exits: JoinSet<String>,
    stop_all: CancellationToken,
    events: Vec<ProviderEvent>,
    next_index: u32,
    started: bool,
    /// Replicas in a row that died soon after launch (launches back off).
    fast_failures: u32,
    last_poll: Instant,
    rng: u64,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl LocalProvider {
    /// `http` checks the replicas' health; with `settings.https` it must
    /// present the client certificate the replicas require. Drains go to
    /// the gateway over `link`, and preemption notices come from it.
    pub fn new(
        settings: LocalSettings,
        store: Arc<dyn Store>,
        publish: watch::Sender<Vec<ReplicaEndpoint>>,
        http: reqwest::Client,
        link: ControllerLink,
    ) -> Self {
        LocalProvider {
            settings,
            store,
            publish,
            http,
            link,
            running: Vec::new(),
            leaving: Vec::new(),
            exits: JoinSet::new(),
            stop_all: CancellationToken::new(),
            events: Vec::new(),
            next_index: 0,
            started: false,
            fast_failures: 0,
            last_poll: Instant::now(),
            rng: (now_ms() as u64) | 1,
        }
    }

    fn threads(&self, instance_type: &str) -> u32 {
        match self.settings.instance_types.get(instance_type) {
            Some(t) if t.threads > 0 => t.threads,
            _ => self.settings.default_threads,
        }
    }

    async fn spawn(
        &mut self,
        kind: InstanceKind,
        slot: Option<Slot>,
        reserved_for: Option<String>,
    ) -> Result<(), ControlError> {
        if self.fast_failures > 0 {
            // A replica that keeps dying at start: back off a little.
            tokio::time::sleep(Duration::from_millis(
                500 * u64::from(self.fast_failures.min(10)),
            ))
            .await;
        }
        let index = self.next_index;
        self.next_index += 1;
        let port = free_port().map_err(ControlError::Launch)?;
        let threads = self.threads(&kind.instance_type);
        let mut cmd = match &self.settings.external {
            Some(x) => {
                let fill = |t: &String| x.fill(t, &self.settings.model, port, threads);
                let mut cmd = Command::new(fill(&x.command[0]));
                // Its own key only: strata's replica token never reaches
                // another server, nor anything else of this process's
                // environment (a KEK, database URLs, cloud credentials)
                // beyond what runs a program at all.
                cmd.args(x.command[1..].iter().map(fill))
                    .env_clear()
                    .envs(std::env::vars().filter(|(k, _)| PASSED_ON.contains(&k.as_str())))
                    .envs(x.env.iter().map(|(k, v)| (k, fill(v))));
                cmd
            }
            None => {
                let mut cmd = Command::new(&self.settings.program);
                cmd.arg("engine")
                    .args(&self.settings.engine_args)
                    .args(["--threads", &threads.to_string()])
                    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .envs(self.settings.engine_env.iter().map(|(k, v)| (k, v)));
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            // A process group of its own: Ctrl-C in a terminal signals the
            // whole foreground group, and an engine that died with
            // `strata serve` could not hand over its KV cache in the
            // shutdown drain. `strata serve` stops it after that drain.
            .process_group(0)
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
        let record = InstanceRecord {
            // Pools of one process (one per model) name theirs apart.
            id: match self.settings.pool.as_str() {
                "default" => format!("local-{index}-{:x}", now_ms()),
                pool => format!("local-{pool}-{index}-{:x}", now_ms()),
            },
            provider: "local".into(),
            endpoint: format!(
                "{}://127.0.0.1:{port}",
                if self.settings.https && self.settings.external.is_none() {
                    "https"
                } else {
                    "http"
                }
            ),
            state: InstanceState::Starting,
            started_at_ms: now_ms(),
            ended_at_ms: None,
            detail: child.id().map(|pid| format!("pid {pid}")),
            kind,
        };
        tracing::info!(instance = %record.id, endpoint = %record.endpoint,
            instance_type = %record.kind.instance_type, zone = %record.kind.zone,
            capacity = record.kind.capacity.as_str(), threads, "engine replica launched");
        record_instance(&*self.store, &record).await;
        self.running.push(Proc {
            record,
            slot,
            reserved_for,
            child,
            launched: Instant::now(),
            reclaim_at: None,
        });
        self.publish();
        Ok(())
    }

    fn publish(&self) {
        let endpoints = self
            .running
            .iter()
            .map(|p| p.endpoint(&self.settings))
            .chain(self.leaving.iter().cloned())
            .collect();
        self.publish.send_replace(endpoints);
    }

    async fn healthy(&self, p: &Proc) -> bool {
        let check = match &self.settings.external {
            Some(x) => self
                .http
                .get(format!("{}{}", p.record.endpoint, x.engine.ready_path))
                .bearer_auth(&x.engine.api_key),
            None => self.http.get(format!("{}/health", p.record.endpoint)),
        };
        matches!(check.send().await, Ok(r) if r.status().is_success())
    }

    /// Takes the replica out of the pool and lets it go in the background:
    /// the gateway drains it (up to `wait`), then its process stops and
    /// the instance is recorded as `end`.
    fn let_go(&mut self, at: usize, wait: Duration, end: InstanceState, why: String) {
        let mut p = self.running.remove(at);
        self.leaving.push(p.endpoint(&self.settings));
        let drains = self.link.drains.clone();
        let store = self.store.clone();
        let stop_all = self.stop_all.clone();
        let via_store = self.settings.drain_via_store;
        self.exits.spawn(async move {
            if via_store {
                p.record.state = end;
                record_instance(&*store, &p.record).await;
                wait_drained(&*store, &[p.record.id.clone()], wait, &stop_all).await;
                stop_child(&mut p.child).await;
                p.record.ended_at_ms = Some(now_ms());
                p.record.detail = Some(why);
                record_instance(&*store, &p.record).await;
                tracing::info!(instance = %p.record.id, state = end.as_str(), "engine replica gone");
                return p.record.id;
            }
            let (done, drained) = oneshot::channel();
            let request = DrainRequest {
                replica: p.record.id.clone(),
                wait,
                done,
            };
            if drains.send(request).await.is_ok() {
                // The drain ends by `wait` (plus its snapshot export); a
                // reclaimed machine does not wait longer than its notice.
                tokio::select! {
                    _ = stop_all.cancelled() => {}
                    _ = tokio::time::sleep(wait + Duration::from_secs(5)) => {}
                    _ = drained => {}
                }
            }
            stop_child(&mut p.child).await;
            p.record.state = end;
            p.record.ended_at_ms = Some(now_ms());
            p.record.detail = Some(why);
            record_instance(&*store, &p.record).await;
            tracing::info!(instance = %p.record.id, state = end.as_str(), "engine replica gone");
            p.record.id
        });
        self.publish();
    }

    /// Preempts the replica at `at` (a pool replica): its replacement is
    /// planned at once; it drains within the notice and is reclaimed when
    /// the notice ends. With `preemption_drain` shorter than the notice it
    /// takes requests until that long before the end, then drains.
    fn preempt(&mut self, at: usize, notice: Duration) {
        let p = &self.running[at];
        let Some(slot) = p.slot.clone() else {
            tracing::warn!(instance = %p.record.id, "a dedicated tenant's replica is not preempted");
            return;
        };
        if p.reclaim_at.is_some() {
            tracing::debug!(instance = %p.record.id, "a replica under notice is not preempted again");
            return;
        }
        tracing::warn!(instance = %p.record.id, zone = %slot.zone, notice_secs = notice.as_secs_f64(), "preemption notice");
        self.events.push(ProviderEvent::Preempting {
            id: p.record.id.clone(),
            slot,
            notice,
        });
        match self.settings.preemption_drain.filter(|d| *d < notice) {
            Some(_) => {
                tracing::info!(instance = %p.record.id, "serving until its drain before the reclaim");
                self.running[at].reclaim_at = Some(Instant::now() + notice);
            }
            None => self.let_go(
                at,
                notice,
                InstanceState::Preempted,
                format!("preempted ({}s notice)", notice.as_secs_f64()),
            ),
        }
    }

    fn next_random(&mut self) -> f64 {
        // xorshift64*: enough for emulated reclaims.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[async_trait]
impl Provider for LocalProvider {
    async fn launch(&mut self, offer: &Offer) -> Result<String, ControlError> {
        let kind = InstanceKind {
            pool: self.settings.pool.clone(),
            model: self.settings.model.clone(),
            instance_type: offer.instance_type.clone(),
            zone: offer.zone.clone(),
            capacity: offer.capacity,
            price_per_hour: offer.price_per_hour,
            tokens_per_s: offer.tokens_per_s,
        };
        self.spawn(kind, Some(Slot::from(offer)), None).await?;
        Ok(self
            .running
            .last()
            .expect("just launched")
            .record
            .id
            .clone())
    }

    async fn terminate(&mut self, id: &str, why: &str) {
        if let Some(at) = self
            .running
            .iter()
            .position(|p| p.record.id == id && p.reclaim_at.is_none())
        {
            tracing::info!(instance = %id, %why, "engine replica let go");
            let wait = self.settings.drain_wait;
            self.let_go(at, wait, InstanceState::Stopped, why.to_owned());
        }
    }

    fn list(&self) -> Vec<Instance> {
        self.running
            .iter()
            .filter(|p| p.reclaim_at.is_none())
            .filter_map(|p| {
                Some(Instance {
                    id: p.record.id.clone(),
                    slot: p.slot.clone()?,
                    ready: p.record.state == InstanceState::Ready,
                    busy: None,
                })
            })
            .collect()
    }

    async fn poll(&mut self) -> Vec<ProviderEvent> {
        if !self.started {
            self.started = true;
            for (tenant, count) in self.settings.dedicated.clone() {
                for _ in 0..count {
                    let kind = InstanceKind {
                        pool: format!("dedicated:{tenant}"),
                        model: self.settings.model.clone(),
                        ..InstanceKind::default()
                    };
                    if let Err(e) = self.spawn(kind, None, Some(tenant.clone())).await {
                        tracing::error!(error = %e, %tenant, "cannot launch a dedicated replica");
                    }
                }
            }
        }
        // Preemption notices from the admin API.
        while let Ok(n) = self.link.notices.try_recv() {
            match self.running.iter().position(|p| p.record.id == n.replica) {
                Some(at) => {
                    let notice = n.notice.unwrap_or(self.settings.preemption_notice);
                    self.preempt(at, notice);
                }
                // Another pool's (every pool of `strata serve` hears each notice).
                None => {
                    tracing::debug!(replica = %n.replica, pool = %self.settings.pool, "preemption notice for no replica of this pool")
                }
            }
        }
        // Emulated reclaims of spot replicas.
        let dt = self.last_poll.elapsed().as_secs_f64();
        self.last_poll = Instant::now();
        if self.settings.random_preemptions_per_hour > 0.0 {
            let chance = self.settings.random_preemptions_per_hour * dt / 3600.0;
            let mut at = 0;
            while at < self.running.len() {
                let p = &self.running[at];
                let spot = p.record.kind.capacity == CapacityType::Spot
                    && p.slot.is_some()
                    && p.reclaim_at.is_none();
                if spot && p.record.state == InstanceState::Ready && self.next_random() < chance {
                    self.preempt(at, self.settings.preemption_notice);
                } else {
                    at += 1;
                }
            }
        }
        // Preempted replicas that served on: they drain for the rest of
        // their notice.
        if let Some(drain) = self.settings.preemption_drain {
            let now = Instant::now();
            let mut at = 0;
            while at < self.running.len() {
                let due = self.running[at]
                    .reclaim_at
                    .and_then(|end| super::drain_due(end, drain, now));
                match due {
                    Some((left, why)) => self.let_go(at, left, InstanceState::Preempted, why),
                    None => at += 1,
                }
            }
        }
        // Replicas that went away.
        while let Some(done) = self.exits.try_join_next() {
            if let Ok(id) = done {
                self.leaving.retain(|e| e.id != id);
                self.events.push(ProviderEvent::Gone { id });
                self.publish();
            }
        }
        // Exits, start timeouts, health.
        let mut at = 0;
        while at < self.running.len() {
            let p = &mut self.running[at];
            let exited = match p.child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None)
                    if p.record.state == InstanceState::Starting
                        && p.launched.elapsed() > self.settings.startup_timeout =>
                {
                    let _ = p.child.start_kill();
                    let _ = p.child.wait().await;
                    Some("did not become healthy in time".into())
                }
                Ok(None) => None,
                Err(e) => Some(format!("cannot wait on it: {e}")),
            };
            if let Some(detail) = exited {
                let mut p = self.running.remove(at);
                tracing::warn!(instance = %p.record.id, %detail, "engine replica exited");
                if p.launched.elapsed() < Duration::from_secs(2) {
                    self.fast_failures += 1;
                }
                p.record.state = InstanceState::Exited;
                p.record.ended_at_ms = Some(now_ms());
                p.record.detail = Some(detail.clone());
                record_instance(&*self.store, &p.record).await;
                self.publish();
                match p.reserved_for {
                    // A dedicated tenant's replica comes back at once.
                    Some(tenant) => {
                        let kind = p.record.kind.clone();
                        if let Err(e) = self.spawn(kind, None, Some(tenant)).await {
                            tracing::error!(error = %e, "cannot relaunch a dedicated replica");
                        }
                    }
                    // Under notice: its replacement was planned then.
                    None if p.reclaim_at.is_some() => {
                        self.events.push(ProviderEvent::Gone { id: p.record.id })
                    }
                    // A pool replica is replaced by the controller's next plan.
                    None => self.events.push(ProviderEvent::Failed {
                        id: p.record.id,
                        detail,
                    }),
                }
                continue;
            }
            if p.record.state == InstanceState::Starting && self.healthy(&self.running[at]).await {
                let p = &mut self.running[at];
                p.record.state = InstanceState::Ready;
                self.fast_failures = 0;
                tracing::info!(instance = %p.record.id, secs = p.launched.elapsed().as_secs_f64(), "engine replica ready");
                record_instance(&*self.store, &p.record).await;
                self.events.push(ProviderEvent::Ready {
                    id: p.record.id.clone(),
                });
            }
            at += 1;
        }
        std::mem::take(&mut self.events)
    }

    async fn shutdown(&mut self) {
        if self.settings.drain_via_store && !self.running.is_empty() {
            // Every replica goes: gateways keep their sessions first.
            for p in &mut self.running {
                p.record.state = InstanceState::Stopped;
                record_instance(&*self.store, &p.record).await;
            }
            let ids: Vec<String> = self.running.iter().map(|p| p.record.id.clone()).collect();
            let never = CancellationToken::new();
            wait_drained(&*self.store, &ids, self.settings.drain_wait, &never).await;
        }
        self.stop_all.cancel();
        self.publish.send_replace(Vec::new());
        for p in &mut self.running {
            stop_child(&mut p.child).await;
            p.record.state = InstanceState::Stopped;
            p.record.ended_at_ms = Some(now_ms());
            p.record.detail = Some("shut down".into());
            record_instance(&*self.store, &p.record).await;
        }
        self.running.clear();
        while self.exits.join_next().await.is_some() {}
        self.leaving.clear();
    }
}

/// Waits until a gateway has kept the sessions of every replica of `ids`
/// (it took their `drained/<id>` leases), for `wait` at most, or until
/// `stop`; true when all were kept.
pub async fn wait_drained(
    store: &dyn Store,
    ids: &[String],
    wait: Duration,
    stop: &CancellationToken,
) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    let mut left: Vec<&String> = ids.iter().collect();
    while !left.is_empty() {
        let mut still = Vec::new();
        for id in left {
            if !matches!(
                store.lease(&strata_core::drained_lease(id)).await,
                Ok(Some(_))
            ) {
                still.push(id);
            }
        }
        left = still;
        if left.is_empty() {
            return true;
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(replicas = ?left, "no gateway kept these replicas' sessions in time");
                return false;
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    true
}

async fn record_instance(store: &dyn Store, instance: &InstanceRecord) {
    if let Err(e) = store.upsert_instance(instance).await {
        tracing::warn!(error = %e, "cannot record instance");
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
