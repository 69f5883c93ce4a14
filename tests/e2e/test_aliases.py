"""Aliases and canaries (issue 26): an alias is a stable name for models of
the catalog, by weight. Clients send the alias; each conversation is
answered by one of its models and stays on it (its KV cache) while the
alias names that model; an operator moves clients to a new version with
`strata model alias`, without a client change. Two pools of the real
SmolLM2 engine under `strata serve`, the official openai SDK."""
import json
import uuid

import httpx
import openai
import pytest

from conftest import CHAT_MODEL, STRATA, Server, bearer
from test_models import strata_cli, wait_for

V1, V2 = "smollm2-v1", "smollm2-v2"

CONFIG = f"""
[engine]
context_size = 1024

[serve]
replicas = 1

[[models]]
id = "{V1}"
source = "{CHAT_MODEL}"

[[models]]
id = "{V2}"
source = "{CHAT_MODEL}"

[[models]]
id = "chat"
alias = {{ "{V1}" = 50, "{V2}" = 50 }}
"""


@pytest.fixture(scope="module")
def aliased():
    # One replica per version.
    s = Server(replicas=1, config=CONFIG, tenant="aliases", ready=2)
    yield s
    s.stop()


def ask(client, text, history=()):
    messages = [*history, {"role": "user", "content": text}]
    r = client.chat.completions.create(model="chat", messages=messages, max_tokens=3, temperature=0)
    return r, messages + [{"role": "assistant", "content": r.choices[0].message.content}]


def test_an_alias_is_listed_and_answered_by_its_models_with_their_ids(aliased):
    ids = sorted(m.id for m in aliased.client().models.list().data)
    assert ids == sorted(["chat", V1, V2])
    # Different conversations are split between the two versions; the
    # answer names the version that gave it (as OpenAI names a snapshot).
    client = aliased.client()
    seen = {ask(client, f"Conversation {i}: say a colour.")[0].model for i in range(16)}
    assert seen == {V1, V2}, seen


def test_a_chats_later_turns_stay_on_its_model(aliased):
    client = aliased.client()
    for i in range(6):
        first, history = ask(client, f"Thread {uuid.uuid4()}: hello")
        second, history = ask(client, "and again", history)
        third, _ = ask(client, "once more", history)
        assert first.model == second.model == third.model, (first.model, second.model, third.model)


def test_a_response_chain_and_a_conversation_stay_on_their_model(aliased):
    client = aliased.client()
    for _ in range(4):
        r = client.responses.create(model="chat", input=f"Chain {uuid.uuid4()}: hi", max_output_tokens=3)
        model = r.model
        assert model in (V1, V2)
        for _ in range(2):
            r = client.responses.create(model="chat", input="more", previous_response_id=r.id,
                                        max_output_tokens=3)
            assert r.model == model
    conv = client.conversations.create()
    models = {client.responses.create(model="chat", input=f"turn {i}", conversation=conv.id,
                                      max_output_tokens=3).model for i in range(3)}
    assert len(models) == 1, models


def test_a_key_uses_the_alias_it_may_and_not_the_models_behind_it(aliased):
    key = aliased.new_key(aliased.tenant["id"], "member", models=["chat"])
    client = aliased.client(key)
    assert [m.id for m in client.models.list().data] == ["chat"]
    r, _ = ask(client, "Hi")
    assert r.model in (V1, V2)
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model=r.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert refused.value.code == "model_not_found"
    # And a key for one version does not get the alias.
    only_v1 = aliased.client(aliased.new_key(aliased.tenant["id"], "member", models=[V1]))
    with pytest.raises(openai.NotFoundError) as refused:
        ask(only_v1, "Hi")
    assert refused.value.code == "model_not_found" and "chat" in str(refused.value)


def chain_on(client, alias, model, tries=40):
    for _ in range(tries):
        r = client.responses.create(model=alias, input=f"Chain {uuid.uuid4()}", max_output_tokens=2)
        if r.model == model:
            return r
    raise AssertionError(f"no new chain went to {model} in {tries}")


def test_an_operator_moves_clients_to_a_new_version_without_a_client_change(aliased):
    """An alias deployed at run time, canary to full move: weight 0 takes
    no new conversations but keeps its own; taking the model out of the
    alias moves them too. Usage is the versions', never the alias's."""
    client = aliased.client()
    done = strata_cli(aliased, "alias", "canary", f"{V1}=90", f"{V2}=10")
    assert done.returncode == 0, done.stderr
    old = chain_on(client, "canary", V1)
    done = strata_cli(aliased, "alias", "canary", f"{V1}=0", f"{V2}=100")
    assert done.returncode == 0, done.stderr
    fresh = {client.chat.completions.create(model="canary", max_tokens=2, messages=[
        {"role": "user", "content": f"After the move {i}"}]).model for i in range(8)}
    assert fresh == {V2}, fresh
    kept = client.responses.create(model="canary", input="still here?", previous_response_id=old.id,
                                   max_output_tokens=2)
    assert kept.model == V1, "a conversation stays on its version while the alias names it"
    done = strata_cli(aliased, "alias", "canary", f"{V2}=100")
    assert done.returncode == 0, done.stderr
    spec = aliased.admin("GET", "/admin/v1/models/canary", expect=200).json()["spec"]
    assert spec["alias"] == {V2: 100}
    moved = client.responses.create(model="canary", input="and now?", previous_response_id=kept.id,
                                    max_output_tokens=2)
    assert moved.model == V2, "a version the alias no longer names hands its conversations on"
    # The config file's alias is changed there, not through the API.
    assert strata_cli(aliased, "alias", "chat", f"{V2}=1").returncode != 0
    assert strata_cli(aliased, "undeploy", "canary").returncode == 0

    def usage_models():
        usage = aliased.admin("GET", f"/admin/v1/tenants/{aliased.tenant['id']}/usage", expect=200).json()
        return {row["model"] for row in usage["data"]}
    wait_for("usage of both versions", lambda: {V1, V2} <= usage_models(), 10)
    assert not {"chat", "canary"} & usage_models()


def test_an_alias_names_served_models_and_its_models_stay_while_it_names_them(aliased):
    # Models the catalog does not serve, other aliases, no weight: refused whole.
    for bad in ({"id": "a1", "alias": {"nope": 1}},
                {"id": "a1", "alias": {"chat": 1}},
                {"id": "a1", "alias": {V1: 0}},
                {"id": "a1", "alias": {V1: 1}, "source": CHAT_MODEL}):
        r = aliased.admin("POST", "/admin/v1/models", bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model", (bad, r.text)
    assert aliased.admin("GET", "/admin/v1/models/a1").status_code == 404
    # A deployed model an alias names is not undeployed under it.
    done = strata_cli(aliased, "deploy", "smollm2-v3", "--source", CHAT_MODEL, "--set", "pool.autoscale=true",
                      "--set", "pool.min_replicas=0", "--set", "pool.max_replicas=1")
    assert done.returncode == 0, done.stderr
    done = strata_cli(aliased, "alias", "next", "smollm2-v3=1", f"{V2}=9")
    assert done.returncode == 0, done.stderr
    assert "next" in [m.id for m in aliased.client().models.list().data]
    r = httpx.delete(f"{aliased.base}/admin/v1/models/smollm2-v3", headers=bearer(aliased.admin_key), timeout=10)
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_in_use", r.text
    assert "next" in r.json()["error"]["message"]
    assert strata_cli(aliased, "alias", "next", f"{V2}=1").returncode == 0
    assert strata_cli(aliased, "undeploy", "smollm2-v3").returncode == 0
    assert strata_cli(aliased, "undeploy", "next").returncode == 0
    listed = json.loads(strata_cli(aliased, "list", "--json").stdout)["data"]
    assert {m["id"] for m in listed} == {V1, V2, "chat"}
