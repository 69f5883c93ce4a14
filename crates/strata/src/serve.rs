//! The processes of one machine: `strata serve` (gateway, controller and
//! engine replicas together), `strata gateway` and `strata engine`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use strata_control::controller::{Controller, PoolSpec};
use strata_control::provider::local::LocalProvider;
use strata_core::config::{Config, ServedModel};
use strata_core::link::{ControllerLink, PreemptNotice};
use strata_core::ReplicaEndpoint;
use strata_gateway::{CatalogModel, GatewaySettings, Links, LoadLink, SnapshotPlace};
use strata_models::fetch::ModelSource;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cli::EngineFlags;
use crate::cli::{EngineArgs, GatewayArgs, ServeArgs, TlsFlags};
use crate::cluster;
use crate::launch::{
    engine_settings, local_launch, open_store, pool_processes, replica_trust, shutdown_on_signal,
};

pub async fn run_engine(config: Config, args: EngineArgs) -> Result<()> {
    let config = match &args.serve_model {
        Some(id) => {
            config
                .served_model(id)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .config
        }
        None => config,
    };
    let settings = engine_settings(&config, &args.engine, 1);
    let listen: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| {
            format!(
                "--host {} --port {} is not an address",
                args.host, args.port
            )
        })?;
    let tls = match (args.tls_cert, args.tls_key, args.client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => Some(strata_engine::server::EngineTls {
            files: strata_core::tls::TlsFiles { cert, key },
            client_ca,
        }),
        _ => None,
    };
    let shutdown = shutdown_on_signal();
    let token = std::env::var(strata_core::REPLICA_TOKEN_ENV).ok();
    strata_engine::server::serve(
        settings,
        listen,
        config.engine.max_body_bytes,
        tls,
        token.as_deref(),
        shutdown,
    )
    .await?;
    Ok(())
}

fn gateway_settings(
    config: &Config,
    listen: Option<&String>,
    tls_flags: &TlsFlags,
    db: Option<&PathBuf>,
) -> Result<GatewaySettings> {
    let listen = listen.unwrap_or(&config.gateway.listen);
    let g = &config.gateway;
    let tls = if tls_flags.tls_self_signed {
        let dir = config.store.data_dir(db).join("tls");
        let files = strata_core::tls::self_signed(&dir)?;
        println!(
            "strata: TLS with a self-signed certificate {} (sha256 fingerprint {})",
            files.cert.display(),
            strata_core::tls::fingerprint(&files.cert)?
        );
        Some(files)
    } else {
        match (&g.tls_cert_file, &g.tls_key_file) {
            (Some(cert), Some(key)) => Some(strata_core::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    };
    let require_tls = tls_flags.require_tls || g.require_tls;
    if require_tls && tls.is_none() {
        bail!("require_tls needs certificates: set gateway.tls_cert_file and gateway.tls_key_file, or pass --tls-self-signed");
    }
    Ok(GatewaySettings {
        tls,
        require_tls,
        replica_auth: strata_gateway::fleet::client::ReplicaAuth {
            // The certificates a local controller or `strata serve` made, or
            // a Secret mounted there: used for `https://` replicas.
            // A cluster's gateway (replicas from the database) may start
            // before its controller has made them: it makes the set itself
            // (the first set placed is the one every process uses).
            pki: match config.serve.replica_mtls {
                false => None,
                true if config.gateway.replicas.is_empty() => {
                    Some(strata_core::tls::ReplicaPki::ensure(
                        &config.store.replica_tls_dir(&config.serve, db),
                    )?)
                }
                true => Some(strata_core::tls::ReplicaPki::at(
                    &config.store.replica_tls_dir(&config.serve, db),
                ))
                .filter(|pki| pki.client.cert.is_file() && pki.client.key.is_file()),
            },
            token: std::env::var(strata_core::REPLICA_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty()),
        },
        listen: listen
            .parse()
            .with_context(|| format!("--listen / gateway.listen `{listen}` is not an address"))?,
        max_body_bytes: config.gateway.max_body_bytes,
        default_max_tokens: config.engine.default_max_tokens,
        health_interval: Duration::from_secs_f64(config.gateway.health_interval_secs),
        connect_timeout: Duration::from_secs_f64(config.gateway.connect_timeout_secs),
        slots_per_replica: config.gateway.slots_per_replica as usize,
        max_waiting_per_tenant: config.gateway.max_waiting_per_tenant as usize,
        queue_timeout: Duration::from_secs_f64(config.gateway.queue_timeout_secs),
        pricing: config.pricing.clone(),
        // Shared where the database is; else beside it.
        snapshots: if strata_core::config::is_postgres_url(&config.store.database(db)) {
            SnapshotPlace::Database
        } else {
            SnapshotPlace::Dir(config.store.data_dir(db).join("snapshots"))
        },
        routing: config.gateway.routing,
        drain_on_shutdown: false,
        hold_when_empty: false,
        models: Vec::new(),
        shared_limits_url: config.gateway.shared_limits_url.clone(),
        metrics_tenant_labels: config.gateway.metrics_tenant_labels,
        // Other gateways spend from the same budgets only on a shared database.
        budget_refresh: strata_core::config::is_postgres_url(&config.store.database(db))
            .then(|| Duration::from_secs_f64(config.gateway.budget_refresh_secs)),
        audit_checkpoints: match config.security.audit_checkpoint_secs.unwrap_or(60.0) {
            secs if secs > 0.0 => Some(strata_gateway::tenancy::audit::Checkpoints {
                file: config.security.audit_checkpoint_file.clone(),
                every: Duration::from_secs_f64(secs),
            }),
            _ => None,
        },
        rotate_kek_on_shred: !config.security.keep_kek_on_shred,
        slo: strata_gateway::ops::dashboard::Slo {
            ttft_p95_ms: config.pool.slo_ttft_p95_ms,
            tpot_p95_ms: config.pool.slo_tpot_p95_ms,
        },
    })
}

pub async fn run_gateway(mut config: Config, args: GatewayArgs) -> Result<()> {
    if let Some(dir) = args.replica_tls_dir {
        config.serve.replica_tls_dir = Some(dir);
    }
    let mut settings =
        gateway_settings(&config, args.listen.as_ref(), &args.tls, args.db.as_ref())?;
    let urls: Vec<String> = config
        .gateway
        .replicas
        .iter()
        .chain(&args.replicas)
        .cloned()
        .collect();
    let in_cluster = urls.is_empty()
        && strata_core::config::is_postgres_url(&config.store.database(args.db.as_ref()));
    if urls.is_empty() && !in_cluster {
        bail!("no replicas: pass --replica URL (repeatable), set gateway.replicas, or use a PostgreSQL database where `strata controller` records them");
    }
    let endpoints = urls
        .iter()
        .map(|u| parse_replica(u))
        .collect::<Result<Vec<_>>>()?;
    let (store, vault) = open_store(&config, args.db.as_ref()).await?;
    let shutdown = shutdown_on_signal();
    // The given replicas, or (a cluster's gateway) those the controller records.
    let (_fixed, fixed) = watch::channel(endpoints);
    let links = if in_cluster {
        cluster::gateway_in_cluster(&store, &mut settings, &shutdown)
    } else {
        Links::endpoints(fixed)
    };
    strata_gateway::serve(settings, links, store, Some(vault), shutdown).await?;
    Ok(())
}

/// `URL` (shared pool) or `TENANT=URL` (reserved for a dedicated tenant).
fn parse_replica(arg: &str) -> Result<ReplicaEndpoint> {
    let (tenant, url) = match arg.split_once('=') {
        Some((tenant, url)) if !tenant.contains("://") => (Some(tenant.trim()), url.trim()),
        _ => (None, arg.trim()),
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("--replica `{arg}`: the URL must start with http:// or https://");
    }
    if tenant.is_some_and(str::is_empty) {
        bail!("--replica `{arg}`: the tenant name before `=` is empty");
    }
    let url = url.trim_end_matches('/').to_string();
    Ok(ReplicaEndpoint {
        id: url.clone(),
        url,
        reserved_for: tenant.map(str::to_owned),
        draining: false,
        model: None,
    })
}

pub async fn run_serve(config: Config, config_path: &Path, args: ServeArgs) -> Result<()> {
    let served = config.served().map_err(|e| anyhow::anyhow!("{e}"))?;
    // The first model is the default one: `--replicas` and the engine
    // flags are its own.
    let mut pools = Vec::new();
    for (i, model) in served.iter().enumerate() {
        let replicas = match i {
            0 => args.replicas.unwrap_or(model.config.serve.replicas),
            _ => model.config.serve.replicas,
        };
        let (replicas, processes) = pool_processes(&model.config, replicas)
            .with_context(|| model_context(model.id.as_deref()))?;
        pools.push((model, replicas, processes));
    }
    // Engines of every pool share the cores.
    let processes: u32 = pools.iter().map(|p| p.2).sum();
    let mut gateway = gateway_settings(&config, args.listen.as_ref(), &args.tls, args.db.as_ref())?;
    // The engines are this process's children and stop with it.
    gateway.drain_on_shutdown = true;
    let trust = replica_trust(&config, args.db.as_ref())?;
    gateway.replica_auth = trust.auth.clone();
    let no_flags = EngineFlags::default();
    let mut launches = Vec::new();
    for (i, (model, replicas, _)) in pools.iter().enumerate() {
        let flags = if i == 0 { &args.engine } else { &no_flags };
        let config = resolve_source(model)?;
        let settings = local_launch(
            &config,
            config_path,
            flags,
            processes,
            &trust,
            model.id.as_deref(),
        )
        .with_context(|| model_context(model.id.as_deref()))?;
        // Listed while the pool is at zero too.
        gateway.models.push(CatalogModel {
            id: settings.model.clone(),
            default_max_tokens: config.engine.default_max_tokens,
        });
        launches.push((config, settings, *replicas));
    }
    let (store, vault) = open_store(&config, args.db.as_ref()).await?;
    // One gateway, one controller per pool: drains from any controller go
    // to the gateway; a preemption notice goes to every pool's provider
    // (only the one running that replica acts on it).
    let (gateway_link, ControllerLink { drains, notices }) = strata_core::link::link();
    let mut notice_to = Vec::new();
    let shutdown = shutdown_on_signal();
    let engines_stop = CancellationToken::new();
    // The controllers' metrics (by pool) show on the gateway's /metrics.
    let metrics = Arc::new(strata_control::metrics::ControllerMetrics::new());
    metrics.leading.set(1);
    let mut loads = Vec::new();
    let mut controllers = Vec::new();
    let mut published = Vec::new();
    for (config, settings, replicas) in launches {
        let (publish, endpoints) = watch::channel(Vec::new());
        let (notice_tx, notice_rx) = tokio::sync::mpsc::channel(64);
        notice_to.push(notice_tx);
        let model = settings.model.clone();
        let pool = settings.pool.clone();
        let provider = LocalProvider::new(
            settings,
            store.clone(),
            publish,
            trust.health.clone(),
            ControllerLink {
                drains: drains.clone(),
                notices: notice_rx,
            },
        );
        // The controller keeps the pool's replicas: `serve.replicas` of
        // them, or with `pool.autoscale` as many as the gateway's load for
        // its model needs (from zero with `scale_to_zero_after_secs`).
        // While none takes requests (from zero, or a lone replica
        // replaced), requests wait for one.
        let (load_tx, load_rx) = watch::channel(strata_gateway::Load::default());
        loads.push(LoadLink {
            model: Some(model),
            tx: load_tx,
        });
        let controller = Controller::new(PoolSpec {
            name: pool,
            ..PoolSpec::from_config(&config, replicas)
        });
        controllers.push(tokio::spawn(strata_control::controller::run(
            controller,
            provider,
            load_rx,
            store.clone(),
            Some(metrics.clone()),
            engines_stop.clone(),
        )));
        published.push(endpoints);
    }
    tokio::spawn(fan_out(notices, notice_to));
    gateway.hold_when_empty = true;
    let links = Links {
        endpoints: merged(published, engines_stop.clone()),
        loads,
        controller: Some(gateway_link),
        more_metrics: Some(strata_gateway::MoreMetrics(Arc::new(move || {
            metrics.render()
        }))),
    };
    // The engines stop after the gateway, which snapshots them on the way out.
    let served = strata_gateway::serve(gateway, links, store, Some(vault), shutdown.clone()).await;
    engines_stop.cancel();
    for controller in controllers {
        controller.await.context("provider task panicked")??;
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Every pool's replicas as one list, kept current as any pool publishes.
fn merged(
    mut pools: Vec<watch::Receiver<Vec<ReplicaEndpoint>>>,
    stop: CancellationToken,
) -> watch::Receiver<Vec<ReplicaEndpoint>> {
    if pools.len() == 1 {
        return pools.remove(0);
    }
    let all = |pools: &[watch::Receiver<Vec<ReplicaEndpoint>>]| {
        pools
            .iter()
            .flat_map(|p| p.borrow().clone())
            .collect::<Vec<_>>()
    };
    let publish = Arc::new(watch::Sender::new(all(&pools)));
    let merged = publish.subscribe();
    for mut pool in pools.clone() {
        let (pools, publish, stop) = (pools.clone(), publish.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = pool.changed() => if changed.is_err() { return },
                }
                publish.send_replace(all(&pools));
            }
        });
    }
    merged
}

/// Each preemption notice to every pool's provider.
async fn fan_out(
    mut notices: tokio::sync::mpsc::Receiver<PreemptNotice>,
    to: Vec<tokio::sync::mpsc::Sender<PreemptNotice>>,
) {
    while let Some(notice) = notices.recv().await {
        for pool in &to {
            let _ = pool.send(notice.clone()).await;
        }
    }
}

/// The served model's configuration with its file's place: a built-in
/// source where `strata model fetch --model` puts it, or its `path`,
/// checked against its `sha256` when it names one.
fn resolve_source(model: &ServedModel) -> Result<Config> {
    let mut config = model.config.clone();
    if let Some(source) = &model.source {
        let Some(builtin) = ModelSource::named(source) else {
            bail!(
                "model `{}`: source `{source}` is not a built-in model ({})",
                model.id.as_deref().unwrap_or_default(),
                ModelSource::builtin_ids().join(", ")
            );
        };
        let path = strata_models::fetch::default_model_path(&builtin.file_name);
        if !path.is_file() {
            bail!(
                "model `{}`: {} does not exist; run `strata model fetch --model {source}`",
                model.id.as_deref().unwrap_or_default(),
                path.display()
            );
        }
        if model
            .sha256
            .as_ref()
            .is_some_and(|h| !h.eq_ignore_ascii_case(&builtin.sha256))
        {
            bail!(
                "model `{}`: sha256 does not match the built-in source `{source}` ({})",
                model.id.as_deref().unwrap_or_default(),
                builtin.sha256
            );
        }
        config.engine.model = Some(path);
    } else if let (Some(path), Some(expected)) = (&config.engine.model, &model.sha256) {
        let actual = strata_models::fetch::sha256_file(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if !actual.eq_ignore_ascii_case(expected) {
            bail!(
                "model `{}`: {} has sha256 {actual}, not the {expected} its entry names; not serving it",
                model.id.as_deref().unwrap_or_default(),
                path.display()
            );
        }
    }
    Ok(config)
}

fn model_context(id: Option<&str>) -> String {
    match id {
        Some(id) => format!("model `{id}`"),
        None => "the model of [engine]".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_shared_or_reserved_by_tenant_name() {
        let shared = parse_replica("http://127.0.0.1:8001/").unwrap();
        assert_eq!(shared.url, "http://127.0.0.1:8001");
        assert_eq!(shared.reserved_for, None);
        let vip = parse_replica("vip=https://10.0.0.5:8001").unwrap();
        assert_eq!(vip.url, "https://10.0.0.5:8001");
        assert_eq!(vip.reserved_for.as_deref(), Some("vip"));
        assert!(parse_replica("=http://x").is_err());
        assert!(parse_replica("vip=ftp://x").is_err());
        assert!(parse_replica("127.0.0.1:8001").is_err());
    }
}
