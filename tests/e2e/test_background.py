"""Background responses through the official openai SDK against the real
`strata serve` (the real model): the answer runs server-side whatever the
client does, is polled, its event stream is resumed after the last event a
client saw, and a cancel stops it. (A gateway killed mid-answer, and the
stream resumed on another, is in test_cluster.py.)"""
import os
import sqlite3
import time

import httpx
import openai
import pytest

from conftest import MODEL_ID, Server, wait_for

LONG = {"model": MODEL_ID, "temperature": 0}


def poll(client, rid, timeout=180):
    """The response once it no longer runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.responses.retrieve(rid)
        if r.status not in ("queued", "in_progress"):
            return r
        time.sleep(0.2)
    raise AssertionError(f"{rid} still runs after {timeout}s")


def deltas(events):
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_a_background_response_is_polled_and_its_stream_replayed(client):
    r = client.responses.create(input="Count from one to twenty.", background=True, max_output_tokens=24, **LONG)
    # It answers at once, before the answer exists.
    assert r.status == "queued" and r.background is True and r.output == []
    done = poll(client, r.id)
    assert done.status == "incomplete" and done.usage.output_tokens == 24
    assert done.output_text and done.background is True
    # The whole stream, kept: numbered from 0 without a gap, the deltas
    # making the stored text, the last event the stored response.
    events = list(client.responses.retrieve(r.id, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[0].response.status == "queued"
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == deltas(events) == done.output_text
    # From any point on: exactly the events after it.
    tail = list(client.responses.retrieve(r.id, stream=True, starting_after=5))
    assert [e.sequence_number for e in tail] == list(range(6, len(events)))
    assert [e.type for e in tail] == [e.type for e in events[6:]]


def test_a_stream_left_by_its_client_goes_on_and_is_resumed(client):
    stream = client.responses.create(input="Write a short story about a lighthouse keeper.", background=True,
                                     stream=True, max_output_tokens=64, **LONG)
    seen = []
    for event in stream:
        seen.append(event)
        if event.sequence_number >= 8:
            break
    stream.close()
    rid = seen[0].response.id
    # The client is gone; the answer goes on without it.
    time.sleep(1)
    rest = list(client.responses.retrieve(rid, stream=True, starting_after=seen[-1].sequence_number))
    events = seen + rest
    assert [e.sequence_number for e in events] == list(range(len(events))), "no gap, no duplicate"
    final = events[-1].response
    assert events[-1].type == "response.incomplete" and final.usage.output_tokens == 64
    assert final.output_text == deltas(events)
    assert poll(client, rid).output_text == final.output_text


def test_a_cancel_stops_a_background_response(server, client):
    r = client.responses.create(input="Write a very long story about the sea.", background=True,
                                max_output_tokens=4000, **LONG)
    # Cancelled once it streams.
    stream = client.responses.retrieve(r.id, stream=True)
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    stream.close()
    cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled", cancelled
    # It stopped: what it generated is far from the 4,000 tokens asked for,
    # and stays as it was.
    stored = client.responses.retrieve(r.id)
    assert stored.status == "cancelled" and stored.usage.output_tokens < 1000
    time.sleep(1)
    assert client.responses.retrieve(r.id).usage.output_tokens == stored.usage.output_tokens
    events = list(client.responses.retrieve(r.id, stream=True))
    assert events[-1].type == "response.cancelled"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # A second cancel answers the same.
    assert client.responses.cancel(r.id).status == "cancelled"

    # A response that did not run in the background cannot be cancelled,
    # nor its stream read again.
    plain = client.responses.create(input="Hi.", max_output_tokens=2, **LONG)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(plain.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.retrieve(plain.id, stream=True)

    # Another tenant finds none of it; a reader may not cancel.
    other = server.admin("POST", "/admin/v1/tenants", {"name": "background-b"}, expect=201).json()
    b = server.client(server.new_key(other["id"], "member"))
    for call in [lambda: b.responses.retrieve(r.id), lambda: b.responses.cancel(r.id),
                 lambda: list(b.responses.retrieve(r.id, stream=True))]:
        with pytest.raises(openai.NotFoundError):
            call()
    reader = server.client(server.new_key(server.tenant["id"], "reader"))
    with pytest.raises(openai.PermissionDeniedError):
        reader.responses.cancel(r.id)


@pytest.mark.parametrize("query,param", [
    ("stream=maybe", "stream"),
    ("stream=true&starting_after=-1", "starting_after"),
    ("stream=true&starting_after=x", "starting_after"),
])
def test_bad_stream_queries_get_openai_shaped_errors(server, client, query, param):
    r = client.responses.create(input="Hi.", background=True, max_output_tokens=2, **LONG)
    got = httpx.get(f"{server.base}/v1/responses/{r.id}?{query}", headers=server.headers, timeout=30)
    assert got.status_code == 400, got.text
    assert got.json()["error"]["param"] == param


def test_a_background_response_is_stored(server):
    r = httpx.post(f"{server.base}/v1/responses", headers=server.headers, timeout=30,
                   json={"model": MODEL_ID, "input": "Hi.", "background": True, "store": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "store", r.text


def test_a_tenant_holds_at_most_its_share_of_resumed_streams_open():
    """A resumed stream reads the database every 50 ms while its response
    runs: one tenant holds at most `gateway.max_resumed_streams_per_tenant`
    (2 here) open on a gateway. The next gets an OpenAI-shaped 429 with
    Retry-After; another tenant is not held back; a closed stream gives
    its place back."""
    s = Server(replicas=1, config="[gateway]\nmax_resumed_streams_per_tenant = 2\n", tenant="followers")
    try:
        c = s.client()
        r = c.responses.create(input="Write a very long story about the sea.", background=True,
                               max_output_tokens=4000, **LONG)
        url = f"{s.base}/v1/responses/{r.id}?stream=true"
        with httpx.Client(timeout=60) as h:
            held = [h.stream("GET", url, headers=s.headers) for _ in range(2)]
            streams = [x.__enter__() for x in held]
            assert [x.status_code for x in streams] == [200, 200]
            with h.stream("GET", url, headers=s.headers) as third:
                assert third.status_code == 429
                third.read()
                assert third.headers["retry-after"] == "1"
                assert third.json()["error"]["code"] == "rate_limit_exceeded", third.text
            # Another tenant follows its own at once.
            other = s.admin("POST", "/admin/v1/tenants", {"name": "followers-b"}, expect=201).json()
            b_key = s.new_key(other["id"], "member")
            b = s.client(b_key)
            rb = b.responses.create(input="Hi.", background=True, max_output_tokens=4, **LONG)
            with h.stream("GET", f"{s.base}/v1/responses/{rb.id}?stream=true",
                          headers={"Authorization": f"Bearer {b_key}"}) as theirs:
                assert theirs.status_code == 200
            # One closed: a place again, once the gateway has seen the
            # connection go (its next write to it, within a poll or two).
            held[0].__exit__(None, None, None)
            deadline = time.time() + 5
            while True:
                with h.stream("GET", url, headers=s.headers) as again:
                    if again.status_code == 200 or time.time() > deadline:
                        break
                    again.read()
                time.sleep(0.05)
            assert again.status_code == 200
            held[1].__exit__(None, None, None)
        c.responses.cancel(r.id)
    finally:
        s.stop()


def test_a_response_whose_gateway_died_before_its_ledger_row_is_metered_once():
    """What a gateway leaves when it dies between a background response's
    last event and its ledger row: no usage row, and the response's row
    still as it was while it ran (marked running, with what it takes to
    run it). Here that row is copied while the response runs and put back
    once it has ended, the usage row deleted. A gateway takes it over,
    finds its last event kept, and writes the ledger row from the usage
    that event holds, under the response's id; put back again with the
    row still there (a backup restored), it is not metered twice."""
    s = Server(replicas=1, tenant="late-meter")
    try:
        c = s.client()
        r = c.responses.create(input="Write a short story about the sea.", background=True,
                               max_output_tokens=64, **LONG)
        db = sqlite3.connect(os.path.join(s.dir, "strata.db"), timeout=30)
        running = db.execute("SELECT sealed, background FROM responses WHERE id = ?", (r.id,)).fetchone()
        assert running[1] == "running", running
        done = poll(c, r.id)
        metered = lambda: db.execute(  # noqa: E731
            "SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage WHERE request_id = ?",
            (r.id,)).fetchone()
        assert metered() == (1, done.usage.input_tokens, done.usage.output_tokens)

        def left_running(drop_row):
            with db:
                if drop_row:
                    db.execute("DELETE FROM usage WHERE request_id = ?", (r.id,))
                db.execute("UPDATE responses SET sealed = ?, background = 'running' WHERE id = ?",
                           (running[0], r.id))
            wait_for("the response taken over and ended", lambda: db.execute(
                "SELECT background IS NULL FROM responses WHERE id = ?", (r.id,)).fetchone()[0] == 1, 30)

        left_running(drop_row=True)
        assert metered() == (1, done.usage.input_tokens, done.usage.output_tokens)
        left_running(drop_row=False)
        assert metered() == (1, done.usage.input_tokens, done.usage.output_tokens)
        # Ended as its last event says, not run again.
        assert c.responses.retrieve(r.id).output_text == done.output_text
    finally:
        s.stop()
