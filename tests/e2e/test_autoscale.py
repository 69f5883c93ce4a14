"""`strata serve` with `pool.autoscale`: it starts at zero replicas, a request
waits while the first replica starts and is served, load adds a replica
(and the time to first token, which counted the wait for one of the first
replica's two slots, recovers), and when the load stops the pool shrinks
to one and then to zero. Windows and delays are seconds, not minutes, so
the whole cycle fits in a test."""
import concurrent.futures as cf
import json
import os
import re
import subprocess
import time

import httpx

from conftest import MODEL_ID, STRATA, Server

CONFIG = """
[engine]
max_sequences = 2

[gateway]
slots_per_replica = 2

[instance_types.local]         # a replica planned at ~20 tokens/s
prefill_tokens_per_s = 100.0
decode_tokens_per_s = [20.0]

[pool]
autoscale = true
target_utilisation = 1.0
min_replicas = 1
max_replicas = 2
stable_window_secs = 3.0
panic_window_secs = 2.0
scale_down_delay_secs = 3.0
scale_to_zero_after_secs = 12.0
"""


def replicas(s):
    return len(s.replica_list())


def wait_for(s, count, timeout):
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        seen.append(replicas(s))
        if seen[-1] == count:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"never {count} replicas in {timeout} s: {seen[-20:]}")


def test_scale_from_zero_up_down_and_to_zero_again():
    s = Server(replicas=1, ready=0, config=CONFIG, tenant="autoscale")
    try:
        health = httpx.get(f"{s.base}/health")
        assert health.status_code == 200 and health.json()["status"] == "idle"
        assert replicas(s) == 0
        c = s.client()
        # The model is listed though no replica runs: a request to it starts one.
        assert [m.id for m in c.models.list().data] == [MODEL_ID]
        t0 = time.time()
        r = c.completions.create(model=MODEL_ID, prompt="Cold start:", max_tokens=4, temperature=0)
        cold = time.time() - t0
        assert r.usage.completion_tokens == 4 and cold < 60, cold
        assert replicas(s) == 1

        # Load: more tokens per second than one replica is planned for, and
        # four clients for its two slots: the first wave waits for a slot.
        # 16 s: at about 3 s a request with two replicas sharing the two
        # cores, four clients start 8 or more after 8 s with room to spare
        # (14 s gave 7 on a busy run).
        start = time.time()
        stop = start + 16
        grew, ttft = [], []

        def work(i):
            while time.time() < stop:
                t0 = time.time()
                stream = c.completions.create(model=MODEL_ID, prompt=f"Story {i}:", max_tokens=24,
                                              temperature=0, stream=True)
                next(iter(stream))
                ttft.append((t0 - start, time.time() - t0))
                for _ in stream:
                    pass
        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(work, i) for i in range(4)]
            while time.time() < stop:
                grew.append(replicas(s))
                time.sleep(0.5)
            for f in futures:
                f.result()
        assert max(grew) == 2, grew
        # With both replicas up nobody waits: the late requests' p95 time to
        # first token is under the first wave's slowest (which waited).
        first_wave = [t for at, t in ttft if at < 0.5]
        late = sorted(t for at, t in ttft if at > 8)
        assert len(first_wave) == 4 and len(late) >= 8, ttft
        assert late[int(len(late) * 0.95) - 1] < max(first_wave) / 2, (first_wave, late)

        # Idle: down to one after the delay, then to zero.
        wait_for(s, 1, 30)
        wait_for(s, 0, 40)
        r = c.completions.create(model=MODEL_ID, prompt="Back again:", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
        # Every change is logged and stored with its reason and inputs.
        log = re.sub(r"\x1b\[[0-9;]*m", "", open(s.log_path).read())
        for reason in ("from_zero", "scale_down", "to_zero"):
            assert f"reason={reason}" in log, reason
        out = subprocess.run([STRATA, "decisions", "--db", os.path.join(s.dir, "strata.db"), "--json"],
                             capture_output=True, text=True, check=True).stdout
        decisions = json.loads(out)
        steps = [(d["from_replicas"], d["to_replicas"], d["reason"]) for d in decisions]
        assert steps[0] == (0, 1, "from_zero"), steps
        assert (2, 1, "scale_down") in steps and (1, 0, "to_zero") in steps, steps
        assert any(to == 2 for _, to, _ in steps), steps
        assert all("stable_demand_tokens_per_s" in json.loads(d["inputs"]) for d in decisions)
        table = subprocess.run([STRATA, "decisions", "--db", os.path.join(s.dir, "strata.db")],
                               capture_output=True, text=True, check=True).stdout
        assert "scale_down" in table and "from_zero" in table
    finally:
        s.stop()
