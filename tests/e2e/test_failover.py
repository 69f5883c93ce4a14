"""A replica killed (SIGKILL) in the middle of a streamed, stored turn of a
conversation: the client's stream carries on from another replica without
an error event, the stored response and the conversation hold the whole
answer, and the next turn works. Then `strata serve` restarts and the
conversation continues from its next turn, its KV cache restored from the
snapshots taken at shutdown."""
import os
import signal
import sqlite3
import threading
import time

import httpx
import pytest
from conftest import CHAT_MODEL, MODEL_ID, Server, alive, model_config

GREEDY = {"model": MODEL_ID, "temperature": 0}


def served_by(server, response_id):
    db = sqlite3.connect(os.path.join(server.dir, "strata.db"))
    return db.execute("SELECT replica FROM responses WHERE id = ?", (response_id,)).fetchone()[0]


def stream_through_kills(stream, victims):
    """Reads a streamed turn, SIGKILLing `victims()` after its fifth delta;
    asserts the client saw the whole turn without an error event and
    returns its events and text."""
    events, killed = [], False
    for event in stream:
        events.append(event)
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        if len(deltas) == 5 and not killed:
            for pid in victims():
                os.kill(pid, signal.SIGKILL)
            killed = True
    assert killed, "the answer ended before the replica could be killed"
    kinds = [e.type for e in events]
    assert "error" not in kinds and "response.failed" not in kinds, kinds
    assert kinds[-1] in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output_text == text and len(text) > 0
    return events, text


@pytest.mark.parametrize("model", [MODEL_ID, CHAT_MODEL])
def test_a_stream_survives_its_replica_and_the_conversation_survives_a_restart(model):
    s = Server(replicas=2, tenant="failover", config=model_config(model))
    GREEDY = {"model": model, "temperature": 0}
    try:
        c = s.client()
        conv = c.conversations.create(metadata={"case": "failover"})
        first = c.responses.create(input="Let us talk about spot instances.", conversation=conv.id,
                                   max_output_tokens=8, **GREEDY)
        home = served_by(s, first.id)
        victim = s.engine_pid(home)

        stream = c.responses.create(input="Tell me a long story about a GPU.", conversation=conv.id,
                                    max_output_tokens=120, stream=True, **GREEDY)
        events, text = stream_through_kills(stream, lambda: [victim])
        final = events[-1].response
        # Moved: the answer was finished by the other replica.
        assert served_by(s, final.id) != home
        assert final.usage.output_tokens >= 5
        # Stored whole, in the response and in the conversation.
        assert c.responses.retrieve(final.id).output_text == text
        items = c.conversations.items.list(conv.id, order="asc").data
        assert [i.role for i in items] == ["user", "assistant", "user", "assistant"]
        assert items[-1].content[0].text == text

        after = c.responses.create(input="And then?", conversation=conv.id, max_output_tokens=8, **GREEDY)
        assert after.status in ("completed", "incomplete")

        s.restart()
        c = s.client()
        resumed = c.responses.create(input="Sum it up.", conversation=conv.id, max_output_tokens=8, **GREEDY)
        assert resumed.status in ("completed", "incomplete")
        # The old replicas were snapshotted on the way out: the new ones
        # restore the conversation's cache instead of prefilling it.
        assert resumed.usage.input_tokens_details.cached_tokens >= after.usage.input_tokens, resumed.usage
        items = c.conversations.items.list(conv.id, order="asc").data
        assert len(items) == 8 and items[-2].content[0].text == "Sum it up."
        chained = c.responses.create(input="One more.", previous_response_id=after.id, max_output_tokens=4, **GREEDY)
        assert chained.previous_response_id == after.id
    finally:
        s.stop()


def test_a_stream_waits_for_a_replica_when_every_replica_dies():
    """Both replicas killed mid-answer: the turn waits for the controller's
    replacements and finishes there, without an error event (found by
    chaos/kill_storm.py: such turns ended in a 502)."""
    s = Server(replicas=2, tenant="failover-all")
    try:
        c = s.client()
        stream = c.responses.create(input="Tell me a long story about a datacenter.", max_output_tokens=120,
                                    stream=True, **GREEDY)
        events, text = stream_through_kills(stream, s.engine_pids)
        assert c.responses.retrieve(events[-1].response.id).output_text == text
    finally:
        s.stop()


def busy_replicas(server):
    """The ids of the replicas with a request in flight."""
    return [r["id"] for r in server.replica_list() if r["outstanding_tokens"] > 0]


def serving_replica(server):
    """The id of the one replica with a request in flight."""
    busy = busy_replicas(server)
    assert len(busy) == 1, busy
    return busy[0]


@pytest.mark.parametrize("model", [MODEL_ID, CHAT_MODEL])
def test_chat_and_completion_streams_survive_their_replica(model):
    """Streamed chat completions (stored and not) and completions whose
    replica is SIGKILLed mid-answer go on from the other replica: the
    client reads one stream, one id, no error, a finish reason, and usage
    that counts every token it read; a stored one is stored whole. On the
    default model (strata's built-in Gemma template) and on a model with a
    chat template of its own."""
    s = Server(replicas=2, tenant="failover-chat", config=model_config(model))
    GREEDY = {"model": model, "temperature": 0}
    try:
        c = s.client()
        for kind in ("chat", "chat stored", "completion"):
            if kind.startswith("chat"):
                stream = c.chat.completions.create(
                    messages=[{"role": "user", "content": "Tell me a long story about a GPU."}],
                    max_tokens=120, stream=True, stream_options={"include_usage": True},
                    store=kind == "chat stored", **GREEDY)
            else:
                stream = c.completions.create(prompt="Once upon a time, in a datacenter,", max_tokens=120,
                                              stream=True, stream_options={"include_usage": True}, **GREEDY)
            chunks, texts, killed = [], [], None
            for chunk in stream:
                chunks.append(chunk)
                if chunk.choices:
                    piece = chunk.choices[0].delta.content if kind.startswith("chat") else chunk.choices[0].text
                    if piece:
                        texts.append(piece)
                if len(texts) == 5 and killed is None:
                    killed = serving_replica(s)
                    os.kill(s.engine_pid(killed), signal.SIGKILL)
            assert killed, f"{kind}: the answer ended before the replica could be killed"
            assert len({ch.id for ch in chunks}) == 1, f"{kind}: {set(ch.id for ch in chunks)}"
            finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            assert finishes in (["stop"], ["length"]), f"{kind}: {finishes}"
            assert len(texts) > 5, f"{kind}: nothing came after the kill"
            usage = chunks[-1].usage
            # One token per chunk from strata's engine; the second replica's
            # count of the first one's tokens moved from prompt to output.
            assert usage.completion_tokens == len(texts), (kind, usage, len(texts))
            # (SmolLM2's template adds a system message of its own.)
            assert usage.prompt_tokens < (40 if model == MODEL_ID else 80), (kind, usage)
            if kind == "chat stored":
                stored = c.chat.completions.retrieve(chunks[0].id)
                assert stored.choices[0].message.content == "".join(texts)
                assert stored.usage.completion_tokens == len(texts)
            # Wait for the controller to bring the killed replica back.
            deadline = time.time() + 120
            while httpx.get(f"{s.base}/health").json()["replicas_ready"] < 2:
                assert time.time() < deadline, "the killed replica did not come back"
                time.sleep(0.5)
    finally:
        s.stop()


def test_a_whole_chat_completion_survives_its_replica():
    """A chat completion answered whole (not streamed) whose replica is
    SIGKILLed while it generates: nothing has gone back to the client (the
    engine sends its headers with the whole answer), so the request is
    sent to the other replica and answered there, without an error."""
    s = Server(replicas=2, tenant="failover-whole")
    try:
        c = s.client()
        result = {}

        def ask():
            result["answer"] = c.chat.completions.create(
                messages=[{"role": "user", "content": "Tell me a long story about a GPU."}],
                max_tokens=120, **GREEDY)

        asking = threading.Thread(target=ask)
        asking.start()
        deadline = time.time() + 60
        while True:
            busy = busy_replicas(s)
            if busy:
                break
            assert time.time() < deadline, "the request never reached a replica"
            time.sleep(0.05)
        time.sleep(0.5)  # into the generation
        os.kill(s.engine_pid(busy[0]), signal.SIGKILL)
        asking.join(timeout=120)
        answer = result["answer"]
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.choices[0].message.content
        assert answer.usage.completion_tokens > 0
        log = open(s.log_path).read()
        assert "replica unreachable; trying another" in log, "the kill did not land mid-answer"
    finally:
        s.stop()


def test_ctrl_c_in_a_terminal_lets_the_engines_hand_over_their_caches():
    # A terminal's Ctrl-C sends SIGINT to its whole foreground process
    # group: `strata serve` and, unless they have a group of their own, its
    # engines, which then die before the shutdown drain snapshots them.
    s = Server(replicas=2, tenant="ctrl-c", own_session=True)
    try:
        c = s.client()
        conv = c.conversations.create()
        first = c.responses.create(input="Let us talk about spot instances.", conversation=conv.id,
                                   max_output_tokens=8, **GREEDY)
        engines = s.engine_pids()
        assert len(engines) == 2
        os.killpg(s.proc.pid, signal.SIGINT)
        assert s.proc.wait(timeout=90) == 0
        with open(s.log_path) as f:
            log = f.read()
        assert "no snapshots taken at shutdown" not in log, log[-3000:]
        # The engines stopped with it, after the drain.
        deadline = time.time() + 10
        while any(alive(p) for p in engines) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in engines)
        # The next start restores the conversation's cache.
        s.restart()
        c = s.client()
        resumed = c.responses.create(input="Sum it up.", conversation=conv.id, max_output_tokens=8, **GREEDY)
        assert resumed.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens, resumed.usage
    finally:
        s.stop()
