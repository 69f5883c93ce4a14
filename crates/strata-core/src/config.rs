//! `strata.toml`: one typed file, every field with a default. Command-line
//! flags (and their `STRATA_*` environment variables) override it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub engine: EngineConfig,
    pub serve: ServeConfig,
    pub store: StoreConfig,
    pub security: SecurityConfig,
    /// The pool of replicas serving the model, and how it scales.
    pub pool: PoolConfig,
    /// Dollars per million tokens, by model id; an unpriced model costs nothing.
    pub pricing: BTreeMap<String, ModelPrice>,
    /// Machine sizes replicas run on, by name, with the model's throughput on each.
    pub instance_types: BTreeMap<String, InstanceType>,
    /// Where each instance type can be had, as spot or on demand, at what price.
    pub catalog: Vec<Offering>,
    /// How strata runs on a Kubernetes cluster (`strata k8s render`, the
    /// `kubernetes` provider of `strata controller`).
    pub kubernetes: KubernetesConfig,
    /// The models to serve, each with a pool of its own (`[[models]]`).
    /// Empty: `[engine]` and `[pool]` describe the one model.
    pub models: Vec<ModelEntry>,
}

/// One model of the catalog: the id clients send, where its file comes
/// from, and what it changes in `[engine]`, `[pool]` and `[serve]` for
/// its own pool; everything it does not name comes from those sections.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The model id clients send (and the engine reports).
    pub id: String,
    /// A built-in source, by the id `strata model fetch --model` takes
    /// (the file is looked for where that command puts it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A GGUF file on this machine (instead of `source`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A GGUF file to download (instead of `source`): `https://…`,
    /// `http://…` or `s3://BUCKET/KEY`; needs `sha256`. Cached by hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The file's SHA-256 (hex), checked before a replica loads it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Replicas kept up when the pool does not autoscale (`serve.replicas`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Dollars per million tokens (the same as a `[pricing]` entry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<ModelPrice>,
    /// `[engine]` keys this model sets for itself.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub engine: toml::Table,
    /// `[pool]` keys this model's pool sets for itself.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub pool: toml::Table,
    /// This model's own throughput on instance types, key by key over
    /// `[instance_types]` (`[models.instance_types."g5.xlarge"]
    /// decode_tokens_per_s = […]`): a bigger model is slower on the same
    /// machine, and its pool is planned and scaled by its own profile.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub instance_types: toml::Table,
    /// An alias instead of a model: the models of the catalog its id
    /// stands for, by weight (a canary: `{ v1 = 90, v2 = 10 }`). A
    /// conversation stays on the model its last turn used while the alias
    /// names it (a weight of 0 takes no new conversations but keeps its
    /// own); an alias has no source, pool or engine of its own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub alias: BTreeMap<String, u32>,
    /// The one tenant (by name) whose keys may use this model; for the
    /// others it does not exist (404). Needed where the model's engine
    /// shares its prefix cache across requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl ModelEntry {
    /// An alias, not a model with a pool.
    pub fn is_alias(&self) -> bool {
        !self.alias.is_empty()
    }

    /// What is wrong with this alias, by key (`alias.v2`), where `model`
    /// tells whether an id is a model of the catalog with a pool.
    pub fn alias_issues(&self, model: &dyn Fn(&str) -> bool) -> Vec<ConfigIssue> {
        let issue = |key: &str, message: String| ConfigIssue {
            key: key.to_owned(),
            message,
        };
        let mut issues = Vec::new();
        let own = [
            ("source", self.source.is_some()),
            ("path", self.path.is_some()),
            ("url", self.url.is_some()),
            ("sha256", self.sha256.is_some()),
            ("replicas", self.replicas.is_some()),
            ("price", self.price.is_some()),
            ("engine", !self.engine.is_empty()),
            ("pool", !self.pool.is_empty()),
            ("instance_types", !self.instance_types.is_empty()),
        ];
        for (key, given) in own {
            if given {
                issues.push(issue(
                    key,
                    "an alias has only `id` and `alias`: its models have the rest".into(),
                ));
            }
        }
        if self.alias.values().all(|w| *w == 0) {
            issues.push(issue(
                "alias",
                "at least one model needs a weight above 0".into(),
            ));
        }
        for (target, weight) in &self.alias {
            if *target == self.id || !model(target) {
                issues.push(issue(
                    &format!("alias.{target}"),
                    format!("`{target}` is not a model of the catalog (an alias names models, not aliases)"),
                ));
            } else if *weight > MAX_ALIAS_WEIGHT {
                issues.push(issue(
                    &format!("alias.{target}"),
                    format!("a weight is at most {MAX_ALIAS_WEIGHT}"),
                ));
            }
        }
        issues
    }
}

impl Config {
    /// Why a model deployed through the admin API may not come from where
    /// `entry` says (`security.model_sources`), if it may not. A file
    /// outside the directories gets the same answer whether or not it
    /// exists.
    pub fn deploy_source_issue(&self, entry: &ModelEntry) -> Option<String> {
        let allowed = &self.security.model_sources;
        if allowed.is_empty() {
            return None;
        }
        let outside = |what: &str| {
            Some(format!(
                "`{what}` is not under security.model_sources ({})",
                allowed.join(", ")
            ))
        };
        if let Some(url) = &entry.url {
            let (_, rest) = url.split_once("://").unwrap_or(("", url));
            let path = rest.split(['?', '#']).next().unwrap_or_default();
            let climbs = path
                .split('/')
                .any(|seg| seg == ".." || seg == "." || seg.contains('%') || seg.contains('\\'));
            let under = allowed
                .iter()
                .any(|p| !p.starts_with('/') && url.starts_with(p.as_str()));
            if climbs || !under {
                return outside("url");
            }
        }
        if let Some(path) = &entry.path {
            let under = std::fs::canonicalize(path).is_ok_and(|file| {
                allowed
                    .iter()
                    .filter(|p| p.starts_with('/'))
                    .filter_map(|dir| std::fs::canonicalize(dir).ok())
                    .any(|dir| file.starts_with(dir))
            });
            if !under {
                return outside("path");
            }
        }
        None
    }
}

/// What credentials a model's `url` carries, if any: a user or password
/// before the host, or a signature or token in the query (a presigned URL).
pub fn url_credentials(url: &str) -> Option<&'static str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Some("a user or password");
    }
    let query = rest.split_once('?').map(|(_, q)| q.to_ascii_lowercase())?;
    const SIGNED: [&str; 9] = [
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "signature=",
        "sig=",
        "token=",
        "password=",
        "awsaccesskeyid=",
    ];
    SIGNED
        .iter()
        .any(|k| query.contains(k))
        .then_some("a signature or token in its query")
}

/// The largest weight of an alias's model (weights are relative: 90 and
/// 10, or 9 and 1, split alike).
pub const MAX_ALIAS_WEIGHT: u32 = 1_000_000;

/// A model to serve with the configuration its pool and engines run on:
/// the whole file with `[engine]`, `[pool]`, `serve.replicas` and
/// `[pricing]` as the model's entry sets them.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedModel {
    /// `None`: the one model `[engine]` describes (its id is the engine's
    /// `model_name`, or the file's name).
    pub id: Option<String>,
    pub source: Option<String>,
    pub url: Option<String>,
    pub sha256: Option<String>,
    /// The one tenant (by name) that may use it; `None`: every tenant.
    pub tenant: Option<String>,
    pub config: Config,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            gateway: GatewayConfig::default(),
            engine: EngineConfig::default(),
            serve: ServeConfig::default(),
            store: StoreConfig::default(),
            security: SecurityConfig::default(),
            pool: PoolConfig::default(),
            pricing: BTreeMap::new(),
            instance_types: BTreeMap::from([(LOCAL_TYPE.to_owned(), InstanceType::default())]),
            catalog: vec![Offering::default()],
            kubernetes: KubernetesConfig::default(),
            models: Vec::new(),
        }
    }
}

/// strata on Kubernetes: where it runs, which image, how replicas find
/// their nodes (the well-known instance-type and zone labels, plus a label
/// for spot vs on-demand), and which node taints mean "reclaimed soon".
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    pub namespace: String,
    /// The container image holding the `strata` binary.
    pub image: String,
    /// Port the engine containers listen on.
    pub engine_port: u16,
    /// Resources of one engine replica (Kubernetes quantities).
    pub engine_cpu: String,
    pub engine_memory: String,
    /// GPUs per replica (`nvidia.com/gpu`); 0 for CPU replicas.
    pub engine_gpus: u32,
    /// A PersistentVolumeClaim holding the model files, mounted read-only
    /// at `/models` (a built-in source as `/models/<its file name>`, a
    /// `url`'s as `/models/sha256-<hash>.gguf`, a `path` where it names);
    /// the engine checks the file's sha256 before loading it. Unset: an
    /// init container fetches each Pod's model into an emptyDir
    /// (`strata model fetch`), and `path` models cannot run.
    pub model_pvc: Option<String>,
    /// A Secret whose keys the model-fetching init container gets as its
    /// environment (e.g. `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_ENDPOINT_URL` for an `s3://` url).
    pub model_fetch_secret: Option<String>,
    /// Node label telling spot from on-demand capacity, and its values
    /// (Karpenter: `karpenter.sh/capacity-type` = spot / on-demand; GKE:
    /// `cloud.google.com/gke-spot` = "true", with no on-demand value).
    pub capacity_label: String,
    pub spot_value: String,
    pub on_demand_value: Option<String>,
    /// Taint keys spot nodes carry, tolerated by spot replicas.
    pub spot_taints: Vec<String>,
    /// Taint keys that mark a node as about to be reclaimed (set by spot
    /// interruption handlers): its replicas drain and are replaced.
    pub preemption_taints: Vec<String>,
    /// Node condition types that, when "True", mark a node as about to be
    /// reclaimed (for handlers that set a condition rather than a taint).
    pub preemption_conditions: Vec<String>,
    /// Seconds of notice a tainted node's replicas get.
    pub preemption_notice_secs: f64,
    /// Longest an engine Pod may wait for a node (unscheduled, or not made
    /// at all) before its replica is given up: an unscheduled one counts as
    /// its offer (type, zone, spot or on demand) having no capacity, so the
    /// planner turns to other offers for `pool.spot_cooldown_secs`; one
    /// never made, as a failed start. Allow for the node autoscaler's boot
    /// of a new node.
    pub schedule_timeout_secs: f64,
    /// Longest an engine Pod may take from its launch to ready (its node,
    /// its image, the model's fetch, the engine's start) before its
    /// replica is given up as a failed start; at least
    /// `schedule_timeout_secs`. Until then a starting replica also holds
    /// back the pool's scale-downs.
    pub start_timeout_secs: f64,
    /// Gateway replicas, and the most the gateway's autoscaler may run.
    pub gateway_replicas: u32,
    pub gateway_max_replicas: u32,
    pub gateway_cpu: String,
    pub gateway_memory: String,
    /// Controller copies (one acts, the others stand by).
    pub controller_replicas: u32,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            namespace: "strata".into(),
            image: "strata:latest".into(),
            engine_port: 8000,
            engine_cpu: "2".into(),
            engine_memory: "4Gi".into(),
            engine_gpus: 0,
            model_pvc: None,
            model_fetch_secret: None,
            capacity_label: "karpenter.sh/capacity-type".into(),
            spot_value: "spot".into(),
            on_demand_value: Some("on-demand".into()),
            spot_taints: vec!["karpenter.sh/capacity-type".into()],
            preemption_taints: vec![
                "aws-node-termination-handler/spot-itn".into(),
                "karpenter.sh/disrupted".into(),
            ],
            preemption_conditions: Vec::new(),
            preemption_notice_secs: 120.0,
            schedule_timeout_secs: 600.0,
            start_timeout_secs: 1800.0,
            gateway_replicas: 2,
            gateway_max_replicas: 10,
            gateway_cpu: "1".into(),
            gateway_memory: "512Mi".into(),
            controller_replicas: 2,
        }
    }
}

/// The instance type of the default catalog: an engine process on this
/// machine with `engine.threads` threads.
pub const LOCAL_TYPE: &str = "local";

/// Spot (cheaper, reclaimable at short notice) or on-demand capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacityType {
    Spot,
    OnDemand,
}

impl CapacityType {
    pub fn as_str(self) -> &'static str {
        match self {
            CapacityType::Spot => "spot",
            CapacityType::OnDemand => "on_demand",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "spot" => Some(CapacityType::Spot),
            "on_demand" => Some(CapacityType::OnDemand),
            _ => None,
        }
    }
}

/// A machine size and the pool's model's throughput on it (its profile).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceType {
    /// Engine threads per replica on the `local` provider (0: `engine.threads`).
    pub threads: u32,
    /// Prompt tokens per second one replica prefills.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second summed over the batch, at batch sizes
    /// 1, 2, … (the last entry is the replica's full batch).
    pub decode_tokens_per_s: Vec<f64>,
    /// Seconds from launch until a replica of this type serves (machine
    /// boot, image, weights), for the simulated cloud; unset: its default.
    pub launch_secs: Option<f64>,
    /// GPUs one replica of this type uses: on Kubernetes its engine Pods
    /// ask for as many `nvidia.com/gpu` (0: `kubernetes.engine_gpus`), so
    /// the fleet `strata simulate` plans is the one that is deployed.
    pub gpus: u32,
}

impl Default for InstanceType {
    /// Gemma 3 270M Q4_K_M with 2 threads on a 2-core machine, as measured
    /// in bench/results/engine.md (decode at 1, 4 and 8 streams; between them
    /// interpolated) and bench/results/stateful.md (prefill).
    fn default() -> Self {
        InstanceType {
            threads: 0,
            prefill_tokens_per_s: 480.0,
            decode_tokens_per_s: vec![40.7, 55.0, 70.0, 82.1, 86.0, 90.0, 94.0, 96.9],
            launch_secs: None,
            gpus: 0,
        }
    }
}

impl InstanceType {
    /// Tokens per second one replica serves at full batch when a share
    /// `prompt_share` (0–1) of the tokens are prompt tokens.
    pub fn tokens_per_s(&self, prompt_share: f64) -> f64 {
        let p = prompt_share.clamp(0.0, 1.0);
        let decode = self.decode_tokens_per_s.last().copied().unwrap_or(0.0);
        if self.prefill_tokens_per_s <= 0.0 || decode <= 0.0 {
            return 0.0;
        }
        1.0 / (p / self.prefill_tokens_per_s + (1.0 - p) / decode)
    }
}

/// One way to get a replica: an instance type in a zone, spot or on demand.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Offering {
    pub instance_type: String,
    pub zone: String,
    pub capacity: CapacityType,
    /// Dollars per hour while the instance runs.
    pub price_per_hour: f64,
}

impl Default for Offering {
    /// This machine, on demand, at a placeholder price: set your own.
    fn default() -> Self {
        Offering {
            instance_type: LOCAL_TYPE.into(),
            zone: "local".into(),
            capacity: CapacityType::OnDemand,
            price_per_hour: 0.10,
        }
    }
}

/// A pool: one model's interchangeable replicas and their autoscaling.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Let the autoscaler set the shared replica count (`strata serve`);
    /// otherwise `serve.replicas` stay up.
    pub autoscale: bool,
    /// Instance types the planner may use (names in `instance_types`;
    /// empty: every type in the catalog). The first is the unit the
    /// autoscaler counts replicas in.
    pub instance_types: Vec<String>,
    /// Spot, on demand, or both.
    pub capacity_types: Vec<CapacityType>,
    /// Zones the planner may use (empty: every zone in the catalog).
    pub zones: Vec<String>,
    /// Spot replicas beyond the demand, as a hedge against preemption.
    pub spot_hedge: u32,
    /// A zone whose spot replica was preempted gets no new spot replica for
    /// this long; an on-demand offer that refused a launch (on Kubernetes:
    /// no node for its Pod) gets no more replicas than it holds.
    pub spot_cooldown_secs: f64,
    /// Spot is spread over the zones whose cheapest spot costs at most this
    /// share more per token than the cheapest zone's; dearer zones get spot
    /// only when those have no room.
    pub spot_zone_premium: f64,
    /// At most this share of the pool's replicas on one zone's spot (a
    /// zone reclaims all of them at once); the rest on demand. 1: no limit.
    pub spot_max_zone_share: f64,
    /// A zone that reclaimed a spot replica (or refused a launch) within
    /// this long holds at most `spot_hedge` spot replicas, when its spot
    /// type launches slower than `preemption_notice_secs` (a reclaim there
    /// leaves a gap no replacement can fill in time): the hedge then
    /// covers losing it, and the rest goes to calmer zones or on demand.
    /// 0: off.
    pub spot_risk_window_secs: f64,
    /// Spot replicas the controller may add beyond what the autoscaler
    /// asks for, to work off a Batch API backlog sooner (0: none). Spot
    /// only: where it has none, the backlog waits for idle slots.
    pub batch_spot_max_replicas: u32,
    /// ... only from spot offers that cost at most this share of the
    /// cheapest on-demand offer per token (spot is cheap then), (0, 1].
    pub batch_spot_price_share: f64,
    /// ... one for each this many seconds of full-load work in the
    /// backlog, so each has work for longer than its launch.
    pub batch_spot_work_secs: f64,
    /// Service-level objectives: p95 time to first token, and p95 time per
    /// output token, in milliseconds. Missed while requests wait: one more replica.
    pub slo_ttft_p95_ms: Option<f64>,
    pub slo_tpot_p95_ms: Option<f64>,
    /// Warning a preempted replica gets before its machine goes (drain time).
    pub preemption_notice_secs: f64,
    /// A reclaimed replica keeps taking requests until this long before
    /// its machine goes, then drains (its requests finish or move on, its
    /// sessions' KV cache is kept); its replacement starts at the notice
    /// either way. Absent: it drains from the notice on. The `local`
    /// provider (`strata serve`, a local cluster), and on Kubernetes
    /// against `kubernetes.preemption_notice_secs` (the engine Pods that
    /// `strata k8s render` makes outlast their eviction; docs/cluster.md).
    pub preemption_drain_secs: Option<f64>,
    /// Emulated spot reclaims on the `local` provider: spot replicas
    /// preempted at random, this many per replica-hour (0: none).
    pub random_preemptions_per_hour: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Share of a replica's measured token capacity to plan for, (0, 1].
    pub target_utilisation: f64,
    /// Mean demand over this window sets the replica count.
    pub stable_window_secs: f64,
    /// A burst over this shorter window scales up at once.
    pub panic_window_secs: f64,
    /// The burst must ask for this many times the current replicas.
    pub panic_threshold: f64,
    /// Scale down only to the most asked for during this long.
    pub scale_down_delay_secs: f64,
    /// No request for this long: zero replicas (absent: never).
    pub scale_to_zero_after_secs: Option<f64>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            autoscale: false,
            instance_types: Vec::new(),
            capacity_types: vec![CapacityType::Spot, CapacityType::OnDemand],
            zones: Vec::new(),
            spot_hedge: 0,
            spot_cooldown_secs: 300.0,
            spot_zone_premium: 0.25,
            spot_max_zone_share: 1.0,
            spot_risk_window_secs: 0.0,
            batch_spot_max_replicas: 0,
            batch_spot_price_share: 0.5,
            batch_spot_work_secs: 900.0,
            slo_ttft_p95_ms: None,
            slo_tpot_p95_ms: None,
            preemption_notice_secs: 30.0,
            preemption_drain_secs: None,
            random_preemptions_per_hour: 0.0,
            min_replicas: 1,
            max_replicas: 4,
            target_utilisation: 0.7,
            stable_window_secs: 60.0,
            panic_window_secs: 6.0,
            panic_threshold: 2.0,
            scale_down_delay_secs: 120.0,
            scale_to_zero_after_secs: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub prompt_per_million: f64,
    pub completion_per_million: f64,
}

impl ModelPrice {
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.prompt_per_million
            + completion_tokens as f64 * self.completion_per_million)
            / 1e6
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// File holding the platform admin key (`sk-strata-...`); without it, a
    /// key is generated at first start and printed once.
    pub admin_key_file: Option<PathBuf>,
    /// File holding the key-encryption key as 64 hex characters; `STRATA_KEK`
    /// overrides it; with neither, one is generated beside the database.
    pub kek_file: Option<PathBuf>,
    /// Where each gateway appends keyed checkpoints of the audit trail's
    /// head (JSON lines), outside the database; `strata audit verify
    /// --checkpoints` reads them. Without it they go to the log only.
    pub audit_checkpoint_file: Option<PathBuf>,
    /// Seconds between checkpoints (default 60; 0: none).
    pub audit_checkpoint_secs: Option<f64>,
    /// Keep the KEK after a tenant is deleted (default: a KEK in a file is
    /// replaced by a new one, the survivors' data keys re-wrapped, so a
    /// backup from before the deletion does not open with the KEK in use).
    /// For several gateways sharing one KEK file, which must then restart.
    pub keep_kek_on_shred: bool,
    /// Where models deployed through the admin API may come from: URL
    /// prefixes ending in `/` (`https://models.internal/`,
    /// `s3://bucket/models/`) and directories (`/srv/models`). Empty: any
    /// URL the machine reaches and any file it can read. Built-in sources
    /// and the config file's own models are always allowed.
    pub model_sources: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address the gateway listens on.
    pub listen: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// External OpenAI-compatible replicas (`strata gateway`).
    pub replicas: Vec<String>,
    /// Seconds between health checks of each replica.
    pub health_interval_secs: f64,
    /// Seconds to wait for a replica's response headers before trying another.
    pub connect_timeout_secs: f64,
    /// Requests one replica takes at once; beyond, requests wait in the fair
    /// queue. Match the engine's `max_sequences`.
    pub slots_per_replica: u32,
    /// Requests one tenant may have waiting before more get 429.
    pub max_waiting_per_tenant: u32,
    /// Background responses' event streams (`GET /v1/responses/{id}?stream=true`)
    /// one tenant may hold open at once on one gateway; more get 429.
    pub max_resumed_streams_per_tenant: u32,
    /// Seconds a request may wait in the fair queue before it gets 429.
    pub queue_timeout_secs: f64,
    /// PEM certificate chain; with `tls_key_file`, the gateway serves HTTPS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse plain HTTP (needs certificates, or `--tls-self-signed`).
    pub require_tls: bool,
    /// How a request without a session picks its replica.
    pub routing: Routing,
    /// `redis://host:port/db` where every gateway of a cluster keeps the
    /// rate limits (exact across gateways); unset: each gateway limits alone.
    pub shared_limits_url: Option<String>,
    /// Seconds a tenant's month spend, read from a shared (PostgreSQL)
    /// ledger, is trusted before it is read again.
    pub budget_refresh_secs: f64,
    /// Label the generation metrics (requests, cost) with the tenant id:
    /// one series per tenant, so off by default.
    pub metrics_tenant_labels: bool,
    /// Largest file `POST /v1/files` takes, in bytes.
    pub max_file_bytes: usize,
    /// What a batch's tokens cost less than the same tokens asked for
    /// interactively (0.5: half price), in the ledger and budgets.
    pub batch_discount: f64,
    /// Lines of one batch waiting for or holding a slot at once.
    pub batch_lines_in_flight: u32,
    /// Share of each pool's slots (rounded down) that waiting batch lines
    /// get first and interactive requests never preempt, so a batch
    /// finishes under constant interactive load; 0 gives batches only the
    /// slots interactive work leaves.
    pub batch_reserved_share: f64,
}

/// `prefix`: where the longest prefix of the prompt went before (its KV
/// cache is likely still there), within bounded imbalance; `least_load`:
/// by outstanding tokens only. Sessions stick to their replica either way.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    #[default]
    Prefix,
    LeastLoad,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 4 * 1024 * 1024,
            replicas: Vec::new(),
            health_interval_secs: 1.0,
            connect_timeout_secs: 5.0,
            slots_per_replica: 8,
            max_waiting_per_tenant: 256,
            max_resumed_streams_per_tenant: 16,
            queue_timeout_secs: 60.0,
            tls_cert_file: None,
            tls_key_file: None,
            require_tls: false,
            routing: Routing::Prefix,
            shared_limits_url: None,
            budget_refresh_secs: 5.0,
            metrics_tenant_labels: false,
            max_file_bytes: 64 * 1024 * 1024,
            batch_discount: 0.5,
            batch_lines_in_flight: 32,
            batch_reserved_share: 0.125,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// GGUF file; empty means the default path of `strata model fetch`.
    pub model: Option<PathBuf>,
    /// Model id clients send; empty means the file name without `.gguf`.
    pub model_name: Option<String>,
    /// Tokens of KV cache shared by all sequences; also the longest request.
    pub context_size: u32,
    /// Sequences decoded together in one batch.
    pub max_sequences: u32,
    /// Requests waiting for a sequence slot before new ones get 429.
    pub max_queue: u32,
    /// CPU threads per engine process; 0 picks cores / replicas.
    pub threads: u32,
    /// Most prompt tokens one sequence prefills per step, so running streams
    /// keep flowing while a long prompt is read.
    pub prefill_chunk: u32,
    /// The longest step while sequences decode, in milliseconds: a step
    /// reads only as many prompt tokens (up to `prefill_chunk`) as its cost,
    /// measured as the engine runs, lets it finish within this. 0: 80% of
    /// `pool.slo_tpot_p95_ms` where set, else every step reads
    /// `prefill_chunk`.
    pub step_budget_ms: f64,
    /// Batch-class sequences (Batch API lines) that decode in a step beside
    /// interactive ones; none while an interactive prompt is read, and every
    /// 8th step that held batch work back is the batch's.
    pub batch_beside_interactive: u32,
    /// `max_tokens` of a chat request that gives none.
    pub default_max_tokens: u32,
    /// Finished sequences whose KV cells are kept for prefix reuse by later
    /// requests of the same tenant (within `context_size`); 0 turns reuse off.
    pub prefix_cache_entries: u32,
    /// Largest request body accepted by the engine server, in bytes.
    pub max_body_bytes: usize,
    /// Which server the replicas run: `strata` (its own llama.cpp engine)
    /// or `openai` (any OpenAI-compatible server, from `command`).
    pub kind: EngineKind,
    /// `openai`: the server's command line, one argument per item, with
    /// `{model_path}`, `{model}`, `{host}`, `{port}`, `{threads}` and
    /// `{api_key}` filled in for each replica (no shell).
    pub command: Vec<String>,
    /// `openai`: the server's environment beside strata's own, its values
    /// filled in alike (`{ API_KEY = "{api_key}" }`: a key in the
    /// environment is not shown to every process as its arguments are).
    pub env: BTreeMap<String, String>,
    /// `openai`: the path that answers 200 (to the pool's API key) once
    /// the server takes requests.
    pub ready_path: String,
    /// `openai`: what the server does, which decides what strata relies on.
    pub capabilities: Capabilities,
    /// `openai` on Kubernetes: the container image that holds the server
    /// (e.g. vLLM's or SGLang's); `command` is run in it.
    pub image: Option<String>,
}

/// A replica's values for the placeholders of an `openai` engine's
/// `command` and `env`.
pub struct Placeholders<'a> {
    pub model_path: &'a str,
    pub model: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub threads: u32,
    pub api_key: &'a str,
}

impl Placeholders<'_> {
    /// `template` with each placeholder replaced by its value.
    pub fn fill(&self, template: &str) -> String {
        template
            .replace("{model_path}", self.model_path)
            .replace("{model}", self.model)
            .replace("{host}", self.host)
            .replace("{port}", &self.port.to_string())
            .replace("{threads}", &self.threads.to_string())
            .replace("{api_key}", self.api_key)
    }
}

/// The `[engine]` keys that say which program runs and what strata relies
/// on of it: the config file's alone (not a deployed model's).
pub const ENGINE_KIND_KEYS: [&str; 6] = [
    "kind",
    "command",
    "env",
    "ready_path",
    "capabilities",
    "image",
];

/// Why a model deployed beside the config file's (admin API, database)
/// may not be served as it is: it sets one of `ENGINE_KIND_KEYS`.
pub fn deployed_engine_issue(entry: &ModelEntry) -> Option<ConfigIssue> {
    let key = ENGINE_KIND_KEYS
        .iter()
        .find(|k| entry.engine.contains_key(**k))?;
    Some(ConfigIssue {
        key: format!("model.engine.{key}"),
        message: "is set in the config file only: a deployed model runs the engine the file \
                  describes"
            .into(),
    })
}

/// Which server a model's replicas run.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// `strata engine`: tenant-scoped prefix cache, KV snapshots, answers
    /// continued after a failure, usage in streams, mutual TLS.
    #[default]
    Strata,
    /// Any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server,
    /// llama-cpp-python's, TGI), reached with an API key strata makes per
    /// pool; no KV snapshots (a moved session is prefilled again).
    Openai,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Strata => "strata",
            EngineKind::Openai => "openai",
        }
    }
}

/// What an `openai` engine does (the `strata` engine does all of it, with
/// its prefix cache scoped per tenant).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Capabilities {
    /// The server reuses a cached prompt prefix for any later request,
    /// whoever sent it (llama-cpp-python always; vLLM and SGLang unless
    /// their prefix cache is turned off by their launch args): one tenant's
    /// prompts would show in another's latency. Such a model serves one
    /// tenant (its entry's `tenant`). `false`: the launch args turn it off.
    pub shared_prefix_cache: bool,
    /// The server takes `continue_final_message` (vLLM, SGLang): an answer
    /// cut short by a failed replica continues on another. Otherwise the
    /// stream ends with an error event.
    pub continue_final_message: bool,
    /// The server schedules by a request's `priority` field (vLLM with
    /// `--scheduling-policy priority`, lower values first; SGLang with
    /// `--enable-priority-scheduling`): Batch API lines are sent with this
    /// value, interactive requests with none (the server's default). Unset:
    /// no `priority` is sent (vLLM refuses one under its default policy).
    pub batch_priority: Option<i64>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            shared_prefix_cache: true,
            continue_final_message: false,
            batch_priority: None,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model: None,
            model_name: None,
            context_size: 8192,
            max_sequences: 8,
            max_queue: 64,
            threads: 0,
            prefill_chunk: 256,
            step_budget_ms: 0.0,
            batch_beside_interactive: 2,
            default_max_tokens: 512,
            prefix_cache_entries: 32,
            max_body_bytes: 4 * 1024 * 1024,
            kind: EngineKind::Strata,
            command: Vec::new(),
            env: BTreeMap::new(),
            ready_path: "/v1/models".into(),
            capabilities: Capabilities::default(),
            image: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Engine processes `strata serve` keeps running.
    pub replicas: u32,
    /// Seconds a new engine process may take to become healthy.
    pub startup_timeout_secs: f64,
    /// Extra replicas reserved for `dedicated` tenants, by tenant name.
    pub dedicated: BTreeMap<String, u32>,
    /// Gateway and replicas talk mutual TLS with certificates strata makes
    /// (a private CA in `replica_tls_dir`). Off, they talk plain HTTP and
    /// the gateway proves itself with a replica token
    /// (`STRATA_REPLICA_TOKEN`, or one made for the run by `strata serve`).
    pub replica_mtls: bool,
    /// Where the replica CA and certificates are (made there once by
    /// `strata serve` and a local controller; read by `strata gateway`).
    /// Default `<data>/tls/replicas`.
    pub replica_tls_dir: Option<PathBuf>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            replicas: 2,
            startup_timeout_secs: 120.0,
            dedicated: BTreeMap::new(),
            replica_mtls: true,
            replica_tls_dir: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite database file; its directory also holds the keyring, a
    /// generated KEK and TLS material, whichever database is used.
    pub path: PathBuf,
    /// A PostgreSQL URL (`postgres://…`): use PostgreSQL instead of `path`.
    pub url: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("./data/strata.db"),
            url: None,
        }
    }
}

impl StoreConfig {
    /// The database to open: `--db` (a file or a PostgreSQL URL) if given,
    /// else `url`, else `path`.
    pub fn database(&self, flag: Option<&PathBuf>) -> String {
        match (flag, &self.url) {
            (Some(db), _) => db.to_string_lossy().into_owned(),
            (None, Some(url)) => url.clone(),
            (None, None) => self.path.to_string_lossy().into_owned(),
        }
    }

    /// Where strata keeps its files: the directory of the SQLite database
    /// in use, or of `path` when the database is PostgreSQL.
    /// Where the replica certificates are: `serve.replica_tls_dir`, else
    /// `<data>/tls/replicas`.
    pub fn replica_tls_dir(&self, serve: &ServeConfig, flag: Option<&PathBuf>) -> PathBuf {
        serve
            .replica_tls_dir
            .clone()
            .unwrap_or_else(|| self.data_dir(flag).join("tls").join("replicas"))
    }

    pub fn data_dir(&self, flag: Option<&PathBuf>) -> PathBuf {
        let file = match flag {
            Some(db) if !is_postgres_url(&db.to_string_lossy()) => db,
            _ => &self.path,
        };
        file.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf()
    }
}

/// A Kubernetes DNS label: lower-case letters, digits and `-`, starting and
/// ending with a letter or digit, at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `db` names a PostgreSQL database (a URL) rather than a SQLite file.
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// One thing wrong with a config, named by its key (`engine.max_sequences`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl Config {
    /// Parses TOML; a syntax error or unknown key is one issue naming its place.
    /// The catalog entries the pool may use, in catalog order.
    pub fn pool_offerings(&self) -> Vec<&Offering> {
        let p = &self.pool;
        self.catalog
            .iter()
            .filter(|o| self.instance_types.contains_key(&o.instance_type))
            .filter(|o| p.instance_types.is_empty() || p.instance_types.contains(&o.instance_type))
            .filter(|o| p.capacity_types.contains(&o.capacity))
            .filter(|o| p.zones.is_empty() || p.zones.contains(&o.zone))
            .collect()
    }

    /// The instance type the autoscaler counts replicas in: the pool's
    /// first allowed type, else the first offered one.
    pub fn unit_type(&self) -> Option<(&str, &InstanceType)> {
        let name = self
            .pool
            .instance_types
            .first()
            .or_else(|| self.pool_offerings().first().map(|o| &o.instance_type))?;
        self.instance_types
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
    }

    /// The models to serve, in order (the first is the default model:
    /// `serve.dedicated` replicas and command-line engine flags are its).
    /// Without `[[models]]`, the one model of `[engine]` and `[pool]`.
    /// Aliases are not served (see `aliases`).
    pub fn served(&self) -> Result<Vec<ServedModel>, ConfigIssue> {
        if self.models.is_empty() {
            return Ok(vec![ServedModel {
                id: None,
                source: None,
                url: None,
                sha256: None,
                tenant: None,
                config: self.clone(),
            }]);
        }
        self.models
            .iter()
            .enumerate()
            .filter(|(_, entry)| !entry.is_alias())
            .map(|(i, entry)| self.serve_entry(i, entry))
            .collect()
    }

    /// The aliases of `[[models]]`: each id with its models by weight.
    pub fn aliases(&self) -> Vec<(String, BTreeMap<String, u32>)> {
        self.models
            .iter()
            .filter(|m| m.is_alias())
            .map(|m| (m.id.clone(), m.alias.clone()))
            .collect()
    }

    /// A model deployed beside the file's (through the admin API), served
    /// with the file's sections under its own keys as any entry but the
    /// first is.
    /// It may not choose what runs on the machine: the engine's kind,
    /// command and environment (and what strata relies on of it) are the
    /// config file's alone, so neither an admin key nor a row written into
    /// the database can start a program of its choosing.
    pub fn served_entry(&self, entry: &ModelEntry) -> Result<ServedModel, ConfigIssue> {
        if let Some(issue) = deployed_engine_issue(entry) {
            return Err(issue);
        }
        self.serve_entry(self.models.len().max(1), entry)
    }

    /// What is wrong with `entry` as one more model of this file's catalog
    /// (its id, source, keys and the pool and engine they make).
    pub fn entry_issues(&self, entry: &ModelEntry) -> Vec<ConfigIssue> {
        let mut with = self.clone();
        with.models.push(entry.clone());
        let at = format!("models[{}]", with.models.len() - 1);
        let mut issues = Issues::default();
        with.check_models(&mut issues);
        issues
            .0
            .into_iter()
            .filter(|i| i.key.starts_with(&at))
            .map(|i| ConfigIssue {
                key: i.key.replacen(&at, "model", 1),
                message: i.message,
            })
            .collect()
    }

    fn serve_entry(&self, i: usize, entry: &ModelEntry) -> Result<ServedModel, ConfigIssue> {
        let at = |section: &str, e: &dyn std::fmt::Display| ConfigIssue {
            key: format!("models[{i}].{section}"),
            message: e.to_string(),
        };
        let mut config = self.clone();
        config.models.clear();
        config.engine = overlay(&self.engine, &entry.engine).map_err(|e| at("engine", &e))?;
        config.pool = overlay(&self.pool, &entry.pool).map_err(|e| at("pool", &e))?;
        for (name, keys) in &entry.instance_types {
            let key = format!("instance_types.{name}");
            let Some(keys) = keys.as_table() else {
                return Err(at(&key, &"must be a table of profile keys"));
            };
            let base = self.instance_types.get(name).cloned().unwrap_or_default();
            let own = overlay(&base, keys).map_err(|e| at(&key, &e))?;
            config.instance_types.insert(name.clone(), own);
        }
        config.engine.model_name = Some(entry.id.clone());
        if let Some(path) = &entry.path {
            config.engine.model = Some(path.clone());
        }
        if let Some(replicas) = entry.replicas {
            config.serve.replicas = replicas;
        }
        if let Some(price) = entry.price {
            config.pricing.insert(entry.id.clone(), price);
        }
        // Dedicated tenants' replicas run the default model.
        if i > 0 {
            config.serve.dedicated.clear();
        }
        Ok(ServedModel {
            id: Some(entry.id.clone()),
            source: entry.source.clone(),
            url: entry.url.clone(),
            sha256: entry.sha256.clone(),
            tenant: entry.tenant.clone(),
            config,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigIssue> {
        toml::from_str(text).map_err(|e| ConfigIssue {
            key: e
                .span()
                .map(|s| key_at(text, s.start))
                .unwrap_or_else(|| "(file)".into()),
            // Some parse errors carry no message of their own (a control
            // character in a comment); the whole report names line and column.
            message: match e.message().trim() {
                "" => e.to_string().trim().replace('\n', " "),
                m => m.to_owned(),
            },
        })
    }

    /// Every value that parses but cannot work, section by section.
    pub fn check(&self) -> Vec<ConfigIssue> {
        let mut issues = Issues::default();
        self.check_gateway(&mut issues);
        self.check_kubernetes(&mut issues);
        self.check_pricing(&mut issues);
        self.check_instance_types(&mut issues);
        self.check_catalog(&mut issues);
        self.check_pool(&mut issues);
        self.check_engine(&mut issues);
        if self
            .security
            .audit_checkpoint_secs
            .is_some_and(|secs| !seconds(secs, 0.0))
        {
            issues.bad(
                "security.audit_checkpoint_secs",
                "must be from 0 (none) to a year (seconds)".into(),
            );
        }
        let e = &self.engine;
        if self.models.is_empty()
            && e.kind == EngineKind::Openai
            && e.capabilities.shared_prefix_cache
        {
            issues.bad(
                "engine.capabilities.shared_prefix_cache",
                "an engine that shares its prefix cache across requests serves one tenant: \
                 declare the model in [[models]] with `tenant`, or turn the cache off in its \
                 command and set this to false"
                    .into(),
            );
        }
        self.check_serve(&mut issues);
        self.check_models(&mut issues);
        for (i, place) in self.security.model_sources.iter().enumerate() {
            let dir = place.starts_with('/');
            let prefix = ["http://", "https://", "s3://"]
                .iter()
                .any(|s| place.starts_with(s) && place.len() > s.len() && place.ends_with('/'));
            if !dir && !prefix {
                issues.bad(
                    &format!("security.model_sources[{i}]"),
                    "must be a directory (/srv/models) or a URL prefix ending in / (https://host/models/)".into(),
                );
            }
        }
        if self.store.path.as_os_str().is_empty() {
            issues.bad("store.path", "must not be empty".into());
        }
        issues.0
    }

    /// `[gateway]`.
    fn check_gateway(&self, issues: &mut Issues) {
        let g = &self.gateway;
        if g.listen.parse::<SocketAddr>().is_err() {
            issues.bad(
                "gateway.listen",
                format!("`{}` is not an address like 127.0.0.1:8080", g.listen),
            );
        }
        if g.max_body_bytes < 1024 {
            issues.bad("gateway.max_body_bytes", "must be at least 1024".into());
        }
        if g.max_file_bytes < 1024 {
            issues.bad("gateway.max_file_bytes", "must be at least 1024".into());
        }
        if !(0.0..1.0).contains(&g.batch_discount) {
            issues.bad(
                "gateway.batch_discount",
                format!(
                    "{} is not a share from 0 up to (not including) 1",
                    g.batch_discount
                ),
            );
        }
        if !(0.0..=0.5).contains(&g.batch_reserved_share) {
            issues.bad(
                "gateway.batch_reserved_share",
                format!(
                    "{} is not a share from 0 to 0.5 (interactive work keeps at least half)",
                    g.batch_reserved_share
                ),
            );
        }
        if g.max_resumed_streams_per_tenant == 0 {
            issues.bad(
                "gateway.max_resumed_streams_per_tenant",
                "must be at least 1".into(),
            );
        }
        if g.batch_lines_in_flight == 0 {
            issues.bad("gateway.batch_lines_in_flight", "must be at least 1".into());
        }
        for (i, replica) in g.replicas.iter().enumerate() {
            // `TENANT=URL` reserves the replica for a dedicated tenant.
            let url = match replica.split_once('=') {
                Some((tenant, url)) if !tenant.contains("://") => url,
                _ => replica,
            };
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                issues.bad(
                    &format!("gateway.replicas[{i}]"),
                    format!("`{url}` must start with http:// or https://"),
                );
            }
        }
        if !positive(g.health_interval_secs) {
            issues.bad(
                "gateway.health_interval_secs",
                "must be greater than 0 and at most a year (seconds)".into(),
            );
        }
        if !positive(g.connect_timeout_secs) {
            issues.bad(
                "gateway.connect_timeout_secs",
                "must be greater than 0 and at most a year (seconds)".into(),
            );
        }
        if g.slots_per_replica == 0 {
            issues.bad("gateway.slots_per_replica", "must be at least 1".into());
        }
        if g.max_waiting_per_tenant == 0 {
            issues.bad(
                "gateway.max_waiting_per_tenant",
                "must be at least 1".into(),
            );
        }
        if !positive(g.queue_timeout_secs) {
            issues.bad(
                "gateway.queue_timeout_secs",
                "must be greater than 0 and at most a year (seconds)".into(),
            );
        }
        if let Some(url) = &g.shared_limits_url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                issues.bad(
                    "gateway.shared_limits_url",
                    format!("`{url}` is not a redis:// or rediss:// URL"),
                );
            }
        }
        if !positive(g.budget_refresh_secs) {
            issues.bad(
                "gateway.budget_refresh_secs",
                "must be greater than 0 and at most a year (seconds)".into(),
            );
        }
        if g.tls_cert_file.is_some() != g.tls_key_file.is_some() {
            issues.bad(
                "gateway.tls_cert_file",
                "give both tls_cert_file and tls_key_file, or neither".into(),
            );
        }
    }

    /// `[kubernetes]`.
    fn check_kubernetes(&self, issues: &mut Issues) {
        let k = &self.kubernetes;
        if !is_dns_label(&k.namespace) {
            issues.bad(
                "kubernetes.namespace",
                format!(
                    "`{}` is not a DNS label (a-z, 0-9, -; at most 63)",
                    k.namespace
                ),
            );
        }
        if k.image.trim().is_empty() {
            issues.bad("kubernetes.image", "must name a container image".into());
        }
        for (key, name) in [
            ("kubernetes.model_pvc", &k.model_pvc),
            ("kubernetes.model_fetch_secret", &k.model_fetch_secret),
        ] {
            let bad = |n: &str| n.len() > 253 || !n.split('.').all(is_dns_label);
            if name.as_deref().is_some_and(bad) {
                issues.bad(key, "must name an object (a-z, 0-9, - and .)".into());
            }
        }
        if k.engine_port == 0 {
            issues.bad("kubernetes.engine_port", "must be a port (1-65535)".into());
        }
        if k.gateway_replicas == 0 || k.gateway_max_replicas < k.gateway_replicas {
            issues.bad(
                "kubernetes.gateway_max_replicas",
                "gateway_replicas must be at least 1 and at most gateway_max_replicas".into(),
            );
        }
        if k.controller_replicas == 0 {
            issues.bad(
                "kubernetes.controller_replicas",
                "must be at least 1".into(),
            );
        }
        if !positive(k.preemption_notice_secs) {
            issues.bad(
                "kubernetes.preemption_notice_secs",
                "must be greater than 0 and at most a year (seconds)".into(),
            );
        }
        if !positive(k.schedule_timeout_secs) {
            issues.bad(
                "kubernetes.schedule_timeout_secs",
                "must be greater than 0 and at most a year (seconds)".into(),
            );
        }
        let before_schedule =
            positive(k.schedule_timeout_secs) && k.start_timeout_secs < k.schedule_timeout_secs;
        if !positive(k.start_timeout_secs) || before_schedule {
            issues.bad(
                "kubernetes.start_timeout_secs",
                "must be at least schedule_timeout_secs and at most a year (seconds)".into(),
            );
        }
    }

    /// `[pricing.MODEL]`.
    fn check_pricing(&self, issues: &mut Issues) {
        for (model, price) in &self.pricing {
            for (field, v) in [
                ("prompt_per_million", price.prompt_per_million),
                ("completion_per_million", price.completion_per_million),
            ] {
                if !v.is_finite() || v < 0.0 {
                    issues.bad(
                        &format!("pricing.{model}.{field}"),
                        "must be a price of 0 or more".into(),
                    );
                }
            }
        }
    }

    /// `[instance_types.NAME]`.
    fn check_instance_types(&self, issues: &mut Issues) {
        for (name, t) in &self.instance_types {
            if !at_least(t.prefill_tokens_per_s, f64::MIN_POSITIVE) {
                issues.bad(
                    &format!("instance_types.{name}.prefill_tokens_per_s"),
                    "must be positive".into(),
                );
            }
            // A replica may be several engines behind one endpoint (eight
            // GPUs of one machine), so more than one engine's 256 sequences.
            if t.decode_tokens_per_s.is_empty()
                || t.decode_tokens_per_s.len() > 2048
                || !t
                    .decode_tokens_per_s
                    .iter()
                    .all(|&v| at_least(v, f64::MIN_POSITIVE))
            {
                issues.bad(
                    &format!("instance_types.{name}.decode_tokens_per_s"),
                    "must list 1 to 2048 positive rates (batch 1, 2, ...)".into(),
                );
            }
            if t.launch_secs
                .is_some_and(|v| !(at_least(v, 0.0) && v <= 86_400.0))
            {
                issues.bad(
                    &format!("instance_types.{name}.launch_secs"),
                    "must be between 0 and 86400 seconds".into(),
                );
            }
        }
    }

    /// `[[catalog]]`: offers of known instance types.
    fn check_catalog(&self, issues: &mut Issues) {
        for (i, o) in self.catalog.iter().enumerate() {
            if !self.instance_types.contains_key(&o.instance_type) {
                issues.bad(
                    &format!("catalog[{i}].instance_type"),
                    format!("`{}` is not in instance_types", o.instance_type),
                );
            }
            if o.zone.trim().is_empty() {
                issues.bad(&format!("catalog[{i}].zone"), "must not be empty".into());
            }
            if !at_least(o.price_per_hour, 0.0) {
                issues.bad(
                    &format!("catalog[{i}].price_per_hour"),
                    "must be a price of 0 or more".into(),
                );
            }
        }
    }

    /// `[pool]`, and that the catalog offers it something.
    fn check_pool(&self, issues: &mut Issues) {
        let p = &self.pool;
        if p.max_replicas == 0 || p.min_replicas > p.max_replicas {
            issues.bad(
                "pool.max_replicas",
                format!(
                    "must be at least 1 and at least min_replicas ({})",
                    p.min_replicas
                ),
            );
        }
        if !(p.target_utilisation > 0.0 && p.target_utilisation <= 1.0) {
            issues.bad("pool.target_utilisation", "must be in (0, 1]".into());
        }
        if !positive(p.stable_window_secs) {
            issues.bad(
                "pool.stable_window_secs",
                "must be greater than 0 and at most a year (seconds)".into(),
            );
        }
        if !(p.panic_window_secs > 0.0 && p.panic_window_secs <= p.stable_window_secs) {
            issues.bad(
                "pool.panic_window_secs",
                "must be positive and at most stable_window_secs".into(),
            );
        }
        for name in &p.instance_types {
            if !self.instance_types.contains_key(name) {
                issues.bad(
                    "pool.instance_types",
                    format!("`{name}` is not in instance_types"),
                );
            }
        }
        if p.capacity_types.is_empty() {
            issues.bad(
                "pool.capacity_types",
                "must allow spot, on_demand or both".into(),
            );
        }
        if self.pool_offerings().is_empty() {
            issues.bad(
            "catalog",
            "offers nothing the pool may use (check pool.instance_types, capacity_types and zones)"
                .into(),
        );
        }
        for (key, v) in [
            ("pool.slo_ttft_p95_ms", p.slo_ttft_p95_ms),
            ("pool.slo_tpot_p95_ms", p.slo_tpot_p95_ms),
        ] {
            if v.is_some_and(|v| !at_least(v, f64::MIN_POSITIVE)) {
                issues.bad(key, "must be positive".into());
            }
        }
        for (key, secs) in [
            ("pool.spot_cooldown_secs", p.spot_cooldown_secs),
            ("pool.spot_risk_window_secs", p.spot_risk_window_secs),
        ] {
            // A duration: an infinite one would panic where it is read.
            if !(0.0..=YEAR_SECS).contains(&secs) {
                issues.bad(key, "must be from 0 to a year (seconds)".into());
            }
        }
        if !(p.spot_max_zone_share > 0.0 && p.spot_max_zone_share <= 1.0) {
            issues.bad("pool.spot_max_zone_share", "must be in (0, 1]".into());
        }
        if !(p.batch_spot_price_share > 0.0 && p.batch_spot_price_share <= 1.0) {
            issues.bad("pool.batch_spot_price_share", "must be in (0, 1]".into());
        }
        if !seconds(p.batch_spot_work_secs, 1.0) {
            issues.bad(
                "pool.batch_spot_work_secs",
                "must be from 1 to a year (seconds)".into(),
            );
        }
        if !at_least(p.spot_zone_premium, 0.0) {
            issues.bad("pool.spot_zone_premium", "must not be negative".into());
        }
        if !seconds(p.preemption_notice_secs, 0.0) {
            issues.bad(
                "pool.preemption_notice_secs",
                "must be from 0 to a year (seconds)".into(),
            );
        }
        if p.preemption_drain_secs
            .is_some_and(|s| !(0.0..=3600.0).contains(&s))
        {
            issues.bad(
                "pool.preemption_drain_secs",
                "must be from 0 to 3600 (seconds)".into(),
            );
        }
        if !at_least(p.random_preemptions_per_hour, 0.0) {
            issues.bad(
                "pool.random_preemptions_per_hour",
                "must not be negative".into(),
            );
        }
        if !at_least(p.panic_threshold, 1.0) {
            issues.bad("pool.panic_threshold", "must be at least 1".into());
        }
        if !seconds(p.scale_down_delay_secs, 0.0) {
            issues.bad(
                "pool.scale_down_delay_secs",
                "must be from 0 to a year (seconds)".into(),
            );
        }
        if p.scale_to_zero_after_secs.is_some_and(|s| !positive(s)) {
            issues.bad(
                "pool.scale_to_zero_after_secs",
                "must be greater than 0 and at most a year (seconds)".into(),
            );
        }
    }

    /// `[engine]`.
    fn check_engine(&self, issues: &mut Issues) {
        let e = &self.engine;
        if e.context_size < 64 {
            issues.bad("engine.context_size", "must be at least 64".into());
        }
        if !(1..=256).contains(&e.max_sequences) {
            issues.bad("engine.max_sequences", "must be between 1 and 256".into());
        }
        if e.max_sequences.saturating_add(e.prefix_cache_entries) > 256 {
            issues.bad(
                "engine.prefix_cache_entries",
                "plus max_sequences must be at most 256 (llama.cpp's sequence limit)".into(),
            );
        }
        if e.prefill_chunk == 0 {
            issues.bad("engine.prefill_chunk", "must be at least 1".into());
        }
        if !(e.step_budget_ms.is_finite() && e.step_budget_ms >= 0.0) {
            issues.bad(
                "engine.step_budget_ms",
                "must be 0 (from pool.slo_tpot_p95_ms) or a number of milliseconds".into(),
            );
        }
        if e.default_max_tokens == 0 {
            issues.bad("engine.default_max_tokens", "must be at least 1".into());
        }
        if e.max_body_bytes < 1024 {
            issues.bad("engine.max_body_bytes", "must be at least 1024".into());
        }
        if let Some(name) = &e.model_name {
            if name.trim().is_empty() {
                issues.bad("engine.model_name", "must not be empty".into());
            }
        }
        if e.kind == EngineKind::Openai {
            if !e.command.iter().any(|a| a.contains("{port}")) {
                issues.bad(
                    "engine.command",
                    "must start the server with `{port}` (and `{model_path}`, `{api_key}`) in its arguments".into(),
                );
            }
            if !e.ready_path.starts_with('/') {
                issues.bad("engine.ready_path", "must be a path starting with /".into());
            }
        }
        match &e.image {
            Some(image) if image.trim().is_empty() => {
                issues.bad("engine.image", "must name a container image".into())
            }
            Some(_) if e.kind != EngineKind::Openai => issues.bad(
                "engine.image",
                "is the image of an `openai` server; a `strata` engine runs kubernetes.image"
                    .into(),
            ),
            _ => {}
        }
    }

    /// `[[models]]`: ids, sources, and each model's pool and engine as
    /// its overrides leave them.
    fn check_models(&self, issues: &mut Issues) {
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = |k: &str| format!("models[{i}].{k}");
            if m.id.trim().is_empty() || m.id.chars().any(char::is_whitespace) {
                issues.bad(&key("id"), "must be a model id without spaces".into());
            } else if !seen.insert(m.id.as_str()) {
                issues.bad(&key("id"), format!("`{}` is named twice", m.id));
            }
            if m.is_alias() {
                if i == 0 {
                    issues.bad(
                        &key("alias"),
                        "the first entry is the default model: put aliases after the models they name".into(),
                    );
                }
                let model = |id: &str| self.models.iter().any(|e| e.id == id && !e.is_alias());
                for issue in m.alias_issues(&model) {
                    issues.bad(&key(&issue.key), issue.message);
                }
                continue;
            }
            let given = [m.source.is_some(), m.path.is_some(), m.url.is_some()];
            match given.iter().filter(|g| **g).count() {
                0 => issues.bad(
                    &key("source"),
                    "give `source` (a built-in model), `path` (a GGUF file) or `url`".into(),
                ),
                1 => {}
                _ => issues.bad(
                    &key("path"),
                    "give one of `source`, `path` and `url`".into(),
                ),
            }
            if let Some(url) = &m.url {
                if !["http://", "https://", "s3://"]
                    .iter()
                    .any(|s| url.starts_with(s))
                {
                    issues.bad(
                        &key("url"),
                        "must start with https://, http:// or s3://".into(),
                    );
                } else if let Some(what) = url_credentials(url) {
                    issues.bad(
                        &key("url"),
                        format!(
                            "carries {what}: the entry is kept in the database (and its backups) \
                             and shown by the admin API; give S3 credentials as AWS_* on the \
                             machine that runs the pools, or a URL without them"
                        ),
                    );
                } else if m.sha256.is_none() {
                    issues.bad(
                        &key("sha256"),
                        "is needed with `url`: a download is checked against it".into(),
                    );
                }
            }
            if let Some(hash) = &m.sha256 {
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    issues.bad(&key("sha256"), "must be 64 hex digits".into());
                }
            }
            for k in ["model", "model_name"] {
                if m.engine.contains_key(k) {
                    issues.bad(
                        &key(&format!("engine.{k}")),
                        "is the entry's `path` and `id`".into(),
                    );
                }
            }
            if m.tenant.as_deref().is_some_and(|t| t.trim().is_empty()) {
                issues.bad(&key("tenant"), "must name a tenant".into());
            }
            match self.serve_entry(i, m) {
                Ok(served) => {
                    let e = &served.config.engine;
                    if e.kind == EngineKind::Openai
                        && e.capabilities.shared_prefix_cache
                        && m.tenant.is_none()
                    {
                        issues.bad(
                            &key("tenant"),
                            "is needed: the model's engine shares its prefix cache across \
                             requests, so one tenant's prompts would show in another's latency; \
                             name the one tenant it serves, or turn the cache off in its command \
                             and set engine.capabilities.shared_prefix_cache = false"
                                .into(),
                        );
                    }
                    let mut own = Issues::default();
                    served.config.check_pool(&mut own);
                    served.config.check_engine(&mut own);
                    served.config.check_serve(&mut own);
                    for issue in own.0 {
                        issues.bad(&key(&issue.key), issue.message);
                    }
                }
                Err(issue) => issues.0.push(issue),
            }
        }
    }

    /// `[serve]`.
    fn check_serve(&self, issues: &mut Issues) {
        let s = &self.serve;
        if !(1..=64).contains(&s.replicas) {
            issues.bad("serve.replicas", "must be between 1 and 64".into());
        }
        for (tenant, count) in &s.dedicated {
            if tenant.trim().is_empty() || !(1..=16).contains(count) {
                issues.bad(
                    &format!("serve.dedicated.{tenant}"),
                    "must name a tenant and reserve 1 to 16 replicas".into(),
                );
            }
        }
        if !positive(s.startup_timeout_secs) {
            issues.bad(
                "serve.startup_timeout_secs",
                "must be greater than 0 and at most a year (seconds)".into(),
            );
        }
    }
}

/// `base` with the keys of `keys` replaced (a model's own `[engine]` or
/// `[pool]` over the file's).
fn overlay<T: Serialize + serde::de::DeserializeOwned>(
    base: &T,
    keys: &toml::Table,
) -> Result<T, toml::de::Error> {
    let mut table = toml::Table::try_from(base).expect("a config section serialises");
    for (k, v) in keys {
        table.insert(k.clone(), v.clone());
    }
    T::deserialize(table)
}

/// The issues found so far.
#[derive(Default)]
struct Issues(Vec<ConfigIssue>);

impl Issues {
    fn bad(&mut self, key: &str, message: String) {
        self.0.push(ConfigIssue {
            key: key.into(),
            message,
        });
    }
}

/// At least `min`; written so NaN fails every check.
/// A year in seconds: the longest duration a setting or flag takes (far
/// beyond, `Duration::from_secs_f64` panics; nothing runs that long).
pub const YEAR_SECS: f64 = 365.0 * 86_400.0;

fn at_least(v: f64, min: f64) -> bool {
    v >= min
}

/// A duration in seconds, greater than 0 and at most a year (a longer
/// or infinite one would panic where it is read).
fn positive(secs: f64) -> bool {
    secs > 0.0 && secs <= YEAR_SECS
}

/// A duration in seconds from `min` to a year.
fn seconds(secs: f64, min: f64) -> bool {
    (min..=YEAR_SECS).contains(&secs)
}

/// The dotted key whose line holds byte `offset`, e.g. `engine.threads`.
fn key_at(text: &str, offset: usize) -> String {
    let mut table = String::new();
    let mut key = None;
    let offset = (0..=offset.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    for line in text[..offset].lines().chain(text[offset..].lines().take(1)) {
        let l = line.trim();
        if let Some(t) = l.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = t.trim().to_string();
            key = None;
        } else if let Some((k, _)) = l.split_once('=') {
            key = Some(k.trim().to_string());
        }
    }
    match (table.is_empty(), key) {
        (true, Some(k)) => k,
        (false, Some(k)) => format!("{table}.{k}"),
        (false, None) => table,
        (true, None) => "(file)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_defaults_and_they_check_clean() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c, Config::default());
        assert!(c.check().is_empty());
    }

    #[test]
    fn wrong_types_and_unknown_keys_name_their_key() {
        let e = Config::from_toml("[engine]\nmax_sequences = \"eight\"\n").unwrap_err();
        assert_eq!(e.key, "engine.max_sequences");
        let e = Config::from_toml("[serve]\nreplica = 2\n").unwrap_err();
        assert_eq!(e.key, "serve.replica");
        assert!(e.message.contains("unknown field"), "{}", e.message);
    }

    #[test]
    fn a_parse_error_without_a_message_of_its_own_still_says_where() {
        // Found by the config fuzz target: a control character in a comment.
        let e = Config::from_toml("# fine\n# not \u{1} fine\n").unwrap_err();
        assert!(e.message.contains("line 2"), "{e}");
    }

    #[test]
    fn the_readme_config_is_valid() {
        let readme = include_str!("../../../README.md");
        let block = readme
            .split("## Configuration")
            .nth(1)
            .and_then(|s| s.split("```toml").nth(1))
            .and_then(|s| s.split("```").next())
            .expect("README has a toml block under Configuration");
        let c = Config::from_toml(block).expect("README config parses");
        assert_eq!(c.check(), vec![]);
        assert_eq!(c.gateway, GatewayConfig::default());
        assert_eq!(c.pool, PoolConfig::default());
    }

    #[test]
    fn check_names_each_bad_value() {
        let c = Config::from_toml(
            "[gateway]\nlisten = \"nowhere\"\nreplicas = [\"ftp://x\"]\nbatch_reserved_share = 0.9\n[kubernetes]\nschedule_timeout_secs = 1e300\n[engine]\nmax_sequences = 0\n[serve]\nreplicas = 0\n",
        )
        .unwrap();
        let keys: Vec<_> = c.check().into_iter().map(|i| i.key).collect();
        assert_eq!(
            keys,
            [
                "gateway.listen",
                "gateway.batch_reserved_share",
                "gateway.replicas[0]",
                "kubernetes.schedule_timeout_secs",
                "engine.max_sequences",
                "serve.replicas"
            ]
        );
    }

    #[test]
    fn a_catalog_is_checked_against_its_instance_types_and_the_pool() {
        let text = "[instance_types.small]\nthreads = 1\nprefill_tokens_per_s = 300.0\ndecode_tokens_per_s = [20.0, 30.0]\n\
            [instance_types.broken]\nprefill_tokens_per_s = 0.0\ndecode_tokens_per_s = []\nlaunch_secs = -1.0\n\
            [[catalog]]\ninstance_type = \"small\"\nzone = \"a\"\ncapacity = \"spot\"\nprice_per_hour = 0.02\n\
            [[catalog]]\ninstance_type = \"huge\"\nzone = \"\"\ncapacity = \"on_demand\"\nprice_per_hour = -1.0\n\
            [pool]\ninstance_types = [\"small\", \"tiny\"]\nslo_ttft_p95_ms = 0.0\n\
            spot_max_zone_share = 0.0\nspot_zone_premium = -0.1\nbatch_spot_price_share = 1.5\nbatch_spot_work_secs = 0.0\n\
            spot_cooldown_secs = inf\nspot_risk_window_secs = -1.0\npreemption_drain_secs = nan\n";
        let c = Config::from_toml(text).unwrap();
        let keys: Vec<_> = c.check().into_iter().map(|i| i.key).collect();
        assert_eq!(
            keys,
            [
                "instance_types.broken.prefill_tokens_per_s",
                "instance_types.broken.decode_tokens_per_s",
                "instance_types.broken.launch_secs",
                "catalog[1].instance_type",
                "catalog[1].zone",
                "catalog[1].price_per_hour",
                "pool.instance_types",
                "pool.slo_ttft_p95_ms",
                "pool.spot_cooldown_secs",
                "pool.spot_risk_window_secs",
                "pool.spot_max_zone_share",
                "pool.batch_spot_price_share",
                "pool.batch_spot_work_secs",
                "pool.spot_zone_premium",
                "pool.preemption_drain_secs",
            ]
        );
        // Only spot offered, only on-demand allowed: nothing to run.
        let c = Config::from_toml(
            "[[catalog]]\ninstance_type = \"local\"\nzone = \"a\"\ncapacity = \"spot\"\n[pool]\ncapacity_types = [\"on_demand\"]\n",
        )
        .unwrap();
        let keys: Vec<_> = c.check().into_iter().map(|i| i.key).collect();
        assert_eq!(keys, ["catalog"]);
        // The default: one local type on demand, two threads' profile.
        let c = Config::default();
        let (name, unit) = c.unit_type().unwrap();
        assert_eq!(name, LOCAL_TYPE);
        assert!((unit.tokens_per_s(0.0) - 96.9).abs() < 1e-9);
        assert!(unit.tokens_per_s(0.5) > 96.9 && unit.tokens_per_s(0.5) < 480.0);
        assert_eq!(c.pool_offerings().len(), 1);
    }

    #[test]
    fn a_profile_may_list_several_engines_worth_of_batch_sizes() {
        // Eight engines of 105 sequences behind one endpoint: 840 rates.
        let rates = |n: usize| vec!["1.0"; n].join(", ");
        let text = |n| {
            format!(
                "[instance_types.p4d]\nprefill_tokens_per_s = 1.0\ndecode_tokens_per_s = [{}]\n",
                rates(n)
            )
        };
        let keys = |n| -> Vec<String> {
            let c = Config::from_toml(&text(n)).unwrap();
            c.check()
                .into_iter()
                .map(|i| i.key)
                .filter(|k| k.starts_with("instance_types"))
                .collect()
        };
        assert!(keys(840).is_empty(), "{:?}", keys(840));
        assert_eq!(keys(2049), ["instance_types.p4d.decode_tokens_per_s"]);
    }

    #[test]
    fn bad_pool_values_are_named() {
        let c = Config::from_toml(
            "[pool]\nmin_replicas = 3\nmax_replicas = 2\ntarget_utilisation = 1.5\npanic_window_secs = 90.0\npanic_threshold = 0.5\nscale_to_zero_after_secs = 0.0\n",
        )
        .unwrap();
        let keys: Vec<_> = c.check().into_iter().map(|i| i.key).collect();
        assert_eq!(
            keys,
            [
                "pool.max_replicas",
                "pool.target_utilisation",
                "pool.panic_window_secs",
                "pool.panic_threshold",
                "pool.scale_to_zero_after_secs"
            ]
        );
    }

    /// Seconds too large for a `Duration` (which would panic where they are
    /// read) are named by the check, as are NaN and infinity.
    #[test]
    fn durations_beyond_a_year_are_named_not_read() {
        let keys = [
            ("gateway", "health_interval_secs"),
            ("gateway", "connect_timeout_secs"),
            ("gateway", "queue_timeout_secs"),
            ("gateway", "budget_refresh_secs"),
            ("kubernetes", "preemption_notice_secs"),
            ("kubernetes", "schedule_timeout_secs"),
            ("kubernetes", "start_timeout_secs"),
            ("pool", "spot_cooldown_secs"),
            ("pool", "spot_risk_window_secs"),
            ("pool", "batch_spot_work_secs"),
            ("pool", "preemption_notice_secs"),
            ("pool", "stable_window_secs"),
            ("pool", "scale_down_delay_secs"),
            ("pool", "scale_to_zero_after_secs"),
            ("security", "audit_checkpoint_secs"),
            ("serve", "startup_timeout_secs"),
        ];
        for value in ["1e300", "inf", "nan"] {
            for (table, key) in keys {
                let c = Config::from_toml(&format!("[{table}]\n{key} = {value}\n")).unwrap();
                let named: Vec<String> = c.check().into_iter().map(|i| i.key).collect();
                assert!(
                    named.contains(&format!("{table}.{key}")),
                    "{table}.{key} = {value}: {named:?}"
                );
            }
        }
        // A year is still a duration.
        let c = Config::from_toml("[pool]\nscale_down_delay_secs = 31536000.0\n").unwrap();
        assert_eq!(c.check(), []);
        // A start includes getting a node.
        let c = Config::from_toml(
            "[kubernetes]\nschedule_timeout_secs = 900.0\nstart_timeout_secs = 600.0\n",
        )
        .unwrap();
        let named: Vec<String> = c.check().into_iter().map(|i| i.key).collect();
        assert_eq!(named, ["kubernetes.start_timeout_secs"]);
    }

    #[test]
    fn each_model_runs_on_the_file_with_its_own_keys_over_the_shared_ones() {
        let c = Config::from_toml(
            r#"
[engine]
context_size = 4096
default_max_tokens = 300
[pool]
max_replicas = 3
[serve]
replicas = 2
dedicated = { vip = 1 }

[[models]]
id = "chat"
source = "SmolLM2-135M-Instruct.Q4_1"

[[models]]
id = "base"
path = "/models/base.gguf"
sha256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
replicas = 1
price = { prompt_per_million = 0.5, completion_per_million = 1.5 }
[models.engine]
default_max_tokens = 64
[models.pool]
autoscale = true
min_replicas = 0
scale_to_zero_after_secs = 60.0
[models.instance_types.local]
decode_tokens_per_s = [10.0, 18.0]
"#,
        )
        .unwrap();
        assert_eq!(c.check(), []);
        let served = c.served().unwrap();
        let (chat, base) = (&served[0], &served[1]);
        assert_eq!(chat.id.as_deref(), Some("chat"));
        assert_eq!(chat.config.engine.model_name.as_deref(), Some("chat"));
        assert_eq!(chat.config.engine.default_max_tokens, 300);
        assert_eq!(chat.config.serve.replicas, 2);
        assert!(!chat.config.pool.autoscale);
        // The default (first) model keeps the dedicated tenants' replicas.
        assert_eq!(chat.config.serve.dedicated.len(), 1);
        assert_eq!(
            base.config.engine.model.as_deref(),
            Some(std::path::Path::new("/models/base.gguf"))
        );
        assert_eq!(base.config.engine.default_max_tokens, 64);
        // Keys the entry does not set come from the file's sections.
        assert_eq!(base.config.engine.context_size, 4096);
        assert_eq!(base.config.pool.max_replicas, 3);
        assert!(base.config.pool.autoscale);
        assert_eq!(base.config.pool.min_replicas, 0);
        assert_eq!(base.config.serve.replicas, 1);
        assert!(base.config.serve.dedicated.is_empty());
        assert_eq!(base.config.pricing["base"].completion_per_million, 1.5);
        // Its own profile on `local`, key by key: the rest is the file's.
        let (own, file) = (
            &base.config.instance_types["local"],
            &chat.config.instance_types["local"],
        );
        assert_eq!(own.decode_tokens_per_s, [10.0, 18.0]);
        assert_eq!(own.prefill_tokens_per_s, file.prefill_tokens_per_s);
        assert_ne!(file.decode_tokens_per_s, own.decode_tokens_per_s);
        assert!(base.config.models.is_empty());
        // One more deployed beside them runs as the second does.
        let mut extra: ModelEntry =
            toml::from_str("id = \"x\"\nsource = \"y\"\n[pool]\nmax_replicas = 9").unwrap();
        assert_eq!(c.entry_issues(&extra), []);
        let x = c.served_entry(&extra).unwrap();
        assert_eq!(
            (x.config.pool.max_replicas, x.config.serve.dedicated.len()),
            (9, 0)
        );
        extra.id = "chat".into();
        extra
            .pool
            .insert("max_replicas".into(), toml::Value::Integer(0));
        let keys: Vec<_> = c.entry_issues(&extra).into_iter().map(|i| i.key).collect();
        assert_eq!(keys, ["model.id", "model.pool.max_replicas"]);
        // Without [[models]], the one model of [engine].
        let one = Config::default().served().unwrap();
        assert_eq!((one.len(), one[0].id.clone()), (1, None));
    }

    #[test]
    fn a_catalogs_mistakes_are_named_with_their_entry() {
        let c = Config::from_toml(
            r#"
[[models]]
id = "a"
source = "x"
[[models]]
id = "a"
[models.pool]
max_replica = 2
[[models]]
id = "b c"
source = "x"
path = "/x.gguf"
sha256 = "abc"
[models.engine]
model_name = "other"
[[models]]
id = "d"
source = "x"
[models.engine]
context_size = 8
[[models]]
id = "e"
url = "ftp://host/m.gguf"
[[models]]
id = "f"
url = "s3://bucket/m.gguf"
[[models]]
id = "g"
url = "https://host/m.gguf"
sha256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
"#,
        )
        .unwrap();
        let keys: Vec<_> = c.check().into_iter().map(|i| i.key).collect();
        assert_eq!(
            keys,
            [
                "models[1].id",
                "models[1].source",
                "models[1].pool",
                "models[2].id",
                "models[2].path",
                "models[2].sha256",
                "models[2].engine.model_name",
                "models[3].engine.context_size",
                "models[4].url",
                "models[5].sha256",
            ]
        );
    }

    #[test]
    fn an_alias_names_models_of_the_catalog_and_is_not_served() {
        let c = Config::from_toml(
            r#"
[[models]]
id = "v1"
source = "x"
[[models]]
id = "v2"
source = "x"
[[models]]
id = "chat"
alias = { v1 = 90, v2 = 10 }
"#,
        )
        .unwrap();
        assert_eq!(c.check(), []);
        let served: Vec<_> = c.served().unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(served, [Some("v1".to_owned()), Some("v2".to_owned())]);
        assert_eq!(
            c.aliases(),
            [(
                "chat".to_owned(),
                BTreeMap::from([("v1".to_owned(), 90), ("v2".to_owned(), 10)])
            )]
        );
        let bad = Config::from_toml(
            r#"
[[models]]
id = "first"
alias = { v1 = 1 }
[[models]]
id = "v1"
source = "x"
[[models]]
id = "a"
alias = { v1 = 0, nope = 1, first = 1 }
source = "x"
[[models]]
id = "b"
alias = { v1 = 0 }
[[models]]
id = "c"
alias = { c = 1, v1 = 2000000 }
"#,
        )
        .unwrap();
        let keys: Vec<_> = bad.check().into_iter().map(|i| i.key).collect();
        assert_eq!(
            keys,
            [
                "models[0].alias",
                "models[2].source",
                "models[2].alias.first",
                "models[2].alias.nope",
                "models[3].alias",
                "models[4].alias.c",
                "models[4].alias.v1",
            ]
        );
    }

    #[test]
    fn a_model_url_with_credentials_is_named() {
        for url in [
            "https://user:secret@host/m.gguf",
            "https://token@host/m.gguf",
            "https://bucket.s3.amazonaws.com/m.gguf?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA&X-Amz-Signature=ab",
            "https://acct.blob.core.windows.net/c/m.gguf?sv=2020&sig=abc",
            "http://host/m.gguf?access_token=x",
        ] {
            assert!(url_credentials(url).is_some(), "{url}");
        }
        for url in [
            "https://host/m.gguf",
            "s3://bucket/models/m.gguf",
            "https://host/path@v2/m.gguf",
            "https://host/m.gguf?version=2",
        ] {
            assert_eq!(url_credentials(url), None, "{url}");
        }
        let c = Config::from_toml(
            "[[models]]\nid = \"m\"\nurl = \"https://u:p@host/m.gguf\"\nsha256 = \"a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818\"\n",
        )
        .unwrap();
        let issues = c.check();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "models[0].url");
        assert!(
            !issues[0].message.contains("u:p"),
            "the secret is not echoed"
        );
    }

    #[test]
    fn a_deployed_models_source_must_be_under_model_sources() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("models");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::write(allowed.join("m.gguf"), b"GGUF").unwrap();
        std::fs::write(dir.path().join("secret.gguf"), b"GGUF").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.gguf"), allowed.join("link.gguf"))
            .unwrap();
        let mut c = Config::default();
        let entry = |path: Option<std::path::PathBuf>, url: Option<&str>| ModelEntry {
            id: "m".into(),
            path,
            url: url.map(str::to_owned),
            ..Default::default()
        };
        // No list: anywhere.
        assert_eq!(
            c.deploy_source_issue(&entry(Some("/etc/passwd".into()), None)),
            None
        );
        c.security.model_sources = vec![
            allowed.display().to_string(),
            "https://models.internal/llm/".into(),
        ];
        assert_eq!(c.check(), []);
        let ok = |e: &ModelEntry| c.deploy_source_issue(e).is_none();
        assert!(ok(&entry(Some(allowed.join("m.gguf")), None)));
        assert!(ok(&entry(None, Some("https://models.internal/llm/a.gguf"))));
        assert!(
            ok(&entry(None, None)),
            "a built-in source is always allowed"
        );
        for bad in [
            entry(Some(dir.path().join("secret.gguf")), None),
            entry(Some(allowed.join("../secret.gguf")), None),
            entry(Some(allowed.join("link.gguf")), None),
            entry(Some(allowed.join("missing.gguf")), None),
            entry(None, Some("https://models.internal/llm/../admin")),
            entry(None, Some("https://models.internal/llm/%2e%2e/admin")),
            entry(None, Some("https://models.internal.evil.com/llm/a.gguf")),
            entry(None, Some("http://169.254.169.254/latest/meta-data/")),
        ] {
            assert!(!ok(&bad), "{bad:?}");
        }
        // A missing file and a file outside get the same answer.
        assert_eq!(
            c.deploy_source_issue(&entry(Some(allowed.join("missing.gguf")), None)),
            c.deploy_source_issue(&entry(Some("/etc/passwd".into()), None)),
        );
        c.security.model_sources = vec!["https://host".into(), "models".into()];
        let keys: Vec<_> = c.check().into_iter().map(|i| i.key).collect();
        assert_eq!(
            keys,
            ["security.model_sources[0]", "security.model_sources[1]"]
        );
    }

    /// The keys `check` names for a config file's text.
    fn keys(text: &str) -> Vec<String> {
        Config::from_toml(text)
            .unwrap()
            .check()
            .into_iter()
            .map(|i| i.key)
            .collect()
    }

    #[test]
    fn an_external_engine_needs_its_command_and_one_tenant_while_it_shares_its_cache() {
        let model = |engine: &str, tenant: &str| {
            format!(
                "[[models]]\nid = \"a\"\nsource = \"gemma-3-270m-q4_k_m\"\n\
                 [[models]]\nid = \"b\"\npath = \"/m.gguf\"\n{tenant}\n[models.engine]\nkind = \"openai\"\n{engine}\n"
            )
        };
        let command = r#"command = ["srv", "--port", "{port}", "--model", "{model_path}"]"#;
        assert_eq!(
            keys(&model("", "tenant = \"acme\"")),
            ["models[1].engine.command"]
        );
        assert_eq!(keys(&model(command, "")), ["models[1].tenant"]);
        assert!(keys(&model(command, "tenant = \"acme\"")).is_empty());
        let off = format!("{command}\n[models.engine.capabilities]\nshared_prefix_cache = false");
        assert!(keys(&model(&off, "")).is_empty());
        // The one model of [engine] has no tenant to keep to.
        let single = format!("[engine]\nkind = \"openai\"\n{command}\n");
        assert_eq!(keys(&single), ["engine.capabilities.shared_prefix_cache"]);
        let e = Config::from_toml("[engine]\nkind = \"vllm\"\n").unwrap_err();
        assert_eq!(e.key, "engine.kind");
        // An image is another server's; strata's engine runs kubernetes.image.
        let image = format!("{command}\nimage = \"vllm/vllm-openai:v0.11.0\"");
        assert!(keys(&model(&image, "tenant = \"acme\"")).is_empty());
        assert_eq!(
            keys(&model(
                &format!("{command}\nimage = \" \""),
                "tenant = \"acme\""
            )),
            ["models[1].engine.image"]
        );
        assert_eq!(
            keys("[engine]\nimage = \"vllm/vllm-openai:v0.11.0\"\n"),
            ["engine.image"]
        );
    }

    #[test]
    fn a_step_budget_is_a_number_of_milliseconds_or_zero() {
        assert!(keys("[engine]\nstep_budget_ms = 100.0\n").is_empty());
        assert!(keys("[engine]\nstep_budget_ms = 0.0\n").is_empty());
        assert_eq!(
            keys("[engine]\nstep_budget_ms = -5.0\n"),
            ["engine.step_budget_ms"]
        );
        assert_eq!(
            keys("[engine]\nstep_budget_ms = inf\n"),
            ["engine.step_budget_ms"]
        );
    }

    #[test]
    fn a_deployed_model_cannot_choose_the_program_that_runs() {
        let config = Config::default();
        for key in ENGINE_KIND_KEYS {
            let entry: ModelEntry = serde_json::from_value(serde_json::json!({
                "id": "x", "source": "gemma-3-270m-q4_k_m",
                "engine": {key: if key == "command" { serde_json::json!(["/bin/sh", "-c", "id"]) } else { serde_json::json!("openai") }},
            }))
            .unwrap();
            let issue = config.served_entry(&entry).unwrap_err();
            assert_eq!(issue.key, format!("model.engine.{key}"));
        }
        let plain: ModelEntry =
            serde_json::from_value(serde_json::json!({"id": "x", "source": "gemma-3-270m-q4_k_m"}))
                .unwrap();
        assert!(config.served_entry(&plain).is_ok());
    }
}
