"""The agent catalog: agents defined as events, and parameters checked against their schema.

An agent is ``group/slug`` (Mindcase's agent paths) with a name, a description and a
parameter schema. ``agent.defined`` on the stream ``$agents/<group>/<slug>`` defines it; a
later one replaces it. Running an agent reads the definition in force from that stream inside
the same transaction as the ``job.queued`` it appends, so a job is always checked against the
schema that was current at its position.

The schema is a small, documented subset of JSON Schema, checked here rather than with the
``jsonschema`` package: the subset is what the catalog renders for SDKs (Mindcase's parameter
list), a schema using anything else is refused when it is defined (not silently ignored), and
errors must name the field as ``params.<path>`` in the ledger's own ``Invalid``. ``pattern``
is left out on purpose: a tenant's regular expression would run on the shared event loop, and
Python's ``re`` has no time limit, so one tenant's schema could stall every other's requests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ledger import commands
from ledger.errors import Invalid, NotFound
from ledger.events import AgentDefined, JobQueued, Price
from ledger.jobs import JobState
from ledger.records import Recorded
from ledger.store import UnitOfWork

AGENT_NAME = re.compile(r"^([A-Za-z0-9_.-]{1,100})/([A-Za-z0-9_.-]{1,99})$")
RESERVED_GROUPS = frozenset({"all"})  # ``GET /agents/all`` lists every group in Mindcase

TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "format", "$schema"})
KEYWORDS = ANNOTATIONS | {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
}
MAX_DEPTH = 16


def agent_stream(agent: str) -> str:
    return f"$agents/{agent}"


def split_name(agent: str) -> tuple[str, str]:
    """``(group, slug)`` of an agent name, or ``Invalid`` naming ``agent``."""
    found = AGENT_NAME.match(agent)
    if found is None:
        raise Invalid("an agent is group/slug, each 1-100 of [A-Za-z0-9_.-]", field="agent")
    return found.group(1), found.group(2)


# -- the schema subset ---------------------------------------------------------------------------


def check_schema(schema: Mapping[str, Any], path: str = "params_schema", depth: int = 0) -> None:
    """Refuse a schema that uses anything outside the supported subset, naming where."""
    if depth > MAX_DEPTH:
        raise Invalid(f"the schema is nested more than {MAX_DEPTH} levels deep", field=path)
    for key, value in schema.items():
        where = f"{path}.{key}"
        if key not in KEYWORDS:
            raise Invalid(f"unsupported schema keyword {key!r}", field=where)
        if key == "type":
            names = value if isinstance(value, list) else [value]
            if not names or any(not isinstance(n, str) or n not in TYPES for n in names):
                raise Invalid(f"type is one or a list of {', '.join(TYPES)}", field=where)
        elif key == "properties":
            if not isinstance(value, dict):
                raise Invalid("properties is an object of schemas", field=where)
            for name, sub in value.items():
                if not isinstance(sub, dict):
                    raise Invalid("each property is a schema object", field=f"{where}.{name}")
                check_schema(sub, f"{where}.{name}", depth + 1)
        elif key == "items":
            if not isinstance(value, dict):
                raise Invalid("items is one schema object", field=where)
            check_schema(value, where, depth + 1)
        elif key == "additionalProperties":
            if not isinstance(value, bool):
                raise Invalid("additionalProperties is true or false", field=where)
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise Invalid("required is a list of property names", field=where)
        elif key == "enum":
            if not isinstance(value, list) or not value:
                raise Invalid("enum is a non-empty list", field=where)
        elif key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Invalid(f"{key} is a number", field=where)
        elif key in ("minLength", "maxLength", "minItems", "maxItems"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise Invalid(f"{key} is a non-negative integer", field=where)
    if depth == 0 and schema.get("type", "object") != "object":
        raise Invalid("a parameter schema describes an object", field=f"{path}.type")


def _is(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, TYPES[name])


def validate(schema: Mapping[str, Any], value: Any, path: str = "params") -> None:
    """Check ``value`` against ``schema`` (the subset above); ``Invalid`` names the field."""
    kind = schema.get("type")
    if kind is not None:
        names = kind if isinstance(kind, list) else [kind]
        if not any(_is(value, n) for n in names):
            raise Invalid(f"{path} must be of type {' or '.join(names)}", field=path)
    if "const" in schema and value != schema["const"]:
        raise Invalid(f"{path} must be {schema['const']!r}", field=path)
    if "enum" in schema and value not in schema["enum"]:
        options = ", ".join(repr(v) for v in schema["enum"])
        raise Invalid(f"{path} must be one of {options}", field=path)
    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(schema, value, path)
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise Invalid(f"{path} is shorter than {schema['minLength']}", field=path)
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise Invalid(f"{path} is longer than {schema['maxLength']}", field=path)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise Invalid(f"{path} needs at least {schema['minItems']} items", field=path)
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise Invalid(f"{path} takes at most {schema['maxItems']} items", field=path)
        if "items" in schema:
            for index, item in enumerate(value):
                validate(schema["items"], item, f"{path}[{index}]")
    if isinstance(value, dict):
        properties: dict[str, Any] = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                raise Invalid(f"{path}.{name} is required", field=f"{path}.{name}")
        for name, item in value.items():
            if name in properties:
                validate(properties[name], item, f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                raise Invalid(f"{path}.{name} is not a parameter", field=f"{path}.{name}")


def _check_number(schema: Mapping[str, Any], value: float, path: str) -> None:
    if "minimum" in schema and value < schema["minimum"]:
        raise Invalid(f"{path} must be at least {schema['minimum']}", field=path)
    if "maximum" in schema and value > schema["maximum"]:
        raise Invalid(f"{path} must be at most {schema['maximum']}", field=path)
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        raise Invalid(f"{path} must be more than {schema['exclusiveMinimum']}", field=path)
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        raise Invalid(f"{path} must be less than {schema['exclusiveMaximum']}", field=path)


# -- commands ------------------------------------------------------------------------------------


async def define(
    uow: UnitOfWork,
    tenant: str,
    definition: AgentDefined,
    *,
    price: Price | None = None,
    actor: str,
) -> Recorded:
    """Append ``agent.defined``; with a price, also the agent's ``price.set`` (one source)."""
    group, _ = split_name(definition.agent)
    if group in RESERVED_GROUPS:
        raise Invalid(f"{group!r} is a reserved group name", field="agent")
    check_schema(definition.params_schema)
    recorded = await uow.append(tenant, agent_stream(definition.agent), definition, actor=actor)
    if price is not None:
        await commands.set_price(uow, tenant, definition.agent, price, actor=actor)
    return recorded


async def definition_of(uow: UnitOfWork, tenant: str, agent: str) -> AgentDefined:
    """The definition in force, read from the agent's stream; ``NotFound`` if none."""
    event = await uow.latest(tenant, agent_stream(agent))
    if not isinstance(event, AgentDefined):
        raise NotFound(f"no agent {agent}")
    return event


async def run(
    uow: UnitOfWork,
    tenant: str,
    job_id: str,
    queued: JobQueued,
    *,
    actor: str,
    enforce_credits: bool = False,
) -> JobState:
    """Queue a job of a catalog agent, its params checked against the agent's schema."""
    definition = await definition_of(uow, tenant, queued.agent)
    validate(definition.params_schema, queued.params)
    return await commands.create_job(
        uow, tenant, job_id, queued, actor=actor, enforce_credits=enforce_credits, fresh_id=True
    )


def looks_like_schema(value: Mapping[str, Any]) -> bool:
    """A JSON Schema object rather than Mindcase's ``{key: {...}}`` parameter list."""
    return value.get("type") == "object" or isinstance(value.get("properties"), dict)


def schema_from_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Mindcase's parameter list (``{key: {name, type, required, description, default,
    options}}``, as its SDK shows an agent) as the equivalent schema of the subset."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for key, spec in parameters.items():
        where = f"parameters.{key}"
        if not isinstance(spec, dict):
            raise Invalid("each parameter is an object", field=where)
        unknown = set(spec) - {"name", "type", "required", "description", "default", "options"}
        if unknown:
            raise Invalid(f"unknown parameter field {sorted(unknown)[0]!r}", field=where)
        kind = spec.get("type", "string")
        if kind not in TYPES:
            raise Invalid(f"type is one of {', '.join(TYPES)}", field=f"{where}.type")
        prop: dict[str, Any] = {"type": kind}
        for source, target in (("name", "title"), ("description", "description")):
            if spec.get(source) is not None:
                prop[target] = spec[source]
        if "default" in spec and spec["default"] is not None:
            prop["default"] = spec["default"]
        options = spec.get("options")
        if options:
            if not isinstance(options, list):
                raise Invalid("options is a list", field=f"{where}.options")
            prop["enum"] = [
                o["value"] if isinstance(o, dict) and "value" in o else o for o in options
            ]
        if spec.get("required") is True:
            required.append(key)
        properties[key] = prop
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def parameters(schema: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The schema's top-level properties as Mindcase lists an agent's parameters."""
    required = set(schema.get("required", []))
    out: dict[str, dict[str, Any]] = {}
    for key, sub in schema.get("properties", {}).items():
        kind = sub.get("type", "string")
        entry: dict[str, Any] = {
            "name": sub.get("title", key),
            "type": kind if isinstance(kind, str) else kind[0],
            "required": key in required,
            "description": sub.get("description", ""),
            "default": sub.get("default"),
        }
        if "enum" in sub:
            entry["options"] = [{"label": str(v), "value": v} for v in sub["enum"]]
        out[key] = entry
    return out
