"""The Responses and Conversations APIs through the official openai SDK
against the real `strata serve` (two replicas, the real model), once on
SQLite and once on PostgreSQL: multi-turn state on the server, streaming
events, retrieval, deletion, pagination, tenant scoping and bad input."""
import glob
import os
import subprocess

import httpx
import openai
import pytest

from conftest import MODEL_ID, Server, postgres_url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request):
    if request.param == "sqlite":
        yield request.getfixturevalue("server")
        return
    s = Server(db=postgres_url("responses"), tenant="e2e-pg")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()

GREEDY = {"model": MODEL_ID, "temperature": 0, "max_output_tokens": 12}


def text_of(response):
    return response.output_text


def test_previous_response_id_carries_the_conversation(client):
    system = "You are a terse assistant for a cloud platform. " * 4
    r1 = client.responses.create(input="My name is Ada.", instructions=system, **GREEDY)
    assert r1.status in ("completed", "incomplete") and r1.id.startswith("resp_")
    r2 = client.responses.create(input="What is my name?", previous_response_id=r1.id, instructions=system, **GREEDY)
    assert r2.previous_response_id == r1.id
    # The server rebuilt the whole conversation: the very prompt of a chat
    # completion given every message explicitly. (Not compared: the greedy
    # text, which a prefix-cache hit may change in a near tie, as llama.cpp's
    # kernels are not batch-invariant.)
    chat = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=1, messages=[
        {"role": "system", "content": system},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": text_of(r1)},
        {"role": "user", "content": "What is my name?"},
    ])
    assert r2.usage.input_tokens == chat.usage.prompt_tokens
    # The turn went to the replica holding the first turn's KV cache: the
    # first turn's whole prompt came from the cache.
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens - 1, (r1.usage, r2.usage)
    # input_items lists only the turn's own input.
    items = client.responses.input_items.list(r2.id)
    assert [i.content[0].text for i in items.data] == ["What is my name?"]
    again = client.responses.retrieve(r2.id)
    assert text_of(again) == text_of(r2) and again.usage.output_tokens == r2.usage.output_tokens


def test_streaming_emits_the_standard_events_and_stores_the_whole_response(client):
    stream = client.responses.create(input="Count to five.", stream=True, **GREEDY)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas and kinds.count("response.output_text.delta") == len(deltas)
    tail = [k for k in kinds if k != "response.output_text.delta"][4:]
    assert tail[:3] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert tail[3] in ("response.completed", "response.incomplete") and len(tail) == 4
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert text_of(final) == "".join(deltas)
    # Stored before the last event, so it is readable at once.
    assert text_of(client.responses.retrieve(final.id)) == "".join(deltas)
    assert final.usage.output_tokens == 12 and final.status == "incomplete"
    assert final.incomplete_details.reason == "max_output_tokens"


def test_a_streamed_turn_continues_a_chain(client):
    r1 = client.responses.create(input="Remember the number 42.", **GREEDY)
    events = list(client.responses.create(input="Which number?", previous_response_id=r1.id, stream=True, **GREEDY))
    r2 = events[-1].response
    assert r2.previous_response_id == r1.id
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens - 1
    whole = client.responses.create(input="Which number?", previous_response_id=r1.id, **GREEDY)
    assert whole.usage.input_tokens == r2.usage.input_tokens


def test_conversations_collect_every_turn(client):
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "We are planning a GPU budget."}],
        metadata={"project": "budget"})
    assert conv.id.startswith("conv_") and conv.metadata == {"project": "budget"}
    r1 = client.responses.create(input="How many GPUs do we have?", conversation=conv.id, **GREEDY)
    assert r1.conversation.id == conv.id
    r2 = client.responses.create(input=[{"role": "user", "content": [{"type": "input_text", "text": "And spot ones?"}]}],
                                 conversation={"id": conv.id}, stream=True, **GREEDY)
    r2 = list(r2)[-1].response
    items = client.conversations.items.list(conv.id, order="asc")
    assert [(i.role, i.content[0].text) for i in items.data] == [
        ("user", "We are planning a GPU budget."),
        ("user", "How many GPUs do we have?"),
        ("assistant", text_of(r1)),
        ("user", "And spot ones?"),
        ("assistant", text_of(r2)),
    ]
    # The second turn read the first: the prompt of the explicit chat.
    chat = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=1, messages=[
        {"role": "user", "content": "We are planning a GPU budget."},
        {"role": "user", "content": "How many GPUs do we have?"},
        {"role": "assistant", "content": text_of(r1)},
        {"role": "user", "content": "And spot ones?"},
    ])
    assert r2.usage.input_tokens == chat.usage.prompt_tokens

    # Pagination both ways, newest first by default.
    ids = [i.id for i in items.data]
    page = client.conversations.items.list(conv.id, limit=2)
    assert [i.id for i in page.data] == ids[::-1][:2] and page.has_more
    page = client.conversations.items.list(conv.id, limit=2, after=page.data[-1].id)
    assert [i.id for i in page.data] == ids[::-1][2:4]
    assert [i.id for i in client.conversations.items.list(conv.id, order="asc", after=ids[3]).data] == ids[4:]

    added = client.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "Noted."}])
    assert added.data[0].content[0].text == "Noted."
    got = client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert got.id == added.data[0].id
    client.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)

    updated = client.conversations.update(conv.id, metadata={"project": "budget", "q": "4"})
    assert client.conversations.retrieve(conv.id).metadata == updated.metadata == {"project": "budget", "q": "4"}
    deleted = client.conversations.delete(conv.id)
    assert deleted.deleted and deleted.id == conv.id
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="Still there?", conversation=conv.id, **GREEDY)
    # Responses outlive their conversation.
    assert client.responses.retrieve(r1.id).id == r1.id


def test_deleted_and_unstored_responses_are_gone(client):
    r = client.responses.create(input=[{"role": "user", "content": t} for t in "abc"], **GREEDY)
    page = client.responses.input_items.list(r.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["a", "b"] and page.has_more
    page = client.responses.input_items.list(r.id, after=page.data[-1].id, order="asc")
    assert [i.content[0].text for i in page.data] == ["c"] and not page.has_more
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="next", previous_response_id=r.id, **GREEDY)
    unstored = client.responses.create(input="Do not keep this.", store=False, **GREEDY)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_another_tenant_sees_none_of_it(server, client):
    r = client.responses.create(input="CANARY-responses-5521 is my secret.", **GREEDY)
    conv = client.conversations.create(items=[{"role": "user", "content": "CANARY-responses-5521"}])
    other = server.admin("POST", "/admin/v1/tenants", {"name": "responses-b"}, expect=201).json()
    b = server.client(server.new_key(other["id"], "member"))
    for call in [
        lambda: b.responses.retrieve(r.id),
        lambda: b.responses.delete(r.id),
        lambda: b.responses.input_items.list(r.id),
        lambda: b.responses.create(input="x", previous_response_id=r.id, **GREEDY),
        lambda: b.conversations.retrieve(conv.id),
        lambda: b.conversations.update(conv.id, metadata={"a": "b"}),
        lambda: b.conversations.items.list(conv.id),
        lambda: b.conversations.items.create(conv.id, items=[{"role": "user", "content": "x"}]),
        lambda: b.conversations.delete(conv.id),
        lambda: b.responses.create(input="x", conversation=conv.id, **GREEDY),
    ]:
        with pytest.raises(openai.NotFoundError):
            call()
    assert client.responses.retrieve(r.id).id == r.id
    assert client.conversations.retrieve(conv.id).id == conv.id
    # A reader may read but not write.
    reader = server.client(server.new_key(server.tenant["id"], "reader"))
    assert reader.responses.retrieve(r.id).id == r.id
    with pytest.raises(openai.PermissionDeniedError):
        reader.responses.delete(r.id)
    with pytest.raises(openai.PermissionDeniedError):
        reader.conversations.create()
    with pytest.raises(openai.PermissionDeniedError):
        reader.responses.create(input="x", **GREEDY)
    # Stored content is sealed: the canary is nowhere in the database.
    if server.db:
        schema = server.db.split("search_path%3D")[1]
        dump = subprocess.run(["pg_dump", "--data-only", "-n", schema, os.environ["DATABASE_URL"]],
                              check=True, capture_output=True).stdout
        assert b"msg_" in dump and b"CANARY-responses-5521" not in dump
    else:
        files = glob.glob(os.path.join(server.dir, "strata.db*"))
        assert files
        for path in files:
            with open(path, "rb") as f:
                assert b"CANARY-responses-5521" not in f.read()


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL_ID}, "input"),
    ({"model": MODEL_ID, "input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"model": MODEL_ID, "input": [{"type": "function_call", "name": "f"}]}, "input[0].type"),
    ({"model": MODEL_ID, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"model": MODEL_ID, "input": "x", "max_output_tokens": -1}, "max_output_tokens"),
    ({"model": MODEL_ID, "input": "x", "temperature": 9}, "temperature"),
    ({"model": MODEL_ID, "input": "x", "previous_response_id": "resp_x", "conversation": "conv_x"}, "previous_response_id"),
    ({"model": MODEL_ID, "input": "x", "previous_response_id": "resp_missing"}, "previous_response_id"),
    ({"model": MODEL_ID, "input": "x", "conversation": "conv_missing"}, "conversation"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, param):
    r = httpx.post(f"{server.base}/v1/responses", json=body, headers=server.headers, timeout=30)
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]


def test_bad_conversation_requests(server):
    h = server.headers
    r = httpx.post(f"{server.base}/v1/conversations", json={"items": [{"role": "robot", "content": "x"}]}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "items[0].role"
    r = httpx.post(f"{server.base}/v1/conversations", json={"metadata": {"k" * 65: "v"}}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
    r = httpx.post(f"{server.base}/v1/conversations", json={"items": [{"role": "user", "content": "x"}] * 21}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "items"
    r = httpx.post(f"{server.base}/v1/conversations", json={"colour": "red"}, headers=h)
    assert r.status_code == 400
    conv = httpx.post(f"{server.base}/v1/conversations", json={}, headers=h).json()
    r = httpx.get(f"{server.base}/v1/conversations/{conv['id']}/items?limit=0", headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    r = httpx.get(f"{server.base}/v1/conversations/{conv['id']}/items?order=sideways", headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "order"
    r = httpx.post(f"{server.base}/v1/conversations/{conv['id']}", json={}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
