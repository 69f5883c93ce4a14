"""The Files and Batch APIs through the official `openai` SDK, unmodified,
against the real `strata serve` and model: files checked line by line and
sealed per tenant, batches of two tenants run to completion with their
output and error files in input order, a batch cancelled mid-way, and a
batch that goes on through the kill of a replica and of `strata serve`
itself, every line's result kept exactly once."""
import io
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time

import httpx
import openai
import pytest
from conftest import MODEL_ID, STRATA, Server, wait_for, wait_ready
from test_autoscale import CONFIG as AUTOSCALE_CONFIG


def line(custom_id, prompt, max_tokens=3, model=MODEL_ID, url="/v1/chat/completions", **extra):
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, **extra}
    if url == "/v1/completions":
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines):
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def upload(client, lines, name="input.jsonl"):
    return client.files.create(file=(name, io.BytesIO(jsonl(lines))), purpose="batch")


def wait_batch(client, batch_id, statuses=("completed", "failed", "expired", "cancelled"), timeout=600):
    seen = {}

    def done():
        seen["b"] = client.batches.retrieve(batch_id)
        return seen["b"].status in statuses

    wait_for(f"batch {batch_id} to reach {statuses}", done, timeout=timeout)
    return seen["b"]


def read_lines(client, file_id):
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x.strip()]


def test_an_uploaded_file_is_checked_line_by_line_and_kept_for_its_tenant_only(server, client):
    good = [line("a", "Hello"), line("b", "World")]
    f = upload(client, good, "mine.jsonl")
    assert f.purpose == "batch" and f.filename == "mine.jsonl" and f.bytes == len(jsonl(good))
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).content == jsonl(good)
    assert f.id in [x.id for x in client.files.list(purpose="batch")]

    # Every bad line is named, and nothing is kept.
    before = [x.id for x in client.files.list()]
    bad = good + [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}]}},
                  line("c", "x", stream=True),
                  {"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": {}}]
    with pytest.raises(openai.BadRequestError) as e:
        upload(client, bad)
    message = e.value.body["message"]
    assert "line 3:" in message and "used twice" in message, message
    assert "line 4:" in message and "stream" in message, message
    assert "line 5:" in message and "/v1/embeddings" in message, message
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", io.BytesIO(jsonl(good))), purpose="fine-tune")
    assert [x.id for x in client.files.list()] == before

    # Another tenant: every id of this one is a 404, its own list is empty.
    other = server.admin("POST", "/admin/v1/tenants", {"name": "files-other"}).json()
    theirs = server.client(server.new_key(other["id"], "member"))
    for call in (lambda: theirs.files.retrieve(f.id), lambda: theirs.files.content(f.id),
                 lambda: theirs.files.delete(f.id),
                 lambda: theirs.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                               completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert theirs.files.list().data == []
    # A reader may read but not upload.
    reader = server.client(server.new_key(server.tenant["id"], "reader"))
    assert reader.files.retrieve(f.id).id == f.id
    with pytest.raises(openai.PermissionDeniedError):
        upload(reader, good)

    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_a_batch_runs_every_line_and_answers_in_input_order(server, client):
    lines = [line(f"req-{i}", f"Count to {i}.") for i in range(12)]
    # The replica refuses these (longer than the context): they go to the
    # error file with the replica's 400.
    lines[4] = line("req-4", "Too long.", max_tokens=10**6)
    lines[9] = line("req-9", "Too long as well.", max_tokens=10**6)
    f = upload(client, lines)
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"job": "nightly"})
    assert b.status == "validating" and b.request_counts.total == 12 and b.metadata == {"job": "nightly"}
    b = wait_batch(client, b.id)
    assert b.status == "completed", b
    assert (b.request_counts.completed, b.request_counts.failed) == (10, 2)
    assert b.completed_at and b.in_progress_at and b.output_file_id and b.error_file_id

    out = read_lines(client, b.output_file_id)
    assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(12) if i not in (4, 9)]
    for x in out:
        assert x["response"]["status_code"] == 200 and x["error"] is None
        assert x["response"]["body"]["object"] == "chat.completion"
        assert x["response"]["body"]["usage"]["completion_tokens"] <= 3
    errors = read_lines(client, b.error_file_id)
    assert [x["custom_id"] for x in errors] == ["req-4", "req-9"]
    assert all(x["response"]["status_code"] == 400 for x in errors), errors

    # A line's answer is the answer the same request gets interactively.
    same = client.chat.completions.create(**lines[3]["body"])
    assert out[3]["response"]["body"]["choices"][0]["message"]["content"] == same.choices[0].message.content

    assert b.id in [x.id for x in client.batches.list()]
    assert client.files.retrieve(b.output_file_id).purpose == "batch_output"
    # An ended batch cannot be cancelled.
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(b.id)


def test_a_batch_is_refused_when_its_lines_do_not_fit_it(server, client):
    f = upload(client, [line("a", "x"), line("b", "y", url="/v1/completions")])
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    f = upload(client, [line("a", "x")])
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")
    assert e.value.body["param"] == "completion_window"
    # A key limited to other models does not learn the model exists.
    limited = server.client(server.new_key(server.tenant["id"], "member", models=["no-such-model"]))
    f = upload(limited, [line("a", "x")])
    with pytest.raises(openai.NotFoundError):
        limited.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_a_cancelled_batch_keeps_what_finished_and_names_what_did_not_run(server, client):
    lines = [line(f"c-{i}", f"Tell me about the number {i}.", max_tokens=24) for i in range(120)]
    b = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    wait_for("a few lines to finish", lambda: client.batches.retrieve(b.id).request_counts.completed >= 3)
    assert client.batches.cancel(b.id).status in ("cancelling", "cancelled")
    b = wait_batch(client, b.id)
    assert b.status == "cancelled" and b.cancelled_at
    out, errors = read_lines(client, b.output_file_id), read_lines(client, b.error_file_id)
    assert b.request_counts.completed == len(out) >= 3
    assert len(out) < 120, "the batch was cancelled long before its end"
    # Every line is in one file or the other, once, in input order.
    assert sorted([x["custom_id"] for x in out + errors], key=lambda c: int(c[2:])) == [x["custom_id"] for x in lines]
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}

    # An insider with write access to the database flips the status kept in
    # the clear back to running: the sealed batch says cancelled, so no line
    # runs (nothing more in the ledger) and the batch stays cancelled.
    ran = usage_requests(server, server.tenant["id"])
    db = sqlite3.connect(server.args[server.args.index("--db") + 1], timeout=30)
    with db:
        db.execute("UPDATE batches SET status = 'in_progress' WHERE id = ?", (b.id,))
    time.sleep(6)
    assert usage_requests(server, server.tenant["id"]) == ran
    assert client.batches.retrieve(b.id).status == "cancelled"


def usage_requests(s, tenant_id):
    r = s.admin("GET", f"/admin/v1/tenants/{tenant_id}/usage", expect=200).json()
    return sum(m["requests"] for m in r["data"])


def test_a_batch_of_two_tenants_goes_on_through_killed_replicas_and_a_killed_server(tmp_path):
    """Kill an engine, then SIGKILL `strata serve` with its engines, mid-batch;
    start it again on the same database: both tenants' batches complete,
    every line's result is in its files exactly once, and the ledger counts
    no more runs than lines plus those that were running at the kills."""
    in_flight = 4
    price = (100.0, 300.0)  # dollars per million prompt and completion tokens
    s = Server(replicas=2, own_session=True,
               config=f"[gateway]\nbatch_lines_in_flight = {in_flight}\nbatch_discount = 0.5\n"
                      f"[pricing.\"{MODEL_ID}\"]\nprompt_per_million = {price[0]}\ncompletion_per_million = {price[1]}\n")
    try:
        tenants = [s.tenant["id"], s.admin("POST", "/admin/v1/tenants", {"name": "batch-b"}).json()["id"]]
        clients = [s.client(), s.client(s.new_key(tenants[1], "member"))]
        n = 150
        batches = []
        for t, c in enumerate(clients):
            lines = [line(f"t{t}-{i}", f"Say the word number {i}.", max_tokens=4) for i in range(n)]
            batches.append(c.batches.create(input_file_id=upload(c, lines).id, endpoint="/v1/chat/completions",
                                            completion_window="24h").id)

        def finished():
            return sum(c.batches.retrieve(b).request_counts.completed for c, b in zip(clients, batches))

        wait_for("a quarter of the lines", lambda: finished() >= n // 2, timeout=300)
        os.kill(s.engine_pid(s.replica_list()[0]["id"]), signal.SIGKILL)
        wait_for("half of the lines", lambda: finished() >= n, timeout=300)
        at_kill = finished()
        os.killpg(s.proc.pid, signal.SIGKILL)
        assert at_kill < 2 * n - in_flight, "the kill came mid-batch"
        s.proc.wait(timeout=30)
        s.proc = subprocess.Popen(s.args, cwd=s.dir, stdout=s.log, stderr=subprocess.STDOUT, env=s.env,
                                  start_new_session=True)
        wait_ready(s.base, 2)
        for t, (c, b) in enumerate(zip(clients, batches)):
            done = wait_batch(c, b)
            assert done.status == "completed", done
            out = read_lines(c, done.output_file_id)
            assert [x["custom_id"] for x in out] == [f"t{t}-{i}" for i in range(n)]
            assert done.error_file_id is None
            ran = usage_requests(s, tenants[t])
            # Lines running at each kill may run twice; no finished one does.
            assert n <= ran <= n + 2 * in_flight, ran
            # Every batch token is in the ledger at half the list price.
            usage = s.admin("GET", f"/admin/v1/tenants/{tenants[t]}/usage", expect=200).json()["data"]
            listed = sum(u["prompt_tokens"] * price[0] + u["completion_tokens"] * price[1] for u in usage) / 1e6
            cost = sum(u["cost_usd"] for u in usage)
            assert listed > 0 and abs(cost - 0.5 * listed) < 1e-6 * listed, (cost, listed)
    finally:
        if s.proc.poll() is None:
            os.killpg(s.proc.pid, signal.SIGTERM)
            s.proc.wait(timeout=90)


def test_files_and_batch_lines_are_sealed_at_rest(server, client):
    """What someone with a copy of the database reads of a batch: no
    prompt of its input and no word of its answers."""
    canary = "batch-canary-7716"
    lines = [line("s-0", f"Repeat: {canary}", max_tokens=8)]
    b = client.batches.create(input_file_id=upload(client, lines, f"{canary}.jsonl").id,
                              endpoint="/v1/chat/completions", completion_window="24h")
    b = wait_batch(client, b.id)
    answer = read_lines(client, b.output_file_id)[0]["response"]["body"]["choices"][0]["message"]["content"]
    db = sqlite3.connect(server.args[server.args.index("--db") + 1])
    for table in ("files", "batches", "batch_lines"):
        for row in db.execute(f"SELECT * FROM {table}"):
            raw = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
            assert canary.encode() not in raw, table
            if len(answer.strip()) > 6:
                assert answer.strip().encode() not in raw, table


def test_revoking_its_key_stops_a_running_batch(server):
    """A key revoked (say, leaked) while its batch runs: no more lines run
    as it; the batch fails naming why, within seconds."""
    key = server.new_key(server.tenant["id"], "member")
    key_id = server.admin("GET", f"/admin/v1/tenants/{server.tenant['id']}/keys").json()["data"][-1]["id"]
    c = server.client(key)
    lines = [line(f"r-{i}", f"Tell me about the number {i}.", max_tokens=24) for i in range(200)]
    b = c.batches.create(input_file_id=upload(c, lines).id, endpoint="/v1/chat/completions",
                         completion_window="24h")
    wait_for("a few lines to finish", lambda: c.batches.retrieve(b.id).request_counts.completed >= 3)
    server.admin("DELETE", f"/admin/v1/tenants/{server.tenant['id']}/keys/{key_id}", expect=200)
    # Read as another key of the tenant: the revoked one reads nothing now.
    reader = server.client()
    b = wait_batch(reader, b.id, timeout=60)
    assert b.status == "failed" and b.errors.data[0].code == "key_revoked", b
    assert b.request_counts.completed < 200


# test_autoscale's pool (one replica planned at ~20 tokens/s, 2 slots,
# windows of seconds), going to zero after 4 s idle.
AUTOSCALE = AUTOSCALE_CONFIG.replace("scale_to_zero_after_secs = 12.0", "scale_to_zero_after_secs = 4.0")
assert "scale_to_zero_after_secs = 4.0" in AUTOSCALE


def run_counting(s, c, replicas):
    """A batch of 60 completion lines (24 tokens each) run to its end on
    `s`, sampling `replicas()` every half second: the batch as it ended,
    and the samples."""
    lines = [line(f"l{i}", f"Count from {i}:", max_tokens=24, url="/v1/completions") for i in range(60)]
    b = c.batches.create(input_file_id=upload(c, lines).id, endpoint="/v1/completions",
                         completion_window="24h").id
    seen = []
    deadline = time.time() + 600
    while time.time() < deadline:
        seen.append(replicas())
        done = c.batches.retrieve(b)
        if done.status in ("completed", "failed", "cancelled", "expired"):
            break
        time.sleep(0.5)
    return done, seen


def test_a_batch_backlog_alone_buys_no_replica_and_keeps_one():
    """A batch runs on the slots interactive work leaves: with no
    interactive traffic, a backlog that keeps the one replica busy (more
    tokens per second than it is planned for) is not demand, and the
    autoscaler buys no second replica for it; nor does the pool go to zero
    under the running batch (idle for interactive work far longer than
    its 4 s to zero). Once the batch is done, it does."""
    s = Server(replicas=1, ready=0, config=AUTOSCALE, tenant="batch-scale")
    try:
        c = s.client()
        done, seen = run_counting(s, c, lambda: len(s.replica_list()))
        assert done.status == "completed" and done.request_counts.completed == 60, done
        # A pool at zero starts one replica for the batch, then keeps it.
        started = seen[seen.index(1):]
        assert set(started) == {1}, f"replicas while the batch ran: {seen}"
        assert len(started) > 20, "the batch outlasted the time to zero several times over"
        deadline = time.time() + 60
        while len(s.replica_list()) and time.time() < deadline:
            time.sleep(0.5)
        assert s.replica_list() == [], "idle after the batch: to zero"
        # The decisions say which class drove them: the batch started the
        # replica; idleness took it away.
        out = subprocess.run([STRATA, "decisions", "--db", os.path.join(s.dir, "strata.db"), "--json"],
                             capture_output=True, text=True, check=True).stdout
        steps = [(d["from_replicas"], d["to_replicas"], json.loads(d["inputs"])) for d in json.loads(out)]
        up = [i for f, t, i in steps if (f, t) == (0, 1)]
        assert up and all(i["class"] == "batch" and i["batch_lines"] > 0 for i in up), steps
        assert any((f, t) == (1, 0) for f, t, _ in steps), steps
        # The ledger charges the replica's time to the batch by its tokens;
        # the rest stays idle.
        out = subprocess.run([STRATA, "--config", s.config, "cost", "report", "--by", "class", "--since", "1h",
                              "--db", os.path.join(s.dir, "strata.db"), "--json"],
                             capture_output=True, text=True, check=True).stdout
        lines = {l["key"]: l for l in json.loads(out)["lines"]}
        assert set(lines) <= {"batch", "(idle)"} and lines["batch"]["tokens"] >= 60 * 10, lines
        metrics = httpx.get(f"{s.base}/metrics", headers={"Authorization": f"Bearer {s.admin_key}"}).text
        batch_tokens = [l for l in metrics.splitlines() if l.startswith("strata_gateway_batch_tokens_total")]
        assert batch_tokens and float(batch_tokens[0].split()[-1]) >= 60 * 10, batch_tokens
    finally:
        s.stop()


# Spot at 0.3 of on demand's price; one spot replica for a batch backlog
# of at least 5 s of a replica's work (~33 tokens/s planned: ~170 tokens).
BATCH_SPOT = AUTOSCALE.replace("[pool]\n", "[pool]\nbatch_spot_max_replicas = 1\nbatch_spot_work_secs = 5.0\n") + """
[[catalog]]
instance_type = "local"
zone = "zone-a"
capacity = "spot"
price_per_hour = 0.03

[[catalog]]
instance_type = "local"
zone = "zone-a"
capacity = "on_demand"
price_per_hour = 0.10
"""
assert "batch_spot_max_replicas = 1" in BATCH_SPOT


def test_a_batch_backlog_buys_cheap_spot_beside_the_count_and_lets_it_go_when_worked_off():
    """With `pool.batch_spot_max_replicas`, a backlog the one replica would
    take minutes over gets a spot replica of its own (the autoscaler alone
    buys none: the test above), which takes lines at once; the decision
    says the batch drove it; when what is left is less than its
    `batch_spot_work_secs`, it goes again. Every instance is spot."""
    s = Server(replicas=1, ready=0, config=BATCH_SPOT, tenant="batch-spot")
    try:
        c = s.client()
        done, seen = run_counting(s, c, lambda: len([r for r in s.replica_list() if r["ready"]]))
        assert done.status == "completed" and done.request_counts.completed == 60, done
        assert max(seen) == 2, f"ready replicas while the batch ran: {seen}"
        # Its spot replica went before the batch ended (the last lines are
        # under 5 s of work), or goes now.
        deadline = time.time() + 60
        while len(s.replica_list()) > 1 and time.time() < deadline:
            time.sleep(0.5)
        assert len(s.replica_list()) <= 1, s.replica_list()
        db = sqlite3.connect(os.path.join(s.dir, "strata.db"))
        capacities = [r[0] for r in db.execute("SELECT capacity FROM instances")]
        assert len(capacities) >= 2 and set(capacities) == {"spot"}, capacities
        out = subprocess.run([STRATA, "decisions", "--db", os.path.join(s.dir, "strata.db"), "--json"],
                             capture_output=True, text=True, check=True).stdout
        steps = [(d["from_replicas"], d["to_replicas"], d["reason"], json.loads(d["inputs"]))
                 for d in json.loads(out)]
        spot = [(f, t, i) for f, t, r, i in steps if r == "batch_spot"]
        up = [(f, t, i) for f, t, i in spot if t > f]
        down = [(f, t, i) for f, t, i in spot if t < f]
        assert up and down, steps
        assert all(i["class"] == "batch" for _, _, i in spot), spot
        assert up[0][2]["batch_spot_replicas"] == 1 and up[0][2]["batch_backlog_tokens"] > 170, up
    finally:
        s.stop()


def test_a_batch_finishes_in_its_reserved_share_while_interactive_work_keeps_every_slot_wanted():
    """16 clients stream back to back on one replica's 8 slots, so
    interactive requests are waiting nearly all the time and no slot is
    ever left over: a batch still finishes, in the one slot of eight that
    `gateway.batch_reserved_share` (0.125) keeps for it. (With the share
    set to 0, no line finishes while the load lasts.)"""
    share = os.environ.get("STRATA_TEST_BATCH_SHARE", "0.125")
    s = Server(replicas=1, config=f"[gateway]\nbatch_reserved_share = {share}\n", tenant="batch-reserve")
    stop = threading.Event()
    try:
        c = s.client()
        waited = []

        def stream():
            while not stop.is_set():
                for _ in c.chat.completions.create(model=MODEL_ID, max_tokens=16, temperature=0, stream=True,
                                                    messages=[{"role": "user", "content": "Tell me a story."}]):
                    pass

        def sample():
            while not stop.is_set():
                metrics = httpx.get(f"{s.base}/metrics", headers={"Authorization": f"Bearer {s.admin_key}"}).text
                waiting = [l for l in metrics.splitlines() if l.startswith("strata_gateway_requests_waiting ")]
                waited.append(float(waiting[0].split()[-1]) > 0)
                time.sleep(0.5)

        threads = [threading.Thread(target=stream, daemon=True) for _ in range(16)]
        threads.append(threading.Thread(target=sample, daemon=True))
        for t in threads:
            t.start()
        time.sleep(5)
        lines = [line(f"r{i}", f"Say {i}.", max_tokens=4) for i in range(12)]
        b = c.batches.create(input_file_id=upload(c, lines).id, endpoint="/v1/chat/completions",
                             completion_window="24h").id
        deadline = time.time() + 120
        while time.time() < deadline and c.batches.retrieve(b).status != "completed":
            time.sleep(1)
        done = c.batches.retrieve(b)
        stop.set()
        assert done.status == "completed" and done.request_counts.completed == 12, done
        # The load kept interactive requests waiting: no slot was left over.
        assert sum(waited) >= 0.8 * len(waited), f"waiting in {sum(waited)} of {len(waited)} samples"
    finally:
        stop.set()
        s.stop()


def test_a_tenants_batch_token_limit_is_apart_from_its_interactive_one(server):
    """A tenant whose interactive allowance (300 tokens a minute) a batch
    would use up in seconds: with `batch_tokens_per_minute` set, its lines
    count against that instead, the batch runs through, and the tenant's
    interactive requests are still served. A line larger than the whole
    batch allowance fails at once (400, in the error file) rather than
    waiting out the window."""
    t = server.admin("POST", "/admin/v1/tenants", {"name": "batch-tpm", "tokens_per_minute": 300,
                                                  "batch_tokens_per_minute": 100000}, expect=201).json()
    assert t["batch_tokens_per_minute"] == 100000
    c = server.client(server.new_key(t["id"], "member"))
    lines = [line(f"b{i}", f"Say {i}.", max_tokens=8) for i in range(30)]
    lines[7] = line("b7", "Far too long for the batch allowance.", max_tokens=200000)
    b = c.batches.create(input_file_id=upload(c, lines).id, endpoint="/v1/chat/completions",
                         completion_window="24h").id
    done = wait_batch(c, b, timeout=120)
    assert done.status == "completed" and done.request_counts.completed == 29, done
    [big] = read_lines(c, done.error_file_id)
    assert big["custom_id"] == "b7" and big["response"]["status_code"] == 400, big
    assert "batch tokens-per-minute" in big["response"]["body"]["error"]["message"], big
    # About 29 × 20 tokens went to the batch limit; the interactive one is untouched.
    r = c.chat.completions.create(model=MODEL_ID, max_tokens=8, temperature=0,
                                  messages=[{"role": "user", "content": "Still here?"}])
    assert r.usage.completion_tokens >= 1


def engine_counter(s, name):
    """The sum of counter `name` over the server's engines."""
    total = 0.0
    with s.engine_client() as engine:
        for r in s.replica_list():
            for metric in engine.get(f"{r['url']}/metrics", timeout=10).text.splitlines():
                if metric.startswith(name + " "):
                    total += float(metric.split()[1])
    return total


def test_batch_lines_step_after_interactive_work_in_the_engine():
    """Batch lines reach the engine marked batch: it counts their tokens
    apart from interactive ones, and an interactive request that arrives
    while they decode has its prompt read in steps that hold the batch back
    (counted). Without the mark the engine sees only interactive work and
    neither count moves."""
    s = Server(replicas=1, tenant="batch-engine-class")
    try:
        c = s.client()
        lines = [line(f"r{i}", "1, 2, 3, 4,", max_tokens=200, url="/v1/completions") for i in range(4)]
        b = c.batches.create(input_file_id=upload(c, lines).id, endpoint="/v1/completions",
                             completion_window="24h").id
        tokens = "strata_engine_batch_generation_tokens_total"
        held = "strata_engine_batch_held_steps_total"
        wait_for("batch lines decoding in the engine", lambda: engine_counter(s, tokens) > 0, timeout=120)
        held_before = engine_counter(s, held)
        for i in range(3):
            r = c.chat.completions.create(model=MODEL_ID, max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": f"Hello {i}, a prompt to read."}])
            assert r.choices[0].message.content
        assert c.batches.retrieve(b).request_counts.completed < 4, "the batch ended before the interactive requests"
        assert engine_counter(s, held) > held_before
        done = wait_batch(c, b)
        assert done.status == "completed" and done.request_counts.completed == 4, done
        out = read_lines(c, done.output_file_id)
        batch_tokens = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
        assert batch_tokens >= 4 * 100
        # Every batch token counted as batch, and no interactive one.
        assert engine_counter(s, tokens) == batch_tokens
    finally:
        s.stop()
