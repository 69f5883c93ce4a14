"""Helpers shared by the gateway benchmarks: free ports, waiting for a
server, the nginx stub engine from ../shared/bench, and wrk runs parsed
into req/s and latency percentiles."""
import base64
import json
import os
import re
import subprocess
import socket
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "bench")
STUB = "http://127.0.0.1:18001"


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url, headers=None, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url, headers=headers, timeout=5).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def new_key():
    """A key in strata's format, for an admin key file."""
    return "sk-strata-" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def start_stub(d):
    """nginx answering OpenAI routes with static JSON at STUB, run from `d`."""
    # A stub left running by an earlier run would answer in this one's
    # place (this one could not bind), its CPU uncounted.
    try:
        httpx.get(f"{STUB}/health", timeout=1)
    except httpx.HTTPError:
        pass
    else:
        raise RuntimeError(f"something already answers at {STUB} (a stub an earlier run left?); stop it first")
    os.makedirs(os.path.join(d, "nginx"))
    nginx = subprocess.Popen(["nginx", "-c", os.path.join(SHARED, "stub-nginx.conf"), "-p", os.path.join(d, "nginx") + "/"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait(f"{STUB}/health")
    return nginx


def wrk(url, key=None, connections=32, duration="10s"):
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration}", "--latency", "-s", os.path.join(SHARED, "chat.lua"), url]
    if key:
        cmd[1:1] = ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    pct = {p: v for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M)}

    def ms(v):
        n = float(re.match(r"[\d.]+", v).group())
        return n / 1000 if v.endswith("us") else n * 1000 if v.endswith("s") and not v.endswith("ms") else n
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": ms(pct["50"]), "p99": ms(pct["99"]), "errors": int(non2xx.group(1)) if non2xx else 0}


def median(xs):
    return sorted(xs)[len(xs) // 2]


def summarize(runs):
    """Prints wrk runs by path as a table of medians; returns the medians."""
    print("\n| path | req/s (median) | p50 ms | p99 ms | non-2xx |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, rs in runs.items():
        summary[name] = {k: median([r[k] for r in rs]) for k in ("rps", "p50", "p99")}
        print(f"| {name} | {summary[name]['rps']:.0f} | {summary[name]['p50']:.3f} | "
              f"{summary[name]['p99']:.3f} | {sum(r['errors'] for r in rs)} |")
    return summary


def streamed_chat(http, url, body):
    """POSTs a chat completion with `stream` set and reads it to the end:
    (answered with 200, seconds to the first content token or None,
    seconds in all)."""
    t0 = time.perf_counter()
    ttft, ok = None, False
    try:
        with http.stream("POST", url, json={**body, "stream": True}) as r:
            if r.status_code == 200:
                for line in r.iter_lines():
                    if ttft is None and line.startswith("data: {"):
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        if choices[0].get("delta", {}).get("content"):
                            ttft = time.perf_counter() - t0
                ok = True
            else:
                r.read()
    except httpx.HTTPError:
        ok = False
    return ok, ttft, time.perf_counter() - t0
