"""Starts the real `strata serve` (two engine replicas, the real model, SQLite)
once for the session and hands its base URL to the tests."""
import os
import signal
import socket
import subprocess
import tempfile
import time

import httpx
import pytest

STRATA = os.environ.get("STRATA_BIN", os.path.join(os.path.dirname(__file__), "../../target/debug/strata"))
MODEL_ID = "gemma-3-270m-q4_k_m"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    """Pids of the direct children of `pid`."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_ready(base, replicas, timeout=180):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            r = httpx.get(f"{base}/health", timeout=2)
            last = r.text
            if r.status_code == 200 and r.json()["replicas_ready"] == replicas:
                return r.json()
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise AssertionError(f"strata serve not ready after {timeout}s: {last}")


class Server:
    def __init__(self, replicas=2):
        self.dir = tempfile.mkdtemp(prefix="strata-e2e-")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.replicas = replicas
        self.log = open(os.path.join(self.dir, "serve.log"), "w")
        self.proc = subprocess.Popen(
            [STRATA, "serve", "--listen", f"127.0.0.1:{self.port}", "--replicas", str(replicas),
             "--db", os.path.join(self.dir, "strata.db")],
            cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_ready(self.base, replicas)

    def engine_pids(self):
        return children(self.proc.pid)

    def stop(self):
        engines = self.engine_pids()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        return code, engines


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    if s.proc.poll() is None:
        s.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)
