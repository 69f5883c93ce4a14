"""Multi-tenant privacy end to end: keys and roles on every route, cross-tenant
probes, sealed storage, limits, budgets, fair share and the audit trail,
against a real `strata serve` (one replica, the real model, SQLite)."""
import concurrent.futures as cf
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import time

import httpx
import openai
import pytest

from conftest import MODEL_ID, STRATA, Server, bearer, free_port, new_key

# $0.01 per prompt token and $0.02 per completion token: budgets run out fast.
PROMPT_PRICE, COMPLETION_PRICE = 0.01, 0.02
CONFIG = f"""audit_checkpoint_file = "audit-checkpoints.jsonl"
audit_checkpoint_secs = 0.2
[gateway]
slots_per_replica = 1
max_waiting_per_tenant = 8

[pricing."{MODEL_ID}"]
prompt_per_million = {PROMPT_PRICE * 1e6}
completion_per_million = {COMPLETION_PRICE * 1e6}
"""
CANARY = "CANARY-5d1f-tenant-secret-zebra"


@pytest.fixture(scope="module")
def mt():
    s = Server(replicas=1, config=CONFIG, tenant="acme")
    s.a = s.tenant["id"]
    s.b = s.admin("POST", "/admin/v1/tenants", {"name": "globex"}, expect=201).json()["id"]
    s.keys = {
        "platform": s.admin_key,
        "a_admin": s.new_key(s.a, "admin"),
        "a_member": s.key,
        "a_reader": s.new_key(s.a, "reader"),
        "b_admin": s.new_key(s.b, "admin"),
    }
    s.keys["b_member"] = s.new_key(s.b, "member")
    yield s
    if s.proc.poll() is None:
        s.stop()


def chat_body(content="Hi", max_tokens=1, **extra):
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def call(s, method, path, key=None, body=None, content=None, headers=None):
    h = dict(headers or {})
    if key is not None:
        h.update(bearer(key))
    return httpx.request(method, f"{s.base}{path}", json=body, content=content, headers=h, timeout=120)


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def test_every_bad_key_gets_the_same_401(mt):
    revoked = mt.new_key(mt.a, "member")
    key_id = [k for k in mt.admin("GET", f"/admin/v1/tenants/{mt.a}/keys").json()["data"]][-1]["id"]
    mt.admin("DELETE", f"/admin/v1/tenants/{mt.a}/keys/{key_id}", expect=200)
    expiring = mt.new_key(mt.a, "member", expires_at=int(time.time()) + 2)
    assert call(mt, "GET", "/v1/models", expiring).status_code == 200
    time.sleep(2.5)
    variants = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Basic {mt.key}"},
        bearer(new_key()),  # well-formed, unknown
        bearer(revoked),
        bearer(expiring),
        bearer(mt.key[:-1] + ("A" if mt.key[-1] != "A" else "B")),  # one character off
    ]
    bodies = set()
    for headers in variants:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                             ("GET", "/admin/v1/tenants"), ("GET", f"/v1/chat/completions/x")]:
            r = call(mt, method, path, headers=headers, body=chat_body())
            err = assert_openai_error(r, 401)
            assert err["code"] == "invalid_api_key"
            bodies.add(r.text)
    assert len(bodies) == 1, "the 401 must not say which kind of key was wrong"
    with pytest.raises(openai.AuthenticationError):
        mt.client(key=revoked).chat.completions.create(**chat_body())


def test_every_role_on_every_route(mt):
    a, b = mt.a, mt.b
    gen = chat_body()
    P, AA, AM, AR, BA = "platform", "a_admin", "a_member", "a_reader", "b_admin"
    matrix = [
        ("POST", "/admin/v1/tenants", lambda: {"name": f"t-{time.time_ns()}"},
         {P: 201, AA: 403, AM: 403, AR: 403, BA: 403}),
        ("GET", "/admin/v1/tenants", None, {P: 200, AA: 200, AM: 403, AR: 200, BA: 200}),
        ("GET", f"/admin/v1/tenants/{a}", None, {P: 200, AA: 200, AM: 403, AR: 200, BA: 404}),
        ("PATCH", f"/admin/v1/tenants/{a}", lambda: {"tokens_per_minute": None},
         {P: 200, AA: 403, AM: 403, AR: 403, BA: 404}),
        ("POST", f"/admin/v1/tenants/{a}/keys", lambda: {"name": "m", "role": "member"},
         {P: 201, AA: 201, AM: 403, AR: 403, BA: 404}),
        ("GET", f"/admin/v1/tenants/{a}/keys", None, {P: 200, AA: 200, AM: 403, AR: 200, BA: 404}),
        ("GET", f"/admin/v1/tenants/{a}/usage", None, {P: 200, AA: 200, AM: 403, AR: 200, BA: 404}),
        ("DELETE", f"/admin/v1/tenants/{a}/keys/key_nope", None, {P: 404, AA: 404, AM: 403, AR: 403, BA: 404}),
        ("DELETE", f"/admin/v1/tenants/{b}", None, {AA: 404, AM: 404, AR: 404, BA: 403}),
        ("GET", "/admin/v1/usage", None, {P: 200, AA: 403, AM: 403, AR: 403, BA: 403}),
        ("GET", "/admin/v1/audit", None, {P: 200, AA: 200, AM: 403, AR: 403, BA: 200}),
        ("POST", "/admin/v1/kek/rotate", None, {P: 200, AA: 403, AM: 403, AR: 403, BA: 403}),
        ("POST", "/v1/chat/completions", lambda: gen, {P: 200, AA: 200, AM: 200, AR: 403, BA: 200}),
        ("GET", "/v1/chat/completions", None, {P: 200, AA: 200, AM: 200, AR: 200, BA: 200}),
        ("GET", "/v1/models", None, {P: 200, AA: 200, AM: 200, AR: 200, BA: 200}),
    ]
    failures = []
    for method, path, body, expected in matrix:
        for role, status in expected.items():
            r = call(mt, method, path, mt.keys[role], body=body() if body else None)
            if r.status_code != status:
                failures.append(f"{role} {method} {path}: {r.status_code} != {status}: {r.text[:200]}")
            if status >= 400:
                assert_openai_error(r, status)
    assert not failures, "\n".join(failures)
    # Listings show only what the caller may see.
    seen = {t["id"] for t in call(mt, "GET", "/admin/v1/tenants", mt.keys[AA]).json()["data"]}
    assert seen == {a}
    everyone = {t["id"] for t in call(mt, "GET", "/admin/v1/tenants", mt.keys[P]).json()["data"]}
    assert {a, b, "ten_platform"} <= everyone


def test_a_stored_completions_messages_come_in_pages(mt):
    c = mt.client(mt.keys["a_member"])
    done = c.chat.completions.create(model=MODEL_ID, max_tokens=2, store=True, messages=[
        {"role": "system", "content": "one"}, {"role": "user", "content": "two"},
        {"role": "assistant", "content": "three"}, {"role": "user", "content": "four"}])
    every = c.chat.completions.messages.list(done.id)
    assert [m.content for m in every.data] == ["one", "two", "three", "four"]  # oldest first
    first = c.chat.completions.messages.list(done.id, limit=2)
    assert [m.content for m in first.data] == ["one", "two"] and first.has_more
    rest = c.chat.completions.messages.list(done.id, limit=2, after=first.data[-1].id)
    assert [m.content for m in rest.data] == ["three", "four"] and not rest.has_more
    newest = c.chat.completions.messages.list(done.id, order="desc", limit=1)
    assert [m.content for m in newest.data] == ["four"]
    for bad in ({"order": "sideways"}, {"limit": 0}):
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.messages.list(done.id, **bad)


def test_another_tenants_objects_are_404_like_missing_ones(mt):
    a_client, b_client = mt.client(mt.keys["a_member"]), mt.client(mt.keys["b_member"])
    done = a_client.chat.completions.create(**chat_body(f"Keep this: {CANARY}", 4), store=True,
                                            metadata={"case": "probe"})
    got = a_client.chat.completions.retrieve(done.id)
    assert got.id == done.id and got.choices[0].message.content == done.choices[0].message.content
    assert got.metadata == {"case": "probe"}
    msgs = a_client.chat.completions.messages.list(done.id)
    assert CANARY in msgs.data[0].content
    assert done.id in [c.id for c in a_client.chat.completions.list()]
    updated = a_client.chat.completions.update(done.id, metadata={"case": "probe", "round": "2"})
    assert updated.metadata == {"case": "probe", "round": "2"}
    assert a_client.chat.completions.retrieve(done.id).metadata == {"case": "probe", "round": "2"}
    with pytest.raises(openai.BadRequestError):
        a_client.chat.completions.update(done.id, metadata={f"k{i}": "v" for i in range(17)})
    huge = call(mt, "POST", f"/v1/chat/completions/{done.id}", mt.keys["a_member"],
                content=b'{"metadata": {"k": "' + b"v" * (1 << 20) + b'"}}', headers={"content-type": "application/json"})
    assert_openai_error(huge, 413)
    # Tenant B: every object route answers as for an id that does not exist.
    for path, method in [(f"/v1/chat/completions/{{}}", "GET"), (f"/v1/chat/completions/{{}}/messages", "GET"),
                         (f"/v1/chat/completions/{{}}", "POST"), (f"/v1/chat/completions/{{}}", "DELETE")]:
        body = {"metadata": {"x": "y"}} if method == "POST" else None
        theirs = call(mt, method, path.format(done.id), mt.keys["b_member"], body=body)
        missing = call(mt, method, path.format("chatcmpl-nope"), mt.keys["b_member"], body=body)
        assert_openai_error(theirs, 404)
        assert theirs.json()["error"]["message"].replace(done.id, "X") == \
            missing.json()["error"]["message"].replace("chatcmpl-nope", "X")
    assert done.id not in [c.id for c in b_client.chat.completions.list()]
    with pytest.raises(openai.NotFoundError):
        b_client.chat.completions.retrieve(done.id)
    # Keys: B's admin cannot see A's key ids through either tenant's path.
    a_key = call(mt, "GET", f"/admin/v1/tenants/{mt.a}/keys", mt.keys["a_admin"]).json()["data"][0]["id"]
    assert call(mt, "GET", f"/admin/v1/tenants/{mt.b}/keys/{a_key}", mt.keys["b_admin"]).status_code == 404
    assert call(mt, "GET", f"/admin/v1/tenants/{mt.a}/keys/{a_key}", mt.keys["b_admin"]).status_code == 404
    assert a_key not in json.dumps(call(mt, "GET", f"/admin/v1/tenants/{mt.b}/keys", mt.keys["b_admin"]).json())
    # A reader may read but not delete; a member deletes; then it is gone.
    assert call(mt, "GET", f"/v1/chat/completions/{done.id}", mt.keys["a_reader"]).status_code == 200
    assert_openai_error(call(mt, "DELETE", f"/v1/chat/completions/{done.id}", mt.keys["a_reader"]), 403)
    assert_openai_error(call(mt, "POST", f"/v1/chat/completions/{done.id}", mt.keys["a_reader"],
                             body={"metadata": {}}), 403)
    assert a_client.chat.completions.retrieve(done.id).metadata == {"case": "probe", "round": "2"}
    assert a_client.chat.completions.delete(done.id).deleted
    with pytest.raises(openai.NotFoundError):
        a_client.chat.completions.retrieve(done.id)


def files_containing(directory, needle):
    hits = []
    for root, _, names in os.walk(directory):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                if needle.encode() in f.read():
                    hits.append(n)
    return hits


def sqlite_copy(src, dst):
    with sqlite3.connect(src) as s, sqlite3.connect(dst) as d:
        s.backup(d)


def test_canary_is_never_on_disk_or_in_logs_and_shredding_is_final(mt):
    t = mt.admin("POST", "/admin/v1/tenants", {"name": "shredme"}, expect=201).json()["id"]
    client = mt.client(mt.new_key(t, "member"))
    whole = client.chat.completions.create(**chat_body(f"My secret is {CANARY}", 4), store=True)
    streamed = list(client.chat.completions.create(**chat_body(f"Again {CANARY}", 4), store=True, stream=True))
    # Stored before `[DONE]` reached the client: readable at once.
    kept = client.chat.completions.retrieve(streamed[0].id)
    assert kept.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert CANARY in client.chat.completions.messages.list(whole.id).data[0].content
    # The KEK rotates under the stored content without touching it.
    rotated = mt.admin("POST", "/admin/v1/kek/rotate", expect=200).json()
    assert rotated["id"] != rotated["previous_id"]
    assert CANARY in client.chat.completions.messages.list(whole.id).data[0].content
    assert files_containing(mt.dir, CANARY) == [], "canary found in plaintext (db, wal, keyring or logs)"
    # A backup taken now, then the tenant is deleted.
    backup = os.path.join(mt.dir, "..", os.path.basename(mt.dir) + "-backup.db")
    sqlite_copy(os.path.join(mt.dir, "strata.db"), backup)
    mt.admin("DELETE", f"/admin/v1/tenants/{t}", expect=200)
    with open(os.path.join(mt.dir, "keyring.json")) as f:
        assert t not in f.read(), "the tenant's data key must be gone"
    with sqlite3.connect(backup) as db:
        rows = db.execute("SELECT sealed FROM stored_completions WHERE tenant_id = ?", (t,)).fetchall()
    assert len(rows) == 2 and all(CANARY.encode() not in r[0] for r in rows), \
        "the backup still holds the rows, sealed, with no key left to open them"
    with sqlite3.connect(os.path.join(mt.dir, "strata.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM stored_completions WHERE tenant_id = ?", (t,)).fetchone()[0] == 0
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    os.remove(backup)


def test_request_and_token_limits(mt):
    key = mt.new_key(mt.a, "member", requests_per_minute=3)
    for _ in range(3):
        assert call(mt, "POST", "/v1/chat/completions", key, body=chat_body()).status_code == 200
    r = call(mt, "POST", "/v1/chat/completions", key, body=chat_body())
    err = assert_openai_error(r, 429)
    assert err["code"] == "rate_limit_exceeded" and "requests per minute" in err["message"]
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 20, retry  # one request per 20 s at 3/min
    with pytest.raises(openai.RateLimitError):
        mt.client(key).chat.completions.create(**chat_body())
    # Another key of the same tenant is not affected by this key's limit.
    assert call(mt, "POST", "/v1/chat/completions", mt.keys["a_member"], body=chat_body()).status_code == 200
    # A request larger than the whole tokens-per-minute allowance never fits.
    small = mt.new_key(mt.a, "member", tokens_per_minute=50)
    err = assert_openai_error(call(mt, "POST", "/v1/chat/completions", small, body=chat_body(max_tokens=100)), 429)
    assert "max_tokens" in err["message"]
    assert call(mt, "POST", "/v1/chat/completions", small, body=chat_body(max_tokens=2)).status_code == 200


def test_model_allow_list(mt):
    key = mt.new_key(mt.a, "member", models=["some-other-model"])
    # A model the key may not use answers as one that does not exist: the
    # key learns nothing of what else is served.
    refused = call(mt, "POST", "/v1/chat/completions", key, body=chat_body())
    err = assert_openai_error(refused, 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    missing = call(mt, "POST", "/v1/chat/completions", mt.keys["a_member"], body=chat_body(model="no-such-model"))
    assert refused.json() == {"error": {**missing.json()["error"], "message": missing.json()["error"]["message"].replace("no-such-model", MODEL_ID)}}
    assert call(mt, "GET", "/v1/models", key).json()["data"] == []
    allowed = mt.new_key(mt.a, "member", models=[MODEL_ID])
    assert [m["id"] for m in call(mt, "GET", "/v1/models", allowed).json()["data"]] == [MODEL_ID]


def usage_of(mt, tenant):
    return mt.admin("GET", f"/admin/v1/tenants/{tenant}/usage", expect=200).json()


def test_budget_is_checked_before_and_settled_after(mt):
    budget = 0.5
    t = mt.admin("POST", "/admin/v1/tenants", {"name": "frugal", "monthly_budget_usd": budget}, expect=201).json()["id"]
    key = mt.new_key(t, "member")
    body = json.dumps(chat_body(max_tokens=4)).encode()
    # The gateway's estimate: a prompt token per 4 bytes of body, plus max_tokens.
    estimate = (len(body) // 4) * PROMPT_PRICE + 4 * COMPLETION_PRICE
    assert estimate <= budget
    spent, served = 0.0, 0
    for _ in range(10):
        expect_ok = spent + estimate <= budget + 1e-9
        r = call(mt, "POST", "/v1/chat/completions", key, content=body, headers={"content-type": "application/json"})
        if not expect_ok:
            err = assert_openai_error(r, 402)
            assert err["code"] == "budget_exhausted" and "budget" in err["message"]
            break
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        spent += u["prompt_tokens"] * PROMPT_PRICE + u["completion_tokens"] * COMPLETION_PRICE
        served += 1
    else:
        pytest.fail("the budget never ran out")
    assert served >= 1
    # The ledger agrees to the cent, and the refused request generated nothing.
    deadline = time.time() + 5
    while (u := usage_of(mt, t))["data"] == [] or u["data"][0]["requests"] < served:
        assert time.time() < deadline
        time.sleep(0.1)
    assert u["data"][0]["requests"] == served
    assert abs(u["month_spend_usd"] - spent) < 1e-9 and abs(u["data"][0]["cost_usd"] - spent) < 1e-9
    # Raising the budget lets the tenant continue at once.
    mt.admin("PATCH", f"/admin/v1/tenants/{t}", {"monthly_budget_usd": 100.0}, expect=200)
    r = call(mt, "POST", "/v1/chat/completions", key, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def timed_chat(mt, key, max_tokens):
    """Status, start and end (monotonic seconds) of one chat request."""
    t0 = time.monotonic()
    r = call(mt, "POST", "/v1/chat/completions", key, body=chat_body("Tell me a story", max_tokens))
    return r.status_code, t0, time.monotonic()


def test_a_flooding_tenant_does_not_delay_another_without_bound(mt):
    """With one slot, FIFO would put each calm request behind the whole flood;
    least-service-first lets it pass all but the running request and at most
    one more. Asserted on the order of completions, not on timings."""
    flood = mt.new_key(mt.admin("POST", "/admin/v1/tenants", {"name": "flood"}, expect=201).json()["id"], "member")
    calm = mt.new_key(mt.admin("POST", "/admin/v1/tenants", {"name": "calm"}, expect=201).json()["id"], "member")
    assert timed_chat(mt, calm, 16)[0] == 200
    with cf.ThreadPoolExecutor(8) as pool:
        # Long enough that a calm request is queued before the running one ends.
        floods = [pool.submit(timed_chat, mt, flood, 48) for _ in range(8)]
        time.sleep(0.5)  # the flood holds the one slot and fills its queue
        calm_runs = [timed_chat(mt, calm, 16) for _ in range(3)]
        flood_runs = [f.result() for f in floods]
    assert all(r[0] == 200 for r in flood_runs + calm_runs)
    flood_done = sorted(end for _, _, end in flood_runs)
    passed_by = [sum(start < d < end for d in flood_done) for _, start, end in calm_runs]
    still_waiting = sum(d > calm_runs[0][2] for d in flood_done)
    print(f"flood requests finishing during each calm request: {passed_by}; after the first: {still_waiting}")
    assert all(n <= 2 for n in passed_by), passed_by
    assert still_waiting >= 3, "the first calm request went ahead of a queued flood"


def test_a_tenants_queue_is_bounded(mt):
    key = mt.new_key(mt.admin("POST", "/admin/v1/tenants", {"name": "burst"}, expect=201).json()["id"], "member")
    with cf.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: call(mt, "POST", "/v1/chat/completions", key, body=chat_body(max_tokens=8)),
                                range(20)))
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 9, statuses
    over = next(r for r in results if r.status_code == 429)
    assert over.json()["error"]["code"] == "server_overloaded" and "retry-after" in over.headers


def test_sheddable_tenants_and_keys_are_refused_first_under_overload(mt):
    """A tenant (set with the CLI) or a key (with the admin API) marked
    sheddable is served while a slot is free; once the one slot is busy
    and interactive requests wait, its requests get a 503 with Retry-After
    at once instead of waiting, while every interactive request is served."""
    env = {**os.environ, "STRATA_URL": mt.base, "STRATA_API_KEY": mt.admin_key}
    out = subprocess.run([STRATA, "tenant", "create", "shed-co", "--priority", "sheddable", "--json"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    tenant = json.loads(out.stdout)
    assert tenant["priority"] == "sheddable"
    by_tenant = mt.new_key(tenant["id"], "member")
    by_key = mt.new_key(mt.b, "member", priority="sheddable")
    keys = mt.admin("GET", f"/admin/v1/tenants/{mt.b}/keys", expect=200).json()["data"]
    assert sorted(k["priority"] for k in keys).count("sheddable") == 1
    flood = mt.keys["b_member"]
    for key in (by_tenant, by_key):
        assert call(mt, "POST", "/v1/chat/completions", key, body=chat_body(max_tokens=2)).status_code == 200
    with cf.ThreadPoolExecutor(4) as pool:
        interactive = [pool.submit(call, mt, "POST", "/v1/chat/completions", flood, body=chat_body(max_tokens=48))
                       for _ in range(3)]
        time.sleep(0.5)  # one holds the slot, two wait
        shed = [call(mt, "POST", "/v1/chat/completions", key, body=chat_body(max_tokens=2))
                for key in (by_tenant, by_key)]
        served = [f.result().status_code for f in interactive]
    assert served == [200, 200, 200], served
    for r in shed:
        err = assert_openai_error(r, 503)
        assert err["code"] == "sheddable_refused" and r.headers["retry-after"] == "2", (err, r.headers)
    # The load gone, sheddable requests are served again.
    assert call(mt, "POST", "/v1/chat/completions", by_key, body=chat_body(max_tokens=2)).status_code == 200
    # Back to interactive: it waits like the others.
    mt.admin("PATCH", f"/admin/v1/tenants/{tenant['id']}", {"priority": "interactive"}, expect=200)
    with cf.ThreadPoolExecutor(4) as pool:
        interactive = [pool.submit(call, mt, "POST", "/v1/chat/completions", flood, body=chat_body(max_tokens=48))
                       for _ in range(2)]
        time.sleep(0.5)
        waited = call(mt, "POST", "/v1/chat/completions", by_tenant, body=chat_body(max_tokens=2))
        assert [f.result().status_code for f in interactive] == [200, 200]
    assert waited.status_code == 200, waited.text


ADMIN_BAD = [
    ("POST", "/admin/v1/tenants", b"{", 400, None),
    ("POST", "/admin/v1/tenants", b"{}", 400, None),
    ("POST", "/admin/v1/tenants", b'{"name": 5}', 400, "name"),
    ("POST", "/admin/v1/tenants", json.dumps({"name": "x" * 65}).encode(), 400, "name"),
    ("POST", "/admin/v1/tenants", b'{"name": "ok", "bogus": 1}', 400, None),
    ("POST", "/admin/v1/tenants", b'{"name": "ok", "requests_per_minute": -1}', 400, "requests_per_minute"),
    ("POST", "/admin/v1/tenants", b'{"name": "ok", "requests_per_minute": 0}', 400, "requests_per_minute"),
    ("POST", "/admin/v1/tenants", b'{"name": "ok", "monthly_budget_usd": "lots"}', 400, "monthly_budget_usd"),
    ("POST", "/admin/v1/tenants", b'{"name": "ok", "monthly_budget_usd": -3}', 400, "monthly_budget_usd"),
    ("POST", "/admin/v1/tenants", b'{"name": "ok", "isolation": "private"}', 400, "isolation"),
    ("POST", "/admin/v1/tenants", b'{"name": "ok", "priority": "urgent"}', 400, "priority"),
    ("POST", "/admin/v1/tenants/{a}/keys", b'{"name": "k", "role": "member", "priority": "urgent"}', 400, "priority"),
    ("POST", "/admin/v1/tenants/{a}/keys", b'{"name": "k", "role": "member", "priority": 1}', 400, "priority"),
    ("POST", "/admin/v1/tenants", b'{"name": "ok", "isolation": 2}', 400, "isolation"),
    ("POST", "/admin/v1/tenants", b'{"name": "acme"}', 409, None),
    ("GET", "/admin/v1/tenants/ten_nope", b"", 404, None),
    ("PATCH", "/admin/v1/tenants/ten_nope", b"{}", 404, None),
    ("DELETE", "/admin/v1/tenants/ten_platform", b"", 403, None),
    ("POST", "/admin/v1/tenants/ten_nope/keys", b'{"name": "k", "role": "member"}', 404, None),
    ("POST", "/admin/v1/tenants/{a}/keys", b'{"name": "k", "role": "god"}', 400, "role"),
    ("POST", "/admin/v1/tenants/{a}/keys", b'{"role": "member"}', 400, None),
    ("POST", "/admin/v1/tenants/{a}/keys", b'{"name": "k", "role": "member", "expires_at": 5}', 400, "expires_at"),
    ("POST", "/admin/v1/tenants/{a}/keys", b'{"name": "k", "role": "member", "models": []}', 400, "models"),
    ("POST", "/admin/v1/tenants/{a}/keys", b'{"name": "k", "role": "member", "models": "all"}', 400, "models"),
    ("DELETE", "/admin/v1/tenants/{a}/keys/key_nope", b"", 404, None),
    ("PUT", "/admin/v1/tenants", b"{}", 405, None),
    ("GET", "/v1/chat/completions?limit=0", b"", 400, "limit"),
    ("GET", "/v1/chat/completions?limit=abc", b"", 400, "limit"),
]


@pytest.mark.parametrize("method,path,body,status,param", ADMIN_BAD)
def test_bad_admin_input_is_a_clear_4xx(mt, method, path, body, status, param):
    r = call(mt, method, path.format(a=mt.a), mt.admin_key, content=body,
             headers={"content-type": "application/json"})
    err = assert_openai_error(r, status)
    if param:
        assert err["param"] == param, err


def test_huge_admin_body_is_413(mt):
    r = call(mt, "POST", "/admin/v1/tenants", mt.admin_key, content=b'{"name": "' + b"x" * (5 << 20) + b'"}')
    assert_openai_error(r, 413)


def audit_rows(s, key):
    """Every audit row `key` may see, a page at a time."""
    rows, after = [], 0
    while True:
        page = call(s, "GET", f"/admin/v1/audit?after={after}&limit=50", key)
        assert page.status_code == 200, page.text
        rows += page.json()["data"]
        if not page.json()["has_more"]:
            return rows
        after = page.json()["last_id"]


def test_audit_trail_records_and_verifies(mt):
    rows = audit_rows(mt, mt.admin_key)
    actions = {(r["action"], r["result"]) for r in rows}
    for expected in [("tenant.create", "ok"), ("key.create", "ok"), ("key.revoke", "ok"), ("tenant.delete", "ok"),
                     ("completion.create", "ok"), ("completion.read", "ok"), ("completion.read", "not_found"),
                     ("completion.delete", "ok"), ("tenant.create", "denied"),
                     ("kek.rotate", "ok")]:
        assert expected in actions, expected
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(CANARY not in json.dumps(r) for r in rows)
    b_rows = audit_rows(mt, mt.keys["b_admin"])
    assert b_rows and all(mt.b in (r["tenant"], r["actor_tenant"]) for r in b_rows)
    db = os.path.join(mt.dir, "strata.db")
    checkpoints = os.path.join(mt.dir, "audit-checkpoints.jsonl")
    ok = subprocess.run([STRATA, "audit", "verify", "--db", db], capture_output=True, text=True)
    assert ok.returncode == 0 and "audit log ok" in ok.stdout, ok.stderr
    as_json = subprocess.run([STRATA, "audit", "verify", "--db", db, "--json"], capture_output=True, text=True)
    verdict = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and verdict["ok"] and verdict["rows"] >= len(rows) and verdict["broken_at"] is None
    # The gateway has written keyed checkpoints of the head outside the database.
    deadline = time.time() + 5
    while time.time() < deadline and not os.path.exists(checkpoints):
        time.sleep(0.1)
    with_checkpoints = subprocess.run([STRATA, "audit", "verify", "--db", db, "--checkpoints", checkpoints, "--json"],
                                      capture_output=True, text=True)
    verdict = json.loads(with_checkpoints.stdout)
    assert verdict["ok"] and verdict["checkpoints"] >= 1, with_checkpoints.stdout

    def tampered(sql, *args):
        """`strata audit verify` on a copy of the data directory (database,
        KEK, keyring) after an insider ran `sql` on it; its JSON verdict."""
        copy = tempfile.mkdtemp(prefix="strata-audit-copy-")
        for f in ("kek", "keyring.json"):
            shutil.copy(os.path.join(mt.dir, f), copy)
        sqlite_copy(db, os.path.join(copy, "strata.db"))
        with sqlite3.connect(os.path.join(copy, "strata.db")) as c:
            sql(c)
        r = subprocess.run([STRATA, "audit", "verify", "--db", os.path.join(copy, "strata.db"), "--json", *args],
                           capture_output=True, text=True)
        shutil.rmtree(copy)
        return r.returncode, json.loads(r.stdout)

    # Edit one row; delete another: verify names the break.
    for tamper, seq in [("UPDATE audit SET result = 'tampered' WHERE seq = 3", 3), ("DELETE FROM audit WHERE seq = 5", 5)]:
        code, verdict = tampered(lambda c: c.execute(tamper))
        assert code == 1 and not verdict["ok"] and verdict["broken_at"]["seq"] == seq, verdict

    def rechain(c, edit_seq):
        """What an insider with write access but not the audit key can do:
        edit a row and chain every row from there again (SHA-256, the way
        the chain was computed before it was keyed)."""
        rows = c.execute("SELECT seq, at_ms, actor_key, actor_tenant, action, tenant, target, result, prev_hash "
                         "FROM audit ORDER BY seq").fetchall()
        prev = None
        for seq, at_ms, *fields, prev_hash in rows:
            if seq < edit_seq:
                continue
            if seq == edit_seq:
                prev = prev_hash
                fields[5] = "ok"  # result
            h = hashlib.sha256(seq.to_bytes(8, "big", signed=True) + at_ms.to_bytes(8, "big", signed=True))
            for part in [prev, *fields]:
                h.update(len(part.encode()).to_bytes(8, "big") + part.encode())
            c.execute("UPDATE audit SET result = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                      (fields[5], prev, h.hexdigest(), seq))
            prev = h.hexdigest()

    denied = next(r["seq"] for r in rows if r["result"] == "denied")
    code, verdict = tampered(lambda c: rechain(c, denied))
    assert code == 1 and verdict["broken_at"]["seq"] == denied, verdict
    # The newest rows dropped: the chain alone still holds (that is what a
    # chain cannot show), the checkpoints do not.
    newest = int(verdict["rows"])
    cut = lambda c: c.execute("DELETE FROM audit WHERE seq > ?", (newest - 3,))  # noqa: E731
    code, verdict = tampered(cut)
    assert code == 0 and verdict["ok"], verdict
    code, verdict = tampered(cut, "--checkpoints", checkpoints)
    assert code == 1 and "dropped from the end" in verdict["broken_at"]["reason"], verdict


def test_cli_verbs_manage_tenants_and_keys(mt):
    env = {**os.environ, "STRATA_URL": mt.base, "STRATA_API_KEY": mt.admin_key}

    def strata(*args):
        r = subprocess.run([STRATA, *args], capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    created = json.loads(strata("tenant", "create", "cli-co", "--rpm", "100", "--budget", "5", "--json"))
    tid = created["id"]
    assert created["requests_per_minute"] == 100 and created["monthly_budget_usd"] == 5
    assert "cli-co" in strata("tenant", "list")
    assert json.loads(strata("tenant", "update", tid, "--tpm", "1000", "--json"))["tokens_per_minute"] == 1000
    out = strata("key", "create", "--tenant", tid, "--role", "reader", "--name", "dash")
    secret = re.search(r"key \(shown once\): (sk-strata-\S+)", out).group(1)
    assert call(mt, "GET", "/v1/models", secret).status_code == 200
    keys = json.loads(strata("key", "list", "--tenant", tid, "--json"))["data"]
    assert [k["role"] for k in keys] == ["reader"] and "key" not in keys[0]
    strata("key", "revoke", "--tenant", tid, keys[0]["id"])
    assert call(mt, "GET", "/v1/models", secret).status_code == 401
    assert "deleted" in strata("tenant", "delete", tid)
    bad = subprocess.run([STRATA, "tenant", "show", tid], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "404" in bad.stderr
    nokey = subprocess.run([STRATA, "tenant", "list"], capture_output=True, text=True,
                           env={**env, "STRATA_API_KEY": new_key()})
    assert nokey.returncode != 0 and "401" in nokey.stderr


def test_first_start_prints_an_admin_key_once_and_makes_a_private_kek(tmp_path):
    port = free_port()
    db = tmp_path / "data" / "strata.db"
    cmd = [STRATA, "gateway", "--replica", "http://127.0.0.1:9", "--db", str(db), "--listen", f"127.0.0.1:{port}"]
    base = f"http://127.0.0.1:{port}"

    def start():
        p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                httpx.get(f"{base}/health", timeout=1)
                return p
            except httpx.HTTPError:
                time.sleep(0.1)
        p.kill()
        raise AssertionError("gateway did not start")

    first = start()
    r = httpx.get(f"{base}/admin/v1/tenants", timeout=5)
    assert r.status_code == 401
    first.terminate()
    out, err = first.communicate(timeout=10)
    keys = re.findall(r"sk-strata-[A-Za-z0-9_-]{43}", out)
    assert len(keys) == 1, out
    assert "KEK" in err and keys[0] not in err
    kek = tmp_path / "data" / "kek"
    assert stat.S_IMODE(os.stat(kek).st_mode) == 0o600
    second = start()
    assert httpx.get(f"{base}/admin/v1/tenants", headers=bearer(keys[0]), timeout=5).status_code == 200
    second.terminate()
    out2, _ = second.communicate(timeout=10)
    assert "sk-strata-" not in out2, "the admin key is shown only once"


def test_an_admin_key_from_the_environment_is_never_printed(tmp_path):
    # On Kubernetes the gateway's stdout is the container log: `strata k8s
    # render` gives gateways the admin key from the Secret as
    # STRATA_ADMIN_KEY, and a gateway given one makes none and prints none.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [STRATA, "gateway", "--replica", "http://127.0.0.1:9", "--db", str(tmp_path / "s.db"),
           "--listen", f"127.0.0.1:{port}"]
    admin = new_key()
    env = {**os.environ, "STRATA_ADMIN_KEY": admin}
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.time() < deadline and p.poll() is None, "gateway did not start"
                time.sleep(0.1)
        assert httpx.get(f"{base}/admin/v1/tenants", headers=bearer(admin), timeout=5).status_code == 200
        # It is the one admin key: nothing else was made.
        keys = httpx.get(f"{base}/admin/v1/tenants/ten_platform/keys", headers=bearer(admin), timeout=5)
        assert keys.status_code == 200 and [k["role"] for k in keys.json()["data"]] == ["admin"], keys.text
    finally:
        p.terminate()
        out, err = p.communicate(timeout=10)
    assert "sk-strata-" not in out + err and "admin key" not in out
    # A value that is not a key stops the start with a clear message.
    bad = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=30,
                         env={**env, "STRATA_ADMIN_KEY": "hunter2"})
    assert bad.returncode != 0 and "STRATA_ADMIN_KEY does not hold a strata key" in bad.stderr, bad.stderr
    assert "hunter2" not in bad.stderr
