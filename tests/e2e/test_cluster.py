"""Cluster mode on one machine: three `strata gateway` processes and two
`strata controller` copies (one acting, one standby) on the machine's real
PostgreSQL (a fresh schema) and Redis, with real engine replicas serving the
real model. A conversation alternates between gateways, rate limits hold
across them, a gateway is killed, then the acting controller is killed and
the standby takes over."""
import json
import os
import signal
import subprocess
import tempfile
import time

import httpx
import pytest
from conftest import (CHAT_MODEL, EXTERNAL, MODEL_ID, STRATA, bearer, free_port, peer_engine_model, postgres_url,
                      psql, write_config)

KEK = "5a" * 32
LEASE_SECS = 3


def redis_url():
    url = os.environ.get("REDIS_URL")
    if not url:
        if os.environ.get("STRATA_REQUIRE_REDIS"):
            raise AssertionError("STRATA_REQUIRE_REDIS is set but REDIS_URL is not")
        pytest.skip("REDIS_URL not set")
    return url


def wait_for(what, check, timeout):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, subprocess.CalledProcessError, IndexError, KeyError) as e:
            last = repr(e)
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last})")


class Cluster:
    def __init__(self, gateways=3, replicas=2, extra="", env=None):
        self.db = postgres_url("cluster")
        self.dir = tempfile.mkdtemp(prefix="strata-cluster-")
        # One replica CA for the cluster: the controllers' engines and the
        # gateways each run in a directory of their own.
        self.admin_key, self.config = write_config(
            self.dir, f'[gateway]\nshared_limits_url = "{redis_url()}"\nqueue_timeout_secs = 120\n'
                      f'[serve]\nreplica_tls_dir = "{self.dir}/replica-tls"\n{extra}')
        self.env = {**os.environ, "STRATA_KEK": KEK, **(env or {})}
        self.procs = []
        self.metrics = {name: f"http://127.0.0.1:{free_port()}" for name in ("ctl-a", "ctl-b")}
        self.controllers = {name: self.start(name, "controller", "--db", self.db, "--replicas", str(replicas),
                                             "--lease-secs", str(LEASE_SECS), "--holder", name,
                                             "--metrics-listen", self.metrics[name].split("//")[1])
                            for name in ("ctl-a", "ctl-b")}
        self.gateways = []
        for i in range(gateways):
            port = free_port()
            proc = self.start(f"gw{i}", "gateway", "--listen", f"127.0.0.1:{port}", "--db", self.db)
            self.gateways.append((f"http://127.0.0.1:{port}", proc))

    def start(self, name, *args):
        log = open(os.path.join(self.dir, f"{name}.log"), "w")
        cwd = os.path.join(self.dir, name)
        os.makedirs(cwd)
        proc = subprocess.Popen([STRATA, "--config", self.config, *args], cwd=cwd, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def log(self, name):
        with open(os.path.join(self.dir, f"{name}.log")) as f:
            return f.read()

    def leader(self):
        return psql(self.db, "SELECT holder FROM leases WHERE name = 'controller/default' "
                             "AND expires_at_ms > EXTRACT(EPOCH FROM clock_timestamp()) * 1000")

    def status(self):
        r = subprocess.run([STRATA, "--config", self.config, "status", "--db", self.db, "--json"],
                           capture_output=True, text=True, timeout=30, env=self.env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def ready_ids(self, base):
        # A gateway still starting may answer the admin API with an error:
        # no replicas ready yet, as far as the caller can tell.
        r = httpx.get(f"{base}/admin/v1/replicas", headers=bearer(self.admin_key), timeout=10)
        if r.status_code != 200:
            return []
        return sorted(x["id"] for x in r.json()["data"] if x["ready"])

    def stop(self):
        # Controllers first: the acting one drains its replicas through the
        # gateways still running, instead of waiting for them in vain.
        controllers = list(self.controllers.values())
        others = [p for p in self.procs if p not in controllers]
        for group in (controllers, others):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        for base, _ in c.gateways:
            wait_for(f"two replicas ready at {base}", lambda: len(c.ready_ids(base)) == 2, 180)
        yield c
    finally:
        c.stop()


def client(base, key):
    from openai import OpenAI
    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def turn(base, key, conv, word):
    """One turn of the conversation through the gateway at `base`."""
    resp = client(base, key).responses.create(
        model=MODEL_ID, conversation=conv, input=f"Remember the word {word}.", max_output_tokens=4,
        temperature=0)
    # Four tokens end it early ("incomplete"), but never with an error.
    assert resp.error is None and resp.output_text, resp
    return resp


def test_cluster_survives_a_gateway_and_a_controller(cluster):
    c = cluster
    (g0, _), (g1, g1_proc), (g2, _) = c.gateways
    # Exactly one controller acts; every gateway routes to the same replicas.
    leader = c.leader()
    assert leader in ("ctl-a", "ctl-b"), leader
    first_replicas = c.ready_ids(g0)
    assert c.ready_ids(g1) == first_replicas == c.ready_ids(g2)
    assert int(psql(c.db, "SELECT COUNT(*) FROM instances WHERE ended_at_ms IS NULL")) == 2
    # `strata status` shows the same from the database: the acting
    # controller, both replicas ready at the catalog's price, three gateways.
    status = wait_for("three gateways in status", lambda: (s := c.status()) and len(s["gateways"]) == 3 and s, 10)
    assert status["controller"]["holder"] == leader
    assert sorted(r["id"] for r in status["replicas"]) == first_replicas
    assert status["replicas_by_state"]["ready"] == 2
    assert abs(status["cost_per_hour"] - 2 * 0.10) < 1e-9
    # Each controller's own /metrics: the acting one holds two ready
    # replicas at 0.20 $/h; the standby holds none.
    standby = "ctl-b" if leader == "ctl-a" else "ctl-a"
    acting = httpx.get(f"{c.metrics[leader]}/metrics", timeout=10).text
    assert "strata_controller_leading 1" in acting
    assert ('strata_controller_replicas{pool="default",instance_type="local",zone="local",'
            'capacity="on_demand",state="ready"} 2') in acting
    assert 'strata_controller_cost_rate_dollars_per_hour{pool="default"} 0.2' in acting
    idle = httpx.get(f"{c.metrics[standby]}/metrics", timeout=10).text
    assert "strata_controller_leading 0" in idle and "strata_controller_replicas{" not in idle

    # Admin state is shared: a tenant made on one gateway gets a key on another.
    admin = lambda base, method, path, body=None: httpx.request(  # noqa: E731
        method, f"{base}{path}", json=body, headers=bearer(c.admin_key), timeout=30)
    tenant = admin(g0, "POST", "/admin/v1/tenants", {"name": "cluster"}).json()
    r = admin(g1, "POST", f"/admin/v1/tenants/{tenant['id']}/keys", {"name": "k", "role": "member"})
    assert r.status_code == 201, r.text
    key = r.json()["key"]

    # One conversation, each turn on another gateway.
    conv = client(g0, key).conversations.create()
    words = ["apple", "river", "stone"]
    for base, word in zip([g1, g2, g0], words):
        turn(base, key, conv.id, word)
    items = client(g2, key).conversations.items.list(conv.id, order="asc").data
    said = [i.content[0].text for i in items if i.role == "user"]
    assert said == [f"Remember the word {w}." for w in words]
    assert len([i for i in items if i.role == "assistant"]) == 3

    # Rate limits hold across gateways: 6 requests a minute for this key,
    # whichever gateway they reach (each gateway alone would admit 6).
    limited = admin(g0, "POST", f"/admin/v1/tenants/{tenant['id']}/keys",
                    {"name": "limited", "role": "member", "requests_per_minute": 6}).json()["key"]
    codes = []
    for i in range(12):
        base = c.gateways[i % 3][0]
        r = httpx.post(f"{base}/v1/completions", headers=bearer(limited), timeout=120,
                       json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1})
        codes.append(r.status_code)
    assert codes.count(200) == 6 and codes.count(429) == 6, codes

    # A gateway dies; the conversation goes on through the others.
    g1_proc.send_signal(signal.SIGKILL)
    g1_proc.wait(timeout=10)
    turn(g2, key, conv.id, "cloud")

    # The acting controller dies (its engines with it); the standby takes
    # the lease once its term runs out and starts replicas of its own.
    killed_at = time.time()
    c.controllers[leader].send_signal(signal.SIGKILL)
    c.controllers[leader].wait(timeout=10)
    standby = "ctl-b" if leader == "ctl-a" else "ctl-a"
    wait_for("the standby to lead", lambda: c.leader() == standby, LEASE_SECS * 4)
    took_over = time.time() - killed_at
    assert took_over <= LEASE_SECS * 3, took_over
    new_replicas = wait_for("new replicas at every gateway", lambda: all(
        len(ids := c.ready_ids(base)) == 2 and not set(ids) & set(first_replicas)
        for base in (g0, g2)), 120)
    assert new_replicas
    # The dead leader's instances are recorded as ended; two run now.
    assert int(psql(c.db, "SELECT COUNT(*) FROM instances WHERE ended_at_ms IS NULL")) == 2
    assert int(psql(c.db, "SELECT COUNT(*) FROM instances WHERE detail = 'its controller lost the lease'")) == 2

    # The conversation, stored in PostgreSQL, continues on the new replicas.
    turn(g0, key, conv.id, "flame")
    items = client(g2, key).conversations.items.list(conv.id, order="asc").data
    assert [i.content[0].text for i in items if i.role == "user"][-2:] == [
        "Remember the word cloud.", "Remember the word flame."]
    assert "leading: this controller acts now" in c.log(standby)
    assert "strata_controller_leading 1" in httpx.get(f"{c.metrics[standby]}/metrics", timeout=10).text


def test_a_background_stream_outlives_the_gateway_it_started_on(cluster):
    """After the test above: g0 and g2 run (g1 was killed). A background
    response streams from g0; g0 is SIGKILLed mid-answer; the client
    resumes on g2 after the last event it saw, and reads the rest: every
    event exactly once, the answer whole, counted once."""
    c = cluster
    (g0, g0_proc), _, (g2, _) = c.gateways
    admin = lambda base, method, path, body=None: httpx.request(  # noqa: E731
        method, f"{base}{path}", json=body, headers=bearer(c.admin_key), timeout=30)
    tenant = admin(g2, "POST", "/admin/v1/tenants", {"name": "background"}).json()
    key = admin(g2, "POST", f"/admin/v1/tenants/{tenant['id']}/keys", {"name": "k", "role": "member"}).json()["key"]
    stream = client(g0, key).responses.create(
        model=MODEL_ID, input="Tell me a long story about a lighthouse.", background=True, stream=True,
        max_output_tokens=96, temperature=0)
    seen = []
    for event in stream:
        seen.append(event)
        if event.sequence_number >= 10:
            break
    rid = seen[0].response.id
    g0_proc.send_signal(signal.SIGKILL)
    g0_proc.wait(timeout=10)
    stream.close()
    # g2 takes the response over once g0's lease runs out, and goes on
    # after the last event g0 kept.
    rest = list(client(g2, key).responses.retrieve(rid, stream=True, starting_after=seen[-1].sequence_number))
    events = seen + rest
    assert [e.sequence_number for e in events] == list(range(len(events))), [e.sequence_number for e in events]
    final = events[-1].response
    assert events[-1].type == "response.incomplete", events[-1]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text
    # The whole answer, generated by both replicas' turns, is counted once.
    assert final.usage.output_tokens == 96, final.usage
    stored = client(g2, key).responses.retrieve(rid)
    assert stored.status == "incomplete" and stored.output_text == text
    assert "taking a background response over" in c.log("gw2")
    rows = psql(c.db, f"SELECT COUNT(*) FROM usage WHERE tenant_id = '{tenant['id']}'")
    assert int(rows) == 1, rows
    # An insider with write access to the database marks the finished
    # response as running again: no gateway runs it (or bills the tenant)
    # again; it is ended as it was.
    psql(c.db, f"UPDATE responses SET background = 'running' WHERE id = '{rid}'")
    wait_for("the response ended again", lambda: psql(
        c.db, f"SELECT background IS NULL FROM responses WHERE id = '{rid}'") == "t", 15)
    assert client(g2, key).responses.retrieve(rid).output_text == text
    rows = psql(c.db, f"SELECT COUNT(*) FROM usage WHERE tenant_id = '{tenant['id']}'")
    assert int(rows) == 1, rows


SYSTEM = "You are the support assistant of a cloud platform team; answer briefly. " * 6


def test_a_controller_that_stops_hands_its_sessions_caches_to_the_next(tmp_path):
    """A graceful stop of the acting controller: a gateway keeps its
    replicas' sessions as sealed snapshots in PostgreSQL before they stop,
    and the next turn, on the standby's replica, starts from the snapshot."""
    c = Cluster(gateways=2, replicas=1)
    try:
        (g0, _), (g1, _) = c.gateways
        for base in (g0, g1):
            wait_for(f"a replica ready at {base}", lambda: len(c.ready_ids(base)) == 1, 180)
        first_replicas = c.ready_ids(g0)
        headers = bearer(c.admin_key)
        tenant = httpx.post(f"{g0}/admin/v1/tenants", json={"name": "drain"}, headers=headers).json()
        key = httpx.post(f"{g0}/admin/v1/tenants/{tenant['id']}/keys", json={"name": "k", "role": "member"},
                         headers=headers).json()["key"]
        greedy = {"model": MODEL_ID, "temperature": 0, "max_output_tokens": 8, "instructions": SYSTEM}
        first = client(g0, key).responses.create(input="My name is Ada. CANARY-drain-2291", **greedy)
        leader = c.leader()
        c.controllers[leader].send_signal(signal.SIGTERM)
        assert c.controllers[leader].wait(timeout=60) == 0, c.log(leader)
        # One gateway drained the replica before it stopped.
        drained = [name for name in ("gw0", "gw1") if "replica drained" in c.log(name)]
        assert len(drained) == 1, drained
        assert int(psql(c.db, "SELECT COUNT(*) FROM kv_snapshots")) >= 1
        standby = "ctl-b" if leader == "ctl-a" else "ctl-a"
        wait_for("the standby to lead", lambda: c.leader() == standby, 10)
        wait_for("the standby's replica", lambda: (ids := c.ready_ids(g1)) and ids != first_replicas, 120)
        moved = client(g1, key).responses.create(input="What is my name?", previous_response_id=first.id, **greedy)
        # The whole first turn came back from the snapshot, not from prefill.
        assert moved.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens, moved.usage
        assert int(psql(c.db, "SELECT COUNT(*) FROM kv_snapshots")) == 0, "a snapshot is used once"
    finally:
        c.stop()


def test_a_clusters_gateways_and_acting_controller_share_one_catalog():
    """[[models]] in a cluster: the acting controller runs a pool per model
    of the config file and of the database; a model deployed (or an alias
    made) through one gateway's admin API is listed and served through
    every gateway, and an undeployed one drains and stops."""
    c = Cluster(gateways=2, replicas=1, extra=f'[engine]\ncontext_size = 1024\n'
                                              f'[[models]]\nid = "{CHAT_MODEL}"\nsource = "{CHAT_MODEL}"\n')
    try:
        (g0, _), (g1, _) = c.gateways
        for base in (g0, g1):
            wait_for(f"a replica ready at {base}", lambda: len(c.ready_ids(base)) == 1, 180)
        headers = bearer(c.admin_key)
        admin = lambda base, method, path, body=None: httpx.request(  # noqa: E731
            method, f"{base}{path}", json=body, headers=headers, timeout=60)
        tenant = admin(g0, "POST", "/admin/v1/tenants", {"name": "catalog"}).json()
        key = admin(g0, "POST", f"/admin/v1/tenants/{tenant['id']}/keys", {"name": "k", "role": "member"}).json()["key"]
        listed = lambda base: sorted(m.id for m in client(base, key).models.list().data)  # noqa: E731
        assert listed(g0) == listed(g1) == [CHAT_MODEL]
        # A model the file does not have: refused whole by the gateway.
        r = admin(g1, "POST", "/admin/v1/models", {"id": "x", "source": "no-such-source"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model", r.text
        r = admin(g0, "POST", "/admin/v1/models", {"id": "smollm2-b", "source": CHAT_MODEL, "replicas": 1})
        assert r.status_code == 201, r.text
        wait_for("smollm2-b listed at the other gateway", lambda: "smollm2-b" in listed(g1), 10)
        # Served through the other gateway, by a replica of its own pool
        # the acting controller started.
        answer = client(g1, key).chat.completions.create(
            model="smollm2-b", temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert answer.model == "smollm2-b" and "Paris" in answer.choices[0].message.content
        pools = psql(c.db, "SELECT string_agg(DISTINCT pool, ' ' ORDER BY pool) FROM instances "
                           "WHERE ended_at_ms IS NULL")
        assert pools.split() == sorted([CHAT_MODEL, "smollm2-b"]), pools
        # An alias made at one gateway answers at the other.
        r = admin(g1, "POST", "/admin/v1/models", {"id": "chat", "alias": {CHAT_MODEL: 1, "smollm2-b": 1}})
        assert r.status_code == 201, r.text
        wait_for("the alias at the other gateway", lambda: "chat" in listed(g0), 10)
        models = {client(g0, key).chat.completions.create(
            model="chat", max_tokens=2, messages=[{"role": "user", "content": f"Thread {i}"}]).model
            for i in range(12)}
        assert models == {CHAT_MODEL, "smollm2-b"}, models
        assert admin(g0, "DELETE", "/admin/v1/models/smollm2-b").status_code == 409
        assert admin(g0, "DELETE", "/admin/v1/models/chat").status_code == 200
        assert admin(g0, "DELETE", "/admin/v1/models/smollm2-b").status_code == 200
        wait_for("smollm2-b gone from the other gateway", lambda: "smollm2-b" not in listed(g1), 10)
        wait_for("smollm2-b's replica stopped", lambda: psql(
            c.db, "SELECT COUNT(*) FROM instances WHERE pool = 'smollm2-b' AND ended_at_ms IS NULL") == "0", 90)
        # The config file's model serves on.
        client(g1, key).chat.completions.create(
            model=CHAT_MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    finally:
        c.stop()


def test_a_cluster_serves_an_external_engine_with_the_key_its_gateways_derive():
    """Engine kind `openai` in a cluster: the acting controller launches
    llama-cpp-python with its pool's key derived from STRATA_ENGINE_KEY;
    every gateway derives the same key from the same secret and reaches it,
    and nothing else does."""
    extra = (f'[engine]\ncontext_size = 1024\n[[models]]\nid = "{CHAT_MODEL}"\nsource = "{CHAT_MODEL}"\n'
             + peer_engine_model(EXTERNAL, "ext"))
    c = Cluster(gateways=2, replicas=1, extra=extra, env={"STRATA_ENGINE_KEY": "a cluster's secret"})
    try:
        (g0, _), (g1, _) = c.gateways
        for base in (g0, g1):
            wait_for(f"both pools ready at {base}", lambda: len(c.ready_ids(base)) == 2, 180)
        headers = bearer(c.admin_key)
        tenant = httpx.post(f"{g0}/admin/v1/tenants", json={"name": "ext"}, headers=headers, timeout=30).json()
        key = httpx.post(f"{g0}/admin/v1/tenants/{tenant['id']}/keys", json={"name": "k", "role": "member"},
                         headers=headers, timeout=30).json()["key"]
        for base in (g0, g1):
            answer = client(base, key).chat.completions.create(
                model=EXTERNAL, temperature=0, max_tokens=20,
                messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert "Paris" in answer.choices[0].message.content
        engines = {e["model"]: e["kind"] for e in c.status()["engines"]}
        assert engines == {CHAT_MODEL: "strata", EXTERNAL: "openai"}
        url = psql(c.db, f"SELECT endpoint FROM instances WHERE pool = '{EXTERNAL}' AND ended_at_ms IS NULL")
        body = {"model": EXTERNAL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 401
    finally:
        c.stop()


def test_a_controller_without_postgres_and_a_bad_lease_are_refused(tmp_path):
    (tmp_path / "none.toml").write_text("")
    for args, needle in [
        (["controller", "--db", str(tmp_path / "x.db")], "PostgreSQL"),
        (["controller", "--db", "postgres://127.0.0.1:1/x", "--lease-secs", "0"], "--lease-secs"),
    ]:
        r = subprocess.run([STRATA, "--config", str(tmp_path / "none.toml"), *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and needle in r.stderr, r.stderr
