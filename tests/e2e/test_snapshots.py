"""KV snapshots: draining a replica keeps its sessions' KV caches (sealed),
and the session's next turn, on another replica, restores the cache instead
of prefilling the whole conversation again, with the same greedy answer as
a session that never moved. Three replicas, so two drains leave one. On
SQLite the snapshots go to the data directory; on PostgreSQL (cluster mode)
into the database, where every gateway finds them."""
import glob
import os
import sqlite3
import subprocess

import httpx
import pytest

from conftest import MODEL_ID, Server, postgres_url, psql

SYSTEM = "You are the support assistant of a cloud platform team; answer briefly. " * 6
GREEDY = {"model": MODEL_ID, "temperature": 0, "max_output_tokens": 12, "instructions": SYSTEM}


def served_by(server, response_id):
    if server.db:
        return psql(server.db, f"SELECT replica FROM responses WHERE id = '{response_id}'")
    db = sqlite3.connect(os.path.join(server.dir, "strata.db"))
    return db.execute("SELECT replica FROM responses WHERE id = ?", (response_id,)).fetchone()[0]


def kept_snapshots(server):
    """Sealed snapshot payloads kept right now."""
    if server.db:
        schema = server.db.split("search_path%3D")[1]
        dump = subprocess.run(["pg_dump", "--data-only", "-t", f"{schema}.kv_snapshots", os.environ["DATABASE_URL"]],
                              check=True, capture_output=True).stdout
        rows = int(psql(server.db, "SELECT COUNT(*) FROM kv_snapshots"))
        return [dump] * rows
    return [open(f, "rb").read() for f in glob.glob(os.path.join(server.dir, "snapshots", "*", "*.kv"))]


def drain(server, replica):
    r = server.admin("POST", f"/admin/v1/replicas/{replica}/drain", expect=200)
    return r.json()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_drained_replicas_sessions_continue_elsewhere_from_their_snapshots(backend):
    s = Server(replicas=3, tenant="snapshots", db=postgres_url("snapshots") if backend == "postgres" else None)
    try:
        c = s.client()
        first = c.responses.create(input="My name is Ada. CANARY-kv-8810", **GREEDY)
        home = served_by(s, first.id)
        drained = drain(s, home)
        assert drained["snapshots"] >= 1 and drained["bytes"] > 0, drained
        health = {r["id"]: r for r in s.replica_list()}
        assert health[home]["draining"] and health[home]["ready"]
        # Sealed at rest: the snapshot is not even recognisable as one.
        kept = kept_snapshots(s)
        assert kept
        for data in kept:
            # A snapshot in the clear starts with SKV1 (in a dump: the hex value \x534b5631...).
            assert not data.startswith(b"SKV1") and b"\\x534b5631" not in data
            assert b"CANARY-kv-8810" not in data

        moved = c.responses.create(input="What is my name?", previous_response_id=first.id, **GREEDY)
        assert served_by(s, moved.id) != home
        # The whole first turn came back from the snapshot, not from prefill.
        assert moved.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens, moved.usage
        # Nothing was left behind: the snapshot is used once.
        assert not kept_snapshots(s)

        # A session that never moved gives the same greedy answers.
        again = c.responses.create(input="My name is Ada. CANARY-kv-8810", **GREEDY)
        assert again.output_text == first.output_text
        stayed = c.responses.create(input="What is my name?", previous_response_id=again.id, **GREEDY)
        assert stayed.usage.input_tokens_details.cached_tokens >= again.usage.input_tokens
        assert stayed.output_text == moved.output_text

        # A conversation moves the same way.
        conv = c.conversations.create()
        turn = c.responses.create(input="We run GPUs in two zones.", conversation=conv.id, **GREEDY)
        drain(s, served_by(s, turn.id))
        nxt = c.responses.create(input="Which zones?", conversation=conv.id, **GREEDY)
        assert served_by(s, nxt.id) != served_by(s, turn.id)
        assert nxt.usage.input_tokens_details.cached_tokens >= turn.usage.input_tokens, nxt.usage

        # With every replica but one drained, work still flows to it.
        r = c.responses.create(input="Still there?", **GREEDY)
        assert r.status in ("completed", "incomplete")
        # Undrained, a replica takes requests again; unknown ids are 404.
        s.admin("POST", f"/admin/v1/replicas/{home}/undrain", expect=200)
        assert not {r["id"]: r for r in s.replica_list()}[home]["draining"]
        s.admin("POST", "/admin/v1/replicas/nope/undrain", expect=404)
        s.admin("POST", "/admin/v1/replicas/nope/drain", expect=404)
        s.admin("POST", f"/admin/v1/replicas/{home}/drain", key=s.key, expect=403)
    finally:
        s.stop()


def test_a_snapshot_from_other_settings_or_damaged_is_refused_by_the_engine():
    s = Server(replicas=1, tenant="snapshots-bad")
    try:
        engine = s.replica_list()[0]["url"]
        gateway = s.engine_client(timeout=30)
        for body, status in [(b"SKV1\x05\x00\x00\x00{bad}", 400), (b"GGUF", 400)]:
            r = gateway.post(f"{engine}/internal/kv/import", content=body)
            assert r.status_code == status, r.text
        c = s.client()
        c.responses.create(input="Hello there, replica.", **GREEDY)
        export = gateway.post(f"{engine}/internal/kv/export").content
        length = int.from_bytes(export[:8], "little")
        snapshot = export[8:8 + length]
        assert snapshot.startswith(b"SKV1")
        other = snapshot.replace(b"ctx=8192", b"ctx=4096", 1)
        r = gateway.post(f"{engine}/internal/kv/import", content=other)
        assert r.status_code == 409 and "another model or other context settings" in r.text
        # Still serving.
        assert c.responses.create(input="Still fine?", **GREEDY).status in ("completed", "incomplete")
    finally:
        s.stop()
