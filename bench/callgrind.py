"""Instructions per request in strata's gateway, counted by callgrind (the
same count on a busy or an idle machine, unlike seconds): the gateway as
bench/peers.py runs it (auth, limits, budget, fair queue, routing and
metering into the SQLite ledger) in front of the nginx stub, under
valgrind; wrk sends small chat completions for SECONDS_UNDER_LOAD (20) over
8 connections;
the total instruction count of the gateway process, divided by the
requests it served, is printed, and the profile is left for
callgrind_annotate.

Run: STRATA_BIN=/work/rel-target/release/strata .venv/bin/python bench/callgrind.py
Needs valgrind, nginx and wrk.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx
from benchlib import SHARED, STUB, new_key, port, start_stub, wait

HERE = os.path.dirname(os.path.abspath(__file__))
STRATA = os.environ.get("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
SECONDS = os.environ.get("SECONDS_UNDER_LOAD", "20")


def main():
    d = tempfile.mkdtemp(prefix="strata-callgrind-")
    nginx = start_stub(d)
    admin = new_key()
    with open(os.path.join(d, "admin.key"), "w") as f:
        f.write(admin)
    config = os.path.join(d, "strata.toml")
    with open(config, "w") as f:
        f.write(f'[security]\nadmin_key_file = "{d}/admin.key"\n[gateway]\nslots_per_replica = 64\n'
                '[pricing.stub]\nprompt_per_million = 0.1\ncompletion_per_million = 0.2\n')
    p = port()
    base = f"http://127.0.0.1:{p}"
    out = os.path.join(d, "callgrind.out")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", 
                             "--instr-atstart=no", STRATA, "--config", config, "gateway", "--replica", STUB,
                             "--listen", f"127.0.0.1:{p}", "--db", os.path.join(d, "strata.db")],
                            cwd=d, stdout=open(os.path.join(d, "gateway.log"), "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "STRATA_LOG": "warn"})
    for _ in range(60):
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    h = {"Authorization": f"Bearer {admin}"}
    tenant = httpx.post(f"{base}/admin/v1/tenants", headers=h, timeout=60, json={
        "name": "wrk", "requests_per_minute": 100_000_000, "tokens_per_minute": 1_000_000_000,
        "monthly_budget_usd": 1_000_000.0}).json()["id"]
    key = httpx.post(f"{base}/admin/v1/tenants/{tenant}/keys", headers=h, timeout=60,
                     json={"name": "wrk", "role": "member"}).json()["key"]
    wait(f"{base}/health")
    # Count from here: every thread's work while wrk runs (the ledger's too).
    subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
    run = subprocess.run(["wrk", "-t1", "-c8", f"-d{SECONDS}s", "-H", f"Authorization: Bearer {key}",
                          "-s", os.path.join(SHARED, "chat.lua"), f"{base}/v1/chat/completions"], capture_output=True, text=True, check=True)
    served = int(re.search(r"(\d+) requests in", run.stdout).group(1))
    if "Non-2xx" in run.stdout:
        raise SystemExit(f"requests failed:\n{run.stdout}")
    time.sleep(1)  # the last ledger batch
    subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    nginx.terminate()
    summary = subprocess.run(["callgrind_annotate", "--inclusive=yes", out], capture_output=True, text=True).stdout
    total = int(re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", summary).group(1).replace(",", ""))
    print(summary[:12000])
    print(f"requests served: {served}; instructions in request handling: {total:,}; "
          f"per request: {total / served:,.0f}\nprofile: {out}")


if __name__ == "__main__":
    sys.exit(main())
