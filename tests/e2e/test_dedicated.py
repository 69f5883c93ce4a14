"""Isolation classes: a `dedicated` tenant is served only by the replicas
reserved for it, and no other tenant's request ever reaches those."""
import os
import sqlite3
import time

import httpx

from conftest import MODEL_ID, Server


def test_dedicated_tenants_have_their_own_replicas():
    s = Server(replicas=1, ready=2, config='[serve.dedicated]\nvip = 1\n', tenant="shared-co")
    try:
        health = s.replica_list()
        reserved = [r["id"] for r in health if r["reserved_for"] == "vip"]
        shared = [r["id"] for r in health if r["reserved_for"] is None]
        assert len(reserved) == 1 and len(shared) == 1, health
        vip = s.admin("POST", "/admin/v1/tenants", {"name": "vip", "isolation": "dedicated"}, expect=201).json()
        lonely = s.admin("POST", "/admin/v1/tenants", {"name": "lonely", "isolation": "dedicated"}, expect=201).json()
        vip_client, shared_client = s.client(s.new_key(vip["id"], "member")), s.client()
        for i in range(4):
            for c in (vip_client, shared_client):
                c.completions.create(model=MODEL_ID, prompt=f"Count {i}:", max_tokens=2)
        # A dedicated tenant with no replica reserved for it is not sent to the shared pool.
        r = httpx.post(f"{s.base}/v1/completions", headers={"Authorization": f"Bearer {s.new_key(lonely['id'], 'member')}"},
                       json={"model": MODEL_ID, "prompt": "x", "max_tokens": 1}, timeout=30)
        assert r.status_code == 503 and "reserved" in r.json()["error"]["message"]
        db = sqlite3.connect(os.path.join(s.dir, "strata.db"))
        deadline = time.time() + 5
        while time.time() < deadline:
            rows = db.execute("SELECT tenant_id, replica FROM usage WHERE status = 200").fetchall()
            if len(rows) >= 8:
                break
            time.sleep(0.1)
        by_tenant = {}
        for tenant, replica in rows:
            by_tenant.setdefault(tenant, set()).add(replica)
        assert by_tenant[vip["id"]] == set(reserved), by_tenant
        assert by_tenant[s.tenant["id"]] == set(shared), by_tenant
    finally:
        s.stop()
