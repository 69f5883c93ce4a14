"""HTTPS at the gateway: a self-signed development certificate, the official
SDK over TLS verifying it, and plain HTTP refused with `require_tls`."""
import hashlib
import os
import re
import ssl
import subprocess
import tempfile
import time

import httpx
import openai
import pytest

from conftest import MODEL_ID, STRATA, bearer, free_port, new_key


@pytest.fixture(scope="module")
def tls_server():
    d = tempfile.mkdtemp(prefix="strata-tls-")
    admin = new_key()
    with open(os.path.join(d, "admin.key"), "w") as f:
        f.write(admin)
    with open(os.path.join(d, "strata.toml"), "w") as f:
        f.write(f'[security]\nadmin_key_file = "{d}/admin.key"\n')
    port = free_port()
    log = open(os.path.join(d, "serve.log"), "w")
    proc = subprocess.Popen(
        [STRATA, "--config", os.path.join(d, "strata.toml"), "serve", "--replicas", "1",
         "--listen", f"127.0.0.1:{port}", "--db", os.path.join(d, "data", "strata.db"),
         "--tls-self-signed", "--require-tls"],
        cwd=d, stdout=log, stderr=subprocess.STDOUT)
    cert = os.path.join(d, "data", "tls", "cert.pem")
    base = f"https://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, open(os.path.join(d, "serve.log")).read()
        try:
            ctx = ssl.create_default_context(cafile=cert)
            if httpx.get(f"{base}/health", verify=ctx, timeout=2).status_code == 200:
                break
        except (httpx.HTTPError, ssl.SSLError, FileNotFoundError):
            pass
        assert time.time() < deadline, "TLS server not ready"
        time.sleep(0.5)
    yield {"base": base, "port": port, "cert": cert, "ctx": ctx, "admin": admin, "dir": d, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


def test_the_sdk_talks_https_and_verifies_the_certificate(tls_server):
    s = tls_server
    tenant = httpx.post(f"{s['base']}/admin/v1/tenants", json={"name": "tls"}, headers=bearer(s["admin"]),
                        verify=s["ctx"]).json()["id"]
    key = httpx.post(f"{s['base']}/admin/v1/tenants/{tenant}/keys", json={"name": "k", "role": "member"},
                     headers=bearer(s["admin"]), verify=s["ctx"]).json()["key"]
    client = openai.OpenAI(base_url=f"{s['base']}/v1", api_key=key, max_retries=0,
                           http_client=httpx.Client(verify=s["ctx"], timeout=60))
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert r.usage.completion_tokens >= 1
    streamed = list(client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=3, stream=True))
    assert streamed[-1].choices[0].finish_reason is not None
    # Without trusting the certificate, the client refuses the server.
    untrusting = openai.OpenAI(base_url=f"{s['base']}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        untrusting.models.list()


def test_the_printed_fingerprint_is_the_certificates(tls_server):
    with open(os.path.join(tls_server["dir"], "serve.log")) as f:
        printed = re.search(r"sha256 fingerprint ([0-9A-F:]{95})", f.read()).group(1)
    with open(tls_server["cert"]) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    assert printed == ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    key_file = os.path.join(tls_server["dir"], "data", "tls", "key.pem")
    assert os.stat(key_file).st_mode & 0o777 == 0o600


def test_plain_http_is_refused_with_a_clear_error(tls_server):
    r = httpx.get(f"http://127.0.0.1:{tls_server['port']}/v1/models", headers=bearer(tls_server["admin"]), timeout=5)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "tls_required"
    # The refusal costs nothing: HTTPS still works right after.
    assert httpx.get(f"{tls_server['base']}/health", verify=tls_server["ctx"], timeout=5).status_code == 200


def test_gateway_and_replicas_speak_mutual_tls_by_default():
    from conftest import Server
    s = Server(replicas=1, tenant="mtls")
    try:
        replicas = s.replica_list()
        assert all(r["url"].startswith("https://127.0.0.1:") for r in replicas), replicas
        r = s.client().completions.create(model=MODEL_ID, prompt="Hello", max_tokens=3)
        assert r.usage.completion_tokens >= 1
        pki = os.path.join(s.dir, "tls", "replicas")
        engine = replicas[0]["url"]
        ca = ssl.create_default_context(cafile=os.path.join(pki, "ca.pem"))
        # Without a client certificate: liveness, and nothing else.
        assert httpx.get(f"{engine}/health", verify=ca, timeout=5).status_code == 200
        refused = httpx.get(f"{engine}/v1/models", verify=ca, timeout=5)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "gateway_only"
        # Plain HTTP gets the one clear refusal.
        plain = httpx.get(engine.replace("https://", "http://") + "/health", timeout=5)
        assert plain.status_code == 400 and plain.json()["error"]["code"] == "tls_required"
        # With the gateway's certificate it answers.
        ca.load_cert_chain(os.path.join(pki, "gateway.pem"), os.path.join(pki, "gateway-key.pem"))
        assert httpx.get(f"{engine}/v1/models", verify=ca, timeout=5).status_code == 200
        assert os.stat(os.path.join(pki, "replica-key.pem")).st_mode & 0o777 == 0o600
        assert os.stat(os.path.join(pki, "gateway-key.pem")).st_mode & 0o777 == 0o600
    finally:
        s.stop()
