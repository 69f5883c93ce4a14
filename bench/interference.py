"""Long-prompt interference on strata's engine, written to bench/results/batch.md.

Four streams decode (1,000 tokens at most each, replaced at once when one
ends) when one long prompt (about 6,500 tokens) arrives. Measured while
that prompt is read (from its arrival to its first token): the running
streams' inter-token gaps; the time to first token of short requests a
prober sends one after another (a user arriving meanwhile); and the long
prompt's own time to first token against the same prompt alone on the idle
engine. Each mode is one `strata engine` (release build, 2 threads, context
16,384, prefix cache off so no run reuses another's prompt):

- `before`: the engine of an earlier build (`STRATA_BEFORE`, e.g. a copy of
  the release binary of commit c23184a): every step reads up to 256 prompt
  tokens, prompts in arrival order;
- `fixed`: this build, 256 prompt tokens a step, shortest prompts first;
- `budget`: this build with `engine.step_budget_ms = BUDGET` (default
  100): each step reads as many prompt tokens as its measured cost lets it
  finish within.

Usage: STRATA_BEFORE=/path/to/old/strata .venv/bin/python bench/interference.py [BUDGET_MS] [ROUNDS]
(after `cargo build --release -p strata` and `strata model fetch`; without
STRATA_BEFORE the `before` mode is left out). Modes rotate round by round;
every round's figures are printed and the medians over rounds go in the
table."""
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time

import httpx

from engine_bench import port, start as start_process, stop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATA = os.path.join(ROOT, "target/release/strata")
STREAMS = 4
MODEL_NAME = "gemma-3-270m-q4_k_m"
STREAM_TOKENS = 1000


def long_prompt(seed):
    """About 6,400 Gemma tokens of plain English-like words, different per
    seed from the first word on."""
    rng = random.Random(seed)
    words = ("cloud cluster replica engine token prompt stream answer tenant budget queue gateway "
             "spot zone price model cache prefix decode prefill batch schedule latency memory "
             "thread core request response conversation history network storage").split()
    return f"Report {seed}. " + " ".join(rng.choice(words) for _ in range(6300))


def start(budget_ms, binary=STRATA):
    d = tempfile.mkdtemp(prefix="strata-interference-")
    config = os.path.join(d, "strata.toml")
    with open(config, "w") as f:
        f.write("[engine]\ncontext_size = 16384\nmax_sequences = 8\nprefix_cache_entries = 0\n")
        if budget_ms:
            f.write(f"step_budget_ms = {budget_ms}\n")
    p = port()
    base = f"http://127.0.0.1:{p}"
    proc = start_process([binary, "--config", config, "engine", "--port", str(p), "--threads", "2"],
                         f"{base}/health")
    return proc, base


def stream(client, base, prompt, max_tokens, on_token=None, stop=None):
    """Streams one completion; returns (time of the first token, token
    stamps, prompt tokens)."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    stamps, usage = [], None
    with client.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if stop is not None and stop.is_set():
                break  # closing the stream frees its sequence
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
    """The gaps of the running streams while the long prompt is read, the
    TTFT of short requests sent meanwhile, and the long prompt's TTFT."""
    done = threading.Event()
    reading = threading.Event()
    gaps_at = []  # (time of the later token, gap)
    short_ttft = []
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
                stream(c, base, f"Story {i}.{n}: The history of cloud computing began", STREAM_TOKENS, tick, done)
                n += 1

    def prober():
        reading.wait()
        k = 0
        with httpx.Client() as c:
            while not done.is_set():
                t0 = time.perf_counter()
                first, _, _ = stream(c, base, f"Question {seed}.{k}: what is a replica?", 1)
                short_ttft.append((t0, first - t0))
                k += 1
                time.sleep(1)
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(STREAMS)]
    threads.append(threading.Thread(target=prober, daemon=True))
    for t in threads:
        t.start()
    time.sleep(3)  # the streams decode alone first
    with httpx.Client() as c:
        t0 = time.perf_counter()
        threading.Timer(0.5, reading.set).start()
        first, _, tokens = stream(c, base, long_prompt(seed), 1)
    done.set()
    for t in threads:
        t.join(timeout=600)
    window = [g for at, g in gaps_at if t0 < at <= first]
    before = [g for at, g in gaps_at if at <= t0]
    # Short requests sent while the long prompt was read, however long
    # they waited.
    shorts = [ttft for at, ttft in short_ttft if t0 < at <= first]
    return {"ttft": first - t0, "prompt_tokens": tokens, "gaps": window, "alone_gaps": before,
            "short_ttft": shorts}


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 100.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    modes = {"fixed": (STRATA, 0.0), "budget": (STRATA, budget)}
    if os.environ.get("STRATA_BEFORE"):
        modes = {"before": (os.environ["STRATA_BEFORE"], 0.0), **modes}
    names = {"before": "before: 256 a step, arrival order", "fixed": "fixed: 256 a step, shortest first",
             "budget": f"budget {budget:g} ms, shortest first"}
    results = {m: [] for m in modes}
    seed = 0
    for r in range(rounds):
        order = list(modes)
        order = order[r % len(order):] + order[:r % len(order)]
        for mode in order:
            binary, ms = modes[mode]
            proc, base = start(ms, binary)
            try:
                seed += 1
                alone, tokens = solo(base, seed)
                seed += 1
                run = interfered(base, seed)
            finally:
                stop(proc)
            gaps = [g * 1000 for g in run["gaps"]]
            shorts = run["short_ttft"] or [float("nan")]
            row = {"solo_s": alone, "ttft_s": run["ttft"], "ratio": run["ttft"] / alone,
                   "prompt_tokens": run["prompt_tokens"], "gaps": len(gaps),
                   "alone_p50": pct(run["alone_gaps"], 50) * 1000 if run["alone_gaps"] else float("nan"),
                   **{f"p{p}": pct(gaps, p) for p in (50, 95, 99)}, "max": max(gaps),
                   "shorts": len(run["short_ttft"]), "short_p50_s": pct(shorts, 50), "short_max_s": max(shorts)}
            results[mode].append(row)
            print(f"round {r + 1} {mode}: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in row.items()), flush=True)
    med = {m: {k: statistics.median(row[k] for row in rows) for k in rows[0]} for m, rows in results.items()}
    print(f"\n{datetime.date.today()} · {platform.node()} · {os.cpu_count()} cores · "
          f"`bench/interference.py {budget:g} {rounds}` · medians of {rounds} rounds\n")
    print("| mode | gaps in window | alone p50 ms | p50 ms | p95 ms | p99 ms | max ms | short requests' TTFT p50 / max s "
          "| long TTFT s | solo prefill s | TTFT / solo |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m, x in med.items():
        print(f"| {names[m]} | {x['gaps']:.0f} | {x['alone_p50']:.0f} | {x['p50']:.0f} | {x['p95']:.0f} | "
              f"{x['p99']:.0f} | {x['max']:.0f} | {x['short_p50_s']:.2f} / {x['short_max_s']:.2f} | "
              f"{x['ttft_s']:.1f} | {x['solo_s']:.1f} | {x['ratio']:.2f} |")
    print(f"\nprompt tokens: {med['fixed']['prompt_tokens']:.0f}")


if __name__ == "__main__":
    main()
