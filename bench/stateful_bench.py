"""Time to first token of turn k (1..10) of a conversation with a long
system prompt, through the Responses API of a release `strata serve` with
two replicas:

- warm: the turn continues with `previous_response_id` and goes to the
  replica holding the conversation's KV cache (affinity), which prefills
  only the new tokens;
- cold: the same prompt (whole history sent as input) from a tenant whose
  cache holds nothing of it, so everything is prefilled;
- restored: before the turn, the replica holding the conversation is
  drained (its KV cache kept as a sealed snapshot); the turn goes to the
  other replica, which restores the snapshot and prefills the new tokens.
  The drained replica is undrained after the turn.

All greedy, 32 output tokens per turn. Runs alternate per turn, so the
machine's noise hits all three alike.

Run: .venv/bin/python bench/stateful_bench.py   (needs a release build)
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
os.environ.setdefault("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
from conftest import MODEL_ID, Server  # noqa: E402

TURNS = int(os.environ.get("TURNS", "10"))
OUT = 32
SYSTEM = " ".join(
    f"Rule {i}: when a customer asks about workload {i}, check the quota of project {i * 7}, "
    f"prefer spot capacity in zone {chr(97 + i % 3)}, and answer in at most two sentences."
    for i in range(60))
QUESTIONS = [
    "How many GPUs does the nightly batch job use?", "Can it run on spot capacity?",
    "What happens when a spot machine is reclaimed?", "How fast do we scale back up?",
    "Which zone is cheapest this week?", "What does the fine-tuning team pay per month?",
    "Can we cap that spend?", "Who gets paged when the budget runs out?",
    "How do we keep conversations after a restart?", "Summarise the plan in one line.",
]


def stream_ttft(s, key, body):
    """Seconds to the first output delta of a streamed response, and the final response."""
    t0 = time.perf_counter()
    ttft, final = None, None
    with httpx.stream("POST", f"{s.base}/v1/responses", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {key}"}, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "response.output_text.delta" and ttft is None:
                ttft = time.perf_counter() - t0
            if event["type"] in ("response.completed", "response.incomplete"):
                final = event["response"]
            assert event["type"] not in ("response.failed", "error"), event
    return ttft, final


def text_of(response):
    return "".join(p["text"] for o in response["output"] for p in o["content"])


def served_by(s, response_id):
    import sqlite3
    db = sqlite3.connect(os.path.join(s.dir, "strata.db"))
    return db.execute("SELECT replica FROM responses WHERE id = ?", (response_id,)).fetchone()[0]


def main():
    s = Server(replicas=2, tenant="bench-warm")
    try:
        warm_key = s.key
        restored_key = s.new_key(s.admin("POST", "/admin/v1/tenants", {"name": "bench-restored"}, expect=201)
                                 .json()["id"], "member")
        base = {"model": MODEL_ID, "temperature": 0, "max_output_tokens": OUT, "instructions": SYSTEM}
        rows, history = [], []
        prev = {"warm": None, "restored": None}
        for k, q in enumerate(QUESTIONS[:TURNS], start=1):
            # Warm: the conversation's own replica.
            body = {**base, "input": q}
            if prev["warm"]:
                body["previous_response_id"] = prev["warm"]["id"]
            t_warm, warm = stream_ttft(s, warm_key, body)
            # Cold: the same prompt from a tenant with nothing cached.
            cold_tenant = s.admin("POST", "/admin/v1/tenants", {"name": f"bench-cold-{k}"}, expect=201).json()["id"]
            items = history + [{"role": "user", "content": q}]
            t_cold, cold = stream_ttft(s, s.new_key(cold_tenant, "member"), {**base, "input": items})
            # Restored: its replica drained first, the cache moved by snapshot.
            body = {**base, "input": q}
            drained = None
            if prev["restored"]:
                body["previous_response_id"] = prev["restored"]["id"]
                drained = served_by(s, prev["restored"]["id"])
                s.admin("POST", f"/admin/v1/replicas/{drained}/drain", expect=200)
            t_rest, restored = stream_ttft(s, restored_key, body)
            if drained:
                s.admin("POST", f"/admin/v1/replicas/{drained}/undrain", expect=200)
            rows.append({
                "turn": k, "prompt_tokens": warm["usage"]["input_tokens"],
                "warm": t_warm, "warm_cached": warm["usage"]["input_tokens_details"]["cached_tokens"],
                "cold": t_cold, "cold_cached": cold["usage"]["input_tokens_details"]["cached_tokens"],
                "restored": t_rest, "restored_cached": restored["usage"]["input_tokens_details"]["cached_tokens"],
                "same_answer": text_of(restored) == text_of(warm),
            })
            print(json.dumps(rows[-1]), flush=True)
            history += [{"role": "user", "content": q}, {"role": "assistant", "content": text_of(warm)}]
            prev = {"warm": warm, "restored": restored}
        print("\n| turn | prompt tokens | warm TTFT ms (cached) | cold TTFT ms (cached) | restored TTFT ms (cached) | warm/cold | restored/cold | restored answer = warm |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['turn']} | {r['prompt_tokens']} | {r['warm'] * 1000:.0f} ({r['warm_cached']}) | "
                  f"{r['cold'] * 1000:.0f} ({r['cold_cached']}) | {r['restored'] * 1000:.0f} ({r['restored_cached']}) | "
                  f"{r['warm'] / r['cold']:.2f} | {r['restored'] / r['cold']:.2f} | {r['same_answer']} |")
    finally:
        s.stop()


if __name__ == "__main__":
    main()
