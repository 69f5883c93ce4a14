"""Instructions per request in strata's gateway, counted by callgrind (the
same count on a busy or an idle machine, unlike seconds): the gateway as
bench/peers.py runs it (auth, limits, budget, fair queue, routing and
metering into the SQLite ledger) in front of the nginx stub, under
valgrind; wrk sends small chat completions for SECONDS_UNDER_LOAD (20) over
8 connections;
the total instruction count of the gateway process, divided by the
requests it served, is printed, and the profile is left for
callgrind_annotate.

With `--mtls`, the stub serves HTTPS that requires the gateway's client
certificate (as bench/peers.py --mtls sets it up), so the count includes
what mutual TLS to the replica costs.

Run: STRATA_BIN=/work/rel-target/release/strata .venv/bin/python bench/callgrind.py [--mtls]
Needs valgrind, nginx and wrk.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from benchlib import SHARED, start_stub
from peers import replica_pki, strata_gateway, tls_stub

SECONDS = os.environ.get("SECONDS_UNDER_LOAD", "20")


def main():
    d = tempfile.mkdtemp(prefix="strata-callgrind-")
    out = os.path.join(d, "callgrind.out")
    wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--instr-atstart=no"]
    mtls = "--mtls" in sys.argv
    if mtls:
        pki = replica_pki(d)
        nginx, replica = tls_stub(d, pki)
    else:
        nginx = start_stub(d)
    proc = None
    try:
        if mtls:
            proc, base, key = strata_gateway(d, replica=replica, wrap=wrap, extra=("--replica-tls-dir", pki))
        else:
            proc, base, key = strata_gateway(d, wrap=wrap)
        # Count from here: every thread's work while wrk runs (the ledger's too).
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        run = subprocess.run(["wrk", "-t1", "-c8", f"-d{SECONDS}s", "-H", f"Authorization: Bearer {key}",
                              "-s", os.path.join(SHARED, "chat.lua"), f"{base}/v1/chat/completions"],
                             capture_output=True, text=True, check=True)
        served = int(re.search(r"(\d+) requests in", run.stdout).group(1))
        if "Non-2xx" in run.stdout:
            raise SystemExit(f"requests failed:\n{run.stdout}")
        time.sleep(1)  # the last ledger batch
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        nginx.terminate()
    summary = subprocess.run(["callgrind_annotate", "--inclusive=yes", out], capture_output=True, text=True).stdout
    total = int(re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", summary).group(1).replace(",", ""))
    print(summary[:12000])
    print(f"requests served: {served}; instructions in request handling: {total:,}; "
          f"per request: {total / served:,.0f}\nprofile: {out}")


if __name__ == "__main__":
    sys.exit(main())
