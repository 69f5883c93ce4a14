"""A catalog of models under one `strata serve` (issue 26): each model in
`[[models]]` has a pool of its own, the gateway routes by `model`, lists
every model of the catalog whether or not a replica runs, and a key sees
and uses only the models it may. Real engines, both built-in models, the
official openai SDK."""
import json
import os
import subprocess
import time

import httpx
import openai
import pytest

from conftest import CHAT_MODEL, MODEL_ID, STRATA, Server, bearer, wait_for, write_config

CATALOG = f"""
[[models]]
id = "{CHAT_MODEL}"
source = "{CHAT_MODEL}"

[[models]]
id = "{MODEL_ID}"
source = "{MODEL_ID}"
[models.engine]
context_size = 2048
[models.pool]
autoscale = true
min_replicas = 0
max_replicas = 1
scale_to_zero_after_secs = 600
"""


@pytest.fixture(scope="module")
def catalog():
    # `--replicas 1` is the default (first) model's: the chat model runs
    # one replica; the base model's pool starts at zero.
    s = Server(replicas=1, config=CATALOG, tenant="catalog")
    yield s
    s.stop()


def replicas_of(s, model):
    return [r for r in s.replica_list() if model in r["id"]]


def test_every_model_of_the_catalog_is_listed_while_its_pool_is_at_zero(catalog):
    ids = sorted(m.id for m in catalog.client().models.list().data)
    assert ids == sorted([CHAT_MODEL, MODEL_ID])
    assert replicas_of(catalog, MODEL_ID) == [], "the base model's pool starts at zero"


def test_a_pool_scales_by_its_own_models_load(catalog):
    """Requests for the chat model are the chat pool's load only: the base
    model's pool, autoscaled from zero, stays at zero while they run (one
    load for the whole gateway would start it)."""
    client = catalog.client()
    for _ in range(3):
        r = client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
        assert r.model == CHAT_MODEL
    time.sleep(3)
    assert replicas_of(catalog, MODEL_ID) == []
    assert len(replicas_of(catalog, CHAT_MODEL)) == 1


def test_each_model_answers_from_its_own_pool(catalog):
    client = catalog.client()
    chat = client.chat.completions.create(
        model=CHAT_MODEL, temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert chat.model == CHAT_MODEL
    assert "Paris" in chat.choices[0].message.content
    # The base model's pool is at zero: the request waits for the replica
    # it starts, and is not sent to the chat model's ready replica.
    started = time.monotonic()
    completion = client.completions.create(model=MODEL_ID, prompt="The sky is", max_tokens=8)
    assert completion.model == MODEL_ID
    assert completion.choices[0].text
    assert len(replicas_of(catalog, MODEL_ID)) == 1, f"after {time.monotonic() - started:.1f} s"
    # Usage is metered per model (the ledger writes in batches).
    def metered():
        usage = catalog.admin("GET", f"/admin/v1/tenants/{catalog.tenant['id']}/usage", expect=200).json()
        return {MODEL_ID, CHAT_MODEL} <= {row["model"] for row in usage["data"]}
    wait_for("usage of both models", metered, 10)


def test_a_key_sees_and_uses_only_its_models(catalog):
    key = catalog.new_key(catalog.tenant["id"], "member", models=[CHAT_MODEL])
    client = catalog.client(key)
    assert [m.id for m in client.models.list().data] == [CHAT_MODEL]
    with pytest.raises(openai.NotFoundError) as refused:
        client.completions.create(model=MODEL_ID, prompt="The sky is", max_tokens=4)
    assert refused.value.code == "model_not_found"
    ok = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
    assert ok.choices[0].message.content is not None


def test_a_model_outside_the_catalog_is_a_404_and_starts_nothing(catalog):
    before = catalog.replica_list()
    with pytest.raises(openai.NotFoundError) as refused:
        catalog.client().chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert refused.value.code == "model_not_found"
    assert {r["id"] for r in catalog.replica_list()} == {r["id"] for r in before}


def test_the_controller_reports_and_bills_each_pool(catalog):
    metrics = httpx.get(f"{catalog.base}/metrics", headers=bearer(catalog.admin_key), timeout=10).text
    for model in (CHAT_MODEL, MODEL_ID):
        assert f'pool="{model}"' in metrics, model
    # The ledger splits the instances' bill by pool and by model.
    for by in ("pool", "model"):
        out = subprocess.run([STRATA, "--config", catalog.config, "cost", "report", "--by", by, "--since", "1h",
                              "--db", os.path.join(catalog.dir, "strata.db"), "--json"],
                             capture_output=True, text=True, check=True).stdout
        keys = {line["key"] for line in json.loads(out)["lines"]}
        assert {CHAT_MODEL, MODEL_ID} <= keys, (by, keys)
    # The dashboard's data break down by model, each with its own pool.
    login = httpx.post(f"{catalog.base}/ui/login", data={"key": catalog.admin_key})
    data = httpx.get(f"{catalog.base}/ui/data?minutes=15", cookies={"strata_ui": login.cookies["strata_ui"]}).json()
    rows = {m["model"]: m for m in data["models"]}
    for model in (CHAT_MODEL, MODEL_ID):
        assert rows[model]["pools"] == [model] and rows[model]["requests"] > 0, rows


def run_serve(tmp_path, extra):
    _, config = write_config(str(tmp_path), extra)
    return subprocess.run([STRATA, "--config", config, "serve", "--listen", "127.0.0.1:0",
                           "--db", str(tmp_path / "strata.db")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_a_model_file_whose_hash_differs_is_not_served(tmp_path):
    path = subprocess.run([STRATA, "model", "fetch", "--model", CHAT_MODEL, "--json"], capture_output=True,
                          text=True, check=True, timeout=600).stdout.splitlines()[-1]
    path = __import__("json").loads(path)["path"]
    wrong = "0" * 64
    done = run_serve(tmp_path, f'[[models]]\nid = "mine"\npath = "{path}"\nsha256 = "{wrong}"\n')
    assert done.returncode != 0
    assert "sha256" in done.stderr and wrong in done.stderr and "not serving it" in done.stderr, done.stderr


def test_a_catalog_with_a_mistake_is_refused_with_its_place(tmp_path):
    done = run_serve(tmp_path, f'[[models]]\nid = "a"\nsource = "{CHAT_MODEL}"\n'
                               f'[[models]]\nid = "a"\nsource = "nope"\n[models.pool]\nmax_replica = 3\n')
    assert done.returncode != 0
    assert "models[1].id" in done.stderr and "named twice" in done.stderr, done.stderr
    assert "models[1].pool" in done.stderr and "max_replica" in done.stderr, done.stderr


def models_listed(s, key=None):
    return sorted(m.id for m in s.client(key).models.list().data)




def strata_cli(s, *args):
    return subprocess.run([STRATA, "model", *args, "--url", s.base, "--api-key", s.admin_key],
                          capture_output=True, text=True, timeout=120)


def test_a_model_deployed_at_run_time_serves_from_its_own_pool_and_undeploys(catalog):
    """Deployed with `strata model deploy` (the admin API), kept in the
    database (there after a restart), served from a pool of its own that
    scales from zero; undeployed, it leaves the catalog at once and its
    replica drains and stops."""
    done = strata_cli(catalog, "deploy", "chat-v2", "--source", CHAT_MODEL, "--set", "pool.autoscale=true",
                      "--set", "pool.min_replicas=0", "--set", "pool.max_replicas=1",
                      "--set", "pool.scale_to_zero_after_secs=600", "--set", "engine.context_size=2048")
    assert done.returncode == 0, done.stderr
    wait_for("chat-v2 listed", lambda: "chat-v2" in models_listed(catalog), 15)
    listed = strata_cli(catalog, "list", "--json")
    rows = {m["id"]: m for m in json.loads(listed.stdout)["data"]}
    assert rows["chat-v2"]["managed_by"] == "api" and rows["chat-v2"]["spec"]["engine"] == {"context_size": 2048}
    assert rows[CHAT_MODEL]["managed_by"] == "config"
    chat = catalog.client().chat.completions.create(
        model="chat-v2", temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert chat.model == "chat-v2" and "Paris" in chat.choices[0].message.content
    assert len(replicas_of(catalog, "chat-v2")) == 1
    # Kept in the database: a restarted strata serve serves it again.
    catalog.restart()
    assert "chat-v2" in models_listed(catalog)
    catalog.client().chat.completions.create(
        model="chat-v2", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    done = strata_cli(catalog, "undeploy", "chat-v2")
    assert done.returncode == 0, done.stderr
    assert "chat-v2" not in models_listed(catalog)
    with pytest.raises(openai.NotFoundError):
        catalog.client().chat.completions.create(
            model="chat-v2", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    wait_for("chat-v2's replica gone", lambda: replicas_of(catalog, "chat-v2") == [], 60)
    assert catalog.admin("GET", "/admin/v1/models/chat-v2").status_code == 404
    # The other models' pools were not touched.
    assert len(replicas_of(catalog, CHAT_MODEL)) == 1


def test_only_a_platform_admin_deploys_and_a_bad_model_is_refused_whole(catalog, tmp_path):
    member = catalog.key
    body = {"id": "nope", "source": CHAT_MODEL}
    r = httpx.post(f"{catalog.base}/admin/v1/models", json=body, headers=bearer(member), timeout=10)
    assert r.status_code == 403, r.text
    # A file whose hash is not the one named: refused, nothing stored.
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + os.urandom(1024))
    r = catalog.admin("POST", "/admin/v1/models", {"id": "fake", "path": str(fake), "sha256": "0" * 64})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model", r.text
    assert "sha256" in r.json()["error"]["message"]
    assert catalog.admin("GET", "/admin/v1/models/fake").status_code == 404
    # Keys the engine or pool does not have, a source that is not built in.
    for bad in ({"id": "x", "source": CHAT_MODEL, "pool": {"max_replica": 2}},
                {"id": "x", "source": "no-such-source"},
                {"id": "x"},
                {"id": "has space", "source": CHAT_MODEL}):
        r = catalog.admin("POST", "/admin/v1/models", bad)
        assert r.status_code == 400, (bad, r.text)
    # The config file's models are changed there, not through the API.
    assert catalog.admin("POST", "/admin/v1/models", {"id": CHAT_MODEL, "source": CHAT_MODEL}).status_code == 409
    assert catalog.admin("PATCH", f"/admin/v1/models/{CHAT_MODEL}", {"replicas": 2}).status_code == 409
    assert catalog.admin("DELETE", f"/admin/v1/models/{CHAT_MODEL}").status_code == 409
    assert sorted(models_listed(catalog)) == sorted([CHAT_MODEL, MODEL_ID])


def test_the_one_model_of_a_file_without_a_catalog_is_the_catalog(server):
    """Without [[models]], [engine]'s model is the catalog's one entry: listed
    as declared by the config, and not deployable again under its id."""
    listed = server.admin("GET", "/admin/v1/models", expect=200).json()["data"]
    assert [(m["id"], m["managed_by"], m["serving"]) for m in listed] == [(MODEL_ID, "config", True)]
    r = server.admin("POST", "/admin/v1/models", {"id": MODEL_ID, "source": MODEL_ID})
    assert r.status_code == 409, r.text
