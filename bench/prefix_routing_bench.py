"""Prefix-aware vs least-load routing, replaying the shared-prefix structure
of the Mooncake conversation trace (../shared/data/traces/mooncake/).

Each trace request lists the hash ids of its 512-token prompt blocks;
requests that share leading ids share that prefix (block 0 is shared by
all; a conversation's later turns extend its earlier ones). Here every block id
becomes a fixed, distinct piece of text (scaled down to ~20 tokens so the
CPU replicas keep up), a request's prompt is its blocks' texts in order
(at most MAX_BLOCKS), every SAMPLE-th conversation of the first WINDOW
requests is kept, and requests go out at the trace's timestamps divided
by SPEEDUP, as chat completions of one tenant with 4 output tokens. The same
replay runs against a fresh `strata serve` (two replicas) with
`gateway.routing = "prefix"` and with `"least_load"`; reported: the share of
prompt tokens served from the engines' prefix caches
(usage.prompt_tokens_details.cached_tokens) and the time to first token.

Run: .venv/bin/python bench/prefix_routing_bench.py   (needs a release build)
"""
import concurrent.futures as cf
import json
import os
import statistics
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
os.environ.setdefault("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
from conftest import MODEL_ID, Server  # noqa: E402

TRACE = os.path.join(HERE, "..", "..", "shared", "data", "traces", "mooncake", "conversation_trace.jsonl")
WINDOW = int(os.environ.get("WINDOW", "2000"))
SAMPLE = int(os.environ.get("SAMPLE", "16"))
SPEEDUP = float(os.environ.get("SPEEDUP", "5"))
ROUNDS = int(os.environ.get("ROUNDS", "1"))
MAX_BLOCKS = int(os.environ.get("MAX_BLOCKS", "8"))
WORDS = ["spot", "quota", "zone", "replica", "tenant", "budget", "cache", "token", "prefill", "decode",
         "drain", "snapshot", "region", "price", "gpu", "batch", "stream", "route", "queue", "scale"]


def block_text(block_id):
    """~20 tokens of text that only this block id produces."""
    words = [WORDS[(block_id * 7 + i * 13 + (block_id >> i % 5)) % len(WORDS)] for i in range(12)]
    return f"[block {block_id}] " + " ".join(words) + ". "


def load_trace():
    """The first WINDOW trace requests, thinned to every SAMPLE-th
    conversation (a conversation is named by its first own block, the one
    after the shared block 0), so its later turns, minutes apart, stay in."""
    reqs = []
    with open(TRACE) as f:
        for n, line in enumerate(f):
            if n == WINDOW:
                break
            r = json.loads(line)
            ids = r["hash_ids"]
            if len(ids) > 1 and ids[1] % SAMPLE == 0:
                reqs.append((r["timestamp"] / 1000.0 / SPEEDUP, "".join(block_text(b) for b in ids[:MAX_BLOCKS])))
    return reqs


def replay(routing, reqs):
    s = Server(replicas=2, tenant=f"mooncake-{routing}", config=f'[gateway]\nrouting = "{routing}"\n')
    try:
        key = s.key

        def send(prompt):
            t0 = time.perf_counter()
            ttft = None
            usage = None
            with httpx.stream("POST", f"{s.base}/v1/chat/completions", timeout=300,
                              headers={"Authorization": f"Bearer {key}"},
                              json={"model": MODEL_ID, "messages": [{"role": "user", "content": prompt}],
                                    "max_tokens": 4, "temperature": 0, "stream": True,
                                    "stream_options": {"include_usage": True}}) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    # The first chunk with text (the role chunk comes before prefill).
                    if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        ttft = time.perf_counter() - t0
                    if chunk.get("usage"):
                        usage = chunk["usage"]
            return ttft, usage

        start = time.perf_counter()
        futures = []
        with cf.ThreadPoolExecutor(64) as pool:
            for at, prompt in reqs:
                delay = at - (time.perf_counter() - start)
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(send, prompt))
            results = [f.result() for f in futures]
        wall = time.perf_counter() - start
        prompt = sum(u["prompt_tokens"] for _, u in results)
        cached = sum(u["prompt_tokens_details"]["cached_tokens"] for _, u in results)
        ttfts = sorted(t for t, _ in results)
        return {"routing": routing, "requests": len(results), "wall_s": wall,
                "prompt_tokens": prompt, "cached_tokens": cached, "hit_rate": cached / prompt,
                "ttft_p50_ms": statistics.median(ttfts) * 1000,
                "ttft_p90_ms": ttfts[int(0.9 * (len(ttfts) - 1))] * 1000,
                "ttft_p99_ms": ttfts[int(0.99 * (len(ttfts) - 1))] * 1000}
    finally:
        s.stop()


def main():
    reqs = load_trace()
    print(f"{len(reqs)} requests over {reqs[-1][0]:.1f} s (trace time / {SPEEDUP}), prompts of up to {MAX_BLOCKS} blocks")
    rows = []
    for routing in ["prefix", "least_load"] * ROUNDS:
        rows.append(replay(routing, reqs))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| routing | run | requests | prompt tokens | cached tokens | hit rate | TTFT p50 ms | p90 ms | p99 ms | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {r['routing']} | {i // 2 + 1} | {r['requests']} | {r['prompt_tokens']} | {r['cached_tokens']} | "
              f"{r['hit_rate']:.1%} | {r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
