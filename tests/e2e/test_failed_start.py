"""A replica that cannot start (an engine that exits at once: a bad flag,
a missing library) under `strata serve`: the controller does not relaunch
it again and again, and its `/metrics` say so, for an alert."""
import re
import time

import httpx

from conftest import CHAT_MODEL, Server, bearer, model_config


def pool_metric(text, name, pool):
    m = re.search(name + r'\{pool="' + pool + r'"\} (\S+)', text)
    return float(m[1]) if m else None


def test_an_engine_that_cannot_start_is_relaunched_only_after_a_growing_wait():
    """Its offer waits 10 s after the first failed start, 20 s after the
    second: at most three tries in the first 14 s (relaunched at once,
    with only the local provider's own short pause, it failed more often,
    and this test with it)."""
    path = model_config(CHAT_MODEL).split('"')[1]
    config = f"""
[[models]]
id = "broken"
path = "{path}"
tenant = "broken"
replicas = 1
[models.engine]
kind = "openai"
command = ["/bin/sh", "-c", "exit 3 # {{port}}"]
"""
    s = Server(replicas=1, ready=0, config=config, tenant="broken")
    try:
        seen = []
        started = time.time()
        while time.time() - started < 14:
            text = httpx.get(f"{s.base}/metrics", headers=bearer(s.admin_key), timeout=10).text
            seen.append((pool_metric(text, "strata_controller_failed_starts_total", "broken"),
                         pool_metric(text, "strata_controller_held_back_offers", "broken")))
            time.sleep(0.5)
        failed = [f for f, _ in seen if f is not None]
        assert failed and 1 <= failed[-1] <= 3, seen
        # Most of the time the offer was waiting.
        waiting = sum(1 for _, h in seen if h == 1)
        assert waiting >= len(seen) // 2, seen
        # The gateway stays up all along, with nothing to serve.
        r = httpx.get(f"{s.base}/health", timeout=10)
        assert r.status_code == 200 and r.json()["replicas_ready"] == 0, r.text
        log = open(s.log_path).read()
        assert "a replica failed to start; its slot waits before the next launch" in log
    finally:
        s.stop()
