"""Live autoscaling on the `local` provider under a ramp-up / ramp-down
load, against a fixed deployment sized for the peak, in the same run.

The load is clients streaming chat completions (greedy, 32 tokens), each
waiting THINK seconds between its requests; engines run 4 sequences and
the gateway gives each replica 4 slots, so a busy replica queues requests
(TTFT includes the wait). The number of clients steps through PHASES
(seconds, clients):
idle, a ramp up to the peak, a ramp down, idle again. The same schedule
runs twice against a release `strata serve`:

- autoscaled: `pool.autoscale` from zero, min 1, max 2 replicas of one
  engine thread each (this machine has 2 cores; the profile is measured by
  bench/profile.py), scale to zero after 20 s idle, p95 TTFT objective SLO_MS;
- fixed peak: 2 replicas of one thread all the time.

Each second the replicas listed by /health are sampled. Reported per run:
replicas over time (a text strip, one character per 5 s), replica-seconds,
requests, errors, TTFT p50/p95 and the share of requests with TTFT within
the objective, per phase and overall; the controller's decisions; the
ledger's cost (`strata cost report`). Replica-seconds count every listed
replica, starting or draining included (what a cloud would bill).

Run: .venv/bin/python bench/ramp_bench.py   (needs a release build)
"""
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
os.environ.setdefault("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
from benchlib import streamed_chat  # noqa: E402
from conftest import MODEL_ID, STRATA, Server  # noqa: E402

SCALE = float(os.environ.get("SCALE", "1"))
PHASES = [(int(s * SCALE), n) for s, n in [(10, 0), (30, 1), (30, 3), (50, 8), (30, 3), (30, 1), (50, 0)]]
SLO_MS = 1000.0
OUT = 32
THINK = 1.0  # seconds a client waits between its requests

TYPE = """
[engine]
max_sequences = 4

[gateway]
slots_per_replica = 4

# measured on this machine: THREADS=1 MAX_SEQ=4 bench/profile.py
[instance_types.cpu1]
threads = 1
prefill_tokens_per_s = 247.0
decode_tokens_per_s = [82.6, 43.4, 40.5, 68.2]

[[catalog]]
instance_type = "cpu1"
zone = "local"
capacity = "on_demand"
price_per_hour = 0.05
"""
AUTOSCALED = TYPE + f"""
[pool]
autoscale = true
min_replicas = 1
max_replicas = 2
target_utilisation = 0.8
stable_window_secs = 15.0
panic_window_secs = 4.0
scale_down_delay_secs = 15.0
scale_to_zero_after_secs = 20.0
slo_ttft_p95_ms = {SLO_MS}
"""
FIXED = TYPE


def client_loop(s, stop, phase_of, results, i):
    body = {"model": MODEL_ID, "max_tokens": OUT, "temperature": 0,
            "messages": [{"role": "user", "content": f"Customer {i} asks: why is my bill higher this month?"}]}
    with httpx.Client(timeout=180, headers=s.headers) as http:
        while not stop.is_set():
            phase = phase_of()
            ok, ttft, secs = streamed_chat(http, f"{s.base}/v1/chat/completions", body)
            results.append({"phase": phase, "ok": ok, "ttft_ms": ttft * 1000 if ttft else None,
                            "secs": secs, "at": time.time()})
            stop.wait(THINK)


def run(name, config, replicas, ready):
    s = Server(replicas=replicas, config=config, tenant="ramp", ready=ready)
    results, samples = [], []
    started = time.time()
    phase_idx = [0]
    stop_all = threading.Event()
    clients = []  # (thread, stop event)
    try:
        def sampler():
            while not stop_all.is_set():
                try:
                    listed = httpx.get(f"{s.base}/health", timeout=2).json()["replicas"]
                except httpx.HTTPError:
                    listed = []
                samples.append((time.time() - started, phase_idx[0], len(listed),
                                sum(1 for r in listed if r["ready"] and not r["draining"])))
                time.sleep(1)
        t = threading.Thread(target=sampler, daemon=True)
        t.start()
        for idx, (secs, n) in enumerate(PHASES):
            phase_idx[0] = idx
            while len(clients) < n:
                stop = threading.Event()
                th = threading.Thread(target=client_loop, args=(s, stop, lambda: phase_idx[0], results, len(clients)),
                                      daemon=True)
                th.start()
                clients.append((th, stop))
            while len(clients) > n:
                th, stop = clients.pop()
                stop.set()
            time.sleep(secs)
        for th, stop in clients:
            stop.set()
        for th, _ in clients:
            th.join(timeout=200)
        stop_all.set()
        t.join()
        db = os.path.join(s.dir, "strata.db")
        decisions = json.loads(subprocess.run([STRATA, "decisions", "--db", db, "--json", "--limit", "200"],
                                              capture_output=True, text=True, check=True).stdout)
        cost = json.loads(subprocess.run([STRATA, "--config", s.config, "cost", "report", "--by", "tenant",
                                          "--since", "1h", "--db", db, "--json"],
                                         capture_output=True, text=True, check=True).stdout)
    finally:
        s.stop()
    return {"name": name, "results": results, "samples": samples, "decisions": decisions, "cost": cost,
            "duration": time.time() - started, "started": started}


def pct(values, q):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * len(v) + 0.5)) - 1))]


def summary(rows):
    ttft = [r["ttft_ms"] for r in rows if r["ok"] and r["ttft_ms"] is not None]
    errors = sum(1 for r in rows if not r["ok"])
    within = sum(1 for t in ttft if t <= SLO_MS)
    return {"requests": len(rows), "errors": errors, "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95),
            "slo_attainment": within / len(rows) if rows else float("nan")}


def strip(samples):
    """Listed replicas, one character per 5 s."""
    out = []
    for i in range(0, len(samples), 5):
        window = [x[2] for x in samples[i:i + 5]]
        out.append(str(max(window)))
    return "".join(out)


def ttft_strip(run, started):
    """p95 TTFT per 5 s window (tenths of a second, capped at 9; `.` without requests)."""
    out = []
    for i in range(0, len(run["samples"]), 5):
        window = [r["ttft_ms"] for r in run["results"]
                  if r["ttft_ms"] is not None and i <= r["at"] - started < i + 5]
        out.append("." if not window else str(min(9, int(pct(window, 95) / 100))))
    return "".join(out)


def report(runs):
    print(f"# ramp: phases (seconds, clients) {PHASES}; SLO p95 TTFT {SLO_MS:.0f} ms; {OUT} tokens per request")
    for run in runs:
        rs = run["samples"]
        replica_secs = sum(x[2] for x in rs)
        print(f"\n## {run['name']}")
        print(f"replicas listed, one digit per 5 s:  {strip(rs)}")
        print(f"p95 TTFT (0.1 s) per 5 s window:     {ttft_strip(run, run['started'])}")
        print(f"replica-seconds: {replica_secs}  (over {len(rs)} s sampled)")
        print("| phase | clients | replicas (mean listed) | requests | errors | TTFT p50 ms | TTFT p95 ms | within SLO |")
        print("|---|---|---|---|---|---|---|---|")
        for idx, (secs, n) in enumerate(PHASES):
            rows = [r for r in run["results"] if r["phase"] == idx]
            sm = summary(rows)
            listed = [x[2] for x in rs if x[1] == idx]
            mean = statistics.mean(listed) if listed else float("nan")
            print(f"| {idx} ({secs}s) | {n} | {mean:.2f} | {sm['requests']} | {sm['errors']} | "
                  f"{sm['ttft_p50_ms']:.0f} | {sm['ttft_p95_ms']:.0f} | {sm['slo_attainment']:.1%} |")
        sm = summary(run["results"])
        print(f"| all | | {replica_secs / max(1, len(rs)):.2f} | {sm['requests']} | {sm['errors']} | "
              f"{sm['ttft_p50_ms']:.0f} | {sm['ttft_p95_ms']:.0f} | {sm['slo_attainment']:.1%} |")
        run["replica_secs"] = replica_secs
        run["summary"] = sm
        reasons = [d["reason"] for d in run["decisions"]]
        steps = [f"{d['from_replicas']}->{d['to_replicas']} {d['reason']}" for d in run["decisions"]]
        print(f"decisions ({len(reasons)}): {', '.join(steps)}")
        lines = {l["key"]: l["cost"] for l in run["cost"]["lines"]}
        print(f"ledger: total ${run['cost']['total_usd']:.6f}, idle ${lines.get('(idle)', 0):.6f}")
    auto, fixed = runs
    print("\n## autoscaled / fixed peak")
    print(f"replica-seconds: {auto['replica_secs']} / {fixed['replica_secs']} = "
          f"{auto['replica_secs'] / fixed['replica_secs']:.2f}x")
    print(f"ledger cost: {auto['cost']['total_usd'] / fixed['cost']['total_usd']:.2f}x")
    print(f"SLO attainment: {auto['summary']['slo_attainment']:.1%} vs {fixed['summary']['slo_attainment']:.1%}; "
          f"errors {auto['summary']['errors']} vs {fixed['summary']['errors']}")


if __name__ == "__main__":
    runs = [run("autoscaled (0..2 replicas)", AUTOSCALED, 1, 0), run("fixed peak (2 replicas)", FIXED, 2, 2)]
    report(runs)
