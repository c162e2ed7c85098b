"""The OpenAPI 3.1 document, generated from the msgspec types the handlers use.

Besides the types, it states what the wire carries and the types alone do not say: amounts are
JSON numbers (the encoder writes decimals as numbers), events are a union discriminated by
``type`` with each type's ``data``, and the headers each route reads and answers. Every
response the test suite receives is validated against this document.
"""

from __future__ import annotations

import re
import types
from typing import Any, Union, get_args, get_origin

import msgspec

from api.http import OPERATIONS, Operation
from api.schemas import ErrorEnvelope
from ledger.audit import EventRecord
from ledger.events import EVENT_TYPES
from ledger.ids import JOB_ID

_PARAM = re.compile(r"\{(\w+)\}")
_TEXT: dict[str, Any] = {"type": "string"}
_PATH_SCHEMAS: dict[str, dict[str, Any]] = {"id": {"type": "string", "pattern": JOB_ID.pattern}}
_ERROR_TEXT = {
    400: "Malformed request",
    401: "Missing, bad or revoked key",
    402: "Insufficient credits",
    403: "Role too weak",
    404: "Not found",
    409: "Conflict",
    410: "Gone",
    413: "Body too large",
    422: "Invalid input",
    429: "Rate limited",
}
# Names a generator turns into method names; a route missing here gets a derived camelCase name.
OPERATION_IDS = {
    ("GET", "/healthz"): "health",
    ("POST", "/v1/webhooks"): "createWebhook",
    ("GET", "/v1/webhooks"): "listWebhooks",
    ("GET", "/v1/webhooks/{id}"): "getWebhook",
    ("PATCH", "/v1/webhooks/{id}"): "updateWebhook",
    ("DELETE", "/v1/webhooks/{id}"): "deleteWebhook",
    ("POST", "/v1/webhooks/{id}/rotate"): "rotateWebhookSecret",
    ("GET", "/v1/webhooks/{id}/deliveries"): "listWebhookDeliveries",
    ("POST", "/v1/webhooks/{id}/recover"): "recoverWebhook",
    ("POST", "/v1/agents"): "defineAgent",
    ("GET", "/v1/agents"): "listAgents",
    ("GET", "/v1/me"): "getMe",
    ("GET", "/v1/credits/usage"): "getCreditUsage",
    ("POST", "/v1/audit/verify"): "verifyAudit",
    ("GET", "/v1/openapi.json"): "getOpenapi",
    ("POST", "/v1/jobs"): "createJob",
    ("GET", "/v1/jobs"): "listJobs",
    ("DELETE", "/v1/jobs"): "deleteJobs",
    ("GET", "/v1/jobs/stats"): "getStats",
    ("GET", "/v1/jobs/running"): "listRunningJobs",
    ("GET", "/v1/jobs/{id}"): "getJob",
    ("DELETE", "/v1/jobs/{id}"): "deleteJob",
    ("GET", "/v1/jobs/{id}/events"): "listJobEvents",
    ("POST", "/v1/jobs/{id}/events"): "appendEvents",
    ("POST", "/v1/jobs/{id}/cancel"): "cancelJob",
    ("POST", "/v1/jobs/{id}/archive"): "archiveJob",
    ("POST", "/v1/jobs/{id}/redact"): "redactJob",
    ("GET", "/v1/jobs/{id}/results"): "getJobResults",
    ("GET", "/v1/results/{result_id}"): "getResult",
    ("GET", "/v1/results/{result_id}/job"): "getResultJob",
    ("POST", "/v1/prices"): "setPrice",
    ("GET", "/v1/prices"): "listPrices",
    ("POST", "/v1/credits/grants"): "grantCredits",
    ("GET", "/v1/credits"): "getCredits",
    ("GET", "/v1/credits/statement"): "getStatement",
    ("GET", "/v1/accounts"): "listAccounts",
    ("GET", "/v1/accounts/{account}"): "getAccount",
    ("GET", "/v1/events"): "listEvents",
    ("GET", "/v1/events/stream"): "streamEvents",
    ("GET", "/v1/audit/head"): "getAuditHead",
    ("GET", "/v1/audit/export"): "exportAudit",
}
_AMOUNT: dict[str, Any] = {
    "type": "number",
    "description": "Credits: an exact decimal with at most 4 fractional digits, as a JSON number",
}
_DECIMAL = {"type": "string", "format": "decimal"}
_HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-Id": {
        "description": "The request's id, as in the server's log (echoes the client's own)",
        "schema": {"type": "string"},
    },
    "X-RateLimit-Limit": {
        "description": "Requests allowed per key per minute (under serve --rate-limit)",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Remaining": {
        "description": "Requests left in this minute",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Reset": {
        "description": "When the window resets, in epoch seconds",
        "schema": {"type": "integer"},
    },
    "X-Ledger-Position": {
        "description": "Writes: the newest position of the tenant's chain once the write "
        "committed; a read that presents it sees the write (read-your-writes on replicas)",
        "schema": {"type": "integer", "minimum": 0},
    },
}
_WRITE_ONLY_HEADERS = frozenset({"X-Ledger-Position"})
_POSTED_READS = frozenset({"/v1/audit/verify"})  # a POST that writes nothing
_POSITION = {
    "name": "X-Ledger-Position",
    "in": "header",
    "required": False,
    "description": "A position a write answered: the read sees at least that much of the "
    "tenant's chain (a read replica that has not replayed it within a moment leaves the read "
    "to the primary)",
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}
_RETRY_AFTER = {"description": "Seconds to wait", "schema": {"type": "integer"}, "required": True}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "The same key with the same request within 24 h answers the first answer "
    "again and writes nothing; with another request it is 409",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}
_PROJECT = {
    "name": "X-Project-Id",
    "in": "header",
    "required": False,
    "description": "Scope every job read to this project and stamp created jobs with it",
    "schema": {"type": "string"},
}
_LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "Resume after this position (sent by EventSource on reconnect; wins over after)",
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}


def _members(tp: Any) -> list[Any]:
    if tp is None:
        return []
    if get_origin(tp) in (Union, types.UnionType):
        return list(get_args(tp))
    return [tp]


def build(title: str = "jobledger", version: str = "0.1.0") -> dict[str, Any]:
    ops = [op for op in OPERATIONS if op.path.startswith(("/v1", "/healthz"))]
    used: list[Any] = [ErrorEnvelope]
    for op in ops:
        used.extend(_members(op.body))
        used.extend(_members(op.response))
    schemas, components = msgspec.json.schema_components(
        used, ref_template="#/components/schemas/{name}"
    )
    # the API's own types carry amounts only; on the wire they are numbers, both directions
    components = {name: _amounts(schema) for name, schema in components.items()}
    components.update(_event_components())
    refs = dict(zip(used, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs, components)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "An event-sourced job ledger: every lifecycle change is an appended, "
            "hash-chained event; read models, credits and the audit log are folded from them. "
            "Amounts are exact decimals sent as JSON numbers; times are RFC 3339 in UTC.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "headers": {**_HEADERS, "Retry-After": _RETRY_AFTER},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _amounts(schema: Any) -> Any:
    """``schema`` with every decimal (alone, or ``int | Decimal``) as a JSON number."""
    if isinstance(schema, list):
        return [_amounts(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("type") == "string" and schema.get("format") == "decimal":
        amount = {k: v for k, v in schema.items() if k not in ("type", "format")}
        if "default" in amount:
            amount["default"] = msgspec.json.decode(amount["default"])  # "0" -> 0
        return {**amount, **_AMOUNT}
    options = schema.get("anyOf")
    if isinstance(options, list) and _DECIMAL in options:
        rest = [o for o in options if o not in (_DECIMAL, {"type": "integer"})]
        around = {k: v for k, v in schema.items() if k != "anyOf"}  # default, title: outside
        return {**around, "anyOf": [_AMOUNT, *rest]} if rest else {**around, **_AMOUNT}
    return {key: _amounts(value) for key, value in schema.items()}


def _event_components() -> dict[str, Any]:
    """``EventRecord`` as a union over ``type``: one variant per event type, with its data.

    Event data keeps amounts as decimal strings (the text the hash covers), so these schemas
    come straight from the event Structs. ``data`` is null once a redaction erased it.
    """
    tags = sorted(EVENT_TYPES)
    classes = [EVENT_TYPES[tag] for tag in tags]
    data_refs, found = msgspec.json.schema_components(
        classes, ref_template="#/components/schemas/{name}"
    )
    out: dict[str, Any] = {}
    for name, schema in found.items():
        schema = dict(schema)
        if "properties" in schema and name in {c.__name__ for c in classes}:
            # the tag lives beside ``data`` (the event's ``type``), not inside it
            schema["properties"] = {k: v for k, v in schema["properties"].items() if k != "type"}
            schema["required"] = [r for r in schema.get("required", []) if r != "type"]
            if not schema["required"]:
                del schema["required"]
            name = f"{name}Data"
        out[name] = schema
    envelope = _record_properties()
    mapping: dict[str, str] = {}
    variants = []
    for tag, cls, ref in zip(tags, classes, data_refs, strict=True):
        variant = f"{cls.__name__}Event"
        data_ref = {"$ref": ref["$ref"] + "Data"}
        out[variant] = {
            "title": variant,
            "type": "object",
            "properties": {
                **envelope["properties"],
                "type": {"const": tag},
                "data": {"anyOf": [data_ref, {"type": "null"}]},
            },
            "required": envelope["required"],
        }
        mapping[tag] = f"#/components/schemas/{variant}"
        variants.append({"$ref": mapping[tag]})
    out["EventRecord"] = {
        "title": "Event",
        "description": "An event as the API and the audit export show it; `data` depends on "
        "`type`, and is null once erased by a redaction",
        "oneOf": variants,
        "discriminator": {"propertyName": "type", "mapping": mapping},
    }
    return out


def _record_properties() -> dict[str, Any]:
    _, found = msgspec.json.schema_components([EventRecord])
    record = found["EventRecord"]
    properties = dict(record["properties"])
    for name in ("occurred_at", "recorded_at"):
        properties[name] = {"type": "string", "format": "date-time"}
    for name in ("data_hash", "prev_hash", "hash"):
        properties[name] = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
    return {"properties": properties, "required": list(record["required"])}


def _schema(tp: Any, refs: dict[Any, Any]) -> dict[str, Any]:
    members = _members(tp)
    if len(members) == 1:
        return dict(refs[members[0]])
    return {"oneOf": [refs[m] for m in members]}


def operation_id(op: Operation) -> str:
    known = OPERATION_IDS.get((op.method, op.path))
    if known is not None:
        return known
    words = [w for w in re.split(r"[^A-Za-z0-9]+", op.path) if w and w != "v1"]
    words = [w for w in words if w not in _PARAM.findall(op.path)]
    return op.method.lower() + "".join(w[:1].upper() + w[1:] for w in words)


def _body_required(tp: Any, components: dict[str, Any]) -> bool:
    """A body none of whose fields is required may be left out (``read_optional_body``)."""
    for member in _members(tp):
        if components.get(member.__name__, {}).get("required"):
            return True
    return False


def _operation(op: Operation, refs: dict[Any, Any], components: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": operation_id(op),
        "tags": list(op.tags),
    }
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _PATH_SCHEMAS.get(name, _TEXT)}
        for name in _PARAM.findall(op.path)
    ]
    if op.query is not None:
        _, comps = msgspec.json.schema_components([op.query])
        query = comps[op.query.__name__]
        for name, prop in query.get("properties", {}).items():
            params.append(
                {
                    "name": name,
                    "in": "query",
                    "required": name in query.get("required", []),
                    "schema": prop,
                }
            )
    if op.role != "public":
        params.append(dict(_PROJECT))
    writes = op.method in ("POST", "PUT", "PATCH", "DELETE") and op.path not in _POSTED_READS
    if op.method in ("POST", "DELETE") and op.role != "public":
        params.append(dict(_IDEMPOTENCY_KEY))
    if op.method == "GET" and op.role != "public":
        params.append(dict(_POSITION))
    if op.content == "text/event-stream":
        params.append(dict(_LAST_EVENT_ID))
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": _body_required(op.body, components),
            "content": {"application/json": {"schema": _schema(op.body, refs)}},
        }
    responses: dict[str, Any] = {}
    if op.response is not None:
        content = {op.content: {"schema": _schema(op.response, refs)}}
    else:
        content = {op.content: {"schema": _TEXT}} if op.content != "application/json" else {}
    content.update({other: {"schema": _TEXT} for other in op.also})
    names = [n for n in _HEADERS if writes or n not in _WRITE_ONLY_HEADERS]
    names = names if op.role != "public" else ["X-Request-Id"]
    headers = {name: {"$ref": f"#/components/headers/{name}"} for name in names}
    responses[str(op.status)] = {
        "description": "OK",
        "headers": headers,
        **({"content": content} if content else {}),
    }
    error = {"application/json": {"schema": refs[ErrorEnvelope]}}
    # every route refuses a control character in a path parameter, query value or header
    codes = set(op.errors) | {422}
    if op.role != "public":
        out["security"] = [{"bearer": []}]
        codes |= {401, 403, 429}  # 429 only under ``serve --rate-limit``
    if any(p["in"] == "path" for p in params):
        codes.add(404)  # a path names something: it may not exist (or not be the caller's)
    if "{id}" in op.path:
        codes.add(422)  # a job id outside its pattern
    if op.body is not None or op.query is not None:
        codes |= {400, 422}
    if any(p["in"] == "header" and p["name"] != "X-Project-Id" for p in params):
        codes.add(422)  # a malformed Idempotency-Key or Last-Event-ID
    if any(p["name"] == "Idempotency-Key" for p in params):
        codes.add(409)  # an Idempotency-Key used before with another request
    if op.body is not None:
        codes.add(413)
    for code in sorted(codes):
        responses[str(code)] = {
            "description": _ERROR_TEXT.get(code, "Error"),
            "headers": (
                {**headers, "Retry-After": {"$ref": "#/components/headers/Retry-After"}}
                if code == 429
                else headers
            ),
            "content": error,
        }
    out["responses"] = responses
    return out
