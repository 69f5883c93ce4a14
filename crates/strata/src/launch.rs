//! What every long-running command starts from: the store with its
//! keyring, engine processes on this machine, a name among a cluster's
//! processes, and shutdown on a signal.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use strata_control::provider::local::{ExternalLaunch, LocalSettings};
use strata_core::config::{Config, EngineKind};
use strata_core::store::Store;
use strata_engine::{default_threads, model_name_for, EngineSettings};
use strata_gateway::tenancy::keys::AdminKey;
use strata_models::fetch::{default_model_path, ModelSource};
use strata_store::{Kek, KekSource, SqlStore, Vault};
use tokio_util::sync::CancellationToken;

use crate::cli::EngineFlags;

pub fn engine_settings(config: &Config, flags: &EngineFlags, replicas: u32) -> EngineSettings {
    let e = &config.engine;
    let model_path = flags
        .model
        .clone()
        .or_else(|| e.model.clone())
        .unwrap_or_else(|| default_model_path(&ModelSource::gemma3_270m().file_name));
    let model_name = flags
        .model_name
        .clone()
        .or_else(|| e.model_name.clone())
        .unwrap_or_else(|| model_name_for(&model_path));
    let threads = match flags.threads.unwrap_or(e.threads) {
        0 => default_threads(replicas),
        n => n,
    };
    EngineSettings {
        model_path,
        model_name,
        context_size: flags.context_size.unwrap_or(e.context_size),
        max_sequences: flags.max_sequences.unwrap_or(e.max_sequences),
        max_queue: e.max_queue,
        threads,
        prefill_chunk: e.prefill_chunk,
        step_budget: step_budget(config),
        batch_beside_interactive: e.batch_beside_interactive,
        default_max_tokens: e.default_max_tokens,
        prefix_cache_entries: e.prefix_cache_entries,
    }
}

/// The longest engine step while sequences decode: `engine.step_budget_ms`,
/// else 80% of the pool's TPOT objective (steps hover about the budget, and
/// the objective is a 95th percentile), else none.
fn step_budget(config: &Config) -> Option<std::time::Duration> {
    let ms = match config.engine.step_budget_ms {
        ms if ms > 0.0 => ms,
        _ => 0.8 * config.pool.slo_tpot_p95_ms?,
    };
    (ms.is_finite() && ms > 0.0).then(|| std::time::Duration::from_secs_f64(ms / 1000.0))
}

/// Cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// The KEK (from `STRATA_KEK`, `security.kek_file`, or generated beside the
/// database), the store and the keyring the KEK opens: a file beside a
/// SQLite database, the shared table in PostgreSQL.
pub async fn open_store_with_keyring(
    config: &Config,
    db: Option<&PathBuf>,
) -> Result<(Arc<dyn Store>, Arc<Vault>)> {
    let dir = config.store.data_dir(db);
    let database = config.store.database(db);
    let default_kek = dir.join("kek");
    let env = std::env::var("STRATA_KEK").ok();
    let (kek, source, generated) = Kek::load(
        env.as_deref(),
        config.security.kek_file.as_deref(),
        &default_kek,
    )?;
    if generated {
        tracing::warn!(
            file = %default_kek.display(),
            "no KEK configured: generated one (mode 0600); keep it apart from database backups, \
             or set security.kek_file / STRATA_KEK"
        );
    }
    let keyring = dir.join("keyring.json");
    let pending = match &source {
        KekSource::File(file) => Kek::pending_rotation(file).map(|p| (file.clone(), p)),
        KekSource::Environment => None,
    };
    match SqlStore::open_with_keyring(&database, kek, source.clone(), &keyring).await {
        Ok((store, vault)) => Ok((Arc::new(store), vault)),
        Err(first) => {
            // A KEK rotation interrupted between re-wrapping and renaming.
            if let Some((file, (new, pending))) = pending {
                if let Ok((store, vault)) =
                    SqlStore::open_with_keyring(&database, new, source, &keyring).await
                {
                    std::fs::rename(&pending, &file).with_context(|| {
                        format!("cannot finish the KEK rotation into {}", file.display())
                    })?;
                    tracing::warn!("finished an interrupted KEK rotation");
                    return Ok((Arc::new(store), vault));
                }
            }
            Err(first.into())
        }
    }
}

/// The environment variable that gives the platform admin key (before
/// `security.admin_key_file`).
pub const ADMIN_KEY_ENV: &str = "STRATA_ADMIN_KEY";

/// Opens the store and makes sure a platform admin key exists: the one
/// `STRATA_ADMIN_KEY` or `security.admin_key_file` gives, else a new one
/// printed once on stdout.
pub async fn open_store(
    config: &Config,
    db: Option<&PathBuf>,
) -> Result<(Arc<dyn Store>, Arc<Vault>)> {
    let (store, vault) = open_store_with_keyring(config, db).await?;
    // Gateways of a cluster may start together: one bootstraps at a time
    // (the lease runs out by itself if this one dies half-way).
    let me = process_name();
    while !store.claim_lease("bootstrap", &me, 30_000).await? {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let from_env = std::env::var(ADMIN_KEY_ENV).ok();
    let given = match (&from_env, &config.security.admin_key_file) {
        (Some(key), _) => Some(AdminKey::Value(key)),
        (None, Some(path)) => Some(AdminKey::File(path)),
        (None, None) => None,
    };
    let admin_key = strata_gateway::tenancy::keys::bootstrap(&*store, given).await;
    store.release_lease("bootstrap", &me).await?;
    let admin_key = admin_key.map_err(|e| anyhow::anyhow!(e))?;
    if let Some(secret) = admin_key {
        println!("strata: platform admin key (shown once, keep it safe): {secret}");
    }
    Ok((store, vault))
}

/// `bytes` bytes from the OS random source, as hex.
pub fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).context("no random source")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
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

/// How the gateway proves itself to the replicas this machine launches:
/// the replicas' mutual-TLS certificates when `serve.replica_mtls` is on,
/// else a replica token made for this run; the engine arguments and
/// environment that make them ask for it, and the client that checks
/// their health. One for every pool, so one gateway reaches them all.
#[derive(Clone)]
pub struct ReplicaTrust {
    pub auth: strata_gateway::fleet::client::ReplicaAuth,
    engine_args: Vec<String>,
    engine_env: Vec<(String, String)>,
    pub health: reqwest::Client,
}

pub fn replica_trust(config: &Config, db: Option<&PathBuf>) -> Result<ReplicaTrust> {
    let mut auth = strata_gateway::fleet::client::ReplicaAuth::default();
    let mut engine_args = Vec::new();
    let mut engine_env = Vec::new();
    if config.serve.replica_mtls {
        let dir = config.store.replica_tls_dir(&config.serve, db);
        let pki = strata_core::tls::ReplicaPki::ensure(&dir)?;
        for (flag, path) in [
            ("--tls-cert", &pki.server.cert),
            ("--tls-key", &pki.server.key),
            ("--client-ca", &pki.ca_cert),
        ] {
            engine_args.push(flag.into());
            engine_args.push(path.display().to_string());
        }
        auth.pki = Some(pki);
    } else {
        // Plain HTTP: the engines still answer only their gateway, which
        // proves itself with the token: `STRATA_REPLICA_TOKEN` where several
        // processes must share it (a cluster), else one made for this run
        // and kept in memory (handed to the engines in their environment).
        let token = match std::env::var(strata_core::REPLICA_TOKEN_ENV) {
            Ok(t) if !t.is_empty() => t,
            _ => random_hex(32)?,
        };
        engine_env.push((strata_core::REPLICA_TOKEN_ENV.to_owned(), token.clone()));
        auth.token = Some(token);
    }
    let health = strata_gateway::fleet::client::replica_client(&auth, Duration::from_secs(2))?;
    Ok(ReplicaTrust {
        auth,
        engine_args,
        engine_env,
        health,
    })
}

/// How this machine launches one pool's engine replicas (the `local`
/// provider), at most `processes` engines on the machine at once (threads
/// are split so they never oversubscribe the cores: llama.cpp's threads
/// spin). `model` names the pool's model of the catalog, whose own
/// `[engine]` section (in `config`) its engines run with; `None` for the
/// one model of `[engine]`.
pub fn local_launch(
    config: &Config,
    config_path: &Path,
    flags: &EngineFlags,
    processes: u32,
    trust: &ReplicaTrust,
    model: Option<&str>,
) -> Result<LocalSettings> {
    let engine = engine_settings(config, flags, processes);
    if !engine.model_path.is_file() {
        bail!(
            "model file {} does not exist; run `strata model fetch` or pass --model",
            engine.model_path.display()
        );
    }
    let mut engine_args = vec![
        "--model".to_string(),
        engine.model_path.display().to_string(),
        "--model-name".into(),
        engine.model_name.clone(),
        "--max-sequences".into(),
        engine.max_sequences.to_string(),
        "--context-size".into(),
        engine.context_size.to_string(),
    ];
    engine_args.extend(trust.engine_args.iter().cloned());
    // Engine children read the same config file, when there is one, and
    // a model of the catalog's pool its own `[engine]`.
    if let Ok(path) = std::fs::canonicalize(config_path) {
        engine_args.splice(0..0, ["--config".to_string(), path.display().to_string()]);
    }
    if model.is_some() {
        let own = serde_json::to_string(&config.engine).context("the engine section")?;
        engine_args.extend(["--engine-config".to_string(), own]);
    }
    let external = match config.engine.kind {
        EngineKind::Strata => None,
        EngineKind::Openai => {
            let e = &config.engine;
            if e.command.is_empty() {
                bail!("engine kind `openai` needs engine.command");
            }
            Some(ExternalLaunch {
                command: e.command.clone(),
                env: e.env.clone().into_iter().collect(),
                model_path: engine.model_path.clone(),
                engine: strata_core::ExternalEngine {
                    // One per pool, made now; it lives in this process and
                    // the replicas' environment or arguments only.
                    api_key: random_hex(32)?,
                    ready_path: e.ready_path.clone(),
                    continues: e.capabilities.continue_final_message,
                    batch_priority: e.capabilities.batch_priority,
                },
            })
        }
    };
    Ok(LocalSettings {
        program: std::env::current_exe().context("cannot find this program's path")?,
        engine_args,
        default_threads: engine.threads,
        instance_types: config.instance_types.clone(),
        pool: model.unwrap_or("default").into(),
        model: engine.model_name.clone(),
        https: trust.auth.pki.is_some(),
        engine_env: trust.engine_env.clone(),
        dedicated: config.serve.dedicated.clone(),
        startup_timeout: Duration::from_secs_f64(config.serve.startup_timeout_secs),
        preemption_notice: Duration::from_secs_f64(config.pool.preemption_notice_secs),
        preemption_drain: config
            .pool
            .preemption_drain_secs
            .map(Duration::from_secs_f64),
        random_preemptions_per_hour: config.pool.random_preemptions_per_hour,
        drain_wait: Duration::from_secs(30),
        drain_via_store: false,
        external,
    })
}

/// The engine processes a pool of `replicas` may need at once.
pub fn pool_processes(config: &Config, replicas: u32) -> Result<(u32, u32)> {
    if !(1..=64).contains(&replicas) {
        bail!("--replicas / serve.replicas must be between 1 and 64, got {replicas}");
    }
    // An autoscaled pool may grow to its maximum.
    let pool = if config.pool.autoscale {
        config.pool.max_replicas
    } else {
        replicas
    };
    Ok((
        replicas,
        pool + config.serve.dedicated.values().sum::<u32>(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_step_budget_comes_from_the_engine_or_the_pools_tpot_objective() {
        let budget = |text: &str| step_budget(&Config::from_toml(text).unwrap());
        assert_eq!(budget(""), None);
        assert_eq!(
            budget("[pool]\nslo_tpot_p95_ms = 150.0\n"),
            Some(std::time::Duration::from_millis(120))
        );
        assert_eq!(
            budget("[engine]\nstep_budget_ms = 90.0\n[pool]\nslo_tpot_p95_ms = 150.0\n"),
            Some(std::time::Duration::from_millis(90))
        );
    }
}
