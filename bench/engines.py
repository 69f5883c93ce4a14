"""Engines of every kind under strata (issue 27), written to
bench/results/engines.md:

- llama-cpp-python's OpenAI server (engine kind `openai`) behind strata
  against the same server reached directly: the relay's cost at a real
  engine's pace.
- strata's own engine against llama-cpp-python's server, on the same model
  (SmolLM2-135M-Instruct Q4_1), both under one `strata serve`: the choice a
  user of engine kinds makes.

Each case streams N chat completions at once (N = 1, 4, 8; 64 tokens at
most, temperature 0, a different opening per stream) and reports streamed
tokens per second over the batch's wall time and TTFT (mean, p95). Engines
get 2 threads each; only one case runs at a time, and the cases alternate
within a round (ROUNDS rounds; medians of the rounds are reported).

`image`: the image deploy/image/build makes from the release binary: its
size, and an engine's start to ready (`/health` 200) from the image
(`buildah run`, chroot isolation, the model on a mounted volume) against
the same binary started directly, alternating, ROUNDS each.

Run: .venv/bin/python bench/engines.py [streams|image]   (after `cargo
build --release -p strata` and `scripts/peer-engine`, which builds
llama-cpp-python once).
"""
import concurrent.futures as cf
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
os.environ.setdefault("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
from conftest import CHAT_MODEL, STRATA, Server, free_port, model_config  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "3"))
STREAMS = [1, 4, 8]
TOKENS = 64
THREADS = os.environ.get("THREADS", "2")
PEER = subprocess.run([os.path.join(HERE, "..", "scripts", "peer-engine")], capture_output=True, text=True,
                      check=True).stdout.strip()
EXTERNAL = "smol-py"


def catalog(path):
    return f"""
[[models]]
id = "{CHAT_MODEL}"
source = "{CHAT_MODEL}"
replicas = 1
[models.engine]
threads = {THREADS}
context_size = 4096

[[models]]
id = "{EXTERNAL}"
path = "{path}"
tenant = "bench"
replicas = 1
[models.engine]
kind = "openai"
command = ["{PEER}", "-m", "llama_cpp.server", "--model", "{{model_path}}", "--model_alias", "{{model}}",
           "--host", "{{host}}", "--port", "{{port}}", "--n_threads", "{THREADS}", "--n_ctx", "4096", "--interrupt_requests", "false"]
env = {{ API_KEY = "{{api_key}}" }}
"""


def one(base, key, model, i):
    body = {"model": model, "max_tokens": TOKENS, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"Story {i}: tell me about the history of cloud computing."}]}
    t0 = time.monotonic()
    first, tokens = None, 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                tokens += 1
                if first is None:
                    first = time.monotonic() - t0
    return tokens, first or 0.0


def batch(base, key, model, n, round_):
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(n) as ex:
        results = list(ex.map(lambda i: one(base, key, model, 1000 * round_ + i), range(n)))
    wall = time.monotonic() - t0
    ttfts = sorted(r[1] for r in results)
    return {"tok_s": sum(r[0] for r in results) / wall, "ttft_mean": statistics.mean(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]}


def main():
    path = model_config(CHAT_MODEL).split('"')[1]
    s = Server(replicas=1, ready=2, config=catalog(path), tenant="bench")
    port = free_port()
    direct_key = "bench-direct-key"
    direct = subprocess.Popen([PEER, "-m", "llama_cpp.server", "--model", path, "--model_alias", EXTERNAL,
                               "--host", "127.0.0.1", "--port", str(port), "--n_threads", THREADS, "--n_ctx", "4096", "--interrupt_requests", "false"],
                              env={**os.environ, "API_KEY": direct_key},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1,
                             headers={"Authorization": f"Bearer {direct_key}"}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the direct llama-cpp-python server did not start"
            time.sleep(0.2)
        cases = {
            "llama-cpp-python direct": (f"http://127.0.0.1:{port}", direct_key, EXTERNAL),
            "llama-cpp-python via strata": (s.base, s.key, EXTERNAL),
            "strata engine via strata": (s.base, s.key, CHAT_MODEL),
        }
        # Warm each path once (model pages, connection pools).
        for base, key, model in cases.values():
            batch(base, key, model, 1, 99)
        rows = {(name, n): [] for name in cases for n in STREAMS}
        for round_ in range(ROUNDS):
            for n in STREAMS:
                names = list(cases)
                if round_ % 2:
                    names.reverse()
                for name in names:
                    rows[(name, n)].append(batch(*cases[name], n, round_))
                    print(name, n, rows[(name, n)][-1], flush=True)
    finally:
        direct.terminate()
        direct.wait(timeout=30)
        s.stop()
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    lines = [
        "# Engines of every kind under strata",
        "",
        f"`ROUNDS={ROUNDS} .venv/bin/python bench/engines.py`, release build, "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"{datetime.date.today().isoformat()}, commit {git_head()}.",
        "",
        f"SmolLM2-135M-Instruct Q4_1 on every engine, {THREADS} thread(s) each, {TOKENS} tokens at most per stream, "
        f"temperature 0; medians of {ROUNDS} rounds, cases alternating within a round.",
        "",
        "| case | streams | tokens/s | TTFT mean (ms) | TTFT p95 (ms) |",
        "|---|---|---|---|---|",
    ]
    for n in STREAMS:
        for name in cases:
            m = med[(name, n)]
            lines.append(f"| {name} | {n} | {m['tok_s']:.1f} | {m['ttft_mean'] * 1000:.0f} | "
                         f"{m['ttft_p95'] * 1000:.0f} |")
    lines += ["", "Ratios (same run):", ""]
    for n in STREAMS:
        d, v, o = (med[(name, n)] for name in cases)
        lines.append(f"- {n} stream(s): llama-cpp-python via strata / direct: tokens/s x{v['tok_s'] / d['tok_s']:.2f}, "
                     f"TTFT mean x{v['ttft_mean'] / d['ttft_mean']:.2f}; strata engine / llama-cpp-python "
                     f"(both via strata): tokens/s x{o['tok_s'] / v['tok_s']:.2f}, TTFT p95 "
                     f"x{o['ttft_p95'] / v['ttft_p95']:.2f}")
    out = "\n".join(lines) + "\n"
    print(out)
    with open(os.path.join(HERE, "results", "engines.md"), "w") as f:
        f.write(out)


def start_to_ready(cmd, port):
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            assert proc.poll() is None, f"{cmd[0]} exited"
            assert time.monotonic() - t0 < 120
            time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def image():
    import shutil
    import tempfile
    tag = "localhost/strata:bench"
    buildah = ["buildah", "--storage-driver", "vfs"]
    t0 = time.monotonic()
    subprocess.run([os.path.join(HERE, "..", "deploy", "image", "build"), STRATA, tag], check=True,
                   capture_output=True, timeout=1800)
    build_s = time.monotonic() - t0
    size = subprocess.run([*buildah, "images", "--format", "{{.Size}}", tag], capture_output=True, text=True,
                          check=True).stdout.strip()
    models = tempfile.mkdtemp(prefix="strata-bench-")
    os.chmod(models, 0o755)
    shutil.copy(model_config(CHAT_MODEL).split('"')[1], os.path.join(models, "model.gguf"))
    os.chmod(os.path.join(models, "model.gguf"), 0o644)
    container = subprocess.run([*buildah, "from", tag], capture_output=True, text=True, check=True).stdout.strip()
    engine = ["engine", "--model-name", CHAT_MODEL, "--threads", "2"]
    times = {"image": [], "host": []}
    try:
        for _ in range(ROUNDS):
            port = free_port()
            times["image"].append(start_to_ready(
                [*buildah, "run", "--isolation", "chroot", "--env", "STRATA_REPLICA_TOKEN=bench", "--volume",
                 f"{models}:/models:ro", container, "--", "/usr/local/bin/strata", *engine, "--model",
                 "/models/model.gguf", "--port", str(port)], port))
            port = free_port()
            times["host"].append(start_to_ready(
                [STRATA, *engine, "--model", os.path.join(models, "model.gguf"), "--port", str(port)], port))
    finally:
        subprocess.run([*buildah, "rm", container], capture_output=True)
        subprocess.run([*buildah, "rmi", "--force", tag], capture_output=True)
        shutil.rmtree(models, ignore_errors=True)
    img, host = statistics.median(times["image"]), statistics.median(times["host"])
    out = "\n".join([
        "",
        "## The image",
        "",
        f"`ROUNDS={ROUNDS} .venv/bin/python bench/engines.py image`, release build, "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"{datetime.date.today().isoformat()}, commit {git_head()}.",
        "",
        f"- Size: {size} (Debian bookworm minbase with python3, pip, libgomp1, libstdc++6, and the stripped "
        f"binary), as `buildah images` reports it; built in {build_s:.0f} s with the root file system cached.",
        f"- An engine's start to ready (SmolLM2, 2 threads, `/health` 200), median of {ROUNDS}: from the image "
        f"(`buildah run`, chroot isolation) {img:.2f} s, the same binary on the host {host:.2f} s "
        f"(x{img / host:.2f}; runs: image {', '.join(f'{t:.2f}' for t in times['image'])}, host "
        f"{', '.join(f'{t:.2f}' for t in times['host'])}). No image pull is counted: none can be made here.",
        "",
    ])
    print(out)
    with open(os.path.join(HERE, "results", "engines.md"), "a") as f:
        f.write(out)


def git_head():
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=HERE).stdout.strip()


if __name__ == "__main__":
    what = sys.argv[1:] or ["streams", "image"]
    if "streams" in what:
        main()
    if "image" in what:
        image()
