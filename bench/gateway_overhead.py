"""What tenancy adds to the gateway's request path, end to end: wrk drives
small chat completions at the nginx stub engine (../shared/bench) directly,
through the gateway as it was before tenancy (a binary built from commit
5f259ab, passed as OLD_STRATA), and through today's gateway with a key that
has request and token limits, a tenant budget and the fair queue in the path.
Runs alternate, so the shared machine's noise hits all of them alike.

Run: OLD_STRATA=/path/to/old/strata .venv/bin/python bench/gateway_overhead.py
Needs nginx and wrk (apt-get install nginx-light wrk) and a release build.
"""
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "bench")
NEW = os.environ.get("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
OLD = os.environ["OLD_STRATA"]
DURATION, ROUNDS = os.environ.get("DURATION", "10s"), int(os.environ.get("ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "32"))


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url, headers=None):
    for _ in range(200):
        try:
            if httpx.get(url, headers=headers, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def wrk(url, key=None):
    cmd = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{DURATION}", "--latency", "-s", os.path.join(SHARED, "chat.lua"), url]
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


def main():
    d = tempfile.mkdtemp(prefix="strata-bench-")
    os.makedirs(os.path.join(d, "nginx"))
    nginx = subprocess.Popen(["nginx", "-c", os.path.join(SHARED, "stub-nginx.conf"), "-p", os.path.join(d, "nginx") + "/"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stub = "http://127.0.0.1:18001"
    wait(f"{stub}/health")
    admin = "sk-strata-" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    with open(os.path.join(d, "admin.key"), "w") as f:
        f.write(admin)
    with open(os.path.join(d, "new.toml"), "w") as f:
        f.write(f'[security]\nadmin_key_file = "{d}/admin.key"\n[gateway]\nslots_per_replica = 64\n'
                '[pricing.stub]\nprompt_per_million = 0.1\ncompletion_per_million = 0.4\n')
    old_port, new_port = port(), port()
    env = {**os.environ, "STRATA_LOG": "warn"}
    old = subprocess.Popen([OLD, "gateway", "--replica", stub, "--listen", f"127.0.0.1:{old_port}",
                            "--db", os.path.join(d, "old.db")], env=env, cwd=d,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    new = subprocess.Popen([NEW, "--config", os.path.join(d, "new.toml"), "gateway", "--replica", stub,
                            "--listen", f"127.0.0.1:{new_port}", "--db", os.path.join(d, "new.db")], env=env, cwd=d,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{new_port}"
        wait(f"http://127.0.0.1:{old_port}/health")
        wait(f"{base}/health")
        h = {"Authorization": f"Bearer {admin}"}
        tenant = httpx.post(f"{base}/admin/v1/tenants", headers=h, json={
            "name": "bench", "requests_per_minute": 100_000_000, "tokens_per_minute": 1_000_000_000,
            "monthly_budget_usd": 1_000_000.0}).json()["id"]
        key = httpx.post(f"{base}/admin/v1/tenants/{tenant}/keys", headers=h, json={
            "name": "wrk", "role": "member", "requests_per_minute": 100_000_000,
            "tokens_per_minute": 1_000_000_000}).json()["key"]
        time.sleep(1.5)  # both gateways have seen the stub healthy
        runs = {"nginx stub, direct": [], "gateway before tenancy": [], "gateway with tenancy": []}
        for _ in range(ROUNDS):
            runs["nginx stub, direct"].append(wrk(f"{stub}/v1/chat/completions"))
            runs["gateway before tenancy"].append(wrk(f"http://127.0.0.1:{old_port}/v1/chat/completions"))
            runs["gateway with tenancy"].append(wrk(f"{base}/v1/chat/completions", key))
        print(json.dumps(runs, indent=1))
        med = lambda xs: sorted(xs)[len(xs) // 2]
        print("\n| path | req/s (median) | p50 ms | p99 ms | non-2xx |")
        print("|---|---|---|---|---|")
        summary = {}
        for name, rs in runs.items():
            summary[name] = {k: med([r[k] for r in rs]) for k in ("rps", "p50", "p99")}
            print(f"| {name} | {summary[name]['rps']:.0f} | {summary[name]['p50']:.3f} | {summary[name]['p99']:.3f} | "
                  f"{sum(r['errors'] for r in rs)} |")
        before, after = summary["gateway before tenancy"], summary["gateway with tenancy"]
        print(f"\nadded by tenancy: p50 {1000 * (after['p50'] - before['p50']):+.0f} us, "
              f"p99 {1000 * (after['p99'] - before['p99']):+.0f} us, throughput x{after['rps'] / before['rps']:.2f}")
    finally:
        for p in (old, new, nginx):
            p.terminate()
        for p in (old, new, nginx):
            p.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
