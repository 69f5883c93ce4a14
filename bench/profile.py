"""Measures an instance type's throughput profile on this machine: one
release `strata engine` with THREADS llama.cpp threads, then

- prefill tokens/s: a ~1,000-token prompt with max_tokens=1 (median of 5);
- decode tokens/s at batch b = 1..MAX_SEQ: b concurrent completions of 64
  greedy tokens, the tokens generated while all b were generating over
  that time (so prefill and the tails are left out).

Prints a `[instance_types.NAME]` block for strata.toml.

Run: THREADS=1 NAME=cpu1 .venv/bin/python bench/profile.py   (needs a release build)
"""
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATA = os.environ.get("STRATA_BIN", os.path.join(ROOT, "target/release/strata"))
THREADS = int(os.environ.get("THREADS", "1"))
NAME = os.environ.get("NAME", f"cpu{THREADS}")
MAX_SEQ = int(os.environ.get("MAX_SEQ", "8"))
TOKENS = 64


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream(base, model, i):
    """Arrival times of one streamed completion's tokens."""
    body = {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": TOKENS, "temperature": 0,
            "stream": True}
    times = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    return times


def main():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([STRATA, "engine", "--port", str(port), "--threads", str(THREADS),
                             "--max-sequences", str(MAX_SEQ)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        rates = []
        for run in range(5):
            # A new first word each run: nothing is reused from the prefix cache.
            prompt = f"Run {run}x{time.time_ns()}: " + " ".join(f"item {i} costs {i * 3} dollars;" for i in range(160))
            t0 = time.perf_counter()
            r = httpx.post(f"{base}/v1/completions", timeout=300,
                           json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}).json()
            rates.append(r["usage"]["prompt_tokens"] / (time.perf_counter() - t0))
        prefill = statistics.median(rates)
        decode = []
        for b in range(1, MAX_SEQ + 1):
            with cf.ThreadPoolExecutor(b) as pool:
                runs = list(pool.map(lambda i: stream(base, model, i), range(b)))
            # Tokens while every stream was generating, over that time.
            start = max(t[0] for t in runs)
            end = min(t[-1] for t in runs)
            tokens = sum(1 for t in runs for x in t if start < x <= end)
            decode.append(tokens / max(end - start, 1e-6))
        print(f"# measured by bench/profile.py on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
        print(f"[instance_types.{NAME}]")
        print(f"threads = {THREADS}")
        print(f"prefill_tokens_per_s = {prefill:.1f}")
        print("decode_tokens_per_s = [" + ", ".join(f"{d:.1f}" for d in decode) + "]")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
