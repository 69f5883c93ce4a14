"""Deleting a tenant against an insider: a backup taken before the deletion
(a real pg_dump of the whole schema; a copy of the whole SQLite data
directory) does not open with the KEK in use after it, while the same backup
with the KEK of its time does (so the test is not passing on a broken
backup). And the tenant's cells leave the engines' caches, its snapshot
files the disk."""
import glob
import os
import shutil
import subprocess
import tempfile
import time

import httpx
from conftest import MODEL_ID, STRATA, Server, bearer, free_port, postgres_url

CANARY = "shred-canary-5521"


def stored_completion(s, tenant):
    key = s.new_key(tenant, "member")
    c = s.client(key).chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": f"My secret is {CANARY}"}], max_tokens=2,
        temperature=0, store=True)
    assert httpx.get(f"{s.base}/v1/chat/completions/{c.id}/messages", headers=bearer(key)).status_code == 200
    return key, c.id


def read_back(db, kek_hex, key, completion, extra_env=None):
    """Starts a bare `strata gateway` on `db` with `kek_hex` as STRATA_KEK
    and reads the stored completion's messages: (status or None if the
    gateway would not start, body)."""
    d = tempfile.mkdtemp(prefix="strata-restore-")
    port = free_port()
    with open(os.path.join(d, "strata.toml"), "w") as f:
        f.write("")
    log = open(os.path.join(d, "gateway.log"), "w")
    # Reading stored objects needs no replica; on SQLite the gateway wants one named.
    replica = [] if db.startswith("postgres") else ["--replica", "http://127.0.0.1:9"]
    proc = subprocess.Popen([STRATA, "--config", os.path.join(d, "strata.toml"), "gateway", "--listen",
                             f"127.0.0.1:{port}", "--db", db, *replica], cwd=d, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "STRATA_KEK": kek_hex, "RUST_BACKTRACE": "0", **(extra_env or {})})
    try:
        deadline = time.time() + 30
        while time.time() < deadline and proc.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        if proc.poll() is not None:
            return None, open(os.path.join(d, "gateway.log")).read()[:3000]
        r = httpx.get(f"http://127.0.0.1:{port}/v1/chat/completions/{completion}/messages", headers=bearer(key),
                      timeout=30)
        return r.status_code, r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(d, ignore_errors=True)


def test_a_pg_dump_from_before_a_shred_does_not_open_with_the_kek_in_use():
    db = postgres_url("shred")
    s = Server(replicas=1, db=db, tenant="shred-pg")
    try:
        kek_file = os.path.join(s.dir, "data", "kek")
        old_kek = open(kek_file).read().strip()
        victim = s.admin("POST", "/admin/v1/tenants", {"name": "shred-victim"}, expect=201).json()["id"]
        survivor_key, survivor_completion = stored_completion(s, s.tenant["id"])
        key, completion = stored_completion(s, victim)
        schema = db.split("search_path%3D")[1]
        base = os.environ["DATABASE_URL"]
        dump = os.path.join(s.dir, "whole.sql")
        subprocess.run(["pg_dump", base, "--schema", schema, "--file", dump], check=True)
        gone = s.admin("DELETE", f"/admin/v1/tenants/{victim}", expect=200).json()
        assert gone["kek_rotated"] is True, gone
        new_kek = open(kek_file).read().strip()
        assert new_kek != old_kek
        # The survivor's content still reads through the running server.
        assert httpx.get(f"{s.base}/v1/chat/completions/{survivor_completion}/messages",
                         headers=bearer(survivor_key)).status_code == 200
        # The dump, restored into a database of its own.
        restored_db = f"strata_restore_{os.getpid()}_{int(time.time())}"
        subprocess.run(["psql", base, "-qc", f"CREATE DATABASE {restored_db}"], check=True)
        try:
            restored_base = base.rsplit("/", 1)[0] + "/" + restored_db
            subprocess.run(["psql", restored_base, "-q", "-f", dump], check=True, capture_output=True)
            restored = f"{restored_base}?options=-c%20search_path%3D{schema}"
            # With the KEK of its time, the backup opens: the canary reads back.
            status, body = read_back(restored, old_kek, key, completion)
            assert status == 200 and CANARY in body, (status, body[-500:])
            # With the KEK in use now, nothing of it opens.
            status, body = read_back(restored, new_kek, key, completion)
            assert status != 200 and CANARY not in body, (status, body[-500:])
        finally:
            subprocess.run(["psql", base, "-qc", f"DROP DATABASE {restored_db} WITH (FORCE)"], check=True)
    finally:
        s.stop()


def test_a_copy_of_the_sqlite_data_directory_from_before_a_shred_does_not_open_with_the_kek_in_use():
    keys = tempfile.mkdtemp(prefix="strata-kek-")
    kek_file = os.path.join(keys, "kek")
    with open(kek_file, "w") as f:
        f.write(os.urandom(32).hex())
    # The KEK outside the data directory: a copy of the directory does not carry it.
    s = Server(replicas=1, tenant="shred-sqlite", config=f'kek_file = "{kek_file}"\n')
    try:
        old_kek = open(kek_file).read().strip()
        victim = s.admin("POST", "/admin/v1/tenants", {"name": "shred-victim"}, expect=201).json()["id"]
        key, completion = stored_completion(s, victim)
        # The victim's conversation leaves cells in the engine and, after a
        # drain, a snapshot file.
        c = s.client(key)
        conv = c.conversations.create()
        c.responses.create(model=MODEL_ID, conversation=conv.id, input=f"Remember {CANARY}.", max_output_tokens=2)
        replica = s.replica_list()[0]
        s.admin("POST", f"/admin/v1/replicas/{replica['id']}/drain", expect=200)
        assert glob.glob(os.path.join(s.dir, "snapshots", victim, "*.kv"))
        s.admin("POST", f"/admin/v1/replicas/{replica['id']}/undrain", expect=200)
        with s.engine_client(timeout=30) as gateway:
            cached = gateway.post(f"{replica['url']}/internal/kv/export").content
        assert victim.encode() in cached
        copy = tempfile.mkdtemp(prefix="strata-copy-")
        shutil.copytree(s.dir, copy, dirs_exist_ok=True)
        gone = s.admin("DELETE", f"/admin/v1/tenants/{victim}", expect=200).json()
        assert gone["kek_rotated"] is True
        new_kek = open(kek_file).read().strip()
        # Its cells left the engine and its snapshot files the disk.
        with s.engine_client(timeout=30) as gateway:
            assert victim.encode() not in gateway.post(f"{replica['url']}/internal/kv/export").content
        assert not os.path.exists(os.path.join(s.dir, "snapshots", victim))
        copied_db = os.path.join(copy, "strata.db")
        status, body = read_back(copied_db, old_kek, key, completion)
        assert status == 200 and CANARY in body, (status, body[-500:])
        status, body = read_back(copied_db, new_kek, key, completion)
        assert status != 200 and CANARY not in body, (status, body[-500:])
        shutil.rmtree(copy)
    finally:
        s.stop()
