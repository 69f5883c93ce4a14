"""strata's OpenAPI document, served at /openapi.json: a valid OpenAPI 3
document, naming every route the gateway serves, and every route it names
is served."""
import glob
import os
import re

import httpx
from conftest import MODEL_ID
from openapi_spec_validator import validate

SRC = os.path.join(os.path.dirname(__file__), "../../crates/strata-gateway/src")
METHODS = {"get", "post", "patch", "delete", "put"}


def document(server):
    r = httpx.get(f"{server.base}/openapi.json", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def operations(doc):
    return sorted((m.upper(), path) for path, item in doc["paths"].items() for m in item if m in METHODS)


def test_the_document_is_valid_openapi_3_with_schemas_for_the_openai_routes(server):
    doc = document(server)
    assert doc["openapi"].startswith("3.")
    validate(doc)
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][body.rsplit("/", 1)[1]]
    # `sampling` is flattened into the request: its fields come as an allOf part.
    required = {f for part in schema["allOf"] for f in part.get("required", [])}
    assert {"model", "messages"} <= required
    assert "4XX" in chat["responses"] and chat["security"] == [{"api_key": []}]
    # The public routes need no key.
    assert "security" not in doc["paths"]["/health"]["get"]


def test_every_route_the_code_registers_is_in_the_document(server):
    """Routes are registered only through `routes!(handler, …)`, whose
    handlers carry their path in `#[utoipa::path]`: no plain `.route(` may
    bypass the document, and the document holds one operation per handler."""
    handlers = 0
    for path in glob.glob(os.path.join(SRC, "**", "*.rs"), recursive=True):
        code = open(path).read()
        assert not re.search(r"\.(route|route_service|nest|nest_service)\(", code), \
            f"{path} registers a route outside routes!()"
        for listed in re.findall(r"routes!\(([^)]*)\)", code):
            handlers += len([h for h in listed.split(",") if h.strip()])
    ops = operations(document(server))
    assert handlers == len(ops) >= 39, (handlers, ops)


def test_every_route_in_the_document_is_served(server):
    doc = document(server)
    for method, path in operations(doc):
        url = server.base + re.sub(r"\{[^}]+\}", "x", path)
        body = {} if method in ("POST", "PATCH") else None
        # A member key: admin routes answer 403 from their handlers, and
        # nothing platform-wide (a KEK rotation) happens.
        headers = {"Authorization": f"Bearer {server.key}"}
        r = httpx.request(method, url, json=body, headers=headers, timeout=30)
        # Served: the handler answered (its own 4xx for an unknown id or an
        # empty body is fine), not the router's fallback.
        assert r.status_code != 405, (method, path, r.text)
        if r.status_code == 404:
            assert r.json()["error"]["message"] != "Unknown route.", (method, path)
        assert r.status_code < 500, (method, path, r.status_code, r.text)
    # And a route the document does not name is the fallback.
    r = httpx.get(f"{server.base}/v1/nothing-here", headers={"Authorization": f"Bearer {server.admin_key}"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "Unknown route."


def test_a_query_or_path_axum_cannot_parse_is_an_openai_shaped_400(server):
    """Found by Schemathesis: a repeated query field got axum's plain-text 400."""
    h = {"Authorization": f"Bearer {server.key}"}
    for url in ("/v1/chat/completions?limit=1&limit=2", "/v1/conversations/x/items?order=asc&order=desc",
                "/v1/responses/%FF%FE"):
        r = httpx.get(f"{server.base}{url}", headers=h)
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), (url, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error", r.text


def test_the_documents_rules_between_fields_are_the_servers(server):
    # Rules between fields are in the schemas (JSON Schema `if`/`then`,
    # `not`, `contains`), so a client validating against the document
    # agrees with the server: each body the schema refuses gets a 400, and
    # its schema-valid twin is served.
    from jsonschema import Draft202012Validator

    doc = document(server)

    def validator(name):
        return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})

    chat, completion, responses = (validator(n) for n in ("ChatCompletionRequest", "CompletionRequest",
                                                          "ResponsesRequest"))
    h = {"Authorization": f"Bearer {server.key}"}
    user = [{"role": "user", "content": "Hi."}]
    m = {"model": MODEL_ID}
    conv = httpx.post(f"{server.base}/v1/conversations", headers=h, json={}, timeout=30).json()["id"]
    prev = httpx.post(f"{server.base}/v1/responses", headers=h, timeout=120,
                      json={**m, "input": "Hi.", "max_output_tokens": 1}).json()["id"]
    cases = [
        ("/v1/completions", completion, {**m, "prompt": "Hi", "max_tokens": 1, "stream_options": {"include_usage": True}}),
        ("/v1/completions", completion, {**m, "prompt": "Hi", "max_tokens": 1, "stream": False, "stream_options": {}}),
        ("/v1/completions", completion, {**m, "prompt": "Hi", "max_tokens": 1, "stream_options": None}),
        ("/v1/chat/completions", chat, {**m, "max_tokens": 1, "messages": [{"role": "system", "content": "Be brief."}]}),
        ("/v1/chat/completions", chat, {**m, "max_tokens": 1, "messages": [{"role": "assistant", "content": "Hi."}]}),
        ("/v1/chat/completions", chat, {**m, "max_tokens": 1, "messages": user}),
        ("/v1/chat/completions", chat, {**m, "max_tokens": 1, "messages": user, "stream_options": {}}),
        ("/v1/chat/completions", chat, {**m, "max_tokens": 1, "messages": user, "metadata": {"k" * 64: "v" * 512}}),
        ("/v1/chat/completions", chat, {**m, "max_tokens": 1, "messages": user, "metadata": {"k" * 65: "v"}}),
        ("/v1/chat/completions", chat, {**m, "max_tokens": 1, "messages": user, "metadata": {"k": "v" * 513}}),
        ("/v1/chat/completions", chat, {**m, "max_tokens": 1, "messages": user,
                                        "metadata": {str(i): "v" for i in range(17)}}),
        ("/v1/responses", responses, {**m, "input": "Hi.", "max_output_tokens": 1, "previous_response_id": prev,
                                      "conversation": conv}),
        ("/v1/responses", responses, {**m, "input": "Hi.", "max_output_tokens": 1, "previous_response_id": prev,
                                      "conversation": None}),
        ("/v1/responses", responses, {**m, "input": "Hi.", "max_output_tokens": 1, "conversation": {"id": conv},
                                      "store": False}),
        ("/v1/responses", responses, {**m, "input": "Hi.", "max_output_tokens": 1, "conversation": conv,
                                      "store": None}),
        ("/v1/responses", responses, {**m, "input": "Hi.", "max_output_tokens": 1, "conversation": None,
                                      "store": False}),
        ("/v1/responses", responses, {**m, "input": "Hi.", "max_output_tokens": 1, "background": True}),
        ("/v1/responses", responses, {**m, "input": "Hi.", "max_output_tokens": 1, "background": False}),
        ("/v1/responses", responses, {**m, "input": "Hi.", "max_output_tokens": 1, "background": True,
                                      "store": False}),
    ]
    verdicts = []
    for path, v, body in cases:
        r = httpx.post(f"{server.base}{path}", headers=h, json=body, timeout=120)
        assert r.status_code in (200, 400), (path, body, r.status_code, r.text)
        verdicts.append((v.is_valid(body), r.status_code == 200))
        assert v.is_valid(body) == (r.status_code == 200), (path, body, r.text)
    # Both sides of every rule were tried.
    assert verdicts.count((True, True)) == 8 and verdicts.count((False, False)) == 11
