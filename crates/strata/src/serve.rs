//! The processes of one machine: `strata serve` (gateway, controller and
//! engine replicas together), `strata gateway` and `strata engine`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use strata_core::config::Config;
use strata_core::ReplicaEndpoint;
use strata_gateway::{GatewaySettings, Links, SnapshotPlace};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cli::{EngineArgs, GatewayArgs, ServeArgs, TlsFlags};
use crate::cluster;
use crate::fleet::{Fleet, FleetParts, Launcher};
use crate::launch::{engine_settings, open_store, replica_trust, shutdown_on_signal};

pub async fn run_engine(config: Config, args: EngineArgs) -> Result<()> {
    let mut config = config;
    if let Some(engine) = &args.engine_config {
        config.engine = serde_json::from_str(engine).context("--engine-config")?;
    }
    let settings = engine_settings(&config, &args.engine, 1);
    if let Some(expected) = &args.sha256 {
        let path = settings.model_path.clone();
        let actual = strata_models::fetch::sha256_file(&path)
            .with_context(|| format!("--sha256: cannot read {}", path.display()))?;
        if !actual.eq_ignore_ascii_case(expected) {
            bail!(
                "{} has sha256 {actual}, not the {expected} --sha256 names; not loading it",
                path.display()
            );
        }
    }
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
        Duration::from_secs_f64(args.linger_secs),
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
        batch: strata_gateway::BatchSettings {
            streams_per_tenant: config.gateway.max_resumed_streams_per_tenant as usize,
            max_file_bytes: config.gateway.max_file_bytes,
            price_factor: 1.0 - config.gateway.batch_discount,
            lines_in_flight: config.gateway.batch_lines_in_flight as usize,
            reserved_share: config.gateway.batch_reserved_share,
        },
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
        cluster::gateway_in_cluster(&store, &config, &mut settings, &shutdown)
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
        external: None,
    })
}

pub async fn run_serve(config: Config, config_path: &Path, args: ServeArgs) -> Result<()> {
    let mut gateway = gateway_settings(&config, args.listen.as_ref(), &args.tls, args.db.as_ref())?;
    // The engines are this process's children and stop with it.
    gateway.drain_on_shutdown = true;
    // While a pool has no replica taking requests (from zero, or a lone
    // replica replaced), its requests wait for one.
    gateway.hold_when_empty = true;
    let trust = replica_trust(&config, args.db.as_ref())?;
    gateway.replica_auth = trust.auth.clone();
    let (store, vault) = open_store(&config, args.db.as_ref()).await?;
    // The controllers' metrics (by pool) show on the gateway's /metrics.
    let metrics = Arc::new(strata_control::metrics::ControllerMetrics::new());
    metrics.leading.set(1);
    let shown = metrics.clone();
    let (gateway_link, controller_link) = strata_core::link::link();
    let shutdown = shutdown_on_signal();
    // The engines stop after the gateway, which snapshots them on the way out.
    let engines_stop = CancellationToken::new();
    let (mut fleet, links) = Fleet::new(
        FleetParts {
            config,
            config_path: config_path.to_owned(),
            flags: args.engine,
            replicas: args.replicas,
            launcher: Launcher::Local(trust),
            store: store.clone(),
            metrics,
            in_cluster: false,
        },
        controller_link,
        engines_stop.clone(),
    );
    // The catalog's pools start before the gateway takes a request.
    fleet.start().await?;
    let fleet = tokio::spawn(fleet.run());
    let links = Links {
        endpoints: links.endpoints,
        load: Some(links.load),
        catalog: Some(links.catalog),
        model_host: Some(links.host),
        controller: Some(gateway_link),
        more_metrics: Some(strata_gateway::MoreMetrics(Arc::new(move || {
            shown.render()
        }))),
    };
    let served = strata_gateway::serve(gateway, links, store, Some(vault), shutdown.clone()).await;
    engines_stop.cancel();
    fleet.await.context("the fleet's task panicked")??;
    served?;
    tracing::info!("stopped");
    Ok(())
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
