"""What keeping a background response's events costs. A streamed Responses
turn through `strata gateway` (release build) against the fast stream stub
(bench/stream_stub.py: no model, so what the gateway and the store add per
event shows), as a plain stream and as a background stream (every event
kept in the store, sealed, before the client hears it), on PostgreSQL (the
cluster's store, where every gateway reads the events) and on SQLite (one
machine). Runs alternate, so the shared machine's noise hits all alike.
Then the raw cost of the two places a cluster could keep events, from one
Python client each: a PostgreSQL INSERT per event (one transaction each, as
strata writes them) against a Redis XADD per event, 1 and 8 writers.

Run: .venv/bin/python bench/background_stream.py
Needs DATABASE_URL (PostgreSQL) and REDIS_URL; pip installs psycopg and
redis into the venv for the raw part.
"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import httpx
from benchlib import new_key, port, wait

HERE = os.path.dirname(os.path.abspath(__file__))
STRATA = os.environ.get("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
TOKENS = int(os.environ.get("TOKENS", "256"))
TURNS = int(os.environ.get("TURNS", "20"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DB = os.environ["DATABASE_URL"]
REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")


def pg_schema(name):
    schema = f"strata_bench_{name}_{os.getpid()}"
    subprocess.run(["psql", DB, "-qc", f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"],
                   check=True)
    sep = "&" if "?" in DB else "?"
    return schema, f"{DB}{sep}options=-c%20search_path%3D{schema}"


def gateway(d, name, stub, db):
    admin = new_key()
    with open(os.path.join(d, f"{name}.key"), "w") as f:
        f.write(admin)
    with open(os.path.join(d, f"{name}.toml"), "w") as f:
        f.write(f'[security]\nadmin_key_file = "{d}/{name}.key"\n[gateway]\nslots_per_replica = 64\n')
    p = port()
    env = {**os.environ, "STRATA_LOG": "warn", "STRATA_KEK": "5a" * 32}
    proc = subprocess.Popen([STRATA, "--config", os.path.join(d, f"{name}.toml"), "gateway", "--replica", stub,
                             "--listen", f"127.0.0.1:{p}", "--db", db], env=env, cwd=d,
                            stdout=open(os.path.join(d, f"{name}.log"), "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{p}"
    wait(f"{base}/health", seconds=60)
    h = {"Authorization": f"Bearer {admin}"}
    tenant = httpx.post(f"{base}/admin/v1/tenants", headers=h, json={"name": "bench"}, timeout=30).json()["id"]
    key = httpx.post(f"{base}/admin/v1/tenants/{tenant}/keys", headers=h, timeout=30,
                     json={"name": "b", "role": "member"}).json()["key"]
    return proc, base, {"Authorization": f"Bearer {key}"}


def turn(base, headers, background):
    """Seconds from the request to the last event, and the events read."""
    body = {"model": "stub", "input": "Hi.", "stream": True, "max_output_tokens": TOKENS}
    if background:
        body["background"] = True
    t0 = time.perf_counter()
    events = 0
    with httpx.stream("POST", f"{base}/v1/responses", headers=headers, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event: "):
                events += 1
    return time.perf_counter() - t0, events


def p50(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def through_strata():
    d = tempfile.mkdtemp(prefix="strata-bench-bg-")
    sp = port()
    stub_proc = subprocess.Popen([sys.executable, os.path.join(HERE, "stream_stub.py"), str(sp)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stub = f"http://127.0.0.1:{sp}"
    wait(f"{stub}/health")
    schema, pg = pg_schema("bg")
    gws = {"postgres": gateway(d, "pg", stub, pg), "sqlite": gateway(d, "lite", stub, os.path.join(d, "s.db"))}
    times = {(db, bg): [] for db in gws for bg in (False, True)}
    events = {}
    try:
        for _, base, h in gws.values():
            for bg in (False, True):
                turn(base, h, bg)  # warm
        for r in range(ROUNDS):
            for db, (_, base, h) in gws.items():
                for bg in (False, True):
                    for _ in range(TURNS):
                        secs, n = turn(base, h, bg)
                        times[(db, bg)].append(secs)
                        events[(db, bg)] = n
            print(f"round {r + 1} of {ROUNDS} done", flush=True)
    finally:
        for proc, _, _ in gws.values():
            proc.terminate()
            proc.wait(timeout=30)
        stub_proc.terminate()
        subprocess.run(["psql", DB, "-qc", f"DROP SCHEMA {schema} CASCADE"], check=True)
    rows = []
    for db in gws:
        plain, bg = p50(times[(db, False)]), p50(times[(db, True)])
        n = events[(db, True)]
        rows.append({"store": db, "events": n, "plain_ms": plain * 1e3, "background_ms": bg * 1e3,
                     "ratio": bg / plain, "background_events_per_s": n / bg, "plain_events_per_s": n / plain})
    return rows


def raw(writers, seconds=5.0):
    """Events a second kept by `writers` clients: PostgreSQL INSERT (one
    transaction each) and Redis XADD, one event per round trip."""
    import psycopg
    import redis
    payload = os.urandom(200)  # about a sealed delta event
    schema, _ = pg_schema("raw")
    with psycopg.connect(DB, autocommit=True) as c:
        c.execute(f"CREATE TABLE {schema}.events (stream TEXT, seq BIGINT, sealed BYTEA, PRIMARY KEY (stream, seq))")
    out = {}

    def pg_writer(i, counts, stop):
        with psycopg.connect(DB, autocommit=True) as c:
            n = 0
            while not stop.is_set():
                c.execute(f"INSERT INTO {schema}.events VALUES (%s, %s, %s)", (f"w{i}", n, payload))
                n += 1
            counts[i] = n

    def redis_writer(i, counts, stop):
        r = redis.Redis.from_url(REDIS)
        n = 0
        while not stop.is_set():
            r.xadd(f"strata-bench-{os.getpid()}-w{i}", {"e": payload})
            n += 1
        counts[i] = n
        r.delete(f"strata-bench-{os.getpid()}-w{i}")

    for name, writer in (("postgres", pg_writer), ("redis", redis_writer)):
        counts, stop = [0] * writers, threading.Event()
        threads = [threading.Thread(target=writer, args=(i, counts, stop)) for i in range(writers)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        out[name] = sum(counts) / seconds
    subprocess.run(["psql", DB, "-qc", f"DROP SCHEMA {schema} CASCADE"], check=True)
    return out


def main():
    rows = through_strata()
    for row in rows:
        print(json.dumps(row), flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "psycopg[binary]", "redis"], check=True)
    for writers in (1, 8):
        print(json.dumps({"writers": writers, **raw(writers)}), flush=True)


if __name__ == "__main__":
    main()
