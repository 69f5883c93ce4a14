//! Cluster mode on the command line: `strata controller` (the pool's
//! controller as a process of its own; several copies may run, and the one
//! holding the lease in the database acts) and the gateway's side of it
//! (replicas read from the store, load reported to it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use strata_control::cluster;
use strata_control::controller::{Controller, PoolSpec};
use strata_control::leader::Elector;
use strata_control::local::LocalProvider;
use strata_core::config::{is_postgres_url, Config};
use strata_core::store::Store;
use strata_core::Load;
use strata_store::SqlStore;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{local_launch, pool_processes, shutdown_on_signal, EngineFlags};

/// The lease the controller copies contend for.
const LEASE: &str = "controller/default";

#[derive(Args)]
pub struct ControllerArgs {
    /// PostgreSQL URL shared with the gateways (default: store.url).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Engine replicas of a pool without autoscaling (default: serve.replicas).
    #[arg(long, env = "STRATA_REPLICAS")]
    replicas: Option<u32>,
    /// Seconds a leader's lease lasts: a standby takes over at most this
    /// long after the leader dies (at once when it shuts down).
    #[arg(long, default_value_t = 15.0)]
    lease_secs: f64,
    /// This copy's name in the lease (default: host name and process id).
    #[arg(long)]
    holder: Option<String>,
    #[command(flatten)]
    engine: EngineFlags,
}

/// A name for this process among a cluster's: host and process id.
pub fn process_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "strata".into());
    format!("{host}-{}", std::process::id())
}

pub async fn run_controller(
    config: Config,
    config_path: &Path,
    args: ControllerArgs,
) -> Result<()> {
    let database = config.store.database(args.db.as_ref());
    if !is_postgres_url(&database) {
        bail!(
            "strata controller needs the PostgreSQL database its gateways use: \
             pass --db postgres://… or set store.url"
        );
    }
    if !(1.0..=600.0).contains(&args.lease_secs) {
        bail!(
            "--lease-secs must be between 1 and 600, got {}",
            args.lease_secs
        );
    }
    let (replicas, processes) =
        pool_processes(&config, args.replicas.unwrap_or(config.serve.replicas))?;
    let launch = local_launch(
        &config,
        config_path,
        &args.engine,
        processes,
        args.db.as_ref(),
    )?;
    // The controller holds no KEK: it never reads tenant content.
    let store: Arc<dyn Store> = Arc::new(
        SqlStore::open_any(&database, None)
            .await
            .context("opening the database")?,
    );
    let holder = args.holder.unwrap_or_else(process_name);
    let shutdown = shutdown_on_signal();
    let (mut leading, elector) = Elector {
        store: store.clone(),
        name: LEASE.into(),
        holder: holder.clone(),
        term: Duration::from_secs_f64(args.lease_secs),
    }
    .spawn(shutdown.clone());
    let (load_tx, load_rx) = watch::channel(Load::default());
    let gather = tokio::spawn(cluster::gather_load(
        store.clone(),
        load_tx,
        shutdown.clone(),
    ));
    tracing::info!(%holder, lease = LEASE, "controller standing by");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            led = leading.wait_for(|l| *l) => if led.is_err() { break },
        }
        // This copy runs no replica yet: whatever is recorded as running
        // was the previous leader's (its engines stopped with it).
        let closed = cluster::close_orphans(&*store, |_| false).await;
        tracing::info!(%holder, closed, "leading: this controller acts now");
        // Gateways read the replicas from the store, so the endpoints
        // published here go nowhere; with no gateway on the link, replicas
        // that go are stopped without a drain.
        let (publish, _) = watch::channel(Vec::new());
        let (_, link) = strata_core::link::link();
        let provider = LocalProvider::new(
            launch.settings.clone(),
            store.clone(),
            publish,
            launch.health.clone(),
            link,
        );
        let acting = CancellationToken::new();
        let task = tokio::spawn(strata_control::controller::run(
            Controller::new(PoolSpec::from_config(&config, replicas)),
            provider,
            load_rx.clone(),
            store.clone(),
            acting.clone(),
        ));
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = leading.wait_for(|l| !*l) => {
                tracing::warn!(%holder, "lost the lease: stopping this controller's replicas");
            }
        }
        acting.cancel();
        task.await.context("controller task panicked")??;
        if shutdown.is_cancelled() {
            break;
        }
    }
    // The replicas are stopped before the lease is let go (the elector
    // releases it once `shutdown` is seen and it is not renewing).
    elector.await.context("elector task panicked")?;
    gather.await.context("load task panicked")?;
    tracing::info!("stopped");
    Ok(())
}

/// A gateway of a cluster: the replicas come from the store (recorded by
/// the controller) and this gateway's load goes to it every second.
pub fn gateway_in_cluster(
    store: &Arc<dyn Store>,
    settings: &mut strata_gateway::GatewaySettings,
    shutdown: &CancellationToken,
) -> watch::Receiver<Vec<strata_core::ReplicaEndpoint>> {
    let (publish, endpoints) = watch::channel(Vec::new());
    tokio::spawn(cluster::discover_replicas(
        store.clone(),
        publish,
        shutdown.clone(),
    ));
    let (load_tx, load_rx) = watch::channel(Load::default());
    settings.load = Some(load_tx);
    // While the controller replaces replicas (or a standby takes over),
    // requests wait for one instead of failing.
    settings.hold_when_empty = true;
    tokio::spawn(cluster::report_load(
        store.clone(),
        process_name(),
        load_rx,
        shutdown.clone(),
    ));
    endpoints
}
