//! Cluster mode on the command line: `strata controller` (the pool's
//! controller as a process of its own; several copies may run, and the one
//! holding the lease in the database acts) and the gateway's side of it
//! (replicas read from the store, load reported to it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use strata_control::cluster;
use strata_control::leader::Elector;
use strata_control::metrics::ControllerMetrics;
use strata_core::config::{is_postgres_url, Config};
use strata_core::store::{LeaseStore, Store};
use strata_core::tenant::looks_like_key;
use strata_core::Loads;
use strata_gateway::tenancy::keys::{new_key, NOT_A_KEY};
use strata_k8s::lease::KubeLeases;
use strata_store::SqlStore;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cli::{ControllerArgs, K8sCommand, ProviderKind};
use crate::fleet::{Fleet, FleetParts, Launcher};
use crate::launch::{
    local_launch, pool_processes, process_name, replica_trust, shutdown_on_signal,
};

/// The lease the controller copies contend for.
const LEASE: &str = "controller/default";

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
    let (_, processes) = pool_processes(&config, args.replicas.unwrap_or(config.serve.replicas))?;
    let kube = match args.provider {
        ProviderKind::Kubernetes => Some(strata_k8s::connect().await.map_err(|e| {
            anyhow::anyhow!(
                "--provider kubernetes: no Kubernetes API to talk to (in a Pod, its service \
                 account; elsewhere, a kubeconfig): {e}"
            )
        })?),
        ProviderKind::Local => None,
    };
    if matches!(args.provider, ProviderKind::Local)
        && !config.serve.replica_mtls
        && std::env::var(strata_core::REPLICA_TOKEN_ENV).map_or(true, |t| t.is_empty())
    {
        bail!(
            "with serve.replica_mtls off, a cluster's controllers and gateways share the replica token: set {} for all of them",
            strata_core::REPLICA_TOKEN_ENV
        );
    }
    let trust = match args.provider {
        ProviderKind::Local => {
            let trust = replica_trust(&config, args.db.as_ref())?;
            // The one model's file is there before this copy stands by.
            if config.models.is_empty() {
                local_launch(&config, config_path, &args.engine, processes, &trust, None)?;
            }
            Some(trust)
        }
        ProviderKind::Kubernetes => None,
    };
    // The controller holds no KEK: it never reads tenant content.
    let store: Arc<dyn Store> = Arc::new(
        SqlStore::open_any(&database, None)
            .await
            .context("opening the database")?,
    );
    let holder = args.holder.unwrap_or_else(process_name);
    let leases: Arc<dyn LeaseStore> = match &kube {
        Some(client) => Arc::new(KubeLeases::new(
            client.clone(),
            &config.kubernetes.namespace,
        )),
        None => store.clone(),
    };
    let shutdown = shutdown_on_signal();
    let metrics = Arc::new(ControllerMetrics::new());
    let metrics_server = match args.metrics_listen {
        Some(addr) => Some(tokio::spawn(serve_metrics(
            bind_metrics(addr).await?,
            metrics.clone(),
            shutdown.clone(),
        ))),
        None => None,
    };
    // The lease is let go only after this copy's replicas are gone (or
    // drained, in a cluster), so a standby never starts beside them.
    let release = CancellationToken::new();
    let (mut leading, elector) = Elector {
        store: leases,
        name: LEASE.into(),
        holder: holder.clone(),
        term: Duration::from_secs_f64(args.lease_secs),
    }
    .spawn(release.clone());
    let (load_tx, load_rx) = watch::channel(Loads::default());
    let gather = tokio::spawn(cluster::gather_load(
        store.clone(),
        load_tx,
        shutdown.clone(),
    ));
    let config = Arc::new(config);
    tracing::info!(%holder, lease = LEASE, provider = ?args.provider, "controller standing by");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            led = leading.wait_for(|l| *l) => if led.is_err() { break },
        }
        // This copy runs no replica yet: whatever is recorded as running
        // was the previous leader's (local engines stopped with it;
        // Kubernetes Pods are adopted under new ids).
        let closed = cluster::close_orphans(&*store).await;
        metrics.leading.set(1);
        tracing::info!(%holder, closed, "leading: this controller acts now");
        let acting = CancellationToken::new();
        // A pool per model of the catalog (the config file's, then those
        // deployed through a gateway's admin API), each scaled by its
        // model's share of the gateways' load: engine processes on this
        // machine, or engine Deployments in the cluster. Gateways read the
        // replicas from the store, so endpoints published here go nowhere,
        // and a replica that goes is drained by a gateway through the store.
        let launcher = match (&kube, &trust) {
            (Some(client), _) => Launcher::Kube(client.clone()),
            (None, Some(trust)) => Launcher::Local(trust.clone()),
            (None, None) => unreachable!("one provider is set up above"),
        };
        let (_, link) = strata_core::link::link();
        let (mut fleet, links) = Fleet::new(
            FleetParts {
                config: (*config).clone(),
                config_path: config_path.to_owned(),
                flags: args.engine.clone(),
                replicas: args.replicas,
                launcher,
                store: store.clone(),
                metrics: metrics.clone(),
                in_cluster: true,
            },
            link,
            acting.clone(),
        );
        tokio::spawn(forward(load_rx.clone(), links.load, acting.clone()));
        fleet.start().await?;
        let task = tokio::spawn(fleet.run());
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = leading.wait_for(|l| !*l) => {
                tracing::warn!(%holder, "lost the lease: this controller stops acting");
            }
        }
        acting.cancel();
        task.await.context("controller task panicked")??;
        metrics.leading.set(0);
        if shutdown.is_cancelled() {
            break;
        }
    }
    release.cancel();
    elector.await.context("elector task panicked")?;
    gather.await.context("load task panicked")?;
    if let Some(server) = metrics_server {
        server.await.context("metrics server panicked")?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Copies the cluster's load into the fleet's until `stop`.
async fn forward(
    mut from: watch::Receiver<Loads>,
    to: watch::Sender<Loads>,
    stop: CancellationToken,
) {
    loop {
        to.send_replace(from.borrow_and_update().clone());
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = from.changed() => if changed.is_err() { return },
        }
    }
}

async fn bind_metrics(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-listen {addr}: cannot listen"))
}

/// `/metrics` (the controller's) and `/health` until `shutdown`.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<ControllerMetrics>,
    shutdown: CancellationToken,
) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }),
        )
        .route("/health", get(|| async { "ok" }));
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "the metrics listener failed");
    }
}

/// A gateway of a cluster: the replicas come from the store (recorded by
/// the controller), this gateway's load goes to it every second (the whole
/// and each model's), and the catalog is the config file's and the
/// database's, as the acting controller's pools serve it.
pub fn gateway_in_cluster(
    store: &Arc<dyn Store>,
    config: &Config,
    settings: &mut strata_gateway::GatewaySettings,
    shutdown: &CancellationToken,
) -> strata_gateway::Links {
    let (publish, recorded) = watch::channel(Vec::new());
    tokio::spawn(cluster::discover_replicas(
        store.clone(),
        publish,
        shutdown.clone(),
    ));
    let (load_tx, loads) = watch::channel(strata_core::Loads::default());
    // While the controller replaces replicas (or a standby takes over),
    // requests wait for one instead of failing.
    settings.hold_when_empty = true;
    tokio::spawn(cluster::report_load(
        store.clone(),
        process_name(),
        loads,
        shutdown.clone(),
    ));
    let (catalog, engines, host) =
        crate::fleet::follow_cluster_catalog(store.clone(), config, shutdown);
    // Replicas of `openai` engines get their pool's key, not strata's.
    let endpoints = crate::fleet::with_engines(recorded, engines, shutdown.clone());
    strata_gateway::Links {
        load: Some(load_tx),
        catalog: Some(catalog),
        model_host: Some(host),
        ..strata_gateway::Links::endpoints(endpoints)
    }
}

/// The Secrets to render, with what gateways and engines prove themselves
/// with on Kubernetes: a replica CA and certificates made now (with
/// `serve.replica_mtls`), or a token.
fn secrets(
    config: &Config,
    kek: String,
    database_url: String,
) -> Result<strata_k8s::render::Secrets> {
    // The platform admin key: the one given, else a new one (it is in
    // the printed Secret, and nowhere else).
    let admin_key = match std::env::var(crate::launch::ADMIN_KEY_ENV) {
        Ok(key) if looks_like_key(key.trim()) => key.trim().to_string(),
        Ok(_) => bail!("{} {NOT_A_KEY}", crate::launch::ADMIN_KEY_ENV),
        Err(_) => new_key().secret,
    };
    let mut secrets = strata_k8s::render::Secrets {
        kek,
        database_url,
        admin_key,
        replica_tls: Vec::new(),
        replica_token: None,
        // The one given (gateways outside the cluster share it), else new.
        engine_key: match std::env::var(strata_core::ENGINE_KEY_ENV) {
            Ok(key) if !key.trim().is_empty() => key.trim().to_owned(),
            _ => crate::launch::random_hex(32)?,
        },
    };
    if !config.serve.replica_mtls {
        secrets.replica_token = Some(crate::launch::random_hex(32)?);
        return Ok(secrets);
    }
    let dir = tempfile_dir()?;
    let pki = strata_core::tls::ReplicaPki::ensure(&dir)?;
    let mut files = Vec::new();
    for path in [
        &pki.ca_cert,
        &pki.server.cert,
        &pki.server.key,
        &pki.client.cert,
        &pki.client.key,
    ] {
        let name = path
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned();
        files.push((name, std::fs::read_to_string(path)?));
    }
    std::fs::remove_dir_all(&dir)?;
    secrets.replica_tls = files;
    Ok(secrets)
}

/// A fresh private directory for certificates that live only until printed.
fn tempfile_dir() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let name = crate::launch::random_hex(8)?;
    let dir = std::env::temp_dir().join(format!("strata-render-{name}"));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

pub fn k8s(config: &Config, config_path: &Path, command: K8sCommand) -> Result<()> {
    match command {
        K8sCommand::Render { engines } => {
            // Every model's engine Pods must be able to get its file.
            let flags = crate::cli::EngineFlags::default();
            let mut pools = Vec::new();
            for model in config.served().map_err(|e| anyhow::anyhow!("{e}"))? {
                pools.push(crate::fleet::pool_model(
                    &model,
                    "config",
                    &flags,
                    &config.kubernetes,
                )?);
            }
            let text = match std::fs::read_to_string(config_path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot read {}", config_path.display()))
                }
            };
            let secrets = match (
                std::env::var("STRATA_KEK").ok(),
                std::env::var("STRATA_DATABASE_URL").ok(),
            ) {
                (Some(kek), Some(database_url)) => {
                    strata_store::Kek::from_hex(&kek).context("STRATA_KEK")?;
                    if !is_postgres_url(&database_url) {
                        bail!("STRATA_DATABASE_URL must be a postgres:// URL");
                    }
                    Some(secrets(config, kek, database_url)?)
                }
                _ => {
                    eprintln!(
                        "strata k8s render: no Secret rendered (set STRATA_KEK and \
                         STRATA_DATABASE_URL, or create it: kubectl -n {ns} create secret generic \
                         strata --from-literal=kek=<64 hex> --from-literal=database-url=postgres://… \
                         --from-literal=admin-key=sk-strata-$(openssl rand -base64 32 | tr '+/' '-_' | tr -d =) \
                         --from-literal=engine-key=$(openssl rand -hex 32); \
                         and the replica certificates, e.g. the ones `strata serve` makes under \
                         <data>/tls/replicas: kubectl -n {ns} create secret generic {tls} \
                         --from-file=<data>/tls/replicas)",
                        ns = config.kubernetes.namespace,
                        tls = strata_k8s::render::REPLICA_TLS_SECRET,
                    );
                    None
                }
            };
            let mut objects = strata_k8s::render::manifests(config, &text, secrets.as_ref());
            if engines {
                for pool in &pools {
                    for offer in &config.catalog {
                        let variant = strata_k8s::render::Variant {
                            pool: pool.pool.clone(),
                            instance_type: offer.instance_type.clone(),
                            zone: offer.zone.clone(),
                            capacity: offer.capacity,
                        };
                        objects.push(strata_k8s::render::engine_deployment(
                            config, &variant, 0, pool,
                        ));
                    }
                }
            }
            strata_k8s::render::check(&objects)
                .map_err(|e| anyhow::anyhow!("a rendered manifest is invalid: {e}"))?;
            print!("{}", strata_k8s::render::to_yaml(&objects));
            Ok(())
        }
    }
}
