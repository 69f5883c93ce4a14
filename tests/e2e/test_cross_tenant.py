"""Cross-tenant probes at scale: tenant A keeps one of every object (a
stored chat completion, a stored response, a conversation and its items,
its keys, the tenant itself); tenant B's admin, member and reader keys try
every route of the OpenAPI document that names an object, with A's ids and
with variants of them (case, padding, encodings, traversal, other
prefixes). Not one attempt may succeed or show A's content, and A's objects
are intact afterwards."""
import urllib.parse

import httpx
import pytest

from conftest import MODEL_ID, Server

CANARY = "zebra-canary-7c1f"


def call(s, method, path, key, body=None):
    return httpx.request(method, f"{s.base}{path}", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def two():
    s = Server(replicas=1, tenant="probe-a")
    a = s.tenant["id"]
    b = s.admin("POST", "/admin/v1/tenants", {"name": "probe-b"}, expect=201).json()["id"]
    keys = {
        "a_admin": s.new_key(a, "admin"),
        "b_admin": s.new_key(b, "admin"),
        "b_member": s.new_key(b, "member"),
        "b_reader": s.new_key(b, "reader"),
    }
    a_key = s.key
    chat = call(s, "POST", "/v1/chat/completions", a_key, {
        "model": MODEL_ID, "store": True, "max_tokens": 2,
        "messages": [{"role": "user", "content": f"Say {CANARY}"}]}).json()
    response = call(s, "POST", "/v1/responses", a_key, {
        "model": MODEL_ID, "input": f"Remember {CANARY}", "max_output_tokens": 2}).json()
    conv = call(s, "POST", "/v1/conversations", a_key, {
        "items": [{"type": "message", "role": "user", "content": f"The word is {CANARY}"}]}).json()
    item = call(s, "GET", f"/v1/conversations/{conv['id']}/items", a_key).json()["data"][0]
    key_id = call(s, "GET", f"/admin/v1/tenants/{a}/keys", keys["a_admin"]).json()["data"][0]["id"]
    ids = {"tenant": a, "key": key_id, "completion": chat["id"], "response": response["id"],
           "conversation": conv["id"], "item": item["id"]}
    yield s, ids, keys, a_key
    s.stop()


def variants(value):
    """The id as given and as a prober might bend it."""
    prefix, _, rest = value.partition("_") if "_" in value else value.partition("-")
    return [value, value.upper(), value + " ", value + "%00", value + "/", urllib.parse.quote(value, safe=""),
            urllib.parse.quote(urllib.parse.quote(value, safe=""), safe=""), f"../{value}", f"..%2F{value}",
            f"{value}?tenant=x", f"x_{rest}", rest, value[:-1], value + "0"]


def fill(path, ids):
    """The path with A's id for each parameter, by route."""
    param_for = {"{tenant}": "tenant", "{key}": "key", "{item_id}": "item"}
    if path.startswith("/v1/chat/completions/"):
        param_for["{id}"] = "completion"
    elif path.startswith("/v1/responses/"):
        param_for["{id}"] = "response"
    elif path.startswith("/v1/conversations/"):
        param_for["{id}"] = "conversation"
    elif not path.startswith("/admin/v1/tenants/"):
        return None  # replicas and dashboard files are not tenant objects
    return {p: ids[name] for p, name in param_for.items() if p in path}


def test_five_hundred_probes_of_another_tenants_objects_all_fail(two):
    s, ids, keys, a_key = two
    doc = httpx.get(f"{s.base}/openapi.json").json()
    targets = []
    for path, item in doc["paths"].items():
        if "{" not in path:
            continue
        params = fill(path, ids)
        if params is None:
            continue
        for method in (m for m in item if m in ("get", "post", "patch", "delete")):
            targets.append((method.upper(), path, params))
    # Every route that names a tenant's object is probed.
    assert len(targets) >= 19, targets
    secrets = [ids[k] for k in ("completion", "response", "conversation", "item", "key")] + [CANARY]
    attempts, successes = 0, []
    for method, path, params in targets:
        # Bend one parameter at a time (the last: the object itself); the
        # others keep A's real ids.
        last = list(params)[-1]
        for bent in variants(params[last]):
            concrete = path
            for p, v in params.items():
                concrete = concrete.replace(p, bent if p == last else v)
            for who in ("b_admin", "b_member", "b_reader"):
                body = {"metadata": {"x": "y"}} if method == "POST" else ({} if method == "PATCH" else None)
                r = call(s, method, concrete, keys[who], body)
                attempts += 1
                # An error may repeat the id it was given; nothing else of A's.
                asked = urllib.parse.unquote(urllib.parse.unquote(concrete))
                leaked = [x for x in secrets if x in r.text and x not in asked]
                if r.status_code < 400 or leaked or r.status_code >= 500:
                    successes.append((who, method, concrete, r.status_code, leaked, r.text[:200]))
    assert attempts >= 500, attempts
    assert successes == [], successes[:5]
    # A's objects are all still there, unchanged.
    assert CANARY in call(s, "GET", f"/v1/chat/completions/{ids['completion']}/messages", a_key).text
    assert call(s, "GET", f"/v1/responses/{ids['response']}", a_key).status_code == 200
    items = call(s, "GET", f"/v1/conversations/{ids['conversation']}/items", a_key).json()["data"]
    assert [i["id"] for i in items] == [ids["item"]] and CANARY in items[0]["content"][0]["text"]
    assert call(s, "GET", f"/admin/v1/tenants/{ids['tenant']}/keys/{ids['key']}", keys["a_admin"]).json()["revoked_at"] is None
    assert call(s, "GET", f"/admin/v1/tenants/{ids['tenant']}", keys["a_admin"]).status_code == 200
    print(f"{attempts} cross-tenant attempts over {len(targets)} operations, 0 succeeded")
