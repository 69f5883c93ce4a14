"""Schemathesis (from PyPI) against strata's own OpenAPI document, on a
running `strata serve` with the real model: generated requests for every
operation (valid ones and ones that break the schema) as the platform
admin; no answer may be a 5xx, every answer must match the document
(status code, content type, body schema), every request that breaks the
schema is refused and every one that keeps it is accepted (the two rules
no schema can hold are kept out of the valid cases by st_hooks.py)."""
import os
import subprocess
import sys
import tempfile
import time

import httpx
from conftest import MODEL_ID, Server

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "schemathesis.toml")


def stored_objects(s):
    """A conversation with an item, a stored (background) response and a stored chat
    completion, made as the key the run uses: ids for the operations that
    read or change one (schemathesis.toml names them), which would otherwise
    see only 404s."""
    h = {"Authorization": f"Bearer {s.admin_key}"}

    def post(path, body):
        r = httpx.post(f"{s.base}{path}", headers=h, json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    conv = post("/v1/conversations", {"items": [{"role": "user", "content": "hi"}]})["id"]
    item = httpx.get(f"{s.base}/v1/conversations/{conv}/items", headers=h).json()["data"][0]["id"]
    # A background response (ended before the run starts): its stream can
    # be read again and a cancel answers it as it stands.
    response = post("/v1/responses", {"model": MODEL_ID, "input": "Hi.", "max_output_tokens": 2,
                                       "background": True})["id"]
    deadline = time.time() + 120
    while httpx.get(f"{s.base}/v1/responses/{response}", headers=h).json()["status"] in ("queued", "in_progress"):
        assert time.time() < deadline, "the background response did not end"
        time.sleep(0.2)
    completion = post("/v1/chat/completions", {"model": MODEL_ID, "store": True, "max_tokens": 2,
                                               "messages": [{"role": "user", "content": "Hi."}]})["id"]
    return {"STRATA_ST_CONVERSATION": conv, "STRATA_ST_ITEM": item, "STRATA_ST_RESPONSE": response,
            "STRATA_ST_COMPLETION": completion}


def test_generated_requests_get_no_5xx_and_answers_match_the_document():
    s = Server(replicas=1, tenant="conformance")
    try:
        ids = stored_objects(s)
        st = os.path.join(os.path.dirname(sys.executable), "st")
        out = subprocess.run(
            [st, "--config-file", CONFIG, "run", f"{s.base}/openapi.json",
             "-H", f"Authorization: Bearer {s.admin_key}", "--max-examples", os.environ.get("STRATA_ST_EXAMPLES", "25"),
             "--workers", "1", "--request-timeout", "120", "--seed", "20261129",
             # The dashboard's login form takes a form body, and its logout
             # ends sessions; KEK rotation and replica drains change the
             # server under the other operations.
             "--exclude-path-regex", "^/ui/log|/kek/rotate|/replicas/",
             "--suppress-health-check", "all"],
            # Its cache goes to a scratch directory, not the checkout.
            capture_output=True, text=True, timeout=900, cwd=tempfile.mkdtemp(prefix="strata-st-"),
            env={**os.environ, **ids, "SCHEMATHESIS_HOOKS": "st_hooks",
                 "PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))})
        summary = out.stdout[-6000:]
        assert out.returncode == 0, summary
        assert "Tested: " in out.stdout and " generated" in out.stdout, summary
        print(summary)
    finally:
        s.stop()
