"""Soak (issue 9): `strata serve` with autoscaling on (zero to two engine
replicas, the real model) under a mixed load of three tenants for
SOAK_MINUTES (30), in cycles of CYCLE_SECS (360): busy (4 clients), light
(1 client), idle (the pool scales to zero; the next request waits for a
replica to start). Each request is one of: a chat completion, a streamed
chat completion, a stored Responses turn in a conversation, a read of the
conversation's items.

Every 10 s it samples the gateway process (`strata serve`: gateway and
controller) for resident memory and open file descriptors. Per cycle it
prints requests, failures, latency percentiles of the plain chat
completions, and memory and descriptors at the cycle's end (idle, so
cycles compare like with like). It exits 1 if any request was lost (not a
200, or no answer), or if memory or descriptors grew from the second
cycle's end to the last's by more than the limits below.

Run: STRATA_BIN=/work/rel-target/release/strata .venv/bin/python bench/soak.py
(loopback only; it stops by itself.)
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
from conftest import MODEL_ID, bearer, free_port, wait_ready, write_config  # noqa: E402  (the e2e tests' helpers)

STRATA = os.environ.get("STRATA_BIN", os.path.join(HERE, "..", "target", "debug", "strata"))
MINUTES = float(os.environ.get("SOAK_MINUTES", "30"))
CYCLE = float(os.environ.get("CYCLE_SECS", "360"))
BUSY, LIGHT = 0.6 * CYCLE, 0.2 * CYCLE  # then idle for the rest
# Growth allowed from the second cycle's end to the last's.
RSS_GROWTH_MB, FD_GROWTH = 16, 8

CONFIG = """
[engine]
max_sequences = 2

[gateway]
slots_per_replica = 2
queue_timeout_secs = 180

[pool]
autoscale = true
min_replicas = 0
max_replicas = 2
stable_window_secs = 10.0
panic_window_secs = 4.0
scale_down_delay_secs = 15.0
scale_to_zero_after_secs = 30.0
"""


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def process_sample(pid):
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def main():
    d = tempfile.mkdtemp(prefix="strata-soak-")
    admin, config = write_config(d, CONFIG)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(os.path.join(d, "serve.log"), "w")
    proc = subprocess.Popen([STRATA, "--config", config, "serve", "--listen", f"127.0.0.1:{port}",
                             "--db", os.path.join(d, "strata.db")], cwd=d, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "STRATA_LOG": "warn"})
    wait_ready(base, 0, timeout=60)  # autoscaling from zero: no replica yet
    keys = []
    for name in ("alpha", "beta", "gamma"):
        t = httpx.post(f"{base}/admin/v1/tenants", json={"name": name}, headers=bearer(admin)).json()["id"]
        keys.append(httpx.post(f"{base}/admin/v1/tenants/{t}/keys", json={"name": name, "role": "member"},
                               headers=bearer(admin)).json()["key"])

    started = time.time()
    end = started + MINUTES * 60
    lock = threading.Lock()
    done = []  # (finished at, kind, seconds, ok, what)
    samples = []  # (at, rss MiB, fds, replicas)

    def cycle_of(t):
        return int((t - started) // CYCLE)

    def wanted_clients(now):
        phase = (now - started) % CYCLE
        return 4 if phase < BUSY else 1 if phase < BUSY + LIGHT else 0

    def client(i):
        key = keys[i % len(keys)]
        conv = None
        with httpx.Client(base_url=base, headers=bearer(key), timeout=300) as c:
            while time.time() < end:
                if i >= wanted_clients(time.time()):
                    time.sleep(0.5)
                    continue
                kind = random.choices(["chat", "stream", "turn", "read"], [4, 2, 3, 1])[0]
                t0 = time.time()
                ok, what = False, ""
                try:
                    if kind == "chat":
                        r = c.post("/v1/chat/completions", json={
                            "model": MODEL_ID, "max_tokens": 8,
                            "messages": [{"role": "user", "content": f"Count to {random.randint(3, 9)}."}]})
                        ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
                    elif kind == "stream":
                        with c.stream("POST", "/v1/chat/completions", json={
                                "model": MODEL_ID, "max_tokens": 8, "stream": True,
                                "messages": [{"role": "user", "content": "Say hello."}]}) as r:
                            body = r.read().decode()
                        ok = r.status_code == 200 and body.rstrip().endswith("data: [DONE]") and '"error"' not in body
                    elif kind == "turn":
                        if conv is None:
                            conv = c.post("/v1/conversations", json={}).json()["id"]
                        r = c.post("/v1/responses", json={"model": MODEL_ID, "conversation": conv,
                                                          "input": f"Remember {random.randint(0, 999)}.",
                                                          "max_output_tokens": 8})
                        ok = r.status_code == 200 and r.json()["status"] in ("completed", "incomplete")
                        if random.random() < 0.1:
                            conv = None
                    else:
                        r = c.get(f"/v1/conversations/{conv}/items" if conv else "/v1/models")
                        ok = r.status_code == 200
                    if not ok:
                        what = f"{r.status_code} {r.text[:120]}"
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    what = f"{type(e).__name__}: {e}"
                with lock:
                    done.append((time.time(), kind, time.time() - t0, ok, what))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    while time.time() < end:
        rss, fds = process_sample(proc.pid)
        replicas = len(httpx.get(f"{base}/health", timeout=10).json()["replicas"])
        samples.append((time.time(), rss, fds, replicas))
        time.sleep(10)
    for t in threads:
        t.join(timeout=330)
    rss, fds = process_sample(proc.pid)
    samples.append((time.time(), rss, fds, 0))
    proc.terminate()
    proc.wait(timeout=60)

    cycles = []
    for n in range(cycle_of(end - 1) + 1):
        mine = [x for x in done if cycle_of(x[0]) == n]
        chat = [x[2] for x in mine if x[1] == "chat" and x[3]]
        last = [s for s in samples if cycle_of(s[0]) == n] or samples[-1:]
        cycles.append({
            "cycle": n + 1, "requests": len(mine), "lost": sum(1 for x in mine if not x[3]),
            "chat_p50_ms": round(percentile(chat, 50) * 1000), "chat_p99_ms": round(percentile(chat, 99) * 1000),
            "max_replicas": max(s[3] for s in last), "rss_mib": round(last[-1][1], 1), "fds": last[-1][2],
        })
    lost = [x for x in done if not x[3]]
    problems = [f"lost: {x[1]} after {x[2]:.1f}s: {x[4]}" for x in lost[:10]]
    if len(cycles) >= 3:
        a, b = cycles[1], cycles[-1]
        if b["rss_mib"] - a["rss_mib"] > RSS_GROWTH_MB:
            problems.append(f"memory grew {a['rss_mib']} -> {b['rss_mib']} MiB")
        if b["fds"] - a["fds"] > FD_GROWTH:
            problems.append(f"descriptors grew {a['fds']} -> {b['fds']}")
    print("| cycle | requests | lost | chat p50 ms | chat p99 ms | replicas (max) | RSS MiB at end | fds at end |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cycles:
        print(f"| {c['cycle']} | {c['requests']} | {c['lost']} | {c['chat_p50_ms']} | {c['chat_p99_ms']} | "
              f"{c['max_replicas']} | {c['rss_mib']} | {c['fds']} |")
    print(json.dumps({"minutes": MINUTES, "requests": len(done), "by_kind": Counter(x[1] for x in done),
                      "lost": len(lost), "rss_mib_min_max": [min(s[1] for s in samples), max(s[1] for s in samples)],
                      "fds_min_max": [min(s[2] for s in samples), max(s[2] for s in samples)],
                      "problems": problems}, indent=1))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
