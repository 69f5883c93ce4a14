"""Models deployed from a URL (issue 26 §1): an HTTP server and an
S3-compatible object store, both real servers on loopback (Python's
http.server, and moto's S3 server from PyPI, standing in for a cloud's
object store that this machine cannot reach). The file is downloaded once
into the cache, checked by sha256 before anything loads it; a mismatch
leaves nothing behind and serves nothing."""
import functools
import glob
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import CHAT_MODEL, STRATA, Server, free_port


def model_file():
    import json
    out = subprocess.run([STRATA, "model", "fetch", "--model", CHAT_MODEL, "--json"], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    return json.loads(out.splitlines()[-1])["path"]


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A directory served over HTTP holding the chat model, and the GETs it saw."""
    d = tmp_path_factory.mktemp("http-models")
    os.link(model_file(), d / "chat.gguf") if os.stat(model_file()).st_dev == os.stat(d).st_dev \
        else shutil.copy(model_file(), d / "chat.gguf")
    (d / "truncated.gguf").write_bytes(open(d / "chat.gguf", "rb").read(1 << 20))
    gets = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            gets.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(d)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", gets, sha256_of(d / "chat.gguf")
    server.shutdown()


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server with a bucket holding the chat model."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    import boto3
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="models")
    client.upload_file(model_file(), "models", "smollm2/chat.gguf")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3):
    """strata serve with an empty model cache of its own and the S3 store's
    address and (test) credentials in its environment."""
    cache = tmp_path_factory.mktemp("cache")
    env = {"XDG_CACHE_HOME": str(cache), "AWS_ENDPOINT_URL": s3, "AWS_ALLOW_HTTP": "true",
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    # The default model comes from its usual cache: a path entry.
    config = f'[[models]]\nid = "base"\npath = "{model_file()}"\n'
    s = Server(replicas=1, config=config, tenant="sources", env=env)
    s.cache = cache
    yield s
    s.stop()


def cached(s):
    return glob.glob(os.path.join(str(s.cache), "strata", "models", "*"))


def ask(s, model):
    r = s.client().chat.completions.create(
        model=model, temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert r.model == model
    return r.choices[0].message.content


def deploy(s, body):
    return s.admin("POST", "/admin/v1/models", {"pool": {"autoscale": True, "min_replicas": 0,
                                                         "max_replicas": 1, "scale_to_zero_after_secs": 600},
                                                **body})


def test_a_download_that_does_not_match_leaves_nothing(server, files):
    base, gets, digest = files
    # Cached by hash: a file already here with this hash would be served
    # whatever the URL; this one must be downloaded.
    assert cached(server) == []
    before = []
    for body in ({"url": f"{base}/truncated.gguf", "sha256": digest},   # another file
                 {"url": f"{base}/missing.gguf", "sha256": digest}):    # a 404
        r = deploy(server, {"id": "broken", **body})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model", r.text
        assert server.admin("GET", "/admin/v1/models/broken").status_code == 404
    assert "sha256" in deploy(server, {"id": "broken", "url": f"{base}/truncated.gguf",
                                       "sha256": digest}).json()["error"]["message"]
    assert cached(server) == before, "a part file or a wrong file was left in the cache"
    # A URL needs its hash.
    r = deploy(server, {"id": "broken", "url": f"{base}/chat.gguf"})
    assert r.status_code == 400 and "sha256" in r.json()["error"]["message"], r.text
    # Credentials in a URL would sit in the database and in every read of
    # the catalog: refused before anything is fetched, the secret not echoed.
    host, gets_before = base.split("://")[1], len(gets)
    for url in (f"http://ops:hunter2@{host}/chat.gguf", f"{base}/chat.gguf?X-Amz-Signature=hunter2"):
        r = deploy(server, {"id": "secret", "url": url, "sha256": digest})
        assert r.status_code == 400 and "hunter2" not in r.text, r.text
        assert "AWS_" in r.json()["error"]["message"], r.text
    assert server.admin("GET", "/admin/v1/models/secret").status_code == 404
    assert gets_before == len(gets), "nothing was fetched"


def test_a_model_from_an_http_url_is_downloaded_once_and_served(server, files):
    base, gets, digest = files
    r = deploy(server, {"id": "from-http", "url": f"{base}/chat.gguf", "sha256": digest})
    assert r.status_code == 201, r.text
    assert gets.count("/chat.gguf") == 1
    assert [os.path.basename(p) for p in cached(server)] == [f"sha256-{digest}.gguf"]
    assert "Paris" in ask(server, "from-http")
    # The same file for another model: from the cache, not downloaded again.
    r = deploy(server, {"id": "from-http-2", "url": f"{base}/chat.gguf", "sha256": digest})
    assert r.status_code == 201, r.text
    assert gets.count("/chat.gguf") == 1


def test_a_model_from_an_s3_compatible_store_is_served(server, files):
    _, _, digest = files
    # Dropped from the cache: this one must come from the object store.
    for p in cached(server):
        os.remove(p)
    r = deploy(server, {"id": "from-s3", "url": "s3://models/smollm2/chat.gguf", "sha256": digest})
    assert r.status_code == 201, r.text
    assert [os.path.basename(p) for p in cached(server)] == [f"sha256-{digest}.gguf"]
    assert "Paris" in ask(server, "from-s3")
    for p in cached(server):
        os.remove(p)
    r = deploy(server, {"id": "s3-missing", "url": "s3://models/nothing.gguf", "sha256": digest})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model", r.text
    assert cached(server) == []


def test_with_model_sources_set_a_deploy_comes_only_from_them(files, tmp_path):
    """`security.model_sources`: what a platform admin key can make the
    pools fetch or open. Outside: a 400 before anything is fetched or
    opened, and a missing file reads like a forbidden one."""
    base, gets, digest = files
    allowed = tmp_path / "models"
    allowed.mkdir()
    shutil.copy(model_file(), allowed / "chat.gguf")
    cache = tmp_path / "cache"
    config = (f'model_sources = ["{base}/allowed/", "{allowed}"]\n'
              f'[[models]]\nid = "base"\npath = "{model_file()}"\n')
    s = Server(replicas=1, config=config, tenant="allow-list", env={"XDG_CACHE_HOME": str(cache)})
    try:
        seen = len(gets)
        refused = {}
        for name, body in {
            "url outside": {"url": f"{base}/chat.gguf", "sha256": digest},
            "url climbing out": {"url": f"{base}/allowed/../chat.gguf", "sha256": digest},
            "metadata service": {"url": "http://169.254.169.254/latest/meta-data/x", "sha256": digest},
            "file outside": {"path": "/etc/passwd"},
            "missing file": {"path": str(tmp_path / "nope.gguf")},
        }.items():
            r = deploy(s, {"id": "x", **body})
            assert r.status_code == 400 and "model_sources" in r.json()["error"]["message"], (name, r.text)
            refused[name] = r.json()["error"]["message"]
        assert refused["file outside"] == refused["missing file"]
        assert len(gets) == seen, "nothing outside was fetched"
        # Inside: a file of the directory is served; a URL under the prefix
        # is fetched (this one is not there: the server's 404 is the answer).
        r = deploy(s, {"id": "allowed-file", "path": str(allowed / "chat.gguf"), "sha256": digest})
        assert r.status_code == 201, r.text
        assert ask(s, "allowed-file")
        r = deploy(s, {"id": "allowed-url", "url": f"{base}/allowed/chat.gguf", "sha256": digest})
        assert r.status_code == 400 and "model_sources" not in r.text, r.text
        assert gets[seen:] == ["/allowed/chat.gguf"]
    finally:
        s.stop()


def test_model_fetch_takes_a_url_and_keeps_nothing_that_does_not_match(files, tmp_path):
    """`strata model fetch --url URL --sha256 H --dest FILE`: what an engine
    Pod's init container needs for a model of the catalog with a `url`."""
    base, gets, digest = files
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    dest = tmp_path / "m.gguf"
    fetch = lambda *args: subprocess.run([STRATA, "model", "fetch", *args], capture_output=True,  # noqa: E731
                                         text=True, timeout=120, env=env)
    bad = fetch("--url", f"{base}/truncated.gguf", "--sha256", digest, "--dest", str(dest))
    assert bad.returncode != 0 and "sha256" in bad.stderr, bad.stderr
    assert not dest.exists() and not list((tmp_path).glob("*.part"))
    assert fetch("--url", f"{base}/chat.gguf").returncode != 0, "a URL needs its sha256"
    seen = len(gets)
    done = fetch("--url", f"{base}/chat.gguf", "--sha256", digest, "--dest", str(dest), "--json")
    assert done.returncode == 0, done.stderr
    out = __import__("json").loads(done.stdout.splitlines()[-1])
    assert out == {"path": str(dest), "sha256": digest, "verified": True, "fetched": True}
    assert sha256_of(dest) == digest and gets[seen:] == ["/chat.gguf"]
    again = fetch("--url", f"{base}/chat.gguf", "--sha256", digest, "--json")
    assert __import__("json").loads(again.stdout.splitlines()[-1])["fetched"] is False
    assert gets[seen:] == ["/chat.gguf"], "cached by hash: not downloaded twice"
