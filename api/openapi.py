"""The OpenAPI 3.1 document, generated from the msgspec types the handlers use."""

from __future__ import annotations

import re
import types
from typing import Any, Union, get_args, get_origin

import msgspec

from api.http import OPERATIONS, Operation
from api.schemas import ErrorEnvelope
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
    refs = dict(zip(used, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "An event-sourced job ledger: every lifecycle change is an appended, "
            "hash-chained event; read models, credits and the audit log are folded from them.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _schema(tp: Any, refs: dict[Any, Any]) -> dict[str, Any]:
    members = _members(tp)
    if len(members) == 1:
        return dict(refs[members[0]])
    return {"oneOf": [refs[m] for m in members]}


def _operation(op: Operation, refs: dict[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{op.method.lower()}_{op.path.strip('/').replace('/', '_')}".replace(
            "{", ""
        ).replace("}", ""),
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
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema(op.body, refs)}},
        }
    responses: dict[str, Any] = {}
    if op.response is not None:
        content = {op.content: {"schema": _schema(op.response, refs)}}
    else:
        content = {op.content: {"schema": _TEXT}} if op.content != "application/json" else {}
    content.update({other: {"schema": _TEXT} for other in op.also})
    responses[str(op.status)] = {"description": "OK", **({"content": content} if content else {})}
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
    if op.body is not None:
        codes.add(413)
    for code in sorted(codes):
        responses[str(code)] = {"description": _ERROR_TEXT.get(code, "Error"), "content": error}
    out["responses"] = responses
    return out
