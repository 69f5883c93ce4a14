"""Starts the real `strata serve` (two engine replicas, the real model, SQLite)
once for the session and hands its base URL to the tests, with a platform
admin key (from a key file in the config) and a member key of a tenant."""
import base64
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

STRATA = os.environ.get("STRATA_BIN", os.path.join(os.path.dirname(__file__), "../../target/debug/strata"))
MODEL_ID = "gemma-3-270m-q4_k_m"
# A model with a chat template of its own (the default model's GGUF has
# none: the engine's built-in Gemma template applies).
CHAT_MODEL = "SmolLM2-135M-Instruct.Q4_1"


def model_config(model):
    """The `[engine]` config serving `model` (MODEL_ID or CHAT_MODEL); the
    file is fetched once per machine like the default model (scripts/test
    fetches both first)."""
    if model == MODEL_ID:
        return ""
    out = subprocess.run([STRATA, "model", "fetch", "--model", model, "--json"], capture_output=True,
                         text=True, timeout=600, check=True).stdout
    return f'[engine]\nmodel = "{json.loads(out.splitlines()[-1])["path"]}"\n'


# A model served by llama-cpp-python's server (engine kind `openai`).
EXTERNAL = "smol-py"
PEER_PYTHON = os.environ.get(
    "STRATA_PEER_PYTHON", os.path.expanduser("~/.cache/strata/peers/llama-cpp-python/bin/python"))


def peer_engine_model(model_id, tenant, pool="replicas = 1"):
    """A `[[models]]` entry serving SmolLM2 on llama-cpp-python's server as
    `model_id`, kept to `tenant`. The server is built once per machine by
    scripts/peer-engine (scripts/test runs it); without it this fails."""
    assert os.path.exists(PEER_PYTHON), (
        f"no llama-cpp-python at {PEER_PYTHON}: run scripts/peer-engine (scripts/test does)")
    path = model_config(CHAT_MODEL).split('"')[1]
    return f"""
[[models]]
id = "{model_id}"
path = "{path}"
tenant = "{tenant}"
{pool}
[models.engine]
kind = "openai"
command = ["{PEER_PYTHON}", "-m", "llama_cpp.server", "--model", "{{model_path}}",
           "--model_alias", "{{model}}", "--host", "{{host}}", "--port", "{{port}}",
           "--n_threads", "{{threads}}", "--n_ctx", "2048", "--interrupt_requests", "false"]
env = {{ API_KEY = "{{api_key}}" }}
"""


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


def new_key():
    """A key in strata's format, for the admin key file."""
    return "sk-strata-" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def wait_for(what, check, timeout=60):
    """Waits until `check()` is true, for `timeout` seconds at most."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout} s: {what}")


def wait_healthy(proc, base, what, timeout=60):
    """Waits until the engine process `proc` answers `/health` at `base`;
    fails with its stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} did not become healthy"
        time.sleep(0.2)


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


def acknowledged_problems(base, acked):
    """What is wrong with the acknowledged Responses turns `acked` ((key,
    conversation, response id, input text) each) as stored: a response
    that does not read back, a conversation whose items do not alternate
    user, assistant (half-written), an input stored other than once."""
    problems, by_conv = [], {}
    for key, conv, rid, text in acked:
        r = httpx.get(f"{base}/v1/responses/{rid}", headers=bearer(key), timeout=30)
        if r.status_code != 200:
            problems.append(f"acknowledged response {rid} reads {r.status_code}: {r.text[:200]}")
        by_conv.setdefault((key, conv), []).append(text)
    for (key, conv), texts in by_conv.items():
        items, after = [], None
        while True:
            q = {"order": "asc", "limit": 100, **({"after": after} if after else {})}
            page = httpx.get(f"{base}/v1/conversations/{conv}/items", params=q, headers=bearer(key), timeout=30)
            if page.status_code != 200:
                problems.append(f"conversation {conv} reads {page.status_code}: {page.text[:200]}")
                break
            items += page.json()["data"]
            if not page.json()["has_more"]:
                break
            after = page.json()["last_id"]
        roles = [i["role"] for i in items]
        if roles != ["user", "assistant"] * (len(roles) // 2):
            problems.append(f"conversation {conv} is half-written: {roles}")
        said = [i["content"][0]["text"] for i in items if i["role"] == "user"]
        for t in texts:
            if said.count(t) != 1:
                problems.append(f"conversation {conv}: acknowledged turn {t!r} stored {said.count(t)} times")
    return problems


def postgres_url(name):
    """A PostgreSQL URL whose connections see only a fresh schema, or None
    (the test is skipped) when DATABASE_URL is not set; with
    STRATA_REQUIRE_POSTGRES set (scripts/test sets it) that is a failure."""
    base = os.environ.get("DATABASE_URL")
    if not base:
        if os.environ.get("STRATA_REQUIRE_POSTGRES"):
            raise AssertionError("STRATA_REQUIRE_POSTGRES is set but DATABASE_URL is not")
        pytest.skip("DATABASE_URL not set")
    schema = f"strata_e2e_{name}_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    subprocess.run(["psql", base, "-qc", f"CREATE SCHEMA {schema}"], check=True)
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-c%20search_path%3D{schema}"


def psql(db, query):
    """The last line `query` prints in the schema of `db` (a postgres_url), or ''."""
    schema = db.split("search_path%3D")[1]
    out = subprocess.run(["psql", os.environ["DATABASE_URL"], "-tAc", f"SET search_path = {schema}; {query}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return out.splitlines()[-1] if out else ""


def write_config(d, extra=""):
    """A fresh platform admin key in a key file and `strata.toml` in `d`
    naming it, plus `extra`; returns the key and the config's path."""
    admin_key = new_key()
    key_file = os.path.join(d, "admin.key")
    with open(key_file, "w") as f:
        f.write(admin_key + "\n")
    config = os.path.join(d, "strata.toml")
    with open(config, "w") as f:
        f.write(f'[security]\nadmin_key_file = "{key_file}"\n{extra}')
    return admin_key, config


def replica_list(base, admin_key):
    """`GET /admin/v1/replicas` of the gateway at `base`."""
    r = httpx.get(f"{base}/admin/v1/replicas", headers=bearer(admin_key), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def engine_client(pki_dir, **kw):
    """An httpx client holding what a gateway holds to reach its engines:
    strata's replica CA (`pki_dir`/ca.pem) and the gateway's client
    certificate."""
    import ssl
    ctx = ssl.create_default_context(cafile=os.path.join(pki_dir, "ca.pem"))
    ctx.load_cert_chain(os.path.join(pki_dir, "gateway.pem"), os.path.join(pki_dir, "gateway-key.pem"))
    return httpx.Client(verify=ctx, **kw)


class OtlpCollector:
    """A loopback OTLP/HTTP collector: counts the spans of every export it
    is sent (without parsing them: a benchmark's collector should cost the
    machine little) and, with `keep`, keeps each export's path, content
    type and JSON body."""

    def __init__(self, keep=True):
        self.posts, self.exports, self.span_count = [], 0, 0
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.exports += 1
                collector.span_count += body.count(b'"spanId"')
                if keep:
                    collector.posts.append((self.path, self.headers["Content-Type"], json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self):
        """(resource attributes, span) of every kept export."""
        for _, _, body in self.posts:
            for rs in body["resourceSpans"]:
                resource = otlp_attrs(rs["resource"])
                for ss in rs["scopeSpans"]:
                    for span in ss["spans"]:
                        yield resource, span


def otlp_attrs(item):
    """An OTLP item's attributes as a plain dict of their values."""
    return {a["key"]: next(iter(a["value"].values())) for a in item["attributes"]}


class Server:
    def __init__(self, replicas=2, config="", tenant="e2e", ready=None, db=None, env=None, own_session=False):
        self.dir = tempfile.mkdtemp(prefix="strata-e2e-")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.replicas = replicas
        self.db = db
        self.admin_key, self.config = write_config(self.dir, config)
        self.log_path = os.path.join(self.dir, "serve.log")
        self.log = open(self.log_path, "w")
        self.args = [STRATA, "--config", self.config, "serve", "--listen", f"127.0.0.1:{self.port}",
                     "--replicas", str(replicas), "--db", db or os.path.join(self.dir, "strata.db")]
        self.ready = replicas if ready is None else ready
        self.env = {**os.environ, **(env or {})}
        # In a session (and process group) of its own, as a terminal runs it.
        self.own_session = own_session
        self.proc = subprocess.Popen(self.args, cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=own_session)
        wait_ready(self.base, self.ready)
        self.tenant = self.admin("POST", "/admin/v1/tenants", {"name": tenant}).json()
        self.key = self.new_key(self.tenant["id"], "member")
        self.headers = bearer(self.key)

    def admin(self, method, path, body=None, key=None, expect=None):
        """An admin API call, as the platform admin unless `key` is given."""
        r = httpx.request(method, f"{self.base}{path}", json=body, timeout=30,
                          headers=bearer(key or self.admin_key))
        if expect is not None:
            assert r.status_code == expect, r.text
        return r

    def new_key(self, tenant_id, role, key=None, **fields):
        r = self.admin("POST", f"/admin/v1/tenants/{tenant_id}/keys",
                       {"name": f"{role} key", "role": role, **fields}, key=key)
        assert r.status_code == 201, r.text
        return r.json()["key"]

    def client(self, key=None):
        from openai import OpenAI
        return OpenAI(base_url=f"{self.base}/v1", api_key=key or self.key, max_retries=0, timeout=120)

    def engine_pids(self):
        return children(self.proc.pid)

    def stop(self):
        engines = self.engine_pids()
        self.proc.send_signal(signal.SIGTERM)
        # Stopping snapshots every replica's session caches first (sealed
        # per tenant): after Schemathesis's run, 13 snapshots of 123 MB took
        # a debug build 31 s.
        code = self.proc.wait(timeout=90)
        return code, engines

    def restart(self):
        """Stops the server and starts it again on the same port, config and database."""
        self.stop()
        self.proc = subprocess.Popen(self.args, cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=self.own_session)
        wait_ready(self.base, self.ready)

    def replica_list(self):
        """The gateway's replicas (id, url, ready, draining, reserved_for,
        outstanding_tokens), as a platform admin reads them."""
        return replica_list(self.base, self.admin_key)

    def engine_client(self, **kw):
        """An HTTP client that is this server's gateway to its engines: the
        replica CA and the gateway's client certificate strata made."""
        return engine_client(os.path.join(self.dir, "tls", "replicas"), **kw)

    def engine_pid(self, replica_id):
        """The pid of the engine process behind replica `replica_id`."""
        url = next(r["url"] for r in self.replica_list() if r["id"] == replica_id)
        port = url.rsplit(":", 1)[1]
        for pid in self.engine_pids():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if b"--port" in args and args[args.index(b"--port") + 1] == port.encode():
                return pid
        raise AssertionError(f"no engine process for {replica_id} ({url})")


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    if s.proc.poll() is None:
        s.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client()
