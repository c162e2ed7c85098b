"""HTTP plumbing shared by every route module: the endpoint registry, decoding, encoding.

``endpoint`` registers a handler with its role and the msgspec types of its query, body and
answer; the auth middleware reads the role, and ``api/openapi.py`` reads the types.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from ledger.errors import BadRequest, Invalid, LedgerError
from ledger.events import field_of

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROLE_RANK = {"public": -1, "reader": 0, "writer": 1, "admin": 2}
MAX_DEPTH = 64
MAX_INT = 2**63 - 1

ENCODE = msgspec.json.Encoder(decimal_format="number").encode


@dataclass(frozen=True, slots=True)
class Operation:
    """One documented route: what it takes and what it answers."""

    method: str
    path: str
    role: str
    summary: str
    query: type | None = None
    body: Any = None
    response: Any = None
    status: int = 200
    content: str = "application/json"
    errors: tuple[int, ...] = ()
    tags: tuple[str, ...] = field(default_factory=tuple)
    also: tuple[str, ...] = ()  # other content types it answers on request (``format=csv``)


OPERATIONS: list[Operation] = []


def endpoint(
    routes: web.RouteTableDef,
    method: str,
    path: str,
    *,
    role: str,
    summary: str,
    query: type | None = None,
    body: Any = None,
    response: Any = None,
    status: int = 200,
    content: str = "application/json",
    errors: tuple[int, ...] = (),
    tag: str = "jobs",
    also: tuple[str, ...] = (),
    mount: str = "",
) -> Callable[[Handler], Handler]:
    """Register a handler on ``routes`` and document it.

    ``mount`` is the prefix a sub-application is mounted at: ``path`` is the route inside it,
    and the document names the full path.
    """

    def register(handler: Handler) -> Handler:
        handler.__role__ = role  # type: ignore[attr-defined]
        OPERATIONS.append(
            Operation(
                method,
                mount + path,
                role,
                summary,
                query,
                body,
                response,
                status,
                content,
                errors,
                (tag,),
                also,
            )
        )
        routes.route(method, path)(handler)
        return handler

    return register


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=ENCODE(obj), status=status, content_type="application/json")


def raw_json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def check_json(value: Any, path: str = "$", depth: int = 0) -> None:
    """Refuse what msgspec accepts but the ledger will not keep: deep nesting, huge integers."""
    if depth > MAX_DEPTH:
        raise Invalid(
            f"JSON is nested more than {MAX_DEPTH} levels deep",
            field=path.removeprefix("$.") or "$",
        )
    if isinstance(value, dict):
        for key, item in value.items():
            check_json(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json(item, f"{path}[{index}]", depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise Invalid("integer out of range (|n| < 2^63)", field=path.removeprefix("$.") or "$")


def decode_json(raw: bytes) -> Any:
    """Any JSON value, with the contract's errors: 400 malformed, 422 too deep or too big."""
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        value = msgspec.json.decode(raw)
    except msgspec.ValidationError as exc:
        raise Invalid(f"invalid JSON value: {exc}", field=field_of(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise Invalid("JSON is nested too deeply") from None
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8") from None
    check_json(value)
    return value


def convert(value: Any, type_: type[T], *, prefix: str = "") -> T:
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        raise Invalid(str(exc), field=field_of(exc, prefix)) from None


async def read_body(request: web.Request, type_: type[T]) -> T:
    raw = await request.read()
    value = decode_json(raw)
    if not isinstance(value, dict):
        raise Invalid("the request body must be a JSON object", field="$")
    return convert(value, type_)


async def read_optional_body(request: web.Request, type_: type[T]) -> T:
    """Like ``read_body``, but an empty body means every field's default."""
    raw = await request.read()
    if not raw.strip():
        return convert({}, type_)
    value = decode_json(raw)
    if not isinstance(value, dict):
        raise Invalid("the request body must be a JSON object", field="$")
    return convert(value, type_)


# an amount sent as a string: plain ASCII decimal digits, an optional minus and fraction (no
# spaces, underscores, exponent, "+", or the non-ASCII digits Python's Decimal would also read)
_PLAIN_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?").fullmatch


def plain_amount(value: Any, field: str) -> None:
    """``Invalid`` if ``value``, an amount as the request sent it, is a string that is not a
    plain decimal (a JSON number is checked by its type)."""
    if isinstance(value, str) and _PLAIN_DECIMAL(value) is None:
        raise Invalid(
            f'{field} must be a number or a plain decimal string such as "0.25"', field=field
        )


def read_query(request: web.Request, type_: type[T]) -> T:
    try:
        return msgspec.convert(dict(request.query), type_, strict=False)
    except msgspec.ValidationError as exc:
        raise Invalid(str(exc), field=field_of(exc)) from None


def fingerprint(request: web.Request, body: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(f"{request.method} {request.rel_url}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def error_body(error: LedgerError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.field is not None:
        body["field"] = error.field
    body.update(error.extra)
    return {"error": body}
