"""Traces: with OpenTelemetry's OTLP endpoint variable set, `strata serve`
sends each request's span (tenant, key, model, replica, retries, status) to
a collector as OTLP/HTTP JSON. The collector here is a small HTTP server
that keeps what it is sent."""
import os
import re
import subprocess
import time

import httpx

from conftest import MODEL_ID, STRATA, OtlpCollector, Server, otlp_attrs


def test_each_request_is_a_span_at_the_collector():
    collector = OtlpCollector()
    # Quiet logs (warn) do not quiet the traces.
    s = Server(replicas=1, tenant="traced", env={"STRATA_LOG": "warn",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_SERVICE_NAME": "strata-e2e"})
    try:
        replica = s.replica_list()[0]["id"]
        chat = s.client().chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        wanted = None
        deadline = time.time() + 15
        while wanted is None and time.time() < deadline:
            time.sleep(0.5)
            for resource, span in collector.spans():
                a = otlp_attrs(span)
                if span["name"] == "request" and a.get("tenant") == s.tenant["id"]:
                    wanted = resource, span, a
        assert wanted, [sp["name"] for _, sp in collector.spans()]
        resource, span, a = wanted
        path, content_type, _ = collector.posts[0]
        assert path == "/v1/traces" and content_type.startswith("application/json")
        assert resource["service.name"] == "strata-e2e"
        assert re.fullmatch(r"[0-9a-f]{32}", span["traceId"]) and re.fullmatch(r"[0-9a-f]{16}", span["spanId"])
        assert int(span["endTimeUnixNano"]) > int(span["startTimeUnixNano"])
        assert span["kind"] == 2 and span["status"]["code"] == 0
        assert a["model"] == MODEL_ID and a["path"] == "/v1/chat/completions"
        assert a["replica"] == replica and a["retries"] == "0" and a["status"] == "200"
        assert a["key"].startswith("key_") and a["stream"] is False
        assert chat.id  # the request itself went through
    finally:
        s.stop()


def test_a_bad_endpoint_is_named_at_start():
    out = subprocess.run([STRATA, "status"], capture_output=True, text=True,
                         env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://collector", "RUST_BACKTRACE": "0"})
    assert out.returncode != 0 and "OTEL_EXPORTER_OTLP_ENDPOINT" in out.stderr, out.stderr


def test_the_sampler_keeps_a_share_of_the_traces():
    """OTEL_TRACES_SAMPLER=traceidratio with 0.25: about a quarter of 80
    requests' spans reach the collector (binomial, mean 20, sd 3.9: 6..36 holds with
    overwhelming probability: about 1 in 5,000 runs falls outside); a bad ratio is named at start."""
    collector = OtlpCollector()
    s = Server(replicas=1, tenant="sampled", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    try:
        with httpx.Client(timeout=60) as c:
            for _ in range(80):
                r = c.post(f"{s.base}/v1/completions", headers={"Authorization": f"Bearer {s.key}"},
                           json={"model": MODEL_ID, "prompt": "a", "max_tokens": 1})
                assert r.status_code == 200
        time.sleep(1.5)
        kept = [sp for _, sp in collector.spans() if sp["name"] == "request" and otlp_attrs(sp).get("tenant") == s.tenant["id"]]
        assert 6 <= len(kept) <= 36, len(kept)
    finally:
        s.stop()
    out = subprocess.run([STRATA, "status"], capture_output=True, text=True, env={
        **os.environ, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2", "RUST_BACKTRACE": "0"})
    assert out.returncode != 0 and "OTEL_TRACES_SAMPLER_ARG" in out.stderr, out.stderr
