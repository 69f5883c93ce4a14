"""Replica death and shutdown, against the session's `strata serve`. Runs after
the SDK tests (file order) since it kills processes and, last, the server."""
import concurrent.futures as cf
import os
import signal
import time

import httpx

from conftest import MODEL_ID, alive, wait_ready


def ask(server, i, max_tokens=24, stream=False):
    body = {"model": MODEL_ID, "prompt": f"Story {i}: Once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    r = httpx.post(f"{server.base}/v1/completions", json=body, headers=server.headers, timeout=120)
    return r.status_code


def turn(server, i):
    """A Responses turn in a conversation of its own; its status and the
    answer's status (`completed` or `incomplete`)."""
    conv = httpx.post(f"{server.base}/v1/conversations", json={}, headers=server.headers, timeout=30).json()["id"]
    r = httpx.post(f"{server.base}/v1/responses", headers=server.headers, timeout=120,
                   json={"model": MODEL_ID, "conversation": conv, "input": f"Tell story {i}.",
                         "max_output_tokens": 24, "temperature": 0})
    return r.status_code, r.json().get("status")


def test_sigkill_of_a_replica_during_a_burst(server):
    engines = server.engine_pids()
    assert len(engines) == 2
    with cf.ThreadPoolExecutor(8) as pool:
        burst = [pool.submit(ask, server, i) for i in range(12)]
        turns = [pool.submit(turn, server, i) for i in range(4)]
        time.sleep(1.0)
        victim = engines[0]
        os.kill(victim, signal.SIGKILL)
        statuses = [f.result() for f in burst]
        answered = [f.result() for f in turns]
    # Requests running on the victim go on from the other replica (failover):
    # every completion and every Responses turn is answered.
    assert statuses == [200] * 12, statuses
    assert all(code == 200 and status in ("completed", "incomplete") for code, status in answered), answered
    # Every request after the kill succeeds: the gateway routes around the dead replica.
    for i in range(10):
        assert ask(server, 100 + i, max_tokens=4) == 200
    # The provider launches a replacement, and it becomes ready.
    wait_ready(server.base, 2, timeout=120)
    assert not alive(victim)
    now = server.engine_pids()
    assert len(now) == 2 and victim not in now
    assert all(r["ready"] for r in server.replica_list())
    with cf.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda i: ask(server, i, max_tokens=4), range(8))) == [200] * 8


def test_sigterm_stops_everything_without_orphans(server):
    code, engines = server.stop()
    assert code == 0
    assert len(engines) == 2
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in engines):
        time.sleep(0.2)
    assert not any(alive(p) for p in engines), "engine processes outlived strata serve"
    # The ledger holds what was served, with real token counts.
    import sqlite3
    db = sqlite3.connect(os.path.join(server.dir, "strata.db"))
    rows = db.execute("SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage WHERE status = 200").fetchone()
    assert rows[0] >= 20 and rows[1] > 0 and rows[2] > 0, rows
    states = dict(db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall())
    assert states.get("exited", 0) >= 1 and states.get("stopped", 0) == 2, states
