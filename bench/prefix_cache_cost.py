"""Does the prefix cache cost decode speed? Two release engines side by
side, one with `engine.prefix_cache_entries = 0`, one with the default 32,
each with 2 threads; streamed 64-token greedy completions at 1, 4 and 8
concurrent streams, best of two, alternating between the engines.

Run: .venv/bin/python bench/prefix_cache_cost.py   (needs a release build)
"""
import concurrent.futures as cf
import os
import socket
import subprocess
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
STRATA = os.environ.get("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))


def start(entries):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    config.write(f"[engine]\nprefix_cache_entries = {entries}\n")
    config.close()
    proc = subprocess.Popen([STRATA, "engine", "--config", config.name, "--port", str(port), "--threads", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("engine did not start")


def rate(base, streams):
    def one(i):
        t0, k = None, 0
        with httpx.stream("POST", f"{base}/v1/completions", timeout=120,
                          json={"model": "gemma-3-270m-q4_k_m", "prompt": f"Story {i}: once upon a time",
                                "max_tokens": 64, "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    k += 1
                    t0 = t0 or time.perf_counter()
        return k - 1
    with cf.ThreadPoolExecutor(streams) as ex:
        t = time.perf_counter()
        tokens = sum(ex.map(one, range(streams)))
    return tokens / (time.perf_counter() - t)


def main():
    engines = {entries: start(entries) for entries in (0, 32)}
    try:
        print("| streams | prefix_cache_entries = 0 | = 32 | ratio |")
        print("|---|---|---|---|")
        for streams in (1, 4, 8):
            best = {e: 0.0 for e in engines}
            for _ in range(2):
                for e, (_, base) in engines.items():
                    best[e] = max(best[e], rate(base, streams))
            print(f"| {streams} | {best[0]:.1f} tok/s | {best[32]:.1f} tok/s | {best[32] / best[0]:.2f} |")
    finally:
        for proc, _ in engines.values():
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
