//! The Kubernetes objects strata runs as, for a given config: what
//! `strata k8s render` prints (gateway, controller, their permissions,
//! config and secrets) and the engine Deployment the controller keeps per
//! pool variant. Objects are written as JSON and each is checked by
//! deserializing it into its k8s-openapi type (`check`), so a misspelled or
//! misplaced field is an error here, not a surprise in the cluster.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use strata_core::config::{CapacityType, Config, KubernetesConfig};

/// Labels every strata object carries; the controller lists its engine
/// Deployments and Pods by `MANAGED_BY` and `POOL_LABEL`.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "strata");
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const POOL_LABEL: &str = "strata.dev/pool";
pub const TYPE_LABEL: &str = "strata.dev/instance-type";
pub const ZONE_LABEL: &str = "strata.dev/zone";
pub const CAPACITY_LABEL: &str = "strata.dev/capacity";
/// The well-known node labels replicas are placed by.
pub const NODE_TYPE: &str = "node.kubernetes.io/instance-type";
pub const NODE_ZONE: &str = "topology.kubernetes.io/zone";
/// A zone name that leaves the choice to the scheduler.
pub const ANY_ZONE: &str = "any";

const CONFIG_MAP: &str = "strata-config";
const SECRET: &str = "strata";
/// The replica CA and certificates (the files `ReplicaPki` writes); engines
/// mount the CA and their own pair, gateways the CA and the client pair.
pub const REPLICA_TLS_SECRET: &str = "strata-replica-tls";
/// The API keys of the pools whose engines are of kind `openai`, one
/// entry per model (`PoolModel::key_entry`): the controller writes them
/// (it may read and patch this Secret and no other), each engine Pod gets
/// its own pool's only.
pub const ENGINE_KEYS_SECRET: &str = "strata-engine-keys";
/// The engine container's variable holding its pool's API key, which
/// `{api_key}` in an `openai` engine's command and env stands for.
const ENGINE_API_KEY_VAR: &str = "STRATA_ENGINE_API_KEY";
/// Where the replica certificates are mounted in gateway and engine Pods.
pub const REPLICA_TLS_DIR: &str = "/etc/strata/replica-tls";
const GATEWAY: &str = "strata-gateway";
const CONTROLLER: &str = "strata-controller";
const GATEWAY_PORT: u16 = 8080;
const MODEL_DIR: &str = "/models";

/// Secrets to render into the `strata` Secret (and the replica
/// certificates into theirs); without them the Secrets are left for the
/// operator to create (`kubectl create secret`).
pub struct Secrets {
    /// 64 hex characters.
    pub kek: String,
    /// `postgres://…`
    pub database_url: String,
    /// The platform admin key (`sk-strata-…`), given to gateways as
    /// `STRATA_ADMIN_KEY` so none generates one and prints it to its log.
    pub admin_key: String,
    /// File name → PEM of the replica CA and certificates, with
    /// `serve.replica_mtls` (the names `ReplicaPki` uses).
    pub replica_tls: Vec<(String, String)>,
    /// The replica token gateways and engines share, without mutual TLS.
    pub replica_token: Option<String>,
    /// The secret every controller and gateway derives the `openai`
    /// engines' per-pool API keys from (`STRATA_ENGINE_KEY`).
    pub engine_key: String,
}

/// Where a pool's engine Pods find their model's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFile {
    /// A built-in model (`strata model fetch --model NAME`): its file's
    /// name and SHA-256.
    Builtin {
        name: String,
        file_name: String,
        sha256: String,
    },
    /// A file downloaded from `url` (HTTP(S) or S3), which must hash to
    /// `sha256`.
    Url { url: String, sha256: String },
    /// A file on the model volume (`kubernetes.model_pvc`, mounted at
    /// `/models`), checked against `sha256` where the entry names one.
    Path {
        path: String,
        sha256: Option<String>,
    },
}

/// The server of an `openai` pool's engine Pods: an image strata did not
/// build, started with the model's `command` and `env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalServer {
    pub image: String,
    /// The command line, placeholders unfilled (`{api_key}` becomes a
    /// reference to the Pod's key variable, never the key).
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `{threads}`.
    pub threads: u32,
    /// What the pool's API key is derived from (the model's id, as the
    /// gateways derive it).
    pub key_of: String,
}

/// What one pool's engine Pods serve: the model's id, its file, and its
/// own `[engine]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolModel {
    /// The pool's name (its Deployments' `strata.dev/pool` label): the
    /// model's id, or `default` for the one model of `[engine]`.
    pub pool: String,
    /// The model id the engines answer to (`--model-name`).
    pub name: String,
    pub file: ModelFile,
    /// The model's own `[engine]` section as JSON (`--engine-config`);
    /// `None`: the config file's.
    pub engine: Option<String>,
    /// Engine kind `openai`: the server the Pods run instead of
    /// `strata engine`.
    pub external: Option<ExternalServer>,
}

/// The entry of `ENGINE_KEYS_SECRET` holding the API key derived from
/// `key_of`: a Secret key's characters (`[-._a-zA-Z0-9]`), with a digest
/// suffix where others had to be replaced (entries stay apart).
pub fn key_entry(key_of: &str) -> String {
    let clean = name_chars(key_of, 200);
    if clean == key_of && !clean.is_empty() && clean != "." && clean != ".." {
        clean
    } else {
        format!("{clean}-{:08x}", fnv(key_of))
    }
}

impl PoolModel {
    /// The model file's place in the engine container.
    pub fn file_in_pod(&self) -> String {
        match &self.file {
            ModelFile::Builtin { file_name, .. } => format!("{MODEL_DIR}/{file_name}"),
            ModelFile::Url { sha256, .. } => {
                format!("{MODEL_DIR}/sha256-{}.gguf", sha256.to_ascii_lowercase())
            }
            ModelFile::Path { path, .. } => path.clone(),
        }
    }

    /// Why these engine Pods could not get their file, if they could not:
    /// a `path` is read from the model volume, so it needs
    /// `kubernetes.model_pvc` and must lie under its mount.
    pub fn issue(&self, k: &KubernetesConfig) -> Option<String> {
        let ModelFile::Path { path, .. } = &self.file else {
            return None;
        };
        if k.model_pvc.is_none() {
            return Some(format!(
                "model `{}`: a `path` is read from the engine Pods' model volume on Kubernetes; \
                 set kubernetes.model_pvc to a claim holding it (mounted at {MODEL_DIR}), or give a `url` or `source`",
                self.name
            ));
        }
        let under = std::path::Path::new(path).starts_with(MODEL_DIR)
            && !path.split('/').any(|part| part == "..");
        if !under {
            return Some(format!(
                "model `{}`: path {path} is not under {MODEL_DIR}, where the engine Pods mount kubernetes.model_pvc",
                self.name
            ));
        }
        None
    }

    /// The SHA-256 the engine checks its file against before loading it,
    /// where no init container fetched and checked it.
    fn sha256_at_start(&self, k: &KubernetesConfig) -> Option<&str> {
        k.model_pvc.as_ref()?;
        match &self.file {
            ModelFile::Builtin { sha256, .. } | ModelFile::Url { sha256, .. } => Some(sha256),
            ModelFile::Path { sha256, .. } => sha256.as_deref(),
        }
    }

    /// The init container that fetches and checks the file into the
    /// Pod's model volume (an emptyDir), where there is no model volume;
    /// with one, for a server other than strata's (which checks its file
    /// itself), the one that checks the file there.
    fn fetch(&self, k: &KubernetesConfig, mounts: &[Value]) -> Option<Value> {
        let dest = self.file_in_pod();
        if k.model_pvc.is_some() {
            let sha256 = self.sha256_at_start(k)?;
            self.external.as_ref()?;
            return Some(json!({
                "name": "model-check",
                "image": k.image,
                "args": ["model", "check", &dest, "--sha256", sha256],
                "securityContext": locked_down(),
                "volumeMounts": mounts,
            }));
        }
        let args = match &self.file {
            ModelFile::Builtin { name, .. } => {
                vec!["model", "fetch", "--model", name, "--dest", &dest]
            }
            ModelFile::Url { url, sha256 } => vec![
                "model", "fetch", "--url", url, "--sha256", sha256, "--dest", &dest,
            ],
            ModelFile::Path { .. } => return None,
        };
        // pip writes to a home and a cache, a download to the cache: a
        // writable place on the model volume for both (the cached file is
        // linked to its destination, not copied).
        let mut container = json!({
            "name": "model-fetch",
            "image": k.image,
            "args": args,
            "env": [{"name": "HOME", "value": MODEL_DIR},
                    {"name": "XDG_CACHE_HOME", "value": format!("{MODEL_DIR}/.cache")}],
            "securityContext": locked_down(),
            "volumeMounts": mounts,
        });
        if let (ModelFile::Url { .. }, Some(secret)) = (&self.file, &k.model_fetch_secret) {
            // AWS_* credentials and endpoint for an s3:// URL.
            container["envFrom"] = json!([{"secretRef": {"name": secret}}]);
        }
        Some(container)
    }
}

/// One pool variant: the replicas of a pool on one instance type, in one
/// zone, on one capacity type. One Deployment each.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Variant {
    pub pool: String,
    pub instance_type: String,
    pub zone: String,
    pub capacity: CapacityType,
}

impl Variant {
    /// The Deployment's name: a DNS label made of the variant's parts, with
    /// a digest suffix when they do not fit (names stay unique).
    pub fn name(&self) -> String {
        let capacity = match self.capacity {
            CapacityType::Spot => "spot",
            CapacityType::OnDemand => "od",
        };
        let raw = format!(
            "strata-engine-{}-{}-{}-{capacity}",
            self.pool, self.instance_type, self.zone
        );
        let mut name = dns_chars(&raw);
        if name.len() > 63 || name != raw {
            // Different raw names may map to one cleaned name: the digest
            // of the raw one keeps them apart.
            let digest = fnv(&raw);
            name.truncate(63 - 9);
            name = format!("{}-{digest:08x}", name.trim_end_matches('-'));
        }
        name
    }

    /// The labels of its Deployment and Pods (the selector too).
    pub fn labels(&self) -> Value {
        json!({
            "app.kubernetes.io/name": "strata",
            COMPONENT: "engine",
            MANAGED_BY.0: MANAGED_BY.1,
            POOL_LABEL: label_value(&self.pool),
            TYPE_LABEL: label_value(&self.instance_type),
            ZONE_LABEL: label_value(&self.zone),
            CAPACITY_LABEL: self.capacity.as_str(),
        })
    }
}

/// `raw` in the characters of a DNS label: lower-case letters and digits,
/// every run of anything else one `-`, none at either end.
pub fn dns_chars(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_owned()
}

/// A label value: at most 63 of [A-Za-z0-9._-], starting and ending
/// alphanumeric.
pub fn label_value(s: &str) -> String {
    name_chars(s, 63)
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// The first `max` characters of `s`, each outside [A-Za-z0-9._-] as `_`.
fn name_chars(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect()
}

fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn common_labels(component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "strata",
        COMPONENT: component,
        MANAGED_BY.0: MANAGED_BY.1,
    })
}

fn metadata(name: &str, namespace: &str, labels: Value) -> Value {
    json!({"name": name, "namespace": namespace, "labels": labels})
}

/// A container that runs as nobody, on a read-only root, with no
/// capabilities.
fn locked_down() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65534,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

/// The config (read-only) and a scratch /tmp (the root file system is
/// read-only): the volumes and their mounts.
fn base_volumes() -> (Vec<Value>, Vec<Value>) {
    (
        vec![
            json!({"name": "config", "configMap": {"name": CONFIG_MAP}}),
            json!({"name": "tmp", "emptyDir": {}}),
        ],
        vec![
            json!({"name": "config", "mountPath": "/etc/strata", "readOnly": true}),
            json!({"name": "tmp", "mountPath": "/tmp"}),
        ],
    )
}

/// The replica certificates a Pod needs (`files` of the Secret), mounted
/// read-only at `REPLICA_TLS_DIR`, readable by the Pod's group only.
fn replica_tls_volume(files: &[&str]) -> (Value, Value) {
    let items: Vec<Value> = files.iter().map(|f| json!({"key": f, "path": f})).collect();
    (
        json!({"name": "replica-tls", "secret": {
            "secretName": REPLICA_TLS_SECRET, "items": items, "defaultMode": 0o440,
        }}),
        json!({"name": "replica-tls", "mountPath": REPLICA_TLS_DIR, "readOnly": true}),
    )
}

/// A Deployment of `replicas` Pods with `labels` (its selector) and `pod`
/// as their spec.
fn deployment(name: &str, ns: &str, labels: &Value, replicas: u32, pod: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name, ns, labels.clone()),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    })
}

/// `GET /health` on the `http` port every 5 s, from `delay` seconds on;
/// over TLS (without a client certificate: `/health` is the one route an
/// engine answers to anyone) where `https`.
fn probe(delay: u32, https: bool) -> Value {
    json!({
        "httpGet": {"path": "/health", "port": "http", "scheme": if https { "HTTPS" } else { "HTTP" }},
        "initialDelaySeconds": delay,
        "periodSeconds": 5,
    })
}

fn secret_env(name: &str, key: &str) -> Value {
    json!({"name": name, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key}}})
}

/// `STRATA_ENGINE_KEY`, which only a config with `openai` engines needs
/// (an operator's Secret may lack it).
fn engine_key_env() -> Value {
    json!({"name": strata_core::ENGINE_KEY_ENV, "valueFrom": {"secretKeyRef": {
        "name": SECRET, "key": "engine-key", "optional": true,
    }}})
}

fn resources(cpu: &str, memory: &str, gpus: u32) -> Value {
    let mut limits = json!({"memory": memory});
    if gpus > 0 {
        limits["nvidia.com/gpu"] = json!(gpus.to_string());
    }
    json!({"requests": {"cpu": cpu, "memory": memory}, "limits": limits})
}

/// Everything `strata k8s render` prints, in apply order.
pub fn manifests(config: &Config, config_text: &str, secrets: Option<&Secrets>) -> Vec<Value> {
    let k = &config.kubernetes;
    let ns = k.namespace.as_str();
    let mut out = vec![json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns, "labels": common_labels("namespace")},
    })];
    out.push(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(CONFIG_MAP, ns, common_labels("config")),
        "data": {"strata.toml": config_text},
    }));
    if let Some(s) = secrets {
        let mut data = json!({
            "kek": s.kek,
            "database-url": s.database_url,
            "admin-key": s.admin_key,
            "engine-key": s.engine_key,
        });
        if let Some(token) = &s.replica_token {
            data["replica-token"] = json!(token);
        }
        let secret = |name: &str, data: Value| {
            json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": metadata(name, ns, common_labels("secrets")),
                "type": "Opaque",
                "stringData": data,
            })
        };
        out.push(secret(SECRET, data));
        if !s.replica_tls.is_empty() {
            let files: serde_json::Map<String, Value> = s
                .replica_tls
                .iter()
                .map(|(name, pem)| (name.clone(), json!(pem)))
                .collect();
            out.push(secret(REPLICA_TLS_SECRET, Value::Object(files)));
        }
    }
    // Empty: the controller fills in a pool's key before its first Pod.
    // (`kubectl apply` of this again keeps the entries it wrote.)
    out.push(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(ENGINE_KEYS_SECRET, ns, common_labels("secrets")),
        "type": "Opaque",
    }));
    out.extend(gateway(config));
    out.extend(controller(config));
    out.push(engine_network_policy(k));
    out
}

/// Only gateway Pods reach engine Pods, and only on the engine port: a pod
/// elsewhere in the cluster cannot even open a connection to a replica.
fn engine_network_policy(k: &KubernetesConfig) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata("strata-engines", &k.namespace, common_labels("engine")),
        "spec": {
            "podSelector": {"matchLabels": {COMPONENT: "engine", MANAGED_BY.0: MANAGED_BY.1}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": common_labels("gateway")}}],
                "ports": [{"protocol": "TCP", "port": k.engine_port}],
            }],
        },
    })
}

/// How a Pod of `component` proves itself or checks the other side:
/// the replica certificates it mounts, or the replica token in its
/// environment.
fn replica_trust(config: &Config, files: &[&str]) -> (Option<(Value, Value)>, Vec<Value>) {
    if config.serve.replica_mtls {
        (Some(replica_tls_volume(files)), Vec::new())
    } else {
        (
            None,
            vec![secret_env(strata_core::REPLICA_TOKEN_ENV, "replica-token")],
        )
    }
}

fn gateway(config: &Config) -> Vec<Value> {
    let k = &config.kubernetes;
    let ns = k.namespace.as_str();
    let labels = common_labels("gateway");
    let (mut volumes, mut mounts) = base_volumes();
    let (tls, token_env) = replica_trust(config, &["ca.pem", "gateway.pem", "gateway-key.pem"]);
    let mut args = vec![
        json!("--config"),
        json!("/etc/strata/strata.toml"),
        json!("gateway"),
        json!("--listen"),
        json!(format!("0.0.0.0:{GATEWAY_PORT}")),
        json!("--db"),
        json!("$(DATABASE_URL)"),
    ];
    if let Some((volume, mount)) = tls {
        volumes.push(volume);
        mounts.push(mount);
        args.extend([json!("--replica-tls-dir"), json!(REPLICA_TLS_DIR)]);
    }
    let mut env = vec![
        secret_env("STRATA_KEK", "kek"),
        secret_env("DATABASE_URL", "database-url"),
        // The platform admin key comes from the Secret: a gateway that made
        // one would print it, and on Kubernetes that is the container log.
        secret_env("STRATA_ADMIN_KEY", "admin-key"),
        json!({"name": "STRATA_LOG", "value": "info"}),
        engine_key_env(),
    ];
    env.extend(token_env);
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(GATEWAY, ns, labels.clone()),
            // The gateway never talks to the Kubernetes API.
            "automountServiceAccountToken": false,
        }),
        deployment(
            GATEWAY,
            ns,
            &labels,
            k.gateway_replicas,
            json!({
                            "serviceAccountName": GATEWAY,
                            "automountServiceAccountToken": false,
                            "securityContext": {"fsGroup": 65534},
                            "containers": [{
                                "name": "gateway",
                                "image": k.image,
                                "args": args,
                                "env": env,
                                "ports": [{"name": "http", "containerPort": GATEWAY_PORT}],
                                "readinessProbe": probe(2, false),
                                "livenessProbe": probe(15, false),
                                "resources": resources(&k.gateway_cpu, &k.gateway_memory, 0),
                                "securityContext": locked_down(),
                                "volumeMounts": mounts,
                            }],
                            "volumes": volumes,
            }),
        ),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(GATEWAY, ns, labels.clone()),
            "spec": {
                "selector": labels,
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            },
        }),
        json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": metadata(GATEWAY, ns, labels.clone()),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
        }),
        json!({
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": metadata(GATEWAY, ns, labels.clone()),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY},
                "minReplicas": k.gateway_replicas,
                "maxReplicas": k.gateway_max_replicas,
                "metrics": [{
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }],
            },
        }),
    ]
}

/// What the controller may do, and why (docs/cluster.md repeats it).
fn controller_rules(config: &Config) -> Value {
    // With a drain before the reclaim, a Pod of another server that a
    // scale-down lets go is deleted with a short grace (its preStop sleep
    // is for preemption notices); else the controller deletes no Pod.
    let pods = match pre_stop_sleep(config) {
        Some(_) => json!(["get", "list", "watch", "patch", "delete"]),
        None => json!(["get", "list", "watch", "patch"]),
    };
    json!([
        // One Deployment per pool variant: create, resize, delete.
        {"apiGroups": ["apps"], "resources": ["deployments"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        // Replica health and endpoints; the deletion-cost annotation picks
        // which replica a scale-down removes.
        {"apiGroups": [""], "resources": ["pods"], "verbs": pods},
        // Leader election among the controller copies.
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "verbs": ["get", "create", "update"]},
        // The `openai` pools' API keys, in their one Secret: no other
        // Secret can be read or written.
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [ENGINE_KEYS_SECRET],
         "verbs": ["get", "patch"]},
    ])
}

fn controller(config: &Config) -> Vec<Value> {
    let k = &config.kubernetes;
    let ns = k.namespace.as_str();
    let labels = common_labels("controller");
    let (volumes, mounts) = base_volumes();
    let nodes_role = format!("{CONTROLLER}-{ns}-nodes");
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(CONTROLLER, ns, labels.clone()),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(CONTROLLER, ns, labels.clone()),
            "rules": controller_rules(config),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(CONTROLLER, ns, labels.clone()),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROLLER},
            "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": ns}],
        }),
        // Nodes are cluster-wide: read-only, for their labels and the
        // taints spot interruption handlers set.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": nodes_role, "labels": labels},
            "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": nodes_role, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": nodes_role},
            "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": ns}],
        }),
        deployment(
            CONTROLLER,
            ns,
            &labels,
            k.controller_replicas,
            json!({
                            "serviceAccountName": CONTROLLER,
                            "containers": [{
                                "name": "controller",
                                "image": k.image,
                                // No KEK here: the controller never reads tenant content.
                                "args": ["--config", "/etc/strata/strata.toml", "controller",
                                         "--provider", "kubernetes", "--db", "$(DATABASE_URL)",
                                         "--holder", "$(POD_NAME)"],
                                "env": [secret_env("DATABASE_URL", "database-url"),
                                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                        {"name": "STRATA_LOG", "value": "info"},
                                        engine_key_env()],
                                "resources": resources("100m", "128Mi", 0),
                                "securityContext": locked_down(),
                                "volumeMounts": mounts,
                            }],
                            "volumes": volumes,
            }),
        ),
    ]
}

/// The Deployment of one pool variant with `replicas` engine Pods serving
/// `model` (whose `issue` must be `None`).
pub fn engine_deployment(
    config: &Config,
    variant: &Variant,
    replicas: u32,
    model: &PoolModel,
) -> Value {
    let k = &config.kubernetes;
    let labels = variant.labels();
    let mut node_selector = json!({ NODE_TYPE: variant.instance_type });
    if variant.zone != ANY_ZONE {
        node_selector[NODE_ZONE] = json!(variant.zone);
    }
    let mut tolerations = Vec::new();
    match variant.capacity {
        CapacityType::Spot => {
            node_selector[k.capacity_label.as_str()] = json!(k.spot_value);
            for key in &k.spot_taints {
                tolerations.push(json!({"key": key, "operator": "Exists"}));
            }
        }
        CapacityType::OnDemand => {
            if let Some(v) = &k.on_demand_value {
                node_selector[k.capacity_label.as_str()] = json!(v);
            }
        }
    }
    let (mut volumes, mut mounts) = base_volumes();
    let model_vol = match &k.model_pvc {
        Some(claim) => {
            json!({"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": true}})
        }
        None => json!({"name": "models", "emptyDir": {}}),
    };
    let model_mount = json!({"name": "models", "mountPath": MODEL_DIR});
    volumes.push(model_vol);
    mounts.push(model_mount);
    // The instance type's GPUs, as `strata simulate` planned with them.
    let gpus = config
        .instance_types
        .get(&variant.instance_type)
        .map(|t| t.gpus)
        .filter(|g| *g > 0)
        .unwrap_or(k.engine_gpus);
    if model.external.is_some() {
        // Another server reads no strata config.
        volumes.retain(|v| v["name"] != "config");
        mounts.retain(|m| m["name"] != "config");
    }
    let init: Vec<Value> = model.fetch(k, &mounts).into_iter().collect();
    let mut container = match &model.external {
        None => strata_container(config, model, &mut volumes, mounts),
        Some(server) => {
            // vLLM and SGLang share tensors between their processes
            // through /dev/shm, which a container gets 64 MiB of.
            volumes.push(json!({"name": "dshm", "emptyDir": {"medium": "Memory"}}));
            mounts.push(json!({"name": "dshm", "mountPath": "/dev/shm"}));
            external_container(k, model, server, mounts)
        }
    };
    container["resources"] = resources(&k.engine_cpu, &k.engine_memory, gpus);
    if let (Some(_), Some(seconds)) = (&model.external, pre_stop_sleep(config)) {
        // Evicted at the notice, it serves on until the drain.
        container["lifecycle"] = json!({"preStop": {"sleep": {"seconds": seconds}}});
    }
    // Long enough to serve through a preemption notice.
    let grace = match preemption_drain(config) {
        Some(_) => k.preemption_notice_secs.ceil() as u64 + 30,
        None => 30,
    };
    deployment(
        &variant.name(),
        &k.namespace,
        &labels,
        replicas,
        json!({
                        "automountServiceAccountToken": false,
                        "securityContext": {"fsGroup": 65534},
                        "nodeSelector": node_selector,
                        "tolerations": tolerations,
                        "terminationGracePeriodSeconds": grace,
                        "initContainers": init,
                        "containers": [container],
                        "volumes": volumes,
        }),
    )
}

/// How long before its node goes a replica stops taking requests when the
/// node is reclaimed (`pool.preemption_drain_secs`, when shorter than the
/// notice): until then its Pod serves through the notice. The node's
/// interruption handler evicts the Pod at the notice; strata's engine
/// lingers after the signal while gateways use it (`--linger-secs`), and
/// another server's container sleeps before its signal (a preStop hook)
/// for the notice less the drain. `None`: replicas drain from the notice.
pub fn preemption_drain(config: &Config) -> Option<Duration> {
    let drain = config.pool.preemption_drain_secs?;
    (drain < config.kubernetes.preemption_notice_secs).then(|| Duration::from_secs_f64(drain))
}

/// Seconds a stopping Pod of another server sleeps before its signal, with
/// [`preemption_drain`] set (a scale-down cuts it short: the provider
/// deletes such a Pod with [`STOP_GRACE_SECS`]).
pub fn pre_stop_sleep(config: &Config) -> Option<u64> {
    let drain = preemption_drain(config)?;
    Some((config.kubernetes.preemption_notice_secs - drain.as_secs_f64()).floor() as u64)
}

/// The grace a drained Pod of another server gets when strata lets it go
/// itself: it serves nothing by then, so its preStop sleep is cut short.
pub const STOP_GRACE_SECS: u32 = 5;

/// `strata engine` serving `model`, proving the gateway's identity by the
/// replica certificates or token.
fn strata_container(
    config: &Config,
    model: &PoolModel,
    volumes: &mut Vec<Value>,
    mut mounts: Vec<Value>,
) -> Value {
    let k = &config.kubernetes;
    let https = config.serve.replica_mtls;
    // The engine binds its Pod's address, not every interface.
    let mut args = vec![
        json!("--config"),
        json!("/etc/strata/strata.toml"),
        json!("engine"),
        json!("--host"),
        json!("$(POD_IP)"),
        json!("--port"),
        json!(k.engine_port.to_string()),
        json!("--model"),
        json!(model.file_in_pod()),
        json!("--model-name"),
        json!(model.name),
    ];
    if let Some(engine) = &model.engine {
        args.extend([json!("--engine-config"), json!(engine)]);
    }
    if let Some(sha256) = model.sha256_at_start(k) {
        args.extend([json!("--sha256"), json!(sha256)]);
    }
    if preemption_drain(config).is_some() {
        // Evicted at the notice, it serves on while gateways use it (the
        // flag takes at most an hour; no cloud's notice is that long).
        let linger = k.preemption_notice_secs.min(3600.0);
        args.extend([json!("--linger-secs"), json!(linger.to_string())]);
    }
    let (tls, token_env) = replica_trust(config, &["ca.pem", "replica.pem", "replica-key.pem"]);
    if let Some((volume, mount)) = tls {
        volumes.push(volume);
        mounts.push(mount);
        for (flag, file) in [
            ("--tls-cert", "replica.pem"),
            ("--tls-key", "replica-key.pem"),
            ("--client-ca", "ca.pem"),
        ] {
            args.extend([json!(flag), json!(format!("{REPLICA_TLS_DIR}/{file}"))]);
        }
    }
    let mut env = vec![pod_ip_env()];
    env.extend(token_env);
    json!({
        "name": "engine",
        "image": k.image,
        "args": args,
        "env": env,
        "ports": [{"name": "http", "containerPort": k.engine_port}],
        "readinessProbe": probe(2, https),
        "livenessProbe": probe(60, https),
        "securityContext": locked_down(),
        "volumeMounts": mounts,
    })
}

fn pod_ip_env() -> Value {
    json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
}

/// Another OpenAI-compatible server (engine kind `openai`) from its own
/// image, run by `command` with the placeholders filled for this Pod: the
/// pool's API key comes from `ENGINE_KEYS_SECRET` into a variable that
/// `{api_key}` refers to (Kubernetes expands `$(VAR)` in a command and in
/// later variables), so the key is in no Deployment. Plain HTTP on the
/// Pod's address: the NetworkPolicy admits only gateways, and the key
/// authenticates them. Probes open a TCP connection only (an
/// authenticated readiness path cannot be probed without the key); the
/// gateways check `ready_path` with the key before sending a request.
fn external_container(
    k: &KubernetesConfig,
    model: &PoolModel,
    server: &ExternalServer,
    mounts: Vec<Value>,
) -> Value {
    let key_ref = format!("$({ENGINE_API_KEY_VAR})");
    let values = strata_core::config::Placeholders {
        model_path: &model.file_in_pod(),
        model: &model.name,
        host: "$(POD_IP)",
        port: k.engine_port,
        threads: server.threads,
        api_key: &key_ref,
    };
    let command: Vec<String> = server.command.iter().map(|a| values.fill(a)).collect();
    let mut env = vec![
        pod_ip_env(),
        json!({"name": ENGINE_API_KEY_VAR, "valueFrom": {"secretKeyRef": {
            "name": ENGINE_KEYS_SECRET, "key": key_entry(&server.key_of),
        }}}),
        // A read-only root: caches (Hugging Face, Triton, pip) in /tmp.
        json!({"name": "HOME", "value": "/tmp"}),
        json!({"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"}),
    ];
    for (name, value) in &server.env {
        env.push(json!({"name": name, "value": values.fill(value)}));
    }
    let tcp = |delay: u32| json!({"tcpSocket": {"port": "http"}, "initialDelaySeconds": delay, "periodSeconds": 5});
    json!({
        "name": "engine",
        "image": server.image,
        "command": command,
        "env": env,
        "ports": [{"name": "http", "containerPort": k.engine_port}],
        // A large model loads for minutes: liveness waits for the start.
        "startupProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": tcp(0),
        "livenessProbe": tcp(0),
        "securityContext": locked_down(),
        "volumeMounts": mounts,
    })
}

/// Checks every object: it deserializes into its k8s-openapi type and
/// nothing of it is lost on the way back (no unknown or misplaced field);
/// names are DNS names; selectors match their Pod templates; what the
/// objects refer to (ConfigMap, Secret, ServiceAccount, Role, Deployment)
/// is among them or is the Secret the operator creates.
pub fn check(objects: &[Value]) -> Result<(), String> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};

    fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<(), String> {
        let t: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        let back = serde_json::to_value(&t).map_err(|e| e.to_string())?;
        match lost(v, &back, "") {
            Some(path) => Err(format!("`{path}` is not a field of this kind")),
            None => Ok(()),
        }
    }
    let mut names = BTreeSet::new();
    for v in objects {
        let kind = v["kind"].as_str().unwrap_or_default();
        let name = v["metadata"]["name"].as_str().unwrap_or_default();
        let what = format!("{kind} {name}");
        if !dns_subdomain(name) {
            return Err(format!("{what}: the name is not a DNS name"));
        }
        match kind {
            "Namespace" => typed::<Namespace>(v),
            "ConfigMap" => typed::<ConfigMap>(v),
            "Secret" => typed::<Secret>(v),
            "ServiceAccount" => typed::<ServiceAccount>(v),
            "Service" => typed::<Service>(v),
            "Deployment" => typed::<Deployment>(v).and_then(|_| {
                let selector = &v["spec"]["selector"]["matchLabels"];
                let labels = &v["spec"]["template"]["metadata"]["labels"];
                let matches = selector
                    .as_object()
                    .is_some_and(|s| s.iter().all(|(k, val)| &labels[k] == val));
                matches
                    .then_some(())
                    .ok_or_else(|| "the selector does not match the Pod template".into())
            }),
            "PodDisruptionBudget" => typed::<PodDisruptionBudget>(v),
            "NetworkPolicy" => typed::<NetworkPolicy>(v),
            "HorizontalPodAutoscaler" => typed::<HorizontalPodAutoscaler>(v),
            "Role" => typed::<Role>(v),
            "RoleBinding" => typed::<RoleBinding>(v),
            "ClusterRole" => typed::<ClusterRole>(v),
            "ClusterRoleBinding" => typed::<ClusterRoleBinding>(v),
            other => Err(format!("unexpected kind {other}")),
        }
        .map_err(|e| format!("{what}: {e}"))?;
        names.insert((kind.to_owned(), name.to_owned()));
    }
    let has = |kind: &str, name: &str| names.contains(&(kind.to_owned(), name.to_owned()));
    for v in objects {
        let what = format!("{} {}", v["kind"], v["metadata"]["name"]);
        let mut refs = Vec::new();
        collect_refs(v, &mut refs);
        for (kind, name) in refs {
            // The Secrets may be the operator's, created apart (and an
            // engine Deployment is checked without the manifests).
            let operators = kind == "Secret"
                && [SECRET, REPLICA_TLS_SECRET, ENGINE_KEYS_SECRET].contains(&name.as_str());
            if !(has(&kind, &name) || operators) {
                return Err(format!(
                    "{what} refers to {kind} {name}, which is not rendered"
                ));
            }
        }
    }
    Ok(())
}

/// The first path of `want` that `got` does not have (a field dropped on
/// the way through the typed form).
fn lost(want: &Value, got: &Value, path: &str) -> Option<String> {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => w.iter().find_map(|(k, v)| {
            let p = format!("{path}.{k}");
            match g.get(k) {
                None if !v.is_null() && v != &json!([]) && v != &json!({}) => Some(p),
                None => None,
                Some(gv) => lost(v, gv, &p),
            }
        }),
        (Value::Array(w), Value::Array(g)) => w
            .iter()
            .zip(g)
            .enumerate()
            .find_map(|(i, (a, b))| lost(a, b, &format!("{path}[{i}]"))),
        _ => None,
    }
}

/// ConfigMaps, Secrets, ServiceAccounts, Roles and scale targets an object
/// names.
fn collect_refs(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                let name = || val["name"].as_str().unwrap_or_default().to_owned();
                match k.as_str() {
                    "configMap" => out.push(("ConfigMap".into(), name())),
                    "secretKeyRef" => out.push(("Secret".into(), name())),
                    "secret" => out.push((
                        "Secret".into(),
                        val["secretName"].as_str().unwrap_or_default().to_owned(),
                    )),
                    "serviceAccountName" => out.push((
                        "ServiceAccount".into(),
                        val.as_str().unwrap_or_default().to_owned(),
                    )),
                    "roleRef" | "scaleTargetRef" => {
                        out.push((val["kind"].as_str().unwrap_or_default().to_owned(), name()))
                    }
                    _ => {}
                }
                collect_refs(val, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

fn dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(strata_core::config::is_dns_label)
}

/// The objects as one YAML stream (`kubectl apply -f -`).
pub fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_saphyr::to_string(o).expect("JSON values serialise as YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(zone: &str, capacity: CapacityType) -> Variant {
        Variant {
            pool: "default".into(),
            instance_type: "g5.xlarge".into(),
            zone: zone.into(),
            capacity,
        }
    }

    /// The one model of `[engine]`, as the controller serves it.
    fn gemma() -> PoolModel {
        PoolModel {
            pool: "default".into(),
            name: "gemma-3-270m-q4_k_m".into(),
            file: ModelFile::Builtin {
                name: "gemma-3-270m-q4_k_m".into(),
                file_name: "gemma-3-270m-q4_k_m.gguf".into(),
                sha256: "a5".repeat(32),
            },
            engine: None,
            external: None,
        }
    }

    fn secrets() -> Secrets {
        Secrets {
            kek: "ab".repeat(32),
            database_url: "postgres://strata@db/strata".into(),
            replica_tls: [
                "ca.pem",
                "replica.pem",
                "replica-key.pem",
                "gateway.pem",
                "gateway-key.pem",
            ]
            .iter()
            .map(|f| (f.to_string(), format!("PEM of {f}")))
            .collect(),
            replica_token: None,
            admin_key: format!("sk-strata-{}", "A".repeat(43)),
            engine_key: "ee".repeat(32),
        }
    }

    fn rendered() -> Vec<Value> {
        let config = Config::default();
        let mut all = manifests(&config, "[pool]\n", Some(&secrets()));
        all.push(engine_deployment(
            &config,
            &variant("us-east-1a", CapacityType::Spot),
            3,
            &gemma(),
        ));
        all.push(engine_deployment(
            &config,
            &variant(ANY_ZONE, CapacityType::OnDemand),
            1,
            &gemma(),
        ));
        all
    }

    #[test]
    fn every_object_is_a_valid_kubernetes_object() {
        check(&rendered()).unwrap();
    }

    #[test]
    fn the_yaml_stream_parses_back_into_the_same_objects() {
        let all = rendered();
        let yaml = to_yaml(&all);
        let back: Vec<Value> = serde_saphyr::from_str_multiple(&yaml).unwrap();
        assert_eq!(back, all);
        check(&back).unwrap();
    }

    #[test]
    fn the_check_finds_a_misspelled_field_and_a_dangling_reference() {
        let mut all = rendered();
        let gw = all
            .iter_mut()
            .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == GATEWAY)
            .unwrap();
        gw["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = json!("Always");
        let err = check(&all).unwrap_err();
        assert!(err.contains("imagePullPolicyy"), "{err}");
        let mut all = rendered();
        all.retain(|o| o["kind"] != "ConfigMap");
        let err = check(&all).unwrap_err();
        assert!(err.contains("ConfigMap strata-config"), "{err}");
        let mut all = rendered();
        all[0]["metadata"]["name"] = json!("Not_A_Name");
        assert!(check(&all).is_err());
    }

    #[test]
    fn spot_replicas_go_to_spot_nodes_of_their_type_and_zone() {
        let config = Config::default();
        let d = engine_deployment(
            &config,
            &variant("us-east-1a", CapacityType::Spot),
            3,
            &gemma(),
        );
        let spec = &d["spec"]["template"]["spec"];
        assert_eq!(d["spec"]["replicas"], 3);
        assert_eq!(spec["nodeSelector"][NODE_TYPE], "g5.xlarge");
        assert_eq!(spec["nodeSelector"][NODE_ZONE], "us-east-1a");
        assert_eq!(spec["nodeSelector"]["karpenter.sh/capacity-type"], "spot");
        assert_eq!(spec["tolerations"][0]["key"], "karpenter.sh/capacity-type");
        let od = engine_deployment(
            &config,
            &variant(ANY_ZONE, CapacityType::OnDemand),
            1,
            &gemma(),
        );
        let spec = &od["spec"]["template"]["spec"];
        assert!(spec["nodeSelector"].get(NODE_ZONE).is_none());
        assert_eq!(
            spec["nodeSelector"]["karpenter.sh/capacity-type"],
            "on-demand"
        );
        assert_eq!(spec["tolerations"], json!([]));
        assert_ne!(d["metadata"]["name"], od["metadata"]["name"]);
    }

    #[test]
    fn variant_names_are_dns_labels_and_stay_apart() {
        let a = variant("us-east-1a", CapacityType::Spot).name();
        assert!(strata_core::config::is_dns_label(&a), "{a}");
        let long = Variant {
            pool: "p".repeat(80),
            ..variant("us-east-1a", CapacityType::Spot)
        };
        let n = long.name();
        assert!(
            strata_core::config::is_dns_label(&n) && n.len() <= 63,
            "{n}"
        );
        let (x, y) = (
            Variant {
                instance_type: "a.b".into(),
                ..variant("z", CapacityType::Spot)
            },
            Variant {
                instance_type: "a-b".into(),
                ..variant("z", CapacityType::Spot)
            },
        );
        assert_ne!(x.name(), y.name());
    }

    /// The volume items a Deployment's Pods mount from the replica Secret.
    fn replica_files(d: &Value) -> Vec<String> {
        d["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["secret"]["secretName"] == REPLICA_TLS_SECRET)
            .flat_map(|v| v["secret"]["items"].as_array().unwrap().clone())
            .map(|i| i["key"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn only_gateways_reach_engines_and_each_side_holds_only_its_own_key() {
        let all = rendered();
        let policy = all
            .iter()
            .find(|o| o["kind"] == "NetworkPolicy")
            .expect("a NetworkPolicy");
        assert_eq!(
            policy["spec"]["podSelector"]["matchLabels"][COMPONENT],
            "engine"
        );
        assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
        let ingress = policy["spec"]["ingress"].as_array().unwrap();
        assert_eq!(ingress.len(), 1);
        assert_eq!(
            ingress[0]["from"],
            json!([{"podSelector": {"matchLabels": common_labels("gateway")}}])
        );
        let config = Config::default();
        assert_eq!(
            ingress[0]["ports"][0]["port"],
            config.kubernetes.engine_port
        );
        // The engine Pods' labels are what the policy selects.
        let engine = engine_deployment(
            &config,
            &variant("us-east-1a", CapacityType::Spot),
            1,
            &gemma(),
        );
        let labels = &engine["spec"]["template"]["metadata"]["labels"];
        assert!(policy["spec"]["podSelector"]["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v));
        let container = &engine["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(
            args.windows(2).any(|w| w == ["--host", "$(POD_IP)"]),
            "{args:?}"
        );
        assert!(!args.contains(&"0.0.0.0"));
        assert!(args.windows(2).any(|w| w[0] == "--client-ca"));
        assert_eq!(container["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
        assert_eq!(
            replica_files(&engine),
            ["ca.pem", "replica.pem", "replica-key.pem"]
        );
        let gw = all
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == GATEWAY)
            .unwrap();
        assert_eq!(
            replica_files(gw),
            ["ca.pem", "gateway.pem", "gateway-key.pem"]
        );
        // Without mutual TLS, both sides get the token from the Secret instead.
        let mut plain = Config::default();
        plain.serve.replica_mtls = false;
        let engine = engine_deployment(
            &plain,
            &variant("us-east-1a", CapacityType::Spot),
            1,
            &gemma(),
        );
        assert!(replica_files(&engine).is_empty());
        assert!(engine.to_string().contains(strata_core::REPLICA_TOKEN_ENV));
        let gw = gateway(&plain);
        assert!(gw
            .iter()
            .any(|o| o.to_string().contains(strata_core::REPLICA_TOKEN_ENV)));
        check(&rendered()).unwrap();
    }

    #[test]
    fn the_controller_holds_no_kek_and_the_gateway_no_api_token() {
        let all = rendered();
        let find = |name: &str| {
            all.iter()
                .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == name)
                .unwrap()
                .clone()
        };
        let ctl = find(CONTROLLER).to_string();
        assert!(!ctl.contains("STRATA_KEK") && !ctl.contains("\"kek\""));
        assert!(!ctl.contains("STRATA_ADMIN_KEY") && !ctl.contains("admin-key"));
        let gw = find(GATEWAY);
        // The gateway takes the platform admin key from the Secret, so it
        // never makes one and prints it into its container log.
        let env = &gw["spec"]["template"]["spec"]["containers"][0]["env"];
        let admin = env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "STRATA_ADMIN_KEY")
            .expect("the gateway is given the admin key");
        assert_eq!(
            admin["valueFrom"]["secretKeyRef"],
            json!({"name": SECRET, "key": "admin-key"})
        );
        let secret = all
            .iter()
            .find(|o| o["kind"] == "Secret" && o["metadata"]["name"] == SECRET)
            .unwrap();
        assert!(secret["stringData"]["admin-key"]
            .as_str()
            .unwrap()
            .starts_with("sk-strata-"));
        assert_eq!(
            gw["spec"]["template"]["spec"]["automountServiceAccountToken"],
            false
        );
        // The controller's Role grants nothing beyond its three resources.
        let role = all.iter().find(|o| o["kind"] == "Role").unwrap();
        let resources: Vec<&str> = role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["resources"].as_array().unwrap())
            .map(|r| r.as_str().unwrap())
            .collect();
        assert_eq!(resources, ["deployments", "pods", "leases", "secrets"]);
        // Of Secrets, only the engines' keys, and never listed or made:
        // the KEK and database URL stay out of the controller's reach.
        let secrets = role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resources"] == json!(["secrets"]))
            .unwrap();
        assert_eq!(secrets["resourceNames"], json!([ENGINE_KEYS_SECRET]));
        assert_eq!(secrets["verbs"], json!(["get", "patch"]));
        // Its Secret is rendered empty, for the controller to fill.
        let keys = all
            .iter()
            .find(|o| o["metadata"]["name"] == ENGINE_KEYS_SECRET)
            .unwrap();
        assert_eq!(keys["kind"], "Secret");
        assert!(keys.get("data").is_none() && keys.get("stringData").is_none());
        // Gateways and the controller derive the pools' keys from one
        // secret, which a config without `openai` engines may leave out.
        assert_eq!(secret["stringData"]["engine-key"], "ee".repeat(32));
        for component in ["strata-gateway", "strata-controller"] {
            let d = all
                .iter()
                .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == component)
                .unwrap();
            let env = d["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap();
            let key = env
                .iter()
                .find(|e| e["name"] == strata_core::ENGINE_KEY_ENV)
                .unwrap_or_else(|| panic!("{component} has no {}", strata_core::ENGINE_KEY_ENV));
            assert_eq!(
                key["valueFrom"]["secretKeyRef"],
                json!({"name": SECRET, "key": "engine-key", "optional": true})
            );
        }
    }

    /// vLLM serving a model on a GPU type, as docs/engines.md configures it.
    fn vllm() -> PoolModel {
        PoolModel {
            external: Some(ExternalServer {
                image: "vllm/vllm-openai:v0.11.0".into(),
                command: [
                    "vllm",
                    "serve",
                    "{model_path}",
                    "--served-model-name",
                    "{model}",
                    "--host",
                    "{host}",
                    "--port",
                    "{port}",
                    "--no-enable-prefix-caching",
                ]
                .map(String::from)
                .to_vec(),
                env: vec![("VLLM_API_KEY".into(), "{api_key}".into())],
                threads: 4,
                key_of: "team/chat".into(),
            }),
            engine: None,
            pool: "team/chat-0a1b2c3d".into(),
            name: "team/chat".into(),
            ..gemma()
        }
    }

    fn container(d: &Value, name: &str) -> Value {
        let spec = &d["spec"]["template"]["spec"];
        spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(spec["initContainers"].as_array().unwrap())
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    #[test]
    fn with_a_drain_before_the_reclaim_engines_serve_through_the_notice() {
        let spot = variant("us-east-1a", CapacityType::Spot);
        let grace =
            |d: &Value| d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].clone();
        let mut config = Config::default();
        for model in [gemma(), vllm()] {
            let plain = engine_deployment(&config, &spot, 1, &model);
            assert_eq!(flag(&args_of(&plain, "engine"), "--linger-secs"), None);
            assert_eq!(container(&plain, "engine")["lifecycle"], Value::Null);
            assert_eq!(grace(&plain), json!(30));
        }
        config.pool.preemption_drain_secs = Some(30.0);
        assert_eq!(preemption_drain(&config), Some(Duration::from_secs(30)));
        // strata's engine lingers after its signal while it is used.
        let lingering = engine_deployment(&config, &spot, 1, &gemma());
        assert_eq!(
            flag(&args_of(&lingering, "engine"), "--linger-secs"),
            Some("120")
        );
        assert_eq!(container(&lingering, "engine")["lifecycle"], Value::Null);
        assert_eq!(grace(&lingering), json!(150));
        // Another server gets its signal 90 s after the eviction.
        let other = engine_deployment(&config, &spot, 1, &vllm());
        assert_eq!(
            container(&other, "engine")["lifecycle"],
            json!({"preStop": {"sleep": {"seconds": 90}}})
        );
        assert_eq!(grace(&other), json!(150));
        let mut objects = manifests(&config, "[pool]\n", Some(&secrets()));
        // The controller may delete Pods (a scale-down cuts another
        // server's sleep short) only with the drain set.
        let pod_verbs = |objects: &[Value]| {
            let role = objects
                .iter()
                .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == CONTROLLER)
                .unwrap()
                .clone();
            role["rules"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["resources"] == json!(["pods"]))
                .unwrap()["verbs"]
                .clone()
        };
        assert_eq!(
            pod_verbs(&objects),
            json!(["get", "list", "watch", "patch", "delete"])
        );
        assert_eq!(
            pod_verbs(&rendered()),
            json!(["get", "list", "watch", "patch"])
        );
        objects.extend([lingering, other]);
        check(&objects).unwrap();
        // A notice longer than the flag takes is cut to an hour.
        config.kubernetes.preemption_notice_secs = 7200.0;
        let long = engine_deployment(&config, &spot, 1, &gemma());
        assert_eq!(
            flag(&args_of(&long, "engine"), "--linger-secs"),
            Some("3600")
        );
        config.kubernetes.preemption_notice_secs = 120.0;
        // A drain as long as the notice is none.
        config.pool.preemption_drain_secs = Some(120.0);
        assert_eq!(preemption_drain(&config), None);
        let plain = engine_deployment(&config, &spot, 1, &vllm());
        assert_eq!(container(&plain, "engine")["lifecycle"], Value::Null);
    }

    #[test]
    fn an_openai_pool_runs_its_image_with_its_key_from_the_secret_and_no_strata_credential() {
        let text = include_str!("../../../bench/scenarios/gpu-fleet-p4d.toml");
        let mut config = Config::from_toml(text).unwrap();
        // Whatever strata's own replicas use, another server is reached
        // by its key.
        config.serve.replica_mtls = true;
        // Without the file's model volume: the Pod fetches its file.
        config.kubernetes.model_pvc = None;
        let v = Variant {
            pool: "team/chat-0a1b2c3d".into(),
            ..variant("use1-az1", CapacityType::Spot)
        };
        let d = engine_deployment(&config, &v, 2, &vllm());
        let engine = container(&d, "engine");
        assert_eq!(engine["image"], "vllm/vllm-openai:v0.11.0");
        assert_eq!(
            engine.get("args"),
            None,
            "the image's own entrypoint is replaced"
        );
        let command: Vec<&str> = engine["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let port = config.kubernetes.engine_port.to_string();
        assert_eq!(
            command,
            [
                "vllm",
                "serve",
                "/models/gemma-3-270m-q4_k_m.gguf",
                "--served-model-name",
                "team/chat",
                "--host",
                "$(POD_IP)",
                "--port",
                port.as_str(),
                "--no-enable-prefix-caching"
            ]
        );
        // The key: a reference to the Pod's own entry of the keys Secret,
        // defined before the variable that uses it (Kubernetes expands
        // only earlier ones).
        let env = engine["env"].as_array().unwrap();
        let at = |name: &str| env.iter().position(|e| e["name"] == name).unwrap();
        let entry = key_entry("team/chat");
        assert_eq!(
            env[at(ENGINE_API_KEY_VAR)]["valueFrom"]["secretKeyRef"],
            json!({"name": ENGINE_KEYS_SECRET, "key": entry})
        );
        assert_eq!(env[at("VLLM_API_KEY")]["value"], "$(STRATA_ENGINE_API_KEY)");
        assert!(at(ENGINE_API_KEY_VAR) < at("VLLM_API_KEY"));
        // Nothing of strata's: no replica token, certificates or config.
        let all = d.to_string();
        for absent in [
            strata_core::REPLICA_TOKEN_ENV,
            "replica-tls",
            "strata.toml",
            "\"config\"",
        ] {
            assert!(!all.contains(absent), "{absent} in {all}");
        }
        assert!(!engine["volumeMounts"].to_string().contains("/etc/strata"));
        // The instance type's GPUs, shared memory, TCP probes (the
        // readiness path needs the key, which the kubelet has not).
        assert_eq!(engine["resources"]["limits"]["nvidia.com/gpu"], "1");
        assert!(engine["volumeMounts"].to_string().contains("/dev/shm"));
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(engine[probe]["tcpSocket"]["port"], "http", "{probe}");
        }
        // Its file is still fetched and checked by strata's image.
        let fetch = container(&d, "model-fetch");
        assert_eq!(fetch["image"], config.kubernetes.image);
        // Valid with the manifests around it.
        let mut objects = manifests(&config, text, None);
        objects.push(d);
        check(&objects).unwrap();
    }

    #[test]
    fn an_openai_pool_on_a_model_volume_checks_its_file_before_the_server_starts() {
        let mut config = Config::default();
        config.kubernetes.model_pvc = Some("models".into());
        let d = engine_deployment(
            &config,
            &variant("us-east-1a", CapacityType::Spot),
            1,
            &vllm(),
        );
        assert_eq!(container(&d, "model-fetch"), Value::Null);
        let args = args_of(&d, "model-check");
        assert_eq!(
            &args[..3],
            ["model", "check", "/models/gemma-3-270m-q4_k_m.gguf"]
        );
        assert_eq!(flag(&args, "--sha256"), Some("a5".repeat(32).as_str()));
        // strata's own engine checks its file itself.
        let own = engine_deployment(
            &config,
            &variant("us-east-1a", CapacityType::Spot),
            1,
            &gemma(),
        );
        assert_eq!(container(&own, "model-check"), Value::Null);
    }

    #[test]
    fn key_entries_are_secret_keys_and_stay_apart() {
        assert_eq!(key_entry("chat"), "chat");
        assert_eq!(key_entry("default"), "default");
        let ids = ["team/chat", "team_chat", "team:chat", "..", "", "é"];
        let entries: BTreeSet<String> = ids.iter().map(|id| key_entry(id)).collect();
        assert_eq!(entries.len(), ids.len());
        for e in &entries {
            assert!(!e.is_empty() && e.len() <= 253, "{e}");
            assert!(
                e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')),
                "{e}"
            );
            assert!(e != "." && e != "..");
        }
    }

    fn args_of(d: &Value, name: &str) -> Vec<String> {
        container(d, name)["args"]
            .as_array()
            .map(|args| {
                args.iter()
                    .map(|a| a.as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
        args.windows(2)
            .find(|w| w[0] == name)
            .map(|w| w[1].as_str())
    }

    #[test]
    fn each_model_gets_its_own_engines_which_fetch_and_check_its_own_file() {
        let mut config = Config::default();
        config.kubernetes.model_fetch_secret = Some("model-store".into());
        let sha = "0123456789abcdef".repeat(4);
        let chat = PoolModel {
            pool: "chat".into(),
            name: "chat".into(),
            file: ModelFile::Builtin {
                name: "SmolLM2-135M-Instruct.Q4_1".into(),
                file_name: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
                sha256: "b1".repeat(32),
            },
            engine: Some(r#"{"context_size":2048}"#.into()),
            external: None,
        };
        let code = PoolModel {
            pool: "code/v2".into(),
            name: "code/v2".into(),
            file: ModelFile::Url {
                url: "s3://models/code-v2.gguf".into(),
                sha256: sha.to_uppercase(),
            },
            engine: Some("{}".into()),
            external: None,
        };
        let on = |pool: &str| Variant {
            pool: pool.into(),
            ..variant("us-east-1a", CapacityType::Spot)
        };
        let a = engine_deployment(&config, &on("chat"), 2, &chat);
        let b = engine_deployment(&config, &on("code/v2"), 1, &code);
        // Apart by name and by the pool label the provider selects them by.
        assert_ne!(a["metadata"]["name"], b["metadata"]["name"]);
        assert_eq!(
            a["spec"]["template"]["metadata"]["labels"][POOL_LABEL],
            "chat"
        );
        assert_eq!(
            b["spec"]["template"]["metadata"]["labels"][POOL_LABEL],
            "code_v2"
        );
        let engine = args_of(&a, "engine");
        assert_eq!(flag(&engine, "--model-name"), Some("chat"));
        assert_eq!(
            flag(&engine, "--engine-config"),
            Some(r#"{"context_size":2048}"#)
        );
        assert_eq!(
            flag(&engine, "--model"),
            Some("/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        let fetch = args_of(&a, "model-fetch");
        assert_eq!(flag(&fetch, "--model"), Some("SmolLM2-135M-Instruct.Q4_1"));
        assert_eq!(flag(&fetch, "--dest"), flag(&engine, "--model"));
        // The init container checked the file: the engine does not hash it again.
        assert_eq!(flag(&engine, "--sha256"), None);
        let engine = args_of(&b, "engine");
        let fetch = args_of(&b, "model-fetch");
        let file = format!("/models/sha256-{sha}.gguf");
        assert_eq!(flag(&engine, "--model"), Some(file.as_str()));
        assert_eq!(flag(&engine, "--model-name"), Some("code/v2"));
        assert_eq!(flag(&fetch, "--url"), Some("s3://models/code-v2.gguf"));
        assert_eq!(flag(&fetch, "--sha256"), Some(sha.to_uppercase().as_str()));
        assert_eq!(flag(&fetch, "--dest"), Some(file.as_str()));
        // Only the download gets the store's credentials.
        let env_from =
            |d: &Value| d["spec"]["template"]["spec"]["initContainers"][0]["envFrom"].clone();
        assert_eq!(
            env_from(&b),
            json!([{"secretRef": {"name": "model-store"}}])
        );
        assert_eq!(env_from(&a), Value::Null);
        let mut all = manifests(&config, "", None);
        all.extend([a, b]);
        check(&all).unwrap();
    }

    #[test]
    fn a_model_volume_serves_every_file_checked_by_the_engine_and_a_path_needs_one() {
        let mut config = Config::default();
        let path = PoolModel {
            pool: "mine".into(),
            name: "mine".into(),
            file: ModelFile::Path {
                path: "/models/team/mine.gguf".into(),
                sha256: Some("cd".repeat(32)),
            },
            engine: Some("{}".into()),
            external: None,
        };
        let issue = path.issue(&config.kubernetes).expect("no model volume");
        assert!(issue.contains("kubernetes.model_pvc"), "{issue}");
        config.kubernetes.model_pvc = Some("models".into());
        assert_eq!(path.issue(&config.kubernetes), None);
        for outside in ["/etc/passwd", "/models/../etc/passwd", "models/x.gguf"] {
            let mut p = path.clone();
            p.file = ModelFile::Path {
                path: outside.into(),
                sha256: None,
            };
            assert!(p.issue(&config.kubernetes).is_some(), "{outside}");
        }
        let v = variant("us-east-1a", CapacityType::Spot);
        let d = engine_deployment(&config, &v, 1, &path);
        assert_eq!(d["spec"]["template"]["spec"]["initContainers"], json!([]));
        let engine = args_of(&d, "engine");
        assert_eq!(flag(&engine, "--model"), Some("/models/team/mine.gguf"));
        let sha = "cd".repeat(32);
        assert_eq!(flag(&engine, "--sha256"), Some(sha.as_str()));
        // A built-in model on the volume is checked against its own hash.
        let d = engine_deployment(&config, &v, 1, &gemma());
        let engine = args_of(&d, "engine");
        let sha = "a5".repeat(32);
        assert_eq!(flag(&engine, "--sha256"), Some(sha.as_str()));
        assert_eq!(
            flag(&engine, "--model"),
            Some("/models/gemma-3-270m-q4_k_m.gguf")
        );
        let volumes = d["spec"]["template"]["spec"]["volumes"].to_string();
        assert!(volumes.contains(r#""claimName":"models""#), "{volumes}");
    }

    #[test]
    fn engine_pods_ask_for_the_gpus_of_the_instance_type_the_simulator_planned_with() {
        // The GPU fleet `strata simulate` runs (bench/results/simulate.md).
        let text = include_str!("../../../bench/scenarios/gpu-fleet-p4d.toml");
        let config = Config::from_toml(text).unwrap();
        let on = |instance_type: &str| {
            let d = engine_deployment(
                &config,
                &Variant {
                    instance_type: instance_type.into(),
                    ..variant("use1-az1", CapacityType::Spot)
                },
                1,
                &gemma(),
            );
            d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                .clone()
        };
        assert_eq!(on("g5.xlarge"), "1");
        assert_eq!(on("p4d.24xlarge"), "8");
        // A type that names none: the [kubernetes] section's count (none).
        assert_eq!(on("m5.large"), Value::Null);
    }
}
