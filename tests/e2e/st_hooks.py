"""Schemathesis hooks for test_conformance.py (loaded through
SCHEMATHESIS_HOOKS). The document's schemas hold every rule strata applies
to a request but three that no JSON Schema can hold: a chat's
`continue_final_message` needs an assistant message last (a schema cannot
name an array's last item), a key's `expires_at` must be in the future
(a schema has no clock), and a model deployed through the admin API must
name a file on the machine running the pools, with that file's sha256, and
engine and pool keys strata has (a schema cannot see the machine; the keys
are checked against the config's sections), and an uploaded file's lines
must each be a request of the endpoint they name (a schema describes the
form, not a JSONL file inside it), and a prompt and its `max_tokens` must
fit the model's context (a schema cannot count tokens). Positive cases
that break the first two or the last, and every positive deploy or change
of a model and every positive upload, are not sent (the end-to-end tests deploy real models and
upload real files); negative cases are all sent."""
import json
import time

import schemathesis
from schemathesis.generation import GenerationMode


# The model's context (tokens): a prompt and its `max_tokens` must fit.
CONTEXT = 8192


def breaks_a_rule_in_words(label, body):
    if label == "POST /v1/files":
        return True
    if not isinstance(body, dict):
        return False
    if label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses"):
        asked = [body.get(k) for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")]
        # Whole numbers, as JSON may write them (`16650.0` too).
        asked = max([n for n in asked if isinstance(n, (int, float)) and not isinstance(n, bool)] or [0])
        # A prompt is never more tokens than its body has bytes.
        if asked + len(json.dumps(body).encode()) > CONTEXT:
            return True
    if label == "POST /v1/chat/completions" and body.get("continue_final_message") is True:
        messages = body.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        return not (isinstance(last, dict) and last.get("role") == "assistant")
    if label in ("POST /admin/v1/models", "PATCH /admin/v1/models/{id}"):
        return True
    if label == "POST /admin/v1/tenants/{tenant}/keys":
        at = body.get("expires_at")
        # A whole number, as JSON may write it (`6449885.0` too).
        return isinstance(at, (int, float)) and not isinstance(at, bool) and at <= time.time() + 60
    return False


@schemathesis.hook
def filter_case(context, case):
    meta = case.meta
    if meta is None or meta.generation.mode != GenerationMode.POSITIVE:
        return True
    return not breaks_a_rule_in_words(case.operation.label, case.body)
