"""An attacker inside the platform: a process on the machine (on a cluster,
a pod beside the replicas) that holds no key and no certificate of strata's.
It tries every engine route directly, forges the cache-scope and session
headers and snapshots, and reads the gateway's public endpoints. Every try
is refused, and nothing it can read names a tenant or a replica."""
import os
import ssl
import subprocess
import tempfile
import time

import httpx
import pytest
from conftest import MODEL_ID, STRATA, Server, bearer, free_port

ENGINE_ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": MODEL_ID, "max_tokens": 2,
                                      "messages": [{"role": "user", "content": "Hello"}]}),
    ("GET", "/metrics", None),
    ("POST", "/internal/kv/export", None),
    ("POST", "/internal/kv/import", None),
    ("POST", "/internal/kv/forget", {"scope": "ten_victim"}),
]
FORGED = {"x-strata-cache-scope": "ten_victim", "x-strata-session": "conv_victim"}


def attacker_client_certificate(d):
    """A client certificate the attacker made: a CA of its own, signed by it."""
    for args in (["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", f"{d}/ca-key.pem", "-out", f"{d}/ca.pem", "-subj", "/CN=strata replica CA", "-days", "1"],
                 ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", f"{d}/key.pem", "-out", f"{d}/req.pem", "-subj", "/CN=strata-gateway"],
                 ["x509", "-req", "-in", f"{d}/req.pem", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca-key.pem",
                  "-CAcreateserial", "-out", f"{d}/cert.pem", "-days", "1"]):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(f"{d}/cert.pem", f"{d}/key.pem")
    return ctx


def tenant_shaped(text, s, dedicated):
    """What of `text` names a tenant, a key or a replica of `s`."""
    words = [s.tenant["id"], s.tenant["name"], dedicated["id"], dedicated["name"], "ten_", "reserved_for", "127.0.0.1:"]
    return [w for w in words if w in text]


@pytest.fixture(scope="module")
def insider():
    s = Server(replicas=1, tenant="insider-victim", config='[serve.dedicated]\n"insider-dedicated" = 1\n', ready=2)
    dedicated = s.admin("POST", "/admin/v1/tenants", {"name": "insider-dedicated", "isolation": "dedicated"},
                        expect=201).json()
    # The victim's conversation, so the engine holds a session and cached cells.
    c = s.client()
    conv = c.conversations.create()
    c.responses.create(model=MODEL_ID, conversation=conv.id, input="My secret is 7413.", max_output_tokens=4)
    yield s, dedicated
    s.stop()


def test_no_engine_route_answers_a_process_without_the_gateway_certificate(insider):
    s, _ = insider
    engines = [r["url"] for r in s.replica_list()]
    assert len(engines) == 2 and all(u.startswith("https://127.0.0.1:") for u in engines), engines
    attempts = 0
    with tempfile.TemporaryDirectory() as d:
        own = attacker_client_certificate(d)
        anonymous = httpx.Client(verify=False, timeout=30)
        for url in engines:
            for method, path, body in ENGINE_ROUTES:
                # TLS without a client certificate: the handshake passes (a
                # kubelet probe may read /health), every route answers 401.
                r = anonymous.request(method, url + path, json=body, headers=FORGED)
                attempts += 1
                assert r.status_code == 401 and r.json()["error"]["code"] == "gateway_only", (path, r.text)
                assert "7413" not in r.text and "conv_" not in r.text
                # A client certificate from a CA of the attacker's own: no handshake.
                with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                    httpx.request(method, url + path, json=body, headers=FORGED, verify=own, timeout=30)
                attempts += 1
                # Plain HTTP: one refusal, nothing served.
                plain = httpx.request(method, url.replace("https://", "http://") + path, json=body, timeout=30)
                attempts += 1
                assert plain.status_code == 400 and plain.json()["error"]["code"] == "tls_required"
            # Liveness only, and nothing about tenants.
            health = anonymous.get(url + "/health")
            assert health.status_code == 200 and set(health.json()) == {"status", "model"}
    assert attempts == 2 * len(ENGINE_ROUTES) * 3
    # The gateway itself, with its certificate, still reaches them.
    with s.engine_client(timeout=30) as gateway:
        assert all(gateway.get(u + "/v1/models").status_code == 200 for u in engines)


def test_the_gateway_shows_nothing_tenant_shaped_without_a_key(insider):
    s, dedicated = insider
    health = httpx.get(f"{s.base}/health", timeout=10)
    assert health.status_code == 200 and set(health.json()) == {"status", "replicas_ready"}, health.text
    assert not tenant_shaped(health.text, s, dedicated)
    # Metrics name tenants (with tenant labels) and show spend: a platform
    # admin or reader key, nothing less.
    assert httpx.get(f"{s.base}/metrics", timeout=10).status_code == 401
    member = httpx.get(f"{s.base}/metrics", headers=s.headers, timeout=10)
    assert member.status_code == 403, member.text
    reader = s.new_key("ten_platform", "reader")
    assert httpx.get(f"{s.base}/metrics", headers=bearer(reader), timeout=10).status_code == 200
    assert "strata_gateway_requests_total" in httpx.get(f"{s.base}/metrics", headers=bearer(s.admin_key)).text
    # Replica detail is the platform admin's.
    assert s.admin("GET", "/admin/v1/replicas", key=s.key).status_code == 403
    listed = s.replica_list()
    assert sorted(r["reserved_for"] or "" for r in listed) == ["", "insider-dedicated"]


def test_a_forged_or_oversized_snapshot_is_refused_before_llama_cpp_reads_it(insider):
    s, _ = insider
    engine = next(r["url"] for r in s.replica_list() if r["reserved_for"] is None)
    with s.engine_client(timeout=60) as gateway:
        export = gateway.post(f"{engine}/internal/kv/export").content
        length = int.from_bytes(export[:8], "little")
        snapshot = export[8:8 + length]
        assert snapshot.startswith(b"SKV1")
        # The same header and tokens with a state far larger than the
        # engine writes for them.
        r = gateway.post(f"{engine}/internal/kv/import", content=snapshot + b"\0" * (8 << 20))
        assert r.status_code == 400 and "writes at most" in r.json()["error"]["message"], r.text
        # A body beyond any snapshot of this engine's context is not read
        # to its end: 413, or the connection closed while it is still sent.
        try:
            r = gateway.post(f"{engine}/internal/kv/import", content=b"SKV1" + b"\0" * (400 << 20))
            assert r.status_code == 413, r.text[:200]
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            pass
        # The real one still restores, and the engine still serves.
        assert gateway.post(f"{engine}/internal/kv/import", content=snapshot).status_code == 200
    assert s.client().completions.create(model=MODEL_ID, prompt="Still", max_tokens=2).usage.completion_tokens >= 1


def test_plain_http_replicas_answer_only_the_token_of_their_gateway():
    s = Server(replicas=1, config="[serve]\nreplica_mtls = false\n", tenant="insider-token")
    try:
        engine = s.replica_list()[0]["url"]
        assert engine.startswith("http://127.0.0.1:")
        for method, path, body in ENGINE_ROUTES:
            for headers in (FORGED, {**FORGED, "Authorization": "Bearer not-the-token"}):
                r = httpx.request(method, engine + path, json=body, headers=headers, timeout=30)
                assert r.status_code == 401 and r.json()["error"]["code"] == "gateway_only", (path, r.text)
        assert httpx.get(engine + "/health", timeout=10).status_code == 200
        # The gateway has it, and serves.
        assert s.client().completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        # The token is in no process's arguments (anyone on the machine reads those).
        for pid in [s.proc.pid, *s.engine_pids()]:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"TOKEN" not in f.read().upper()
    finally:
        s.stop()


def test_an_engine_started_by_hand_honours_no_scope_and_moves_no_snapshot():
    """With no client CA and no token, an engine serves whoever asks, but a
    forged scope reaches no tenant's cells and `/internal/*` is refused."""
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        log = open(os.path.join(d, "engine.log"), "w")
        env = {k: v for k, v in os.environ.items() if k != "STRATA_REPLICA_TOKEN"}
        proc = subprocess.Popen([STRATA, "engine", "--port", str(port), "--max-sequences", "1"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            for path in ("/internal/kv/export", "/internal/kv/import", "/internal/kv/forget"):
                r = httpx.post(base + path, content=b"SKV1", timeout=10)
                assert r.status_code == 403, r.text
            prompt = "The quick brown fox jumps over the lazy dog. " * 4
            body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 1, "temperature": 0}
            httpx.post(base + "/v1/completions", json=body, headers={"x-strata-cache-scope": "ten_a"}, timeout=60)
            # Another scope named, yet the same (one unscoped) cache: the
            # header was not honoured, so no name reaches another's cells.
            again = httpx.post(base + "/v1/completions", json=body, headers={"x-strata-cache-scope": "ten_b"},
                               timeout=60).json()
            assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, again
            with open(os.path.join(d, "engine.log")) as f:
                assert "answers anyone" in f.read()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
