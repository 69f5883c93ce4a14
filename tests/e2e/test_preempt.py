"""Spot preemption on the `local` provider, with a catalog of one size in two
zones as spot and on demand: `strata chaos preempt` gives the replica a
notice; a replacement starts at once in the other zone (the reclaiming zone
cools down), the stream running on the preempted replica finishes, requests
sent meanwhile wait and are served, the conversation continues warm from its
snapshot on the new replica, and when both zones have reclaimed, on-demand
capacity takes over. The cost ledger then bills each instance at its
catalog price and splits it by tenant."""
import concurrent.futures as cf
import csv
import io
import json
import os
import sqlite3
import subprocess
import time

import httpx

from conftest import MODEL_ID, STRATA, Server

CONFIG = """
[[catalog]]
instance_type = "local"
zone = "zone-a"
capacity = "spot"
price_per_hour = 0.03

[[catalog]]
instance_type = "local"
zone = "zone-b"
capacity = "spot"
price_per_hour = 0.04

[[catalog]]
instance_type = "local"
zone = "zone-a"
capacity = "on_demand"
price_per_hour = 0.10

[pool]
spot_cooldown_secs = 600.0
preemption_notice_secs = 20.0
"""
SYSTEM = "You are the support assistant of a cloud platform team; answer briefly. " * 6


def instances(s):
    db = sqlite3.connect(os.path.join(s.dir, "strata.db"))
    rows = db.execute("SELECT id, zone, capacity, state, price_per_hour FROM instances ORDER BY started_at_ms").fetchall()
    return [dict(zip(("id", "zone", "capacity", "state", "price"), r)) for r in rows]


def replicas(s):
    return s.replica_list()


def wait_for_new_ready(s, old, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        fresh = [r for r in replicas(s) if r["id"] not in old and r["ready"]]
        if fresh:
            return fresh[0]["id"]
        time.sleep(0.25)
    raise AssertionError(f"no replacement ready: {replicas(s)}")


def wait_gone(s, replica, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(r["id"] != replica for r in replicas(s)):
            return
        time.sleep(0.25)
    raise AssertionError(f"{replica} still listed: {replicas(s)}")


def chaos(s, replica, *flags):
    env = {**os.environ, "STRATA_URL": s.base, "STRATA_API_KEY": s.admin_key}
    return subprocess.run([STRATA, "chaos", "preempt", replica, *flags], env=env,
                          capture_output=True, text=True)


def strata(s, *args):
    return subprocess.run([STRATA, "--config", s.config, *args, "--db", os.path.join(s.dir, "strata.db")],
                          capture_output=True, text=True, check=True).stdout


def test_a_preempted_replica_drains_while_its_replacement_starts_elsewhere():
    s = Server(replicas=1, config=CONFIG, tenant="spot")
    try:
        c = s.client()
        [home] = [r["id"] for r in replicas(s)]
        assert instances(s)[0]["zone"] == "zone-a" and instances(s)[0]["capacity"] == "spot"
        first = c.responses.create(model=MODEL_ID, input="My name is Ada.", instructions=SYSTEM,
                                   temperature=0, max_output_tokens=8)

        # A long stream runs on the replica when the notice comes.
        stream = c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Tell a story."}],
                                           max_tokens=120, temperature=0, stream=True)
        chunks = iter(stream)
        next(chunks)
        out = chaos(s, home, "--notice-secs", "30")
        assert out.returncode == 0 and "preemption notice sent" in out.stdout, out
        # Requests sent during the notice wait for the replacement and are served.
        with cf.ThreadPoolExecutor(4) as pool:
            during = [pool.submit(c.completions.create, model=MODEL_ID, prompt=f"Count {i}:", max_tokens=4,
                                  temperature=0) for i in range(4)]
            rest = list(chunks)
            assert rest[-1].choices[0].finish_reason in ("length", "stop"), rest[-1]
            assert all(f.result().usage.completion_tokens == 4 for f in during)
        new = wait_for_new_ready(s, {home})
        wait_gone(s, home, 40)
        rows = {r["id"]: r for r in instances(s)}
        assert rows[home]["state"] == "preempted"
        assert (rows[new]["zone"], rows[new]["capacity"]) == ("zone-b", "spot"), rows
        # The conversation continues on the new replica from its snapshot.
        second = c.responses.create(model=MODEL_ID, input="What is my name?", previous_response_id=first.id,
                                    instructions=SYSTEM, temperature=0, max_output_tokens=8)
        assert second.usage.input_tokens_details.cached_tokens > 0, second.usage

        # Zone b reclaims too, with no notice: on-demand carries the pool.
        assert chaos(s, new, "--notice-secs", "0").returncode == 0
        third = wait_for_new_ready(s, {home, new})
        assert (instances(s)[-1]["id"], instances(s)[-1]["capacity"]) == (third, "on_demand")
        r = c.completions.create(model=MODEL_ID, prompt="Still here:", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2

        # Bad notices and unknown replicas are clear 4xx errors.
        r = s.admin("POST", f"/admin/v1/replicas/{third}/preempt", {"notice_secs": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "notice_secs"
        assert s.admin("POST", "/admin/v1/replicas/nope/preempt").status_code == 404
        assert s.admin("POST", f"/admin/v1/replicas/{third}/preempt", key=s.key).status_code in (401, 403)

        # Decisions: each change of the mix, with the zones spot was to be had in.
        decisions = json.loads(strata(s, "decisions", "--json"))
        zones = [json.loads(d["inputs"])["spot_zones"] for d in decisions if d["reason"] == "replan"]
        assert ["zone-b"] in zones and [] in zones, decisions

        # The ledger: every instance at its price, split by tenant (over one
        # fixed range, since the running instance's bill grows).
        utc = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
        # The range ends on a whole second: one more second has passed since
        # the last replica launched, so the range holds some of its time
        # (on a busy machine it was once less than a second old: no line).
        time.sleep(1.1)
        span = ["--since", utc(time.time() - 3600), "--until", utc(time.time())]  # the past: fixed
        by_type = json.loads(strata(s, "cost", "report", "--by", "instance-type", *span, "--json"))
        keys = {l["key"] for l in by_type["lines"]}
        assert keys == {"local (spot)", "local (on_demand)"}, by_type
        by_tenant = json.loads(strata(s, "cost", "report", *span, "--json"))
        tenants = {l["key"]: l for l in by_tenant["lines"]}
        assert s.tenant["id"] in tenants and "(idle)" in tenants, by_tenant
        assert tenants[s.tenant["id"]]["tokens"] > 0
        assert abs(by_tenant["total_usd"] - by_type["total_usd"]) < 1e-9
        rows = list(csv.DictReader(io.StringIO(strata(s, "cost", "report", *span, "--csv"))))
        assert {r["PricingCategory"] for r in rows} == {"Dynamic", "Standard"}
        assert {r["ResourceId"] for r in rows} == {home, new, third}
        assert abs(sum(float(r["BilledCost"]) for r in rows) - by_type["total_usd"]) < 1e-6
        # A spot hour at $0.03: the preempted replica cost about its running time.
        spot_a = sum(float(r["BilledCost"]) for r in rows if r["ResourceId"] == home)
        assert 0 < spot_a < 0.03 * 300 / 3600, spot_a
        table = strata(s, "cost", "report", "--by", "tenant")
        assert "(idle)" in table and "total" in table
        bad = subprocess.run([STRATA, "cost", "report", "--by", "colour", "--db", os.path.join(s.dir, "strata.db")],
                             capture_output=True, text=True)
        assert bad.returncode != 0 and "--by must be" in bad.stderr
    finally:
        s.stop()


LATE = CONFIG.replace("preemption_notice_secs = 20.0\n",
                      "preemption_notice_secs = 20.0\npreemption_drain_secs = 6.0\n")


def test_a_preempted_replica_serves_until_its_drain_before_the_reclaim():
    """`pool.preemption_drain_secs`: the replacement starts at the notice,
    and the reclaimed replica takes requests until 6 s before it goes, then
    drains and goes when the notice ends."""
    s = Server(replicas=1, config=LATE, tenant="late")
    try:
        c = s.client()
        [home] = [r["id"] for r in replicas(s)]
        sent = time.time()
        assert chaos(s, home, "--notice-secs", "20").returncode == 0
        # Its replacement is launched at once, in the other zone.
        while len(instances(s)) < 2 and time.time() < sent + 10:
            time.sleep(0.2)
        assert [(r["zone"], r["capacity"]) for r in instances(s)][1:] == [("zone-b", "spot")], instances(s)
        # Until 14 s after the notice it is listed as taking requests (a
        # replica drained at the notice shows `draining` at once), and
        # requests are served.
        served = 0
        while time.time() < sent + 12:
            listed = {r["id"]: r for r in replicas(s)}
            assert home in listed and not listed[home]["draining"], listed
            r = c.completions.create(model=MODEL_ID, prompt="Ping:", max_tokens=2, temperature=0)
            served += r.usage.completion_tokens == 2
            time.sleep(0.5)
        assert served >= 5
        # Then it drains, and it is gone once the notice has run out.
        while time.time() < sent + 22:
            listed = {r["id"]: r for r in replicas(s)}
            if home not in listed or listed[home]["draining"]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{home} still taking requests 22 s after a 20 s notice: {replicas(s)}")
        assert time.time() >= sent + 12
        wait_gone(s, home, 30)
        assert {r["id"]: r["state"] for r in instances(s)}[home] == "preempted"
        r = c.completions.create(model=MODEL_ID, prompt="Still here:", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
    finally:
        s.stop()


RANDOM = """
[[catalog]]
instance_type = "local"
zone = "zone-a"
capacity = "spot"
price_per_hour = 0.03

[pool]
spot_cooldown_secs = 0.0
preemption_notice_secs = 1.0
random_preemptions_per_hour = 1800.0   # one every two seconds per replica, on average
"""


def test_random_reclaims_are_replaced_and_requests_keep_being_served():
    s = Server(replicas=1, config=RANDOM, tenant="reclaims")
    try:
        c = s.client()
        served = 0
        deadline = time.time() + 20
        while time.time() < deadline:
            r = c.completions.create(model=MODEL_ID, prompt="Ping:", max_tokens=2, temperature=0)
            served += r.usage.completion_tokens == 2
        reclaimed = [r for r in instances(s) if r["state"] == "preempted"]
        assert len(reclaimed) >= 2, instances(s)
        assert served >= 5
        log = open(s.log_path).read()
        assert "preemption notice" in log
    finally:
        s.stop()


def test_an_engine_told_to_linger_serves_on_after_sigterm_while_used_then_stops():
    """How a replica serves through its notice on Kubernetes: the node's
    interruption handler evicts the Pod (SIGTERM) at the notice, and the
    engine (`--linger-secs`, rendered with `pool.preemption_drain_secs`)
    keeps answering the gateways until they stop sending, then stops
    10 s later. Requests a gateway would not send (no token) keep nothing
    alive; a linger that is not a number of seconds is refused."""
    from conftest import free_port, wait_healthy

    bad = subprocess.run([STRATA, "engine", "--port", "1", "--linger-secs", "nan"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--linger-secs" in bad.stderr, bad.stderr
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "STRATA_REPLICA_TOKEN": "linger-test-token"}
    proc = subprocess.Popen([STRATA, "engine", "--port", str(port), "--max-sequences", "2", "--linger-secs", "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_healthy(proc, base, "the engine", timeout=120)
        gateway = {"Authorization": "Bearer linger-test-token"}
        body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 4}
        proc.terminate()
        # Used for 14 s after the signal, longer than the 10 s of quiet that
        # would stop it: it answers every request.
        signalled = time.monotonic()
        answered = 0
        while time.monotonic() - signalled < 14:
            r = httpx.post(f"{base}/v1/completions", json=body, headers=gateway, timeout=60)
            assert r.status_code == 200, r.text
            last = time.monotonic()
            answered += 1
            assert proc.poll() is None
            time.sleep(1.5)
        # Unauthenticated requests are refused and do not count as use.
        while time.monotonic() - last < 6:
            assert httpx.post(f"{base}/v1/completions", json=body, timeout=10).status_code == 401
            time.sleep(1)
        proc.wait(timeout=30)
        stopped = time.monotonic() - last
        assert proc.returncode == 0, proc.stderr.read().decode()
        assert answered >= 7
        assert 9 <= stopped <= 14, stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
