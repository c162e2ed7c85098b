"""The agent catalog: agent.defined events behind POST/GET /v1/agents, and their schemas."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from ledger import agents
from ledger.errors import Invalid
from ledger.rebuild import rebuild
from ledger.store import EventStore
from tests.conftest import Api

MakeApi = Callable[..., Coroutine[Any, Any, Api]]
SCHEMA = {
    "type": "object",
    "properties": {
        "usernames": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "title": "Usernames",
            "description": "Profiles to collect",
        },
        "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
        "mode": {"type": "string", "enum": ["fast", "full"]},
    },
    "required": ["usernames"],
    "additionalProperties": False,
}


async def test_define_lists_and_redefines(api: Api) -> None:
    """POST /v1/agents appends agent.defined; GET lists the definition in force, by group."""
    made = await api.post(
        "/v1/agents",
        {
            "name": "instagram/profiles",
            "title": "Instagram Profiles",
            "description": "Public profile data",
            "params_schema": SCHEMA,
        },
    )
    assert made["name"] == made["agent"] == "instagram/profiles" and made["group"] == "instagram"
    assert made["slug"] == "profiles" and made["title"] == "Instagram Profiles"
    assert made["params_schema"] == SCHEMA and made["price"]["per_row"] == 1
    await api.post("/v1/agents", {"agent": "linkedin/company"})
    await api.post(
        "/v1/agents",
        {"agent": "instagram/profiles", "description": "v2", "price": {"per_row": "0.5"}},
    )
    listed = await api.get("/v1/agents")
    assert [a["agent"] for a in listed["agents"]] == ["instagram/profiles", "linkedin/company"]
    first = listed["agents"][0]
    assert first["description"] == "v2" and first["title"] is None  # redefined whole
    assert first["price"]["per_row"] == 0.5
    prices = await api.get("/v1/prices")  # the agent's price is the one credits use
    assert [(p["agent"], p["per_row"]) for p in prices["prices"]] == [("instagram/profiles", 0.5)]
    only = await api.get("/v1/agents", params={"group": "linkedin"})
    assert [a["agent"] for a in only["agents"]] == ["linkedin/company"]
    events = await api.get("/v1/events", params={"types": "agent.defined"})
    assert [e["stream"] for e in events["events"]] == [
        "$agents/instagram/profiles",
        "$agents/linkedin/company",
        "$agents/instagram/profiles",
    ]
    assert events["events"][0]["data"]["params_schema"] == SCHEMA


async def test_catalog_replays_to_the_same_read_model(api: Api, store: EventStore) -> None:
    """A rebuild folds agent.defined into the same catalog the live projection holds."""
    await api.post("/v1/agents", {"agent": "instagram/profiles", "params_schema": SCHEMA})
    await api.post("/v1/agents", {"agent": "instagram/profiles", "description": "v2"})
    await api.post("/v1/agents", {"agent": "linkedin/company", "price": {"per_job": 1}})
    before = await api.get("/v1/agents")
    verified = await rebuild(store.backend, store.projectors, verify=True)
    assert verified.difference is None
    report = await rebuild(store.backend, store.projectors)
    assert report.difference is None
    assert await api.get("/v1/agents") == before


async def test_define_refuses_bad_input(api: Api, make_api: MakeApi) -> None:
    """A bad name, an unsupported schema keyword or a bad price is 422 naming the field."""
    cases = [
        ({"agent": "no-slash"}, "agent"),
        ({"name": "no-slash"}, "name"),
        ({"description": "no name"}, "name"),
        ({"name": "a/b", "agent": "a/c"}, "agent"),
        ({"name": "a/b", "price": "-1"}, "price"),
        ({"name": "a/b", "parameters": {"x": {"type": "date"}}}, "parameters.x.type"),
        ({"name": "a/b", "parameters": {}, "params_schema": {}}, "parameters"),
        ({"agent": "a/b/c"}, "agent"),
        ({"agent": "all/x"}, "agent"),
        ({"agent": "a/b", "params_schema": {"oneOf": []}}, "params_schema.oneOf"),
        (
            {"agent": "a/b", "params_schema": {"properties": {"x": {"type": "date"}}}},
            "params_schema.properties.x.type",
        ),
        ({"agent": "a/b", "params_schema": {"type": "array"}}, "params_schema.type"),
        (
            {"agent": "a/b", "params_schema": {"properties": {"x": {"pattern": "(a+)+$"}}}},
            "params_schema.properties.x.pattern",
        ),
        ({"agent": "a/b", "price": {"per_row": "0.00001"}}, "price.per_row"),
        ({"agent": "a/b", "typo": 1}, "typo"),
    ]
    for body, field in cases:
        answer = await api.post("/v1/agents", body, status=422)
        assert answer["error"]["field"] == field, body
    writer = await make_api(role="writer")
    await writer.post("/v1/agents", {"agent": "a/b"}, status=403)
    assert (await api.get("/v1/agents"))["agents"] == []


async def test_mindcase_parameters_and_a_number_price(api: Api) -> None:
    """Mindcase's parameter list is taken as the schema it means; a number price is per row."""
    made = await api.post(
        "/v1/agents",
        {
            "name": "instagram/profiles",
            "parameters": {
                "usernames": {"name": "Usernames", "type": "array", "required": True},
                "mode": {"type": "string", "options": [{"label": "Fast", "value": "fast"}]},
            },
            "price": 2,
        },
    )
    assert made["params_schema"] == {
        "type": "object",
        "properties": {
            "usernames": {"type": "array", "title": "Usernames"},
            "mode": {"type": "string", "enum": ["fast"]},
        },
        "required": ["usernames"],
    }
    assert made["price"]["per_row"] == 2 and made["price"]["per_job"] == 0
    as_schema = await api.post(
        "/v1/agents", {"name": "x/y", "parameters": made["params_schema"]}
    )  # a JSON Schema under Mindcase's word is taken as the schema
    assert as_schema["params_schema"] == made["params_schema"]
    run = "/compat/mindcase/api/v1/agents/instagram/profiles/run"
    bad = await api.post(run, {"params": {"mode": "fast"}}, status=422)
    assert bad["error"]["field"] == "params.usernames"
    await api.post(run, {"params": {"usernames": ["nike"], "mode": "fast"}})


async def test_catalog_is_per_tenant(api: Api, make_api: MakeApi) -> None:
    """Another tenant neither sees nor runs the first tenant's agents."""
    await api.post("/v1/agents", {"agent": "instagram/profiles"})
    other = await make_api(tenant="globex")
    assert (await other.get("/v1/agents"))["agents"] == []
    base = "/compat/mindcase/api/v1/agents/instagram/profiles"
    await other.get(base, status=404)
    await other.post(f"{base}/run", {"params": {}}, status=404)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "params.usernames"),
        ({"usernames": []}, "params.usernames"),
        ({"usernames": [""]}, "params.usernames[0]"),
        ({"usernames": ["a"], "limit": 0}, "params.limit"),
        ({"usernames": ["a"], "limit": 1.5}, "params.limit"),
        ({"usernames": ["a"], "limit": True}, "params.limit"),
        ({"usernames": ["a"], "mode": "slow"}, "params.mode"),
        ({"usernames": ["a"], "extra": 1}, "params.extra"),
        ({"usernames": "nike"}, "params.usernames"),
    ],
)
def test_validate_names_the_field(params: dict[str, Any], field: str) -> None:
    """Params outside the schema fail with the field to blame."""
    agents.check_schema(SCHEMA)
    with pytest.raises(Invalid) as caught:
        agents.validate(SCHEMA, params)
    assert caught.value.field == field


def test_validate_accepts_what_the_schema_allows() -> None:
    """Params within the schema pass, optional ones left out."""
    agents.validate(SCHEMA, {"usernames": ["nike"]})
    agents.validate(SCHEMA, {"usernames": ["nike", "puma"], "limit": 100, "mode": "full"})


def test_parameters_render_as_mindcase_lists_them() -> None:
    """Top-level properties become Mindcase's parameter entries."""
    rendered = agents.parameters(SCHEMA)
    assert rendered["usernames"] == {
        "name": "Usernames",
        "type": "array",
        "required": True,
        "description": "Profiles to collect",
        "default": None,
    }
    assert rendered["limit"]["default"] == 10 and rendered["limit"]["required"] is False
    assert rendered["mode"]["options"] == [
        {"label": "fast", "value": "fast"},
        {"label": "full", "value": "full"},
    ]
