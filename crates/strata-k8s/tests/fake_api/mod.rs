#![allow(dead_code)] // each test binary uses a part of it
//! A fake Kubernetes API server behind kube's `tower-test` mock service (no
//! API server can run on these machines). It answers the calls strata
//! makes — Deployments (server-side apply, list), Pods (list, merge patch),
//! Nodes (list), Leases (get, create, conditional replace), the one Secret
//! the controller's Role reaches (get, merge patch; any other is 403) — from an
//! in-memory cluster, keeps resourceVersions and conflicts as the API
//! server does, and logs each call in a compact form the tests assert on.
//! `reconcile` plays the ReplicaSet controller and the scheduler: it makes
//! each Deployment's Pods match its replicas (removing the lowest
//! deletion cost first) on nodes matching the node selector; a Pod no
//! node matches stays Pending and unschedulable until one is added. The objects
//! follow the shape of real ones (a kubelet's Pod status with conditions,
//! IPs and container statuses; a Karpenter-provisioned Node's labels and
//! taints), written by hand since no cluster could be recorded here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock;

#[derive(Default)]
pub struct Cluster {
    pub deployments: BTreeMap<String, Value>,
    pub pods: BTreeMap<String, Value>,
    pub nodes: BTreeMap<String, Value>,
    pub leases: BTreeMap<String, Value>,
    pub secrets: BTreeMap<String, Value>,
    pub calls: Vec<String>,
    /// Another writer changes the Lease just before the next replace.
    pub race_next_replace: bool,
    rv: u64,
    pod_seq: u64,
}

pub type Shared = Arc<Mutex<Cluster>>;

/// A client whose every request goes to `cluster`.
pub fn client(cluster: Shared) -> kube::Client {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let (status, answer) = cluster.lock().unwrap().answer(
                &parts.method,
                parts.uri.path(),
                parts.uri.query().unwrap_or(""),
                body,
            );
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    kube::Client::new(service, "strata")
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": reason, "message": message, "code": code}),
    )
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> (u16, Value) {
    (
        200,
        json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": "1"}, "items": items}),
    )
}

/// The `labelSelector` of a list call (equality terms only, as strata
/// sends), percent-decoded.
fn selector(query: &str) -> Vec<(String, String)> {
    let raw = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("labelSelector="))
        .unwrap_or_else(|| panic!("a list call names a label selector: {query}"));
    let decoded = percent_decode(raw);
    decoded
        .split(',')
        .map(|term| {
            let (k, v) = term.split_once('=').expect("key=value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn selected(object: &Value, wanted: &[(String, String)]) -> bool {
    let labels = &object["metadata"]["labels"];
    wanted.iter().all(|(k, v)| labels[k] == json!(v))
}

impl Cluster {
    /// The Secret `strata k8s render` makes for the engines' keys, empty.
    pub fn add_engine_keys(&mut self) {
        self.secrets.insert(
            "strata-engine-keys".into(),
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                   "metadata": {"name": "strata-engine-keys", "namespace": "strata"}}),
        );
    }

    pub fn shared() -> Shared {
        Arc::new(Mutex::new(Cluster::default()))
    }

    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    fn answer(&mut self, method: &Method, path: &str, query: &str, body: Value) -> (u16, Value) {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("PATCH", ["apis", "apps", "v1", "namespaces", _, "deployments", name]) => {
                assert!(
                    query.contains("fieldManager=strata") && query.contains("force=true"),
                    "a Deployment is changed by server-side apply as strata: {query}"
                );
                let replicas = body["spec"]["replicas"].as_u64().unwrap();
                self.calls.push(format!("apply {name} replicas={replicas}"));
                let mut d = body;
                d["metadata"]["resourceVersion"] = json!(self.next_rv());
                self.deployments.insert(name.to_string(), d.clone());
                (200, d)
            }
            ("GET", ["apis", "apps", "v1", "namespaces", _, "deployments"]) => {
                let wanted = selector(query);
                self.calls.push("list deployments".into());
                let items = self
                    .deployments
                    .values()
                    .filter(|d| selected(d, &wanted))
                    .cloned()
                    .collect();
                list("DeploymentList", "apps/v1", items)
            }
            ("DELETE", ["apis", "apps", "v1", "namespaces", _, "deployments", name]) => {
                assert_eq!(body["propagationPolicy"], "Background", "{body}");
                self.calls.push(format!("delete {name}"));
                match self.deployments.remove(*name) {
                    Some(d) => (200, d),
                    None => status(404, "NotFound", "deployments not found"),
                }
            }
            ("GET", ["api", "v1", "namespaces", _, "pods"]) => {
                let wanted = selector(query);
                self.calls.push("list pods".into());
                let items = self
                    .pods
                    .values()
                    .filter(|p| selected(p, &wanted))
                    .cloned()
                    .collect();
                list("PodList", "v1", items)
            }
            ("DELETE", ["api", "v1", "namespaces", _, "pods", name]) => {
                let grace = &body["gracePeriodSeconds"];
                self.calls.push(format!("delete pod {name} grace={grace}"));
                match self.pods.remove(*name) {
                    Some(p) => (200, p),
                    None => status(404, "NotFound", "pods not found"),
                }
            }
            ("PATCH", ["api", "v1", "namespaces", _, "pods", name]) => {
                // A merge patch of annotations (the deletion cost, and the
                // reclaim time of a Pod serving through its notice).
                let annotations = body["metadata"]["annotations"].as_object().unwrap().clone();
                let cost = annotations["controller.kubernetes.io/pod-deletion-cost"]
                    .as_str()
                    .unwrap();
                let mut call = format!("annotate {name} deletion-cost={cost}");
                if annotations.contains_key("strata.dev/reclaim-at") {
                    call.push_str(" reclaim-at");
                }
                self.calls.push(call);
                match self.pods.get_mut(*name) {
                    Some(p) => {
                        for (k, v) in annotations {
                            p["metadata"]["annotations"][k] = v;
                        }
                        (200, p.clone())
                    }
                    None => status(404, "NotFound", "pods not found"),
                }
            }
            (verb, ["api", "v1", "namespaces", _, "secrets", name])
                if *name != "strata-engine-keys" =>
            {
                // As the controller's Role has it.
                self.calls.push(format!("forbidden {verb} secret {name}"));
                status(403, "Forbidden", "secrets is forbidden")
            }
            ("GET", ["api", "v1", "namespaces", _, "secrets", name]) => {
                self.calls.push(format!("get secret {name}"));
                match self.secrets.get(*name) {
                    Some(s) => (200, s.clone()),
                    None => status(404, "NotFound", "secrets not found"),
                }
            }
            ("PATCH", ["api", "v1", "namespaces", _, "secrets", name]) => {
                // A JSON merge patch of `data` (null removes an entry).
                let Some(secret) = self.secrets.get_mut(*name) else {
                    return status(404, "NotFound", "secrets not found");
                };
                let mut changed = Vec::new();
                let mut data = secret["data"].as_object().cloned().unwrap_or_default();
                for (entry, value) in body["data"].as_object().cloned().unwrap_or_default() {
                    if value.is_null() {
                        data.remove(&entry);
                        changed.push(format!("-{entry}"));
                    } else {
                        data.insert(entry.clone(), value);
                        changed.push(format!("+{entry}"));
                    }
                }
                secret["data"] = Value::Object(data);
                let answer = secret.clone();
                self.calls
                    .push(format!("patch secret {name} {}", changed.join(" ")));
                (200, answer)
            }
            ("GET", ["api", "v1", "nodes"]) => {
                self.calls.push("list nodes".into());
                let items = self.nodes.values().cloned().collect();
                list("NodeList", "v1", items)
            }
            ("GET", ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases", name]) => {
                self.calls.push(format!("get lease {name}"));
                match self.leases.get(*name) {
                    Some(l) => (200, l.clone()),
                    None => status(404, "NotFound", "leases not found"),
                }
            }
            ("POST", ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases"]) => {
                let name = body["metadata"]["name"].as_str().unwrap().to_owned();
                let holder = body["spec"]["holderIdentity"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                self.calls
                    .push(format!("create lease {name} holder={holder}"));
                if self.leases.contains_key(&name) {
                    return status(409, "AlreadyExists", "leases already exists");
                }
                let mut l = body;
                l["metadata"]["resourceVersion"] = json!(self.next_rv());
                self.leases.insert(name, l.clone());
                (201, l)
            }
            ("PUT", ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases", name]) => {
                let holder = body["spec"]["holderIdentity"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                self.calls
                    .push(format!("replace lease {name} holder={holder}"));
                if std::mem::take(&mut self.race_next_replace) {
                    let rv = self.next_rv();
                    if let Some(l) = self.leases.get_mut(*name) {
                        l["metadata"]["resourceVersion"] = json!(rv);
                    }
                }
                let current = self.leases.get(*name).cloned();
                match current {
                    None => status(404, "NotFound", "leases not found"),
                    Some(c)
                        if c["metadata"]["resourceVersion"]
                            != body["metadata"]["resourceVersion"] =>
                    {
                        status(409, "Conflict", "the object has been modified")
                    }
                    Some(_) => {
                        let mut l = body;
                        l["metadata"]["resourceVersion"] = json!(self.next_rv());
                        self.leases.insert(name.to_string(), l.clone());
                        (200, l)
                    }
                }
            }
            _ => panic!("unexpected call {method} {path}?{query}"),
        }
    }

    /// A node as Karpenter provisions it.
    pub fn add_node(&mut self, name: &str, instance_type: &str, zone: &str, capacity: &str) {
        self.nodes.insert(
            name.into(),
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "uid": format!("{name}-uid"),
                    "resourceVersion": "100",
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "node.kubernetes.io/instance-type": instance_type,
                        "topology.kubernetes.io/zone": zone,
                        "topology.kubernetes.io/region": "us-east-1",
                        "karpenter.sh/capacity-type": capacity,
                        "karpenter.sh/nodepool": "strata",
                    },
                },
                "spec": {"providerID": format!("aws:///{zone}/i-0{name}")},
                "status": {
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                    "lastHeartbeatTime": "2026-11-29T10:00:00Z",
                                    "lastTransitionTime": "2026-11-29T09:00:00Z"}],
                    "addresses": [{"type": "InternalIP", "address": "10.0.1.10"}],
                },
            }),
        );
    }

    /// What a spot interruption handler does to a node about to go.
    pub fn taint(&mut self, node: &str, key: &str) {
        self.nodes.get_mut(node).unwrap()["spec"]["taints"] = json!([{"key": key, "value": "true", "effect": "NoSchedule",
                    "timeAdded": "2026-11-29T10:05:00Z"}]);
    }

    /// What a handler that reports by condition does to a node about to go.
    pub fn flag(&mut self, node: &str, condition: &str) {
        let conditions = self.nodes.get_mut(node).unwrap()["status"]["conditions"]
            .as_array_mut()
            .unwrap();
        conditions.push(
            json!({"type": condition, "status": "True", "reason": "Rebalance",
                               "lastHeartbeatTime": "2026-11-29T10:05:00Z",
                               "lastTransitionTime": "2026-11-29T10:05:00Z"}),
        );
    }

    /// What an eviction or a graceful delete does to a Pod first: it is
    /// terminating (its `deletionTimestamp` set) but still runs, and its
    /// ReplicaSet no longer counts it.
    pub fn evict(&mut self, pod: &str) {
        self.pods.get_mut(pod).unwrap()["metadata"]["deletionTimestamp"] =
            json!("2026-11-29T10:05:00Z");
    }

    /// The ReplicaSet controller and the scheduler: each Deployment gets
    /// as many Pods as its replicas (extra ones go unscheduled first, then
    /// lowest deletion cost, then newest; terminating ones neither count
    /// nor go here), placed on a node its selector matches.
    pub fn reconcile(&mut self, ready: bool) {
        // The garbage collector: Pods of a deleted Deployment go.
        let deployments = self.deployments.clone();
        self.pods.retain(|_, p| {
            p["metadata"]["labels"]["strata.dev/deployment"]
                .as_str()
                .is_some_and(|d| deployments.contains_key(d))
        });
        let deployments: Vec<(String, Value)> = self
            .deployments
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, d) in deployments {
            let want = d["spec"]["replicas"].as_u64().unwrap() as usize;
            let mut mine: Vec<(bool, i64, u64, String)> = self
                .pods
                .values()
                .filter(|p| p["metadata"]["labels"]["strata.dev/deployment"] == json!(name))
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .map(|p| {
                    let cost = p["metadata"]["annotations"]
                        ["controller.kubernetes.io/pod-deletion-cost"]
                        .as_str()
                        .map_or(0, |c| c.parse().unwrap());
                    (
                        !p["spec"]["nodeName"].is_null(),
                        cost,
                        p["metadata"]["annotations"]["fake.test/seq"]
                            .as_str()
                            .map_or(0, |s| s.parse().unwrap()),
                        p["metadata"]["name"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            // As the ReplicaSet controller ranks them: unscheduled first,
            // then lowest cost, then newest.
            mine.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)));
            while mine.len() > want {
                let (_, _, _, pod) = mine.remove(0);
                self.pods.remove(&pod);
            }
            for _ in mine.len()..want {
                self.add_pod(&name, &d, ready);
            }
        }
        // Pending Pods a node has come for (the node autoscaler's).
        let pending: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| p["spec"]["nodeName"].is_null())
            .map(|(k, _)| k.clone())
            .collect();
        for name in pending {
            let mut pod = self.pods[&name].clone();
            let seq = pod["metadata"]["annotations"]["fake.test/seq"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            self.place(&mut pod, seq, ready);
            self.pods.insert(name, pod);
        }
    }

    fn add_pod(&mut self, deployment: &str, d: &Value, ready: bool) {
        self.pod_seq += 1;
        let seq = self.pod_seq;
        let name = format!("{deployment}-7c9d8f5b6d-{seq:05x}");
        let template = &d["spec"]["template"];
        let mut labels = template["metadata"]["labels"].clone();
        labels["pod-template-hash"] = json!("7c9d8f5b6d");
        // Stands for the ownerReference chain to the Deployment.
        labels["strata.dev/deployment"] = json!(deployment);
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "strata",
                "uid": format!("uid-{seq}"),
                "annotations": {"fake.test/seq": seq.to_string()},
                "resourceVersion": self.next_rv(),
                "labels": labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": format!("{deployment}-7c9d8f5b6d"), "uid": "rs-uid",
                                     "controller": true, "blockOwnerDeletion": true}],
            },
            "spec": {
                "nodeName": null,
                "containers": template["spec"]["containers"],
                "nodeSelector": template["spec"]["nodeSelector"],
            },
        });
        self.place(&mut pod, seq, ready);
        self.pods.insert(name, pod);
    }

    /// The scheduler: binds the Pod to a node its selector matches and
    /// starts it (a kubelet's status); with none, it stays Pending and
    /// unschedulable, as while no node of that kind can be had.
    fn place(&self, pod: &mut Value, seq: u64, ready: bool) {
        let selector = pod["spec"]["nodeSelector"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let node = self
            .nodes
            .values()
            .find(|n| {
                selector
                    .iter()
                    .all(|(k, v)| &n["metadata"]["labels"][k] == v)
            })
            .and_then(|n| n["metadata"]["name"].as_str().map(str::to_owned));
        let condition = |t: &str, s: bool| {
            json!({"type": t, "status": if s { "True" } else { "False" },
                                                   "lastTransitionTime": "2026-11-29T10:01:00Z"})
        };
        let Some(node) = node else {
            pod["status"] = json!({
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                "message": format!("0/{} nodes are available: {} node(s) didn't match Pod's node affinity/selector.",
                                                   self.nodes.len(), self.nodes.len()),
                                "lastTransitionTime": "2026-11-29T10:00:30Z"}],
                "qosClass": "Burstable",
            });
            return;
        };
        pod["spec"]["nodeName"] = json!(node);
        pod["status"] = json!({
            "phase": "Running",
            "conditions": [condition("PodReadyToStartContainers", true), condition("Initialized", true),
                           condition("Ready", ready), condition("ContainersReady", ready),
                           condition("PodScheduled", true)],
            "hostIP": "10.0.1.10",
            "podIP": format!("10.244.1.{seq}"),
            "podIPs": [{"ip": format!("10.244.1.{seq}")}],
            "startTime": "2026-11-29T10:00:30Z",
            "containerStatuses": [{"name": "engine", "ready": ready, "restartCount": 0,
                                   "image": "strata:latest", "imageID": "strata@sha256:0",
                                   "started": true,
                                   "state": {"running": {"startedAt": "2026-11-29T10:00:40Z"}}}],
        });
    }

    /// Pods of the Deployment `name`, by name.
    pub fn pods_of(&self, deployment: &str) -> Vec<String> {
        self.pods
            .values()
            .filter(|p| p["metadata"]["labels"]["strata.dev/deployment"] == json!(deployment))
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn take_calls(&mut self) -> Vec<String> {
        std::mem::take(&mut self.calls)
    }
}
