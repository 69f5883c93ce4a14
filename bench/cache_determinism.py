"""How often a prefix-cache hit changes a greedy answer. llama.cpp's CPU
kernels are not batch-invariant: the logits of a prompt read in one chunk
and of the same prompt's last token read alone (its prefix from the cache)
differ in the last bits, which can flip a near tie. Each prompt is sent
twice to one release engine, first with an empty cache scope (full
prefill), then again (all but one token from the cache), and the two greedy
answers are compared.

Run: .venv/bin/python bench/cache_determinism.py   (needs a release build)
"""
import os
import socket
import subprocess
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
STRATA = os.environ.get("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
N = int(os.environ.get("PROMPTS", "40"))
TOPICS = ["spot instances", "KV caches", "TLS", "budgets", "autoscaling", "GPUs", "queues", "databases",
          "tenants", "snapshots"]


def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([STRATA, "engine", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        same, cached_total = 0, 0
        for i in range(N):
            messages = [{"role": "system", "content": f"Case {i}. You explain {TOPICS[i % len(TOPICS)]} to engineers. " * 6},
                        {"role": "user", "content": f"Question {i}: what should I know first?"}]
            answers = []
            for _ in range(2):
                r = httpx.post(f"{base}/v1/chat/completions", timeout=120, headers={"x-strata-cache-scope": f"s{i}"},
                               json={"model": "gemma-3-270m-q4_k_m", "messages": messages, "max_tokens": 32,
                                     "temperature": 0}).json()
                answers.append(r["choices"][0]["message"]["content"])
                cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
            cached_total += cached
            same += answers[0] == answers[1]
        print(f"{same} of {N} greedy answers identical with and without the prefix cache "
              f"(second requests reused {cached_total / N:.0f} prompt tokens on average)")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
