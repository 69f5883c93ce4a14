"""What tenancy adds to the gateway's request path, end to end: wrk drives
small chat completions at the nginx stub engine (../shared/bench) directly,
through the gateway as it was before tenancy (a binary built from commit
5f259ab, passed as OLD_STRATA), and through today's gateway with a key that
has request and token limits, a tenant budget and the fair queue in the path.
Runs alternate, so the shared machine's noise hits all of them alike.

Run: OLD_STRATA=/path/to/old/strata .venv/bin/python bench/gateway_overhead.py
Needs nginx and wrk (apt-get install nginx-light wrk) and a release build.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time

import httpx
from benchlib import STUB, new_key, port, start_stub, summarize, wait
from benchlib import wrk as run_wrk

HERE = os.path.dirname(os.path.abspath(__file__))
NEW = os.environ.get("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
OLD = os.environ["OLD_STRATA"]
DURATION, ROUNDS = os.environ.get("DURATION", "10s"), int(os.environ.get("ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "32"))


def wrk(url, key=None):
    return run_wrk(url, key, CONNECTIONS, DURATION)


def main():
    d = tempfile.mkdtemp(prefix="strata-bench-")
    nginx = start_stub(d)
    stub = STUB
    admin = new_key()
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
        summary = summarize(runs)
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
