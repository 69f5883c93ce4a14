"""Interactive latency with and without a batch backlog on the same pool,
and how much of the idle capacity the batch takes.

One release `strata serve` (one replica, 2 engine threads, 8 sequences, 8
gateway slots; Gemma 3 270M). Interactive load: streamed chat completions
(greedy, OUT tokens, about 20 prompt tokens) arriving as a Poisson process
at RATE a second, the same arrival times in every run (seeded), for WINDOW
seconds. Three modes, one after another on the same server, rotating over
ROUNDS:

- `alone`: the interactive load only;
- `backlog`: the same load while a batch of 2,000 lines (the same kind of
  request, through the Batch API) waits and runs;
- `batch only`: the batch alone for WINDOW seconds (how many lines a
  second the pool runs when nobody else uses it).

Reported: interactive TTFT p50/p95 (from sending to the first content
token; a slot wait counts), its ratio with/without the backlog; the
interactive requests' share of the slots (the sum of their durations over
WINDOW x slots); batch lines finished in the window; and the share of the
idle capacity the batch used: its lines a second during `backlog` over
`batch only`'s lines a second times the share of slots `alone` left idle.

Run: .venv/bin/python bench/batch_backlog.py   (after `cargo build --release -p strata`)
Env: RATE (2.0), WINDOW (60), ROUNDS (2), OUT (32), STRATA_BIN (the build
to measure), BESIDE (`engine.batch_beside_interactive`; unset: the
build's default, and nothing written for builds before it)."""
import datetime
import io
import json
import os
import platform
import random
import statistics
import sys
import threading
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
os.environ.setdefault("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
from benchlib import streamed_chat  # noqa: E402
from conftest import MODEL_ID, Server  # noqa: E402

RATE = float(os.environ.get("RATE", "2.0"))
WINDOW = float(os.environ.get("WINDOW", "60"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))
OUT = int(os.environ.get("OUT", "32"))
SLOTS = 8
LINES = 2000
BESIDE = os.environ.get("BESIDE")
CONFIG = f"""
[engine]
threads = 2
max_sequences = {SLOTS}
{f"batch_beside_interactive = {int(BESIDE)}" if BESIDE else ""}

[gateway]
slots_per_replica = {SLOTS}
"""


def request(i):
    return {"model": MODEL_ID, "max_tokens": OUT, "temperature": 0,
            "messages": [{"role": "user", "content": f"Customer {i} asks: why is my bill higher this month?"}]}


def one(http, s, i, results):
    ok, ttft, secs = streamed_chat(http, f"{s.base}/v1/chat/completions", request(i))
    results.append({"ok": ok, "ttft": ttft, "secs": secs})


def interactive(s):
    """The seeded Poisson load for WINDOW seconds; every request's result."""
    rng = random.Random(28)
    results, threads = [], []
    with httpx.Client(timeout=300, headers=s.headers, limits=httpx.Limits(max_connections=200)) as http:
        start = time.perf_counter()
        at, i = 0.0, 0
        while True:
            at += rng.expovariate(RATE)
            if at >= WINDOW:
                break
            time.sleep(max(0.0, start + at - time.perf_counter()))
            t = threading.Thread(target=one, args=(http, s, i, results), daemon=True)
            t.start()
            threads.append(t)
            i += 1
        for t in threads:
            t.join(timeout=300)
    return results


def start_batch(s):
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions", "body": request(100000 + i)}
             for i in range(LINES)]
    data = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
    f = httpx.post(f"{s.base}/v1/files", headers=s.headers, timeout=60,
                   files={"file": ("backlog.jsonl", io.BytesIO(data))}, data={"purpose": "batch"}).json()
    b = httpx.post(f"{s.base}/v1/batches", headers=s.headers, timeout=60,
                   json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()
    return b["id"]


def done_lines(s, batch):
    b = httpx.get(f"{s.base}/v1/batches/{batch}", headers=s.headers, timeout=30).json()
    return b["request_counts"]["completed"] + b["request_counts"]["failed"]


def cancel(s, batch):
    httpx.post(f"{s.base}/v1/batches/{batch}/cancel", headers=s.headers, timeout=30)
    deadline = time.time() + 120
    while time.time() < deadline:
        if httpx.get(f"{s.base}/v1/batches/{batch}", headers=s.headers, timeout=30).json()["status"] == "cancelled":
            return
        time.sleep(0.5)
    raise RuntimeError("the batch did not cancel")


def warm_batch(s):
    """A batch started and running (its first lines done)."""
    batch = start_batch(s)
    deadline = time.time() + 60
    while done_lines(s, batch) < SLOTS:
        if time.time() > deadline:
            raise RuntimeError("the batch did not start")
        time.sleep(0.2)
    return batch


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * len(v) + 0.5)) - 1))] if v else float("nan")


def summary(results):
    ttfts = [r["ttft"] * 1000 for r in results if r["ok"] and r["ttft"] is not None]
    return {"requests": len(results), "errors": sum(1 for r in results if not r["ok"]),
            "ttft_p50_ms": pct(ttfts, 50), "ttft_p95_ms": pct(ttfts, 95),
            "slot_share": sum(r["secs"] for r in results) / (WINDOW * SLOTS)}


def main():
    s = Server(replicas=1, config=CONFIG, tenant="batch-bench")
    rounds = []
    try:
        # Warm the engine and the model's pages.
        httpx.post(f"{s.base}/v1/chat/completions", headers=s.headers, json=request(0), timeout=120)
        for r in range(ROUNDS):
            row = {}
            row["alone"] = summary(interactive(s))
            print(f"round {r + 1} alone: {row['alone']}", flush=True)

            batch = warm_batch(s)
            before = done_lines(s, batch)
            t0 = time.perf_counter()
            res = interactive(s)
            elapsed = time.perf_counter() - t0
            lines = done_lines(s, batch) - before
            cancel(s, batch)
            row["backlog"] = {**summary(res), "batch_lines": lines, "batch_lines_per_s": lines / elapsed}
            print(f"round {r + 1} backlog: {row['backlog']}", flush=True)

            batch = warm_batch(s)
            before = done_lines(s, batch)
            t0 = time.perf_counter()
            time.sleep(WINDOW)
            lines = done_lines(s, batch) - before
            elapsed = time.perf_counter() - t0
            cancel(s, batch)
            row["batch_only"] = {"batch_lines": lines, "batch_lines_per_s": lines / elapsed}
            print(f"round {r + 1} batch only: {row['batch_only']}", flush=True)
            rounds.append(row)
    finally:
        s.stop()
    report(rounds)


def report(rounds):
    def med(mode, key):
        return statistics.median(r[mode][key] for r in rounds)

    idle = 1 - med("alone", "slot_share")
    used = med("backlog", "batch_lines_per_s") / (med("batch_only", "batch_lines_per_s") * idle)
    out = [
        f"`.venv/bin/python bench/batch_backlog.py` (RATE={RATE}, WINDOW={WINDOW:g}, ROUNDS={ROUNDS}, OUT={OUT}, "
        f"BESIDE={BESIDE or 'default'}, STRATA_BIN={os.environ['STRATA_BIN']}); "
        f"{datetime.date.today()}, {platform.node()} ({os.cpu_count()} cores); medians over the rounds.",
        "",
        "| mode | interactive requests | errors | TTFT p50 ms | TTFT p95 ms | interactive slot share | batch lines | batch lines/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("alone", "backlog"):
        out.append(f"| {mode} | {med(mode, 'requests'):.0f} | {med(mode, 'errors'):.0f} | {med(mode, 'ttft_p50_ms'):.0f} | "
                   f"{med(mode, 'ttft_p95_ms'):.0f} | {med(mode, 'slot_share'):.2f} | "
                   + (f"{med(mode, 'batch_lines'):.0f} | {med(mode, 'batch_lines_per_s'):.2f} |" if mode == "backlog" else "– | – |"))
    out.append(f"| batch only | – | – | – | – | – | {med('batch_only', 'batch_lines'):.0f} | "
               f"{med('batch_only', 'batch_lines_per_s'):.2f} |")
    out += ["",
            f"Interactive TTFT with the backlog over without: p50 x{med('backlog', 'ttft_p50_ms') / med('alone', 'ttft_p50_ms'):.2f}, "
            f"p95 x{med('backlog', 'ttft_p95_ms') / med('alone', 'ttft_p95_ms'):.2f}. "
            f"Idle share of the slots without the batch: {idle:.2f}; the batch's lines/s during the load over "
            f"(its lines/s alone x that idle share): {used:.2f}."]
    print("\n".join(out))
    print(json.dumps(rounds))


if __name__ == "__main__":
    main()
