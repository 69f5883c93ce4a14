"""What a batch costs on idle capacity, from the cost ledger.

Three `strata serve` runs, each with a fresh database (one replica, the
setup of bench/batch_backlog.py, the local instance at its configured
price), each ledger read with `strata cost report --by class` over the
run's whole life:

- `alone`: the interactive load (batch_backlog's seeded Poisson arrivals
  at RATE a second) for WINDOW seconds;
- `shared`: the same load with a 2,000-line batch running beside it;
- `separate`: the batch alone for WINDOW seconds: a pool of its own, the
  same size, whose whole bill is the batch's.

Reported: each run's bill and its interactive / batch / idle lines; the
dollars per million batch tokens the ledger charges on the shared pool,
against a separate pool's bill per million batch tokens; the idle line's
share of the bill with and without the batch. (The shared pool's bill is
its one replica's time whether the batch runs or not: the batch adds no
instance time there. The runs' lengths differ by the batch's start and
cancel, so their absolute bills are not compared.) The ledger's capacity for the idle line is the instance type's
`prefill_tokens_per_s`/`decode_tokens_per_s`, set here to what one replica
served in a first, unmetered batch-only minute (CAPACITY overrides it).

Run: .venv/bin/python bench/batch_cost.py   (after `cargo build --release -p strata`)
Env: RATE (2.0), WINDOW (60), OUT (32) as in batch_backlog.py; CAPACITY (tokens/s;
measured if unset)."""
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import batch_backlog as bb  # noqa: E402
from conftest import STRATA, Server  # noqa: E402

PRICE = 1.0  # dollars an hour for the one replica


def config(capacity):
    return bb.CONFIG + f"""
[instance_types.local]
prefill_tokens_per_s = {capacity:.1f}
decode_tokens_per_s = [{capacity:.1f}]

[[catalog]]
instance_type = "local"
zone = "local"
capacity = "on_demand"
price_per_hour = {PRICE}
"""


def ledger(s):
    out = subprocess.run([STRATA, "--config", s.config, "cost", "report", "--by", "class", "--since", "1h",
                          "--db", os.path.join(s.dir, "strata.db"), "--json"],
                         capture_output=True, text=True, check=True).stdout
    lines = {l["key"]: l for l in json.loads(out)["lines"]}
    get = lambda k, f: lines.get(k, {}).get(f, 0.0)  # noqa: E731
    return {"bill": sum(l["cost"] for l in lines.values()),
            "interactive": get("interactive", "cost"), "batch": get("batch", "cost"),
            "idle": get("(idle)", "cost"), "batch_tokens": get("batch", "tokens"),
            "interactive_tokens": get("interactive", "tokens")}


def run(mode, capacity):
    s = Server(replicas=1, config=config(capacity), tenant="cost-bench")
    try:
        httpx.post(f"{s.base}/v1/chat/completions", headers=s.headers, json=bb.request(0), timeout=120)
        t0 = time.perf_counter()
        if mode == "alone":
            bb.interactive(s)
        else:
            batch = bb.warm_batch(s)
            if mode == "shared":
                bb.interactive(s)
            else:
                time.sleep(bb.WINDOW)
            bb.cancel(s, batch)
        row = {"secs": time.perf_counter() - t0, **ledger(s)}
    finally:
        s.stop()
    print(f"{mode}: {row}", flush=True)
    return row


def measured_capacity():
    """Tokens per second one replica serves with the batch alone."""
    s = Server(replicas=1, config=bb.CONFIG, tenant="cost-capacity")
    try:
        batch = bb.warm_batch(s)
        metrics = lambda: httpx.get(f"{s.base}/metrics", headers={"Authorization": f"Bearer {s.admin_key}"},  # noqa: E731
                                    timeout=30).text
        def tokens():
            line = [x for x in metrics().splitlines() if x.startswith("strata_gateway_batch_tokens_total")]
            return float(line[0].split()[-1]) if line else 0.0
        before, t0 = tokens(), time.perf_counter()
        time.sleep(min(bb.WINDOW, 30))
        rate = (tokens() - before) / (time.perf_counter() - t0)
        bb.cancel(s, batch)
    finally:
        s.stop()
    return rate


def main():
    capacity = float(os.environ["CAPACITY"]) if "CAPACITY" in os.environ else measured_capacity()
    print(f"capacity: {capacity:.1f} tokens/s", flush=True)
    rows = {mode: run(mode, capacity) for mode in ("alone", "shared", "separate")}
    a, sh, sep = rows["alone"], rows["shared"], rows["separate"]
    charged = sh["batch"] / sh["batch_tokens"] * 1e6
    separate = sep["bill"] / sep["batch_tokens"] * 1e6
    out = [
        f"`.venv/bin/python bench/batch_cost.py` (RATE={bb.RATE}, WINDOW={bb.WINDOW:g}, OUT={bb.OUT}, "
        f"capacity {capacity:.1f} tokens/s, ${PRICE}/h); {datetime.date.today()}, {platform.node()} "
        f"({os.cpu_count()} cores).",
        "",
        "| run | seconds of load | bill $ | interactive $ | batch $ | idle $ | idle share | batch tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in rows.items():
        out.append(f"| {mode} | {r['secs']:.0f} | {r['bill']:.5f} | {r['interactive']:.5f} | {r['batch']:.5f} | "
                   f"{r['idle']:.5f} | {r['idle'] / r['bill']:.2f} | {r['batch_tokens']:.0f} |")
    out += ["",
            f"Per million batch tokens: charged on the shared pool ${charged:.4f}, a separate pool's bill "
            f"${separate:.4f} (x{charged / separate:.2f}). The shared pool's idle line went from "
            f"{a['idle'] / a['bill']:.0%} of its bill without the batch to {sh['idle'] / sh['bill']:.0%} with it; "
            f"the interactive line per interactive token: ${a['interactive'] / a['interactive_tokens'] * 1e6:.4f} "
            f"alone, ${sh['interactive'] / sh['interactive_tokens'] * 1e6:.4f} beside the batch (per million)."]
    print("\n".join(out))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
