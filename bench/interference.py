"""Long-prompt interference on strata's engine, written to bench/results/batch.md.

Four streams decode (closed loop: a finished stream is replaced at once)
when one long prompt (about 6,400 tokens) arrives. Measured: the running
streams' inter-token gaps while that prompt is prefilled (from its arrival
to its first token), and its time to first token against the same prompt
alone on the idle engine. Each mode is one `strata engine` (release build,
2 threads, prefix cache off so no run reuses another's prompt):

- `fixed`: every step reads up to `prefill_chunk` (256) prompt tokens, as
  before `engine.step_budget_ms`;
- `budget`: `engine.step_budget_ms = BUDGET` (default 100 ms): each step
  reads as many prompt tokens as its measured cost lets it finish within.

Usage: .venv/bin/python bench/interference.py [BUDGET_MS] [ROUNDS]
(after `cargo build --release -p strata` and `strata model fetch`). Modes
alternate round by round; every round's figures are printed and the
medians over rounds go in the table."""
import datetime
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATA = os.path.join(ROOT, "target/release/strata")
STREAMS = 4
MODEL_NAME = "gemma-3-270m-q4_k_m"
STREAM_TOKENS = 200


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def long_prompt(seed):
    """About 6,400 Gemma tokens of plain English-like words, different per
    seed from the first word on."""
    rng = random.Random(seed)
    words = ("cloud cluster replica engine token prompt stream answer tenant budget queue gateway "
             "spot zone price model cache prefix decode prefill batch schedule latency memory "
             "thread core request response conversation history network storage").split()
    return f"Report {seed}. " + " ".join(rng.choice(words) for _ in range(6300))


def start(budget_ms):
    d = tempfile.mkdtemp(prefix="strata-interference-")
    config = os.path.join(d, "strata.toml")
    with open(config, "w") as f:
        f.write(f"[engine]\ncontext_size = 8192\nmax_sequences = 8\nprefix_cache_entries = 0\n"
                f"step_budget_ms = {budget_ms}\n")
    p = port()
    proc = subprocess.Popen([STRATA, "--config", config, "engine", "--port", str(p), "--threads", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{p}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the engine did not become ready")


def stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stream(client, base, prompt, max_tokens, on_token=None):
    """Streams one completion; returns (time of the first token, token
    stamps, prompt tokens)."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    stamps, usage = [], None
    with client.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                stamps.append(now)
                if on_token:
                    on_token(now)
    return (stamps[0] if stamps else None), stamps, (usage or {}).get("prompt_tokens")


def solo(base, seed):
    with httpx.Client() as c:
        t0 = time.perf_counter()
        first, _, tokens = stream(c, base, long_prompt(seed), 1)
    return first - t0, tokens


def interfered(base, seed):
    """The gaps of the running streams while the long prompt is read, and its TTFT."""
    done = threading.Event()
    gaps_at = []  # (time of the later token, gap)
    lock = threading.Lock()

    def worker(i):
        n = 0
        with httpx.Client() as c:
            while not done.is_set():
                last = [None]

                def tick(now):
                    if last[0] is not None:
                        with lock:
                            gaps_at.append((now, now - last[0]))
                    last[0] = now
                stream(c, base, f"Story {i}.{n}: The history of cloud computing began", STREAM_TOKENS, tick)
                n += 1
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(STREAMS)]
    for t in threads:
        t.start()
    time.sleep(3)  # the streams decode alone first
    with httpx.Client() as c:
        t0 = time.perf_counter()
        first, _, tokens = stream(c, base, long_prompt(seed), 1)
    done.set()
    for t in threads:
        t.join(timeout=120)
    window = [g for at, g in gaps_at if t0 < at <= first]
    before = [g for at, g in gaps_at if at <= t0]
    return {"ttft": first - t0, "prompt_tokens": tokens, "gaps": window, "alone_gaps": before}


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 100.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    modes = {"fixed": 0.0, "budget": budget}
    results = {m: [] for m in modes}
    seed = 0
    for r in range(rounds):
        for mode in (modes if r % 2 == 0 else reversed(list(modes))):
            proc, base = start(modes[mode])
            try:
                seed += 1
                alone, tokens = solo(base, seed)
                seed += 1
                run = interfered(base, seed)
            finally:
                stop(proc)
            gaps = [g * 1000 for g in run["gaps"]]
            row = {"solo_s": alone, "ttft_s": run["ttft"], "ratio": run["ttft"] / alone,
                   "prompt_tokens": run["prompt_tokens"], "gaps": len(gaps),
                   "alone_p50": pct(run["alone_gaps"], 50) * 1000 if run["alone_gaps"] else float("nan"),
                   **{f"p{p}": pct(gaps, p) for p in (50, 95, 99)}, "max": max(gaps)}
            results[mode].append(row)
            print(f"round {r + 1} {mode}: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in row.items()), flush=True)
    med = {m: {k: statistics.median(row[k] for row in rows) for k in rows[0]} for m, rows in results.items()}
    print(f"\n{datetime.date.today()} · {platform.node()} · {os.cpu_count()} cores · "
          f"`.venv/bin/python bench/interference.py {budget:g} {rounds}` · medians of {rounds} rounds\n")
    print("| mode | gaps in window | alone p50 ms | p50 ms | p95 ms | p99 ms | max ms | long TTFT s | solo prefill s | TTFT / solo |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, x in med.items():
        name = "fixed chunk (256)" if m == "fixed" else f"step budget {budget:g} ms"
        print(f"| {name} | {x['gaps']:.0f} | {x['alone_p50']:.0f} | {x['p50']:.0f} | {x['p95']:.0f} | {x['p99']:.0f} | "
              f"{x['max']:.0f} | {x['ttft_s']:.1f} | {x['solo_s']:.1f} | {x['ratio']:.2f} |")
    print(f"\nprompt tokens: {med['fixed']['prompt_tokens']:.0f}")


if __name__ == "__main__":
    main()
