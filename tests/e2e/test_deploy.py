"""Deployment artefacts: `strata k8s render` (the committed manifests stay
equal to it, secrets only when given, bad config named), the controller's
refusal without a cluster, and the Grafana dashboard, whose every metric a
running `strata serve` (gateway and engine) exports."""
import hashlib
import json
import os
import re
import subprocess
import time

import httpx
import yaml
from conftest import MODEL_ID, STRATA, bearer, free_port, wait_healthy

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DEPLOY = os.path.join(ROOT, "deploy")


def render(config, env=None):
    return subprocess.run([STRATA, "--config", config, "k8s", "render"], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "RUST_BACKTRACE": "0", **(env or {})})


def test_the_committed_manifests_are_what_render_prints():
    r = render(os.path.join(DEPLOY, "kubernetes", "strata.toml"))
    assert r.returncode == 0, r.stderr
    with open(os.path.join(DEPLOY, "kubernetes", "strata.yaml")) as f:
        committed = "".join(line for line in f if not line.startswith("#"))
    assert r.stdout == committed
    kinds = re.findall(r"^kind: (\w+)$", r.stdout, re.M)
    for kind in ["Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                 "HorizontalPodAutoscaler", "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "NetworkPolicy"]:
        assert kind in kinds, kind
    # Without the secrets in the environment, none is printed (but the empty one the
    # controller writes `openai` pools' keys to), and stderr says how to make them.
    secrets = [o for o in yaml.safe_load_all(r.stdout) if o and o["kind"] == "Secret"]
    assert [s["metadata"]["name"] for s in secrets] == ["strata-engine-keys"]
    assert "data" not in secrets[0] and "stringData" not in secrets[0]
    assert "kubectl -n strata create secret" in r.stderr
    assert "create secret generic strata-replica-tls" in r.stderr
    # The platform admin key comes from that Secret (never made and printed by a gateway).
    assert "--from-literal=admin-key=" in r.stderr and "STRATA_ADMIN_KEY" in r.stdout


def test_render_includes_the_secret_only_when_given_and_checks_it(tmp_path):
    config = tmp_path / "strata.toml"
    config.write_text('[kubernetes]\nnamespace = "llm"\n')
    kek = "ab" * 32
    r = render(str(config), {"STRATA_KEK": kek, "STRATA_DATABASE_URL": "postgres://s@db/s"})
    assert r.returncode == 0, r.stderr
    assert "kind: Secret" in r.stdout and kek in r.stdout and "namespace: llm" in r.stdout
    # The replica CA and certificates, made for this render: engines and
    # gateways each mount their own pair and the CA.
    assert "name: strata-replica-tls" in r.stdout and r.stdout.count("BEGIN CERTIFICATE") == 3
    assert r.stdout.count("PRIVATE KEY-----") == 4  # two keys, each BEGIN and END
    again = render(str(config), {"STRATA_KEK": kek, "STRATA_DATABASE_URL": "postgres://s@db/s"}).stdout
    assert re.findall(r"BEGIN CERTIFICATE", again) and again != r.stdout  # a fresh CA each time
    # A new platform admin key in the Secret each time, or the one given.
    made = re.findall(r"admin-key: (sk-strata-[A-Za-z0-9_-]{43})$", r.stdout, re.M)
    assert len(made) == 1 and made[0] not in again and "admin-key: sk-strata-" in again
    given = "sk-strata-" + "Q" * 43
    mine = render(str(config), {"STRATA_KEK": kek, "STRATA_DATABASE_URL": "postgres://s@db/s",
                                "STRATA_ADMIN_KEY": given})
    assert mine.returncode == 0 and f"admin-key: {given}" in mine.stdout
    bad = render(str(config), {"STRATA_KEK": kek, "STRATA_DATABASE_URL": "postgres://s@db/s",
                               "STRATA_ADMIN_KEY": "hunter2"})
    assert bad.returncode != 0 and "STRATA_ADMIN_KEY" in bad.stderr and "hunter2" not in bad.stderr
    # Without mutual TLS, a replica token instead.
    config.write_text('[kubernetes]\nnamespace = "llm"\n[serve]\nreplica_mtls = false\n')
    r = render(str(config), {"STRATA_KEK": kek, "STRATA_DATABASE_URL": "postgres://s@db/s"})
    assert r.returncode == 0 and "replica-token:" in r.stdout and "BEGIN CERTIFICATE" not in r.stdout
    assert "STRATA_REPLICA_TOKEN" in r.stdout and "scheme: HTTPS" not in r.stdout
    r = render(str(config), {"STRATA_KEK": "nothex", "STRATA_DATABASE_URL": "postgres://s@db/s"})
    assert r.returncode != 0 and "STRATA_KEK" in r.stderr
    config.write_text('[kubernetes]\nnamespace = "Not A Name"\n')
    r = render(str(config))
    assert r.returncode != 0 and "kubernetes.namespace" in r.stderr
    config.write_text('[kubernetes]\nimagee = "x"\n')
    r = render(str(config))
    assert r.returncode != 0 and "imagee" in r.stderr


def test_render_takes_a_catalog_and_names_a_model_its_engine_pods_could_not_get(tmp_path):
    config = tmp_path / "models.toml"
    sha = "ab" * 32
    config.write_text('[[models]]\nid = "chat"\nsource = "SmolLM2-135M-Instruct.Q4_1"\n'
                      f'[[models]]\nid = "code"\nurl = "https://models.example/code.gguf"\nsha256 = "{sha}"\n')
    r = render(str(config))
    assert r.returncode == 0, r.stderr
    # The controller reads the catalog from the rendered config.
    assert 'id = "code"' in r.stdout
    # A `path` is read from the engine Pods' model volume.
    config.write_text('[[models]]\nid = "mine"\npath = "/models/mine.gguf"\n')
    r = render(str(config))
    assert r.returncode != 0 and "kubernetes.model_pvc" in r.stderr and "`mine`" in r.stderr, r.stderr
    config.write_text('[kubernetes]\nmodel_pvc = "models"\n[[models]]\nid = "mine"\npath = "/etc/mine.gguf"\n')
    r = render(str(config))
    assert r.returncode != 0 and "not under /models" in r.stderr, r.stderr
    config.write_text('[kubernetes]\nmodel_pvc = "models"\n[[models]]\nid = "mine"\npath = "/models/mine.gguf"\n')
    r = render(str(config))
    assert r.returncode == 0, r.stderr


def test_an_engine_given_a_sha256_loads_only_that_file():
    """What an engine Pod reading its model from a volume does."""
    out = subprocess.run([STRATA, "model", "fetch", "--model", MODEL_ID, "--json"], capture_output=True,
                         text=True, timeout=600, check=True).stdout
    fetched = json.loads(out.splitlines()[-1])
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    r = subprocess.run([STRATA, "engine", "--port", str(free_port()), "--model", fetched["path"],
                        "--sha256", "00" * 32], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "not loading it" in r.stderr, r.stderr
    port = free_port()
    proc = subprocess.Popen([STRATA, "engine", "--port", str(port), "--model", fetched["path"],
                             "--sha256", fetched["sha256"].upper()], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", "the engine with the right sha256")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_gpu_fleet_a_user_simulates_is_the_fleet_render_deploys():
    """bench/scenarios/gpu-fleet.toml: vLLM (engine kind `openai`) on g5
    GPUs. Every instance type and capacity `strata simulate` buys with it
    has an engine Deployment in `k8s render --engines` of the same file,
    running vLLM's image with that type's GPUs and the pool's key by
    reference only."""
    config = os.path.join(ROOT, "bench", "scenarios", "gpu-fleet.toml")
    sim = subprocess.run([STRATA, "--config", config, "simulate", "--trace",
                          os.path.join(ROOT, "testdata", "traces", "azure-conv-10min.csv"), "--rate", "0.1", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert sim.returncode == 0, sim.stderr
    bought = set()
    for policy in json.loads(sim.stdout)["policies"]:
        bought |= {k for k, hours in policy["replica_hours"].items() if hours > 0}
    assert bought, sim.stdout[:500]
    r = subprocess.run([STRATA, "--config", config, "k8s", "render", "--engines"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    objects = [o for o in yaml.safe_load_all(r.stdout) if o]
    engines = [o for o in objects if o["kind"] == "Deployment"
               and o["metadata"]["labels"].get("app.kubernetes.io/component") == "engine"]
    with open(config) as f:
        offers = f.read().count("[[catalog]]")
    assert len(engines) == offers
    gpus = {"g5.xlarge": "1", "g5.4xlarge": "1", "g5.8xlarge": "1"}
    rendered = set()
    for d in engines:
        labels = d["metadata"]["labels"]
        capacity = "spot" if labels["strata.dev/capacity"] == "spot" else "on_demand"
        rendered.add(f'{labels["strata.dev/instance-type"]} ({capacity})')
        assert d["spec"]["replicas"] == 0
        pod = d["spec"]["template"]["spec"]
        engine = pod["containers"][0]
        assert engine["image"] == "vllm/vllm-openai:v0.11.0"
        assert engine["command"][:3] == ["vllm", "serve", "/models/Llama-3.1-8B-Instruct"]
        assert "--no-enable-prefix-caching" in engine["command"]
        assert engine["resources"]["limits"]["nvidia.com/gpu"] == gpus[labels["strata.dev/instance-type"]]
        # pool.preemption_drain_secs = 30 against a 120 s notice: evicted at
        # the notice, vLLM serves on for 90 s before its signal.
        assert engine["lifecycle"] == {"preStop": {"sleep": {"seconds": 90}}}
        assert pod["terminationGracePeriodSeconds"] == 150
        env = {e["name"]: e for e in engine["env"]}
        assert env["STRATA_ENGINE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "strata-engine-keys", "key": "default"}
        assert env["VLLM_API_KEY"]["value"] == "$(STRATA_ENGINE_API_KEY)"
        assert "STRATA_REPLICA_TOKEN" not in env and "strata.toml" not in json.dumps(d)
        # The weights come from the volume, checked by nobody but their owner.
        assert {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]["claimName"] == "models"
    assert bought <= rendered, (bought, rendered)


def test_render_gives_the_engine_key_to_gateways_and_controllers_only(tmp_path):
    config = tmp_path / "strata.toml"
    config.write_text('[serve]\nreplica_mtls = false\n')
    env = {"STRATA_KEK": "ab" * 32, "STRATA_DATABASE_URL": "postgres://s@db/s"}
    made = render(str(config), env)
    assert made.returncode == 0, made.stderr
    key = re.findall(r"^  engine-key: ([0-9a-f]{64})$", made.stdout, re.M)
    assert len(key) == 1 and key[0] not in render(str(config), env).stdout  # a new one each time
    given = render(str(config), {**env, "STRATA_ENGINE_KEY": "f" * 64})
    assert given.returncode == 0 and f"engine-key: {'f' * 64}" in given.stdout
    # Without it in the environment, the stderr's Secret recipe names it.
    assert "--from-literal=engine-key=" in render(str(config)).stderr


def test_model_check_passes_only_the_file_its_sha256_names(tmp_path):
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"GGUF" + bytes(1000))
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    ok = subprocess.run([STRATA, "model", "check", str(f), "--sha256", sha.upper()], capture_output=True, text=True,
                        timeout=30)
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr
    bad = subprocess.run([STRATA, "model", "check", str(f), "--sha256", "00" * 32], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "RUST_BACKTRACE": "0"})
    assert bad.returncode != 0 and sha in bad.stderr, bad.stderr
    gone = subprocess.run([STRATA, "model", "check", str(tmp_path / "none"), "--sha256", sha], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "RUST_BACKTRACE": "0"})
    assert gone.returncode != 0 and "cannot read" in gone.stderr


def test_the_kubernetes_controller_says_when_there_is_no_cluster(tmp_path):
    (tmp_path / "none.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env.update({"RUST_BACKTRACE": "0", "KUBECONFIG": str(tmp_path / "no-kubeconfig")})
    r = subprocess.run([STRATA, "--config", str(tmp_path / "none.toml"), "controller", "--provider", "kubernetes",
                        "--db", "postgres://127.0.0.1:1/x"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0 and "--provider kubernetes" in r.stderr, r.stderr


def test_status_shows_what_runs_on_one_machine(server):
    def status(*extra):
        return subprocess.run([STRATA, "--config", server.config, "status", "--db",
                               os.path.join(server.dir, "strata.db"), *extra],
                              capture_output=True, text=True, timeout=30, env={**os.environ, "RUST_BACKTRACE": "0"})
    r = status()
    assert r.returncode == 0, r.stderr
    assert "controller: none holds the lease" in r.stdout and " ready" in r.stdout
    r = status("--json")
    assert r.returncode == 0, r.stderr
    shown = {rep["id"]: rep for rep in json.loads(r.stdout)["replicas"]}
    ready = [rep["id"] for rep in server.replica_list() if rep["ready"]]
    assert ready, "the session's server has ready replicas"
    for replica_id in ready:
        assert shown[replica_id]["state"] == "ready" and shown[replica_id]["endpoint"].startswith("https://127.0.0.1:")
    r = subprocess.run([STRATA, "status", "--db", "/nonexistent/strata.db"], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "RUST_BACKTRACE": "0"})
    assert r.returncode != 0 and "no database at /nonexistent/strata.db" in r.stderr


def test_every_dashboard_metric_is_exported(server):
    with open(os.path.join(DEPLOY, "grafana", "strata.json")) as f:
        dashboard = json.load(f)
    wanted = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            for name in re.findall(r"strata_[a-z_]+", t["expr"]):
                wanted.add(re.sub(r"_(bucket|sum|count)$", "", name))
    exported = httpx.get(f"{server.base}/metrics", headers=bearer(server.admin_key), timeout=10).text
    replica = server.replica_list()[0]["url"]
    with server.engine_client(timeout=10) as engine:
        exported += engine.get(f"{replica}/metrics").text
    names = set(re.findall(r"^# TYPE (\S+)", exported, re.M))
    names |= {n + "_total" for n in names}
    names |= {n + "_seconds" for n in names}
    missing = sorted(w for w in wanted if w not in names and re.sub(r"_total$", "", w) not in names)
    assert not missing, missing
    assert len(wanted) >= 15


def test_the_controller_metrics_show_on_the_gateway_of_strata_serve(server):
    """Replicas by pool, instance type, zone, capacity type and state, the
    plan's size, the cost rate and cost so far, failed starts, leadership:
    from the controller running in the same process."""
    text = httpx.get(f"{server.base}/metrics", headers=bearer(server.admin_key), timeout=10).text
    assert text.count("# EOF") == 1 and text.rstrip().endswith("# EOF")
    ready = ('strata_controller_replicas{pool="default",instance_type="local",zone="local",'
             'capacity="on_demand",state="ready"} 2')
    assert ready in text
    assert 'strata_controller_desired_replicas{pool="default"} 2' in text
    assert 'strata_controller_cost_rate_dollars_per_hour{pool="default"} 0.2' in text
    assert "strata_controller_leading 1" in text
    # Both replicas started: no failed start, no offer waiting.
    assert 'strata_controller_failed_starts_total{pool="default"} 0' in text
    assert 'strata_controller_held_back_offers{pool="default"} 0' in text
    spent = float(re.search(r'strata_controller_cost_dollars_total\{pool="default",capacity="on_demand"\} (\S+)', text)[1])
    assert spent > 0
    time.sleep(1.5)
    later = httpx.get(f"{server.base}/metrics", headers=bearer(server.admin_key), timeout=10).text
    assert float(re.search(r'strata_controller_cost_dollars_total\{pool="default",capacity="on_demand"\} (\S+)', later)[1]) > spent
