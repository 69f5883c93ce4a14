"""Rate limits shared by several gateways (Redis) against each gateway
limiting alone: what the shared check costs on the request path, and how
many requests a key limited to 60 a minute gets through three gateways.

Cost: wrk drives small chat completions at the nginx stub engine
(../shared/bench) directly, through a gateway with its own limiter, and
through a gateway with `gateway.shared_limits_url` (one Lua script in Redis
per request); the key's limits are far above the load so nothing is
refused. Runs alternate, so the machine's noise hits all paths alike.

Accuracy: three gateways on one PostgreSQL schema, each set once with the
shared limits and once without; a key limited to 60 requests a minute
sends 20 requests a second for 15 s, round robin over the gateways. The
GCRA admits at most a minute's worth at once plus the rate: 60 + 15 = 75.

Run: DATABASE_URL=postgres://... REDIS_URL=redis://127.0.0.1:6379 \
     .venv/bin/python bench/shared_limits.py
Needs nginx and wrk (apt-get install nginx-light wrk) and a release build
(STRATA_BIN, default target/release/strata).
"""
import json
import os
import shutil
import subprocess
import tempfile
import time

import httpx
from benchlib import STUB, new_key, port, start_stub, summarize, wait, wrk

HERE = os.path.dirname(os.path.abspath(__file__))
STRATA = os.environ.get("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
REDIS = os.environ["REDIS_URL"]
BASE_DB = os.environ["DATABASE_URL"]
DURATION, ROUNDS = os.environ.get("DURATION", "10s"), int(os.environ.get("ROUNDS", "3"))
RPM, RATE, SECONDS = 60, 20, 15


class Gateways:
    def __init__(self, d):
        self.d, self.procs = d, []
        self.admin = new_key()
        with open(os.path.join(d, "admin.key"), "w") as f:
            f.write(self.admin)

    def start(self, name, db, shared):
        config = os.path.join(self.d, f"{name}.toml")
        with open(config, "w") as f:
            f.write(f'[security]\nadmin_key_file = "{self.d}/admin.key"\n[gateway]\nslots_per_replica = 64\n')
            if shared:
                f.write(f'shared_limits_url = "{REDIS}"\n')
        p = port()
        env = {**os.environ, "STRATA_LOG": "warn", "STRATA_KEK": "6b" * 32}
        self.procs.append(subprocess.Popen(
            [STRATA, "--config", config, "gateway", "--replica", STUB, "--listen", f"127.0.0.1:{p}", "--db", db],
            env=env, cwd=self.d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        base = f"http://127.0.0.1:{p}"
        wait(f"{base}/health")
        return base

    def key(self, base, name, rpm):
        h = {"Authorization": f"Bearer {self.admin}"}
        tenant = httpx.post(f"{base}/admin/v1/tenants", headers=h, json={"name": name}).json()["id"]
        return httpx.post(f"{base}/admin/v1/tenants/{tenant}/keys", headers=h, json={
            "name": name, "role": "member", "requests_per_minute": rpm}).json()["key"]

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=10)


def pg_schema():
    schema = f"strata_bench_limits_{os.getpid()}"
    subprocess.run(["psql", BASE_DB, "-qc", f"CREATE SCHEMA {schema}"], check=True)
    sep = "&" if "?" in BASE_DB else "?"
    return schema, f"{BASE_DB}{sep}options=-c%20search_path%3D{schema}"


def admitted(bases, key):
    """Requests at RATE a second for SECONDS, round robin; how many got 200."""
    codes = []
    start = time.time()
    with httpx.Client(timeout=10) as c:
        for i in range(RATE * SECONDS):
            time.sleep(max(0.0, start + i / RATE - time.time()))
            r = c.post(f"{bases[i % len(bases)]}/v1/chat/completions",
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            codes.append(r.status_code)
    return codes.count(200), codes.count(429), len(codes)


def main():
    d = tempfile.mkdtemp(prefix="strata-bench-limits-")
    nginx = start_stub(d)
    g = Gateways(d)
    schema, db = pg_schema()
    try:
        # Cost on the request path (SQLite each, no limit reached).
        local = g.start("local", os.path.join(d, "local.db"), shared=False)
        shared = g.start("shared", os.path.join(d, "shared.db"), shared=True)
        keys = {local: g.key(local, "wrk", 100_000_000), shared: g.key(shared, "wrk", 100_000_000)}
        time.sleep(1.5)  # both gateways have seen the stub healthy
        runs = {"nginx stub, direct": [], "gateway, own limiter": [], "gateway, limits in Redis": []}
        for _ in range(ROUNDS):
            runs["nginx stub, direct"].append(wrk(f"{STUB}/v1/chat/completions", duration=DURATION))
            runs["gateway, own limiter"].append(wrk(f"{local}/v1/chat/completions", keys[local], duration=DURATION))
            runs["gateway, limits in Redis"].append(wrk(f"{shared}/v1/chat/completions", keys[shared], duration=DURATION))
        print(json.dumps(runs, indent=1))
        summary = summarize(runs)
        a, b = summary["gateway, own limiter"], summary["gateway, limits in Redis"]
        print(f"\nshared limits: throughput x{b['rps'] / a['rps']:.2f}, p50 {1000 * (b['p50'] - a['p50']):+.0f} us, "
              f"p99 {1000 * (b['p99'] - a['p99']):+.0f} us")

        # Accuracy across three gateways on one database.
        print(f"\n| limits | gateways | sent | admitted | 429 | GCRA bound |")
        print("|---|---|---|---|---|---|")
        for mode, is_shared in (("each gateway alone", False), ("shared in Redis", True)):
            bases = [g.start(f"{mode[:4]}{i}", db, shared=is_shared) for i in range(3)]
            key = g.key(bases[0], f"acc-{int(is_shared)}", RPM)
            time.sleep(1.5)
            ok, refused, sent = admitted(bases, key)
            print(f"| {mode} | 3 | {sent} | {ok} | {refused} | {RPM + SECONDS * RPM // 60} |")
    finally:
        g.stop()
        nginx.terminate()
        nginx.wait(timeout=10)
        subprocess.run(["psql", BASE_DB, "-qc", f"DROP SCHEMA {schema} CASCADE"], check=False, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
