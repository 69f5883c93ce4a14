"""What the operators' view costs: the OTLP trace exporter on the request
path, and the dashboard's data endpoint over a busy hour.

Tracing: wrk drives small chat completions at the nginx stub engine
(../shared/bench) directly, through a gateway as usual, through a gateway
exporting every request's span to a collector (a loopback HTTP server that
reads and counts what it is sent), and through one sampling a tenth of the
traces (OTEL_TRACES_SAMPLER=traceidratio, 0.1). Runs alternate, so the
machine's noise hits all paths alike. The spans the collector received are
counted against the requests served (the exporter drops rather than waits).

Dashboard: after those runs the traced gateway's ledger holds every request
of the hour (SQLite); `GET /ui/data?minutes=60` (series and tables of the
whole hour, the newest 50,000 ledger rows) is timed with a logged-in
session, and again for a 15-minute window.

Run: .venv/bin/python bench/operability.py
Needs nginx and wrk (apt-get install nginx-light wrk) and a release build
(STRATA_BIN, default target/release/strata).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from benchlib import STUB, new_key, port, start_stub, summarize, wait, wrk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
from conftest import OtlpCollector  # noqa: E402  (the e2e tests' loopback collector)
STRATA = os.environ.get("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
DURATION, ROUNDS = os.environ.get("DURATION", "10s"), int(os.environ.get("ROUNDS", "3"))


def gateway(d, name, admin_file, env=None):
    config = os.path.join(d, f"{name}.toml")
    with open(config, "w") as f:
        f.write(f'[security]\nadmin_key_file = "{admin_file}"\n[gateway]\nslots_per_replica = 64\n')
    p = port()
    proc = subprocess.Popen(
        [STRATA, "--config", config, "gateway", "--replica", STUB, "--listen", f"127.0.0.1:{p}",
         "--db", os.path.join(d, f"{name}.db")],
        env={**os.environ, "STRATA_LOG": "warn", **(env or {})}, cwd=d,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{p}"
    wait(f"{base}/health")
    return proc, base


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def member_key(base, admin):
    h = {"Authorization": f"Bearer {admin}"}
    tenant = httpx.post(f"{base}/admin/v1/tenants", headers=h, json={"name": "wrk"}).json()["id"]
    return httpx.post(f"{base}/admin/v1/tenants/{tenant}/keys", headers=h,
                      json={"name": "wrk", "role": "member"}).json()["key"]


def main():
    d = tempfile.mkdtemp(prefix="strata-bench-ops-")
    nginx = start_stub(d)
    admin = new_key()
    admin_file = os.path.join(d, "admin.key")
    with open(admin_file, "w") as f:
        f.write(admin)
    collector = OtlpCollector(keep=False)
    procs = []
    try:
        plain_proc, plain = gateway(d, "plain", admin_file)
        traced_proc, traced = gateway(d, "traced", admin_file, {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url})
        sampled_proc, sampled = gateway(d, "sampled", admin_file, {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_TRACES_SAMPLER": "traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1"})
        procs = [plain_proc, traced_proc, sampled_proc]
        keys = {base: member_key(base, admin) for base in (plain, traced, sampled)}
        time.sleep(1.5)  # both gateways have seen the stub healthy
        runs = {"nginx stub, direct": [], "gateway": [], "gateway, spans to OTLP": [],
                "gateway, 10% of spans to OTLP": []}
        # CPU seconds spent by each gateway (and the collector) over its runs, and requests served.
        cpu = {"gateway": [0.0, 0], "gateway, spans to OTLP": [0.0, 0], "gateway, 10% of spans to OTLP": [0.0, 0],
               "collector": [0.0, 0]}
        for _ in range(ROUNDS):
            runs["nginx stub, direct"].append(wrk(f"{STUB}/v1/chat/completions", duration=DURATION))
            for name, proc, base in (("gateway", plain_proc, plain), ("gateway, spans to OTLP", traced_proc, traced),
                                     ("gateway, 10% of spans to OTLP", sampled_proc, sampled)):
                before, collector_before = cpu_seconds(proc.pid), time.process_time()
                r = wrk(f"{base}/v1/chat/completions", keys[base], duration=DURATION)
                runs[name].append(r)
                cpu[name][0] += cpu_seconds(proc.pid) - before
                cpu[name][1] += int(r["rps"] * float(DURATION.rstrip("s")))
                if proc is traced_proc:
                    cpu["collector"][0] += time.process_time() - collector_before
        print(json.dumps(runs, indent=1))
        summary = summarize(runs)
        a = summary["gateway"]
        for name in ("gateway, spans to OTLP", "gateway, 10% of spans to OTLP"):
            b = summary[name]
            print(f"\n{name}: throughput x{b['rps'] / a['rps']:.2f}, p50 {1000 * (b['p50'] - a['p50']):+.0f} us, "
                  f"p99 {1000 * (b['p99'] - a['p99']):+.0f} us")
        time.sleep(2.5)  # the exporter's last batch
        metrics = httpx.get(f"{traced}/metrics", headers={"Authorization": f"Bearer {admin}"}).text
        served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith('strata_gateway_requests_total{route="/v1/chat/completions",status="200"}'))
        print(f"requests served by the traced gateway: {served:.0f}; spans at the collector: {collector.span_count} "
              f"({collector.span_count / max(served, 1):.3f} per request) in {collector.exports} exports")
        per = {k: 1e6 * c / max(n, 1) for k, (c, n) in cpu.items() if k != "collector"}
        print(f"gateway CPU per request: {per['gateway']:.0f} us plain, {per['gateway, spans to OTLP']:.0f} us all "
              f"traced (x{per['gateway, spans to OTLP'] / per['gateway']:.2f}), "
              f"{per['gateway, 10% of spans to OTLP']:.0f} us 10% traced "
              f"(x{per['gateway, 10% of spans to OTLP'] / per['gateway']:.2f}); the loopback collector (this "
              f"process) used {cpu['collector'][0]:.1f} CPU s over {ROUNDS} x {DURATION} of fully traced load")

        # The dashboard's data over the hour just loaded into the traced gateway's ledger.
        time.sleep(2)  # the ledger writer's last batch
        login = httpx.post(f"{traced}/ui/login", data={"key": admin})
        jar = {"strata_ui": login.cookies["strata_ui"]}
        print("\n| /ui/data window | ledger rows in window | median ms | p90 ms | response KiB |")
        print("|---|---|---|---|---|")
        for minutes in (60, 15):
            times, size = [], 0
            for _ in range(10):
                t = time.perf_counter()
                r = httpx.get(f"{traced}/ui/data?minutes={minutes}", cookies=jar, timeout=60)
                times.append(1000 * (time.perf_counter() - t))
                r.raise_for_status()
                size = len(r.content)
            rows = sum(t["requests"] for t in r.json()["tenants_spend"])
            times.sort()
            print(f"| {minutes} min | {rows} | {statistics.median(times):.1f} | {times[8]:.1f} | {size / 1024:.1f} |")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        nginx.terminate()


if __name__ == "__main__":
    main()
