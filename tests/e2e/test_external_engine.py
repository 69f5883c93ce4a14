"""Engine kind `openai` (issue 27): a real OpenAI-compatible server strata
did not write, llama-cpp-python's, serving SmolLM2 as a second pool under
`strata serve` beside strata's own engine. Routed by model, kept to its
one tenant (its engine shares its prefix cache across requests), metered,
reached only with its pool's API key, replaced when killed, its answers
stored by the Responses API; a stream it cuts short ends with an error
event, not a silent continuation (it takes no `continue_final_message`).
The server is built once per machine by scripts/peer-engine (scripts/test
runs it); without it this test fails rather than pass unseen."""
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from conftest import CHAT_MODEL, EXTERNAL, STRATA, Server, bearer, model_config, peer_engine_model, wait_for

def catalog(pool="replicas = 1"):
    return f"""
[[models]]
id = "{CHAT_MODEL}"
source = "{CHAT_MODEL}"
{peer_engine_model(EXTERNAL, "ext", pool)}"""


@pytest.fixture(scope="module")
def ext():
    s = Server(replicas=1, ready=2, config=catalog(), tenant="ext")
    yield s
    s.stop()


def external_replicas(s):
    return [r for r in s.replica_list() if EXTERNAL in r["id"]]




def test_the_external_engine_answers_its_tenant_and_is_metered(ext):
    client = ext.client()
    assert sorted(m.id for m in client.models.list().data) == sorted([CHAT_MODEL, EXTERNAL])
    r = client.chat.completions.create(
        model=EXTERNAL, temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens > 0
    streamed = client.chat.completions.create(
        model=EXTERNAL, temperature=0, max_tokens=12, stream=True,
        messages=[{"role": "user", "content": "Count from one to five."}])
    pieces = [c.choices[0].delta.content for c in streamed if c.choices and c.choices[0].delta.content]
    assert "".join(pieces).strip()

    # llama-cpp-python reports no usage in streams: strata counts the
    # streamed tokens itself, so nothing generated goes unmetered.
    def metered():
        usage = ext.admin("GET", f"/admin/v1/tenants/{ext.tenant['id']}/usage", expect=200).json()
        rows = [row for row in usage["data"] if row["model"] == EXTERNAL]
        return (len(rows) == 1 and rows[0]["requests"] == 2
                and rows[0]["completion_tokens"] == r.usage.completion_tokens + len(pieces))
    wait_for("both answers in the ledger, with their tokens", metered, 10)


def test_streams_at_once_are_all_answered(ext):
    client = ext.client()

    def one(i):
        stream = client.chat.completions.create(
            model=EXTERNAL, max_tokens=8, stream=True,
            messages=[{"role": "user", "content": f"Say a word about the number {i}."}])
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(4)))
    assert all(a.strip() for a in answers), answers


def test_another_tenant_does_not_see_a_model_kept_to_one(ext):
    other = ext.admin("POST", "/admin/v1/tenants", {"name": "not-ext"}, expect=201).json()
    client = ext.client(ext.new_key(other["id"], "member"))
    assert [m.id for m in client.models.list().data] == [CHAT_MODEL]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=EXTERNAL, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"


def test_the_engine_answers_only_its_pool_key(ext):
    url = external_replicas(ext)[0]["url"]
    assert url.startswith("http://127.0.0.1:")
    body = {"model": EXTERNAL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    anyone = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert anyone.status_code == 401, anyone.text
    # Nor the platform's keys: only the key strata made for the pool.
    keyed = httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer(ext.key), timeout=30)
    assert keyed.status_code == 401, keyed.text
    # The key is in the engine's environment, not its arguments, which
    # every process on the machine may read.
    pid = ext.engine_pid(external_replicas(ext)[0]["id"])
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"api_key" not in f.read().lower()
    # Nor does it get strata's own secrets from strata's environment.
    with open(f"/proc/{pid}/environ", "rb") as f:
        names = {kv.split(b"=", 1)[0].decode() for kv in f.read().split(b"\0") if kv}
    assert "API_KEY" in names
    leaked = {n for n in names if n.startswith("STRATA_") or n in ("DATABASE_URL", "REDIS_URL")}
    assert not leaked, leaked


def test_no_admin_key_or_database_row_chooses_a_program_to_run(ext):
    """The engine's kind and command are the config file's alone: a platform
    admin key (or whoever steals one) deploying a model cannot run a
    program of its choosing on the machine."""
    marker = os.path.join(ext.dir, "pwned")
    for engine in [{"kind": "openai", "command": ["/bin/sh", "-c", f"touch {marker}; sleep 60 # {{port}}"]},
                   {"command": ["/bin/sh", "-c", f"touch {marker}"]},
                   {"env": {"LD_PRELOAD": "/tmp/x.so"}}]:
        r = ext.admin("POST", "/admin/v1/models", {"id": "evil", "source": CHAT_MODEL, "engine": engine})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_model" and "config file only" in r.json()["error"]["message"]
    time.sleep(1)
    assert not os.path.exists(marker)
    assert "evil" not in [m["id"] for m in ext.admin("GET", "/admin/v1/models", expect=200).json()["data"]]


def test_its_answers_are_stored_by_the_responses_api(ext):
    client = ext.client()
    first = client.responses.create(model=EXTERNAL, input="What is the capital of France?",
                                    max_output_tokens=20, temperature=0)
    assert "Paris" in first.output_text
    again = client.responses.retrieve(first.id)
    assert again.output_text == first.output_text and again.model == EXTERNAL


def test_a_killed_replica_is_replaced_and_a_stream_it_cut_ends_with_an_error(ext):
    client = ext.client()
    before = external_replicas(ext)[0]["id"]
    stream = client.chat.completions.create(
        model=EXTERNAL, max_tokens=400, stream=True,
        messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    deltas = 0
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                deltas += 1
                if deltas == 5:
                    os.kill(ext.engine_pid(before), signal.SIGKILL)
    assert deltas >= 5
    assert "cannot continue an answer" in str(e.value), str(e.value)

    def replaced():
        now = [r for r in external_replicas(ext) if r["ready"]]
        return bool(now) and now[0]["id"] != before
    wait_for("a new replica of the external pool", replaced)
    r = client.chat.completions.create(
        model=EXTERNAL, temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content


def test_status_says_what_each_engine_does(ext):
    r = subprocess.run([STRATA, "--config", ext.config, "status", "--db", os.path.join(ext.dir, "strata.db"),
                        "--json"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    engines = {e["model"]: e for e in json.loads(r.stdout)["engines"]}
    assert engines[CHAT_MODEL] == {"model": CHAT_MODEL, "kind": "strata", "prefix_cache": "per tenant",
                                   "snapshots": "kept", "cut_answers": "continued", "gateway": "mutual TLS",
                                   "tenant": "any"}
    assert engines[EXTERNAL] == {"model": EXTERNAL, "kind": "openai", "prefix_cache": "shared: one tenant",
                                 "snapshots": "none: prefilled again", "cut_answers": "error event",
                                 "gateway": "API key, plain HTTP", "tenant": "ext"}
    # The table says it too.
    table = subprocess.run([STRATA, "--config", ext.config, "status", "--db", os.path.join(ext.dir, "strata.db")],
                           capture_output=True, text=True, timeout=30).stdout
    assert "API key, plain HTTP" in table and "mutual TLS" in table


def test_a_key_limit_holds_on_it(ext):
    client = ext.client(ext.new_key(ext.tenant["id"], "member", requests_per_minute=2))
    ask = {"model": EXTERNAL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        client.chat.completions.create(**ask)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**ask)


AUTOSCALED = """
[models.pool]
autoscale = true
min_replicas = 0
max_replicas = 1
stable_window_secs = 2.0
panic_window_secs = 1.0
scale_down_delay_secs = 2.0
scale_to_zero_after_secs = 4.0"""


def test_its_pool_scales_from_zero_and_back():
    s = Server(replicas=1, ready=1, config=catalog(AUTOSCALED), tenant="ext")
    try:
        assert external_replicas(s) == []
        r = s.client().chat.completions.create(
            model=EXTERNAL, temperature=0, max_tokens=20,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
        assert len(external_replicas(s)) == 1
        wait_for("the idle pool back at zero", lambda: external_replicas(s) == [], 60)
    finally:
        s.stop()


def test_batch_lines_reach_a_priority_scheduling_engine_with_their_priority(tmp_path):
    """An engine that schedules by a request's `priority` (vLLM, SGLang)
    gets Batch API lines with the pool's `batch_priority` and interactive
    requests with none. Neither runs without a GPU, so a stand-in that
    records what it is sent takes their place (tests/e2e/standin_engine.py);
    what is checked is strata's side only."""
    from test_batch import line, upload, wait_batch
    record = tmp_path / "priorities.jsonl"
    standin = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin_engine.py")
    path = model_config(CHAT_MODEL).split('"')[1]
    config = f"""
[[models]]
id = "standin"
path = "{path}"
tenant = "prio"
replicas = 1
[models.engine]
kind = "openai"
command = ["{sys.executable}", "{standin}", "--host", "{{host}}", "--port", "{{port}}",
           "--model", "{{model}}", "--api-key", "{{api_key}}", "--record", "{record}"]
[models.engine.capabilities]
batch_priority = 7
"""
    s = Server(replicas=1, ready=1, config=config, tenant="prio")
    try:
        c = s.client()
        for i in range(2):
            r = c.chat.completions.create(model="standin", messages=[{"role": "user", "content": f"Hi {i}"}])
            assert r.choices[0].message.content == "ok"
        lines = [line(f"r{i}", f"Say {i}.", model="standin") for i in range(3)]
        b = c.batches.create(input_file_id=upload(c, lines).id, endpoint="/v1/chat/completions",
                             completion_window="24h").id
        done = wait_batch(c, b, timeout=120)
        assert done.status == "completed" and done.request_counts.completed == 3, done
        sent = [json.loads(x)["priority"] for x in record.read_text().splitlines()]
        assert sorted(sent, key=str) == [7, 7, 7, None, None], sent
    finally:
        s.stop()
