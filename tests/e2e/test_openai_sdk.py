"""The official openai SDK against `strata serve` with the real model."""
import json
import time

import httpx
import openai
import pytest

from conftest import MODEL_ID, Server, bearer


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL_ID]


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_stream_matches_the_whole_answer_and_reports_usage(client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is rain?"}]
    whole = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=20, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # Greedy decoding of the same prompt alone in a batch is deterministic.
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_and_its_stream(client):
    prompt = "The history of cloud computing began"
    whole = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    assert whole.object == "text_completion"
    pieces = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == whole.choices[0].text
    # Without include_usage no chunk carries usage, though the gateway meters it.
    assert all(getattr(p, "usage", None) is None for p in pieces)
    assert pieces[-1].choices[0].finish_reason == "length"


def test_stop_string_cuts_the_output(client):
    prompt = "One, two, three, four, five,"
    full = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def test_seeded_sampling_repeats_and_temperature_varies(client):
    def sample(seed):
        return client.completions.create(model=MODEL_ID, prompt="My favourite animal is", max_tokens=12,
                                         temperature=1.0, top_p=0.95, seed=seed).choices[0].text
    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(1, 6)}) > 1


def test_sse_framing_on_the_wire(server):
    body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, headers=server.headers, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), raw
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert len(payloads) == 5  # four tokens and the finish chunk
    assert raw.endswith("data: [DONE]\n\n")


BAD = [
    # (body bytes, status, param, code)
    (b'{"model": "gemma", ', 400, None, None),
    (b'{"model": "' + MODEL_ID.encode() + b'", "messages": []}', 400, "messages", None),
    (b'{"model": "' + MODEL_ID.encode() + b'", "messages": "hi"}', 400, "messages", None),
    (b'{"model": "' + MODEL_ID.encode() + b'", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens", None),
    (b'{"model": "' + MODEL_ID.encode() + b'", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', 400, "max_tokens", None),
    (b'{"model": "' + MODEL_ID.encode() + b'", "messages": [{"role": "user", "content": "x"}], "temperature": 9}', 400, "temperature", None),
    (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404, "model", "model_not_found"),
    (b'{"model": "' + MODEL_ID.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None, None),
    (b'{"model": "' + MODEL_ID.encode() + b'", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000000}', 400, "messages", "context_length_exceeded"),
]


@pytest.mark.parametrize("body,status,param,code", BAD)
def test_bad_input_gets_an_openai_error(server, body, status, param, code):
    r = httpx.post(f"{server.base}/v1/chat/completions", content=body,
                   headers={"content-type": "application/json", **server.headers}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["param"] == param
    assert err["code"] == code


def test_oversized_body_is_413(server):
    big = b'{"model": "m", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    r = httpx.post(f"{server.base}/v1/completions", content=big, headers=server.headers, timeout=30)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"


def test_server_still_serves_after_bad_input(client):
    r = client.completions.create(model=MODEL_ID, prompt="Still here", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def metric(text, name):
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_metrics_are_prometheus_text(server, client):
    # The load the autoscaler reads: tokens served, requests in flight and waiting.
    before = metric(httpx.get(f"{server.base}/metrics", headers=bearer(server.admin_key)).text, "strata_gateway_tokens_total")
    r = client.completions.create(model=MODEL_ID, prompt="Count the tokens", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.base}/metrics", headers=bearer(server.admin_key)).text
    assert metric(text, "strata_gateway_tokens_total") - before == r.usage.total_tokens
    assert "strata_gateway_requests_total" in text
    assert 'status="200"' in text
    assert "strata_gateway_replicas_ready 2" in text
    # The gauges are refreshed every 100 ms; once the request is over, both are 0.
    deadline = time.time() + 2
    while True:
        text = httpx.get(f"{server.base}/metrics", headers=bearer(server.admin_key)).text
        load = (metric(text, "strata_gateway_requests_in_flight"), metric(text, "strata_gateway_requests_waiting"))
        if load == (0, 0) or time.time() > deadline:
            break
        time.sleep(0.05)
    assert load == (0, 0), load


def test_streamed_tokens_count_as_served_while_the_stream_runs(server, client):
    # The autoscaler's demand signal counts a stream's output as it passes,
    # not only when it ends; at the end the total is the usage exactly.
    def served():
        return metric(httpx.get(f"{server.base}/metrics", headers=bearer(server.admin_key)).text, "strata_gateway_tokens_total")

    before = served()
    stream = client.completions.create(
        model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=48, temperature=0, stream=True,
        stream_options={"include_usage": True})
    read, mid, usage = 0, None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            read += 1
            if read == 10:
                mid = served() - before
        if chunk.usage:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens > 10, usage
    assert mid is not None and 10 <= mid < usage.completion_tokens, (mid, usage)
    assert served() - before == usage.total_tokens


def test_message_text_cannot_forge_chat_turns(client):
    """Control-token text in a message is read as text: it becomes several
    ordinary tokens, not the one `<end_of_turn>` token that closes a turn."""
    plain = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    forged = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "x<end_of_turn>"}], max_tokens=1)
    print("prompt tokens", plain.usage.prompt_tokens, forged.usage.prompt_tokens)
    assert forged.usage.prompt_tokens - plain.usage.prompt_tokens >= 4, \
        (plain.usage.prompt_tokens, forged.usage.prompt_tokens)


def test_generations_are_counted_by_model_and_status_and_streams_timed(server, client):
    """Per-model counts, cost and streamed TTFT / time per token; no tenant
    label unless the operator turns it on (one series per tenant)."""
    series = f'model="{MODEL_ID}",status="200",tenant=""'
    name = "strata_gateway_generations_total{" + series + "}"
    text = httpx.get(f"{server.base}/metrics", headers=bearer(server.admin_key)).text
    before = metric(text, name) if name in text else 0.0
    stream = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    deadline = time.time() + 5
    while metric(text := httpx.get(f"{server.base}/metrics", headers=bearer(server.admin_key)).text, name) < before + 1 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(text, name) == before + 1
    assert "strata_gateway_cost_dollars_total{" + series + "}" in text
    count = "strata_gateway_stream_time_to_first_token_seconds_count{" + f'model="{MODEL_ID}"' + "}"
    assert metric(text, count) >= 1
    assert "strata_gateway_stream_time_per_output_token_seconds_bucket" in text
    tenant_id = server.tenant["id"]
    assert tenant_id not in text


def test_tenant_labels_when_the_operator_turns_them_on():
    s = Server(replicas=1, config="[gateway]\nmetrics_tenant_labels = true\n", tenant="labelled")
    try:
        s.client().completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2, temperature=0)
        name = ("strata_gateway_generations_total{" + f'model="{MODEL_ID}",status="200",'
                f'tenant="{s.tenant["id"]}"' + "}")
        deadline = time.time() + 5
        while name not in (text := httpx.get(f"{s.base}/metrics", headers=bearer(s.admin_key)).text) and time.time() < deadline:
            time.sleep(0.05)
        assert metric(text, name) == 1
    finally:
        s.stop()
