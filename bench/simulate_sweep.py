"""Each policy of `strata simulate` at its cheapest setting that meets the
TTFT objective (issue 29): strata's `pool.target_utilisation` swept, and
SkyServe's baselines over the same utilisations (their queries-per-second
target derived from it) and over SkyServe's upscale/downscale delays.

    python3 bench/simulate_sweep.py CONFIG -- SIMULATE_ARGS...

runs `target/release/strata --config <copy> simulate SIMULATE_ARGS --json`
once per (utilisation, delays) pair on a copy of CONFIG with the
utilisation set, and prints, per policy, every setting's cost and share
within the objective, then the cheapest setting that meets it (default
99%, `--objective`) and the ratios of strata to each baseline there.
strata does not read the SkyServe delays, so its rows come from the
default-delay runs (its figures are the same in every run of one
utilisation: the script checks that).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STRATA = os.environ.get("STRATA_BIN", os.path.join(ROOT, "target/release/strata"))
UTILISATIONS = [0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
# SkyServe's defaults first, then shorter delays a user might set.
DELAYS = [(300, 1200), (120, 600), (60, 300), (20, 120)]


def with_utilisation(config_text, u):
    text, n = re.subn(r"(?m)^target_utilisation\s*=.*$", f"target_utilisation = {u}", config_text)
    if n == 0:
        text = re.sub(r"(?m)^\[pool\]\s*$", f"[pool]\ntarget_utilisation = {u}", config_text, count=1)
    return text


def run(config_path, u, delays, args):
    config_text = open(config_path).read()
    # Relative paths in the config (none today) would resolve from its copy:
    # keep the copy next to the original.
    fd, path = tempfile.mkstemp(suffix=".toml", dir=os.path.dirname(os.path.abspath(config_path)))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(with_utilisation(config_text, u))
        cmd = [STRATA, "--config", path, "simulate", *args, "--json",
               "--skyserve-upscale-delay-secs", str(delays[0]),
               "--skyserve-downscale-delay-secs", str(delays[1])]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
        return json.loads(out.stdout)["policies"]
    finally:
        os.unlink(path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--objective", type=float, default=0.99)
    p.add_argument("simulate_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    args = [x for x in a.simulate_args if x != "--"]
    rows = {}  # policy -> [(setting, cost, attainment)]
    strata_seen = {}
    for u in UTILISATIONS:
        for delays in DELAYS:
            for pol in run(a.config, u, delays, args):
                name = pol["policy"]
                if name.startswith("static"):
                    continue
                if name == "strata":
                    key = (u, pol["cost"], pol["slo_attainment"])
                    if u in strata_seen and strata_seen[u] != key:
                        sys.exit(f"strata moved with SkyServe's delays at {u}: {strata_seen[u]} vs {key}")
                    strata_seen[u] = key
                    if delays != DELAYS[0]:
                        continue
                    setting = f"target_utilisation {u}"
                else:
                    setting = f"utilisation {u}, delays {delays[0]}/{delays[1]} s"
                rows.setdefault(name, []).append((setting, pol["cost"], pol["slo_attainment"]))
            print(f"done: utilisation {u}, delays {delays}", file=sys.stderr)
    cheapest = {}
    for name, runs in rows.items():
        print(f"\n### {name}\n")
        print("| setting | cost $ | within objective |")
        print("|---|---|---|")
        for setting, cost, att in runs:
            print(f"| {setting} | {cost:.2f} | {att * 100:.2f}% |")
        meeting = [r for r in runs if r[2] >= a.objective]
        if meeting:
            cheapest[name] = min(meeting, key=lambda r: r[1])
    print(f"\n### Cheapest setting within {a.objective * 100:.0f}%\n")
    print("| policy | setting | cost $ | within objective | strata / policy |")
    print("|---|---|---|---|---|")
    mine = cheapest.get("strata")
    for name, (setting, cost, att) in cheapest.items():
        ratio = f"{mine[1] / cost:.2f}x" if mine else "-"
        print(f"| {name} | {setting} | {cost:.2f} | {att * 100:.2f}% | {ratio} |")
    for name in rows:
        if name not in cheapest:
            print(f"| {name} | none meets it | | | |")


if __name__ == "__main__":
    main()
