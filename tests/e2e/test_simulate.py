"""`strata simulate` from the command line: a user's own trace (generic CSV)
against the config's catalog, recorded spot availability (testdata/), a table or JSON, the same numbers on every run, and clear
errors for bad input."""
import json
import os
import subprocess
import tempfile

from conftest import STRATA

TESTDATA = os.path.join(os.path.dirname(__file__), "../../testdata")
SPOT = os.path.join(TESTDATA, "spot-traces/aws-02-15-2023")
CONFIG = """
[instance_types.small]
prefill_tokens_per_s = 2000.0
decode_tokens_per_s = [50.0, 90.0, 120.0, 140.0]

[[catalog]]
instance_type = "small"
zone = "us-west-2a"
capacity = "spot"
price_per_hour = 0.3

[[catalog]]
instance_type = "small"
zone = "us-west-2a"
capacity = "on_demand"
price_per_hour = 1.0

[pool]
max_replicas = 20
"""


def run(d, *args):
    return subprocess.run([STRATA, "--config", os.path.join(d, "strata.toml"), "simulate", *args],
                          capture_output=True, text=True, timeout=120)


def test_a_trace_is_replayed_against_the_policies_deterministically():
    d = tempfile.mkdtemp(prefix="strata-sim-")
    with open(os.path.join(d, "strata.toml"), "w") as f:
        f.write(CONFIG)
    trace = os.path.join(d, "trace.csv")
    with open(trace, "w") as f:
        f.write("at_s,prompt_tokens,output_tokens\n")
        for i in range(600):
            # 20 minutes: quiet, a busy stretch, quiet again.
            rate = 4 if 300 <= i < 500 else 1
            for k in range(rate):
                f.write(f"{i * 2 + k * 0.5},{200 + i % 50},{40 + i % 30}\n")
    out = run(d, "--trace", trace, "--spot-dir", SPOT, "--launch-delay-secs", "30", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    names = [p["policy"] for p in report["policies"]]
    # One instance type in one zone: SpotHedge pinned to it and unpinned
    # are one policy (one row), beside the earlier, ideal-timing model.
    assert names[0].startswith("static") and names[1:] == [
        "request-rate autoscaler (on demand)", "SpotHedge (small, SkyServe timing)",
        "SpotHedge (cheapest type per zone, ideal timing)", "strata"], names
    for p in report["policies"]:
        assert p["finished"] + p["unserved"] == report["requests"] == 1200
        assert p["cost"] > report["lower_bound_cost"] > 0
        assert p["ttft_ms"][0] <= p["ttft_ms"][1] <= p["ttft_ms"][2]
    again = run(d, "--trace", trace, "--spot-dir", SPOT, "--launch-delay-secs", "30", "--json")
    assert again.stdout == out.stdout
    # SkyServe's own settings move its policies, never strata: a target of
    # 1,000 queries a second per replica keeps them at one replica.
    few = run(d, "--trace", trace, "--spot-dir", SPOT, "--launch-delay-secs", "30", "--json",
              "--skyserve-qps-per-replica", "1000", "--skyserve-upscale-delay-secs", "20")
    assert few.returncode == 0, few.stderr
    hours = {p["policy"]: sum(p["replica_hours"].values()) for p in report["policies"]}
    few_hours = {p["policy"]: sum(p["replica_hours"].values()) for p in json.loads(few.stdout)["policies"]}
    assert few_hours["strata"] == hours["strata"]
    for name in ("request-rate autoscaler (on demand)", "SpotHedge (small, SkyServe timing)"):
        assert few_hours[name] < hours[name], (name, few_hours[name], hours[name])
    plots = os.path.join(d, "plots")
    table = run(d, "--trace", trace, "--plot", plots)
    assert table.returncode == 0 and "| strata |" in table.stdout and "lower bound" in table.stdout
    for chart in ("demand_capacity", "replicas", "cost"):
        svg = open(os.path.join(plots, chart + ".svg")).read()
        assert svg.startswith("<svg") and svg.count("<polyline") >= 4, chart
        png = open(os.path.join(plots, chart + ".png"), "rb").read()
        # PNG signature, then the IHDR chunk with the chart's 960 x 420 size.
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", chart
        assert int.from_bytes(png[16:20], "big") == 960 and int.from_bytes(png[20:24], "big") == 420

    # A trace mapped onto a zone by name: us-east-1a's record (sold out for
    # the first hours) replaces us-west-2a's, so no policy gets spot there.
    def spot_hours(report):
        return {p["policy"]: sum(h for k, h in p["replica_hours"].items() if "(spot)" in k)
                for p in report["policies"]}
    assert spot_hours(report)["strata"] > 0 and spot_hours(report)["SpotHedge (small, SkyServe timing)"] > 0
    sold_out = os.path.join(SPOT, "us-east-1a_v100_1.json")
    mapped = run(d, "--trace", trace, "--spot-dir", SPOT, "--spot-trace", f"us-west-2a={sold_out}",
                 "--launch-delay-secs", "30", "--json")
    assert mapped.returncode == 0, mapped.stderr
    assert all(h == 0 for h in spot_hours(json.loads(mapped.stdout)).values())

    # SpotServe's node events cap the spot replicas of the catalog's spot zone.
    events = os.path.join(TESTDATA, "spotserve/g4dn_full.csv")
    capped = run(d, "--trace", trace, "--spot-events", events, "--offset-hours", "1", "--json")
    assert capped.returncode == 0, capped.stderr
    assert len(json.loads(capped.stdout)["policies"]) == 5
    with open(os.path.join(d, "events.csv"), "w") as f:
        f.write("10,grow,n1\n")

    for args, message in [
        (["--trace", trace, "--spot-events", os.path.join(d, "events.csv")], "neither add nor remove"),
        (["--trace", os.path.join(d, "missing.csv")], "missing.csv"),
        (["--trace", trace, "--rate", "0"], "--rate"),
        (["--trace", trace, "--dt-ms", "0"], "--dt-ms"),
        (["--trace", trace, "--batch-lines", "5", "--batch-window-hours", "0"], "--batch-window-hours"),
        (["--trace", trace, "--batch-lines", "5", "--batch-window-hours", "1e30"], "from 0 to a year"),
        (["--trace", trace, "--warmup-mins", "1e300"], "--warmup-mins must be from 0 to a year"),
        (["--trace", trace, "--slo-ttft-ms=-5"], "--slo-ttft-ms must be from 0 to a year"),
        (["--trace", trace, "--time-scale", "1e300"], "--time-scale must be at most 1000"),
        (["--trace", trace, "--skyserve-qps-per-replica", "0"], "--skyserve-qps-per-replica"),
        (["--trace", trace, "--skyserve-upscale-delay-secs=-1"], "--skyserve-upscale-delay-secs must be"),
        (["--trace", trace, "--batch-lines", "5", "--batch-at-mins", "nan"], "--batch-at-mins"),
        (["--trace", os.path.join(d, "strata.toml")], "header"),
        (["--trace", trace, "--spot-dir", d], "no spot traces"),
        (["--trace", trace, "--spot-trace", "us-west-2a"], "ZONE=FILE"),
        (["--trace", trace, "--spot-trace", "us-west-2a=" + os.path.join(d, "gone.json")], "gone.json"),
    ]:
        bad = run(d, *args)
        assert bad.returncode != 0 and message in bad.stderr, (args, bad.stderr)


def test_the_readme_example_runs_on_the_repositorys_own_data():
    # README, Benchmarks: the simulator on testdata/ (no ../shared needed).
    root = os.path.join(os.path.dirname(__file__), "../..")
    out = subprocess.run(
        [STRATA, "--config", "bench/scenarios/cpu-fleet.toml", "simulate",
         "--trace", "testdata/traces/azure-conv-10min.csv",
         "--spot-dir", "testdata/spot-traces/aws-02-15-2023", "--rate", "0.1", "--json"],
        capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert len(report["policies"]) == 5
    assert all(p["finished"] + p["unserved"] == report["requests"] > 200 for p in report["policies"])


def test_a_batch_backlog_runs_beside_the_trace_and_against_a_pool_of_its_own():
    """`--batch-lines`: every policy runs the trace with the backlog beside
    it, and strata also runs the trace alone and the batch alone."""
    root = os.path.join(os.path.dirname(__file__), "../..")
    out = subprocess.run(
        [STRATA, "--config", "bench/scenarios/cpu-fleet.toml", "simulate",
         "--trace", "testdata/traces/azure-conv-10min.csv",
         "--spot-dir", "testdata/spot-traces/aws-02-15-2023", "--rate", "0.1",
         "--batch-lines", "50", "--batch-prompt-tokens", "100", "--batch-output-tokens", "20",
         "--batch-window-hours", "1", "--json"],
        capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for p in report["policies"]:
        assert p["batch"]["lines"] == p["batch"]["finished"] == 50 and p["batch"]["within_window"], p
        assert p["batch"]["tokens"] == 50 * 120
    strata = next(p for p in report["policies"] if p["policy"] == "strata")
    alone, own = report["separate_pools"]["interactive"], report["separate_pools"]["batch"]
    assert alone["batch"] is None and alone["requests"] == strata["requests"]
    assert own["requests"] == 0 and own["batch"]["finished"] == 50


def test_several_models_each_on_its_own_trace_and_profile_make_a_fleet():
    """`--model-trace MODEL=FILE` for each model of [[models]]: each pool,
    with its own pool settings and throughput profile, replays its own
    trace; the fleet's cost per policy is the models' sum, set against
    static provisioning of each model at its own peak."""
    d = tempfile.mkdtemp(prefix="strata-sim-fleet-")
    with open(os.path.join(d, "strata.toml"), "w") as f:
        # `slow` is a bigger model: a third of the decode rate on `small`.
        f.write(CONFIG + '\n[[models]]\nid = "chat"\npath = "/models/chat.gguf"\n'
                         '[[models]]\nid = "slow"\npath = "/models/slow.gguf"\n'
                         '[models.instance_types.small]\ndecode_tokens_per_s = [16.7, 30.0, 40.0, 46.7]\n')
    traces = {}
    for name, busy in (("morning", range(0, 200)), ("evening", range(400, 600))):
        traces[name] = os.path.join(d, f"{name}.csv")
        with open(traces[name], "w") as f:
            f.write("at_s,prompt_tokens,output_tokens\n")
            for i in range(600):
                for k in range(4 if i in busy else 1):
                    f.write(f"{i * 2 + k * 0.5},{200 + i % 50},{40 + i % 30}\n")
    # The same trace on both models: the slower one needs more replicas.
    same = run(d, "--model-trace", f"chat={traces['morning']}", "--model-trace", f"slow={traces['morning']}",
               "--launch-delay-secs", "30", "--json")
    assert same.returncode == 0, same.stderr
    chat, slow = json.loads(same.stdout)["models"]
    assert (chat["model"], slow["model"]) == ("chat", "slow")
    static = lambda m: m["policies"][0]  # noqa: E731
    assert sum(static(slow)["replica_hours"].values()) > sum(static(chat)["replica_hours"].values())
    # Two traces whose busy hours differ: the fleet's rows are the sums.
    out = run(d, "--model-trace", f"chat={traces['morning']}", "--model-trace", f"slow={traces['evening']}",
              "--launch-delay-secs", "30", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    fleet = {row["policy"]: row for row in report["fleet"]}
    per_model = {m["model"]: {p["policy"]: p for p in m["policies"]} for m in report["models"]}
    assert abs(fleet["strata"]["cost"] - sum(m["strata"]["cost"] for m in per_model.values())) < 1e-6
    fixed = fleet["static per model at its peak (on demand)"]
    assert abs(fixed["cost"] - sum(static(m)["cost"] for m in report["models"])) < 1e-6
    assert fixed["x_static"] == 1.0 and 0 < fleet["strata"]["x_static"] < 1, fleet
    assert report["lower_bound_cost"] == sum(m["lower_bound_cost"] for m in report["models"])
    table = run(d, "--model-trace", f"chat={traces['morning']}", "--model-trace", f"slow={traces['evening']}")
    assert "## The fleet (2 models)" in table.stdout and "| strata |" in table.stdout
    for args, message in [
        (["--model-trace", f"nope={traces['morning']}"], "not a model of the config"),
        (["--model-trace", "chat"], "MODEL=FILE"),
        (["--model-trace", f"chat={traces['morning']}", "--trace", traces["morning"]], "cannot be used with"),
        (["--model-trace", f"chat={traces['morning']}", "--model-trace", f"chat={traces['evening']}"], "twice"),
        ([], "--trace"),
    ]:
        bad = run(d, *args)
        assert bad.returncode != 0 and message in bad.stderr, (args, bad.stderr)
