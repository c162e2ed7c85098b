"""Validate answers against the OpenAPI document the server serves, so drift fails a test.

``tests/conftest.py``'s ``Api`` client passes every answer it receives through ``check``: the
status must be documented for the operation, and the body (by content type) and the headers
must match the document. Routes the document does not describe (the dialects, a method a route
does not have) are not checked here; ``tests/test_security.py`` and the dialect tests cover
those.

openapi-core does the validation: it is the maintained OpenAPI 3.1 validator for Python (JSON
Schema 2020-12 through jsonschema, response headers and content types included), built for
exactly this check of a request/response pair against a document.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_core.validation.response.exceptions import MissingData

_CHECKERS: dict[str, Checker] = {}


def _text(body: bytes) -> str:
    return body.decode()


# Text answers (CSV, NDJSON, Server-Sent Events) are documented as strings: hand them over as
# such. They may be empty (an export that matches nothing), which is not missing data.
_TEXT_TYPES = ("text/csv", "application/x-ndjson", "text/event-stream")
_CONFIG = Config(extra_media_type_deserializers=dict.fromkeys(_TEXT_TYPES, _text))


class Checker:
    def __init__(self, document: dict[str, Any]) -> None:
        self.openapi = OpenAPI.from_dict(document, config=_CONFIG)
        self.routes = [
            (re.compile("^" + re.sub(r"\{\w+\}", "[^/]+", path) + "$"), set(item))
            for path, item in document["paths"].items()
        ]

    def documented(self, method: str, path: str) -> bool:
        return any(
            pattern.match(path) and method.lower() in methods for pattern, methods in self.routes
        )

    def check(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        status: int,
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        """Raise ``AssertionError`` naming every way the answer differs from the document."""
        if method.upper() == "HEAD" or not self.documented(method, path):
            return
        content_type = headers.get("Content-Type", "").split(";")[0].strip()
        request = MockRequest("http://localhost", method.lower(), path, args=query)
        response = MockResponse(
            body, status_code=status, headers=headers, content_type=content_type
        )
        errors = [
            e
            for e in self.openapi.iter_response_errors(request, response)
            if not (isinstance(e, MissingData) and content_type in _TEXT_TYPES)
        ]
        if errors:
            details = "; ".join(_describe(e) for e in errors)
            raise AssertionError(
                f"{method} {path} answered {status} ({content_type}) against the OpenAPI "
                f"document: {details}\nbody: {body[:500]!r}"
            )


def _describe(error: BaseException) -> str:
    causes = []
    seen: BaseException | None = error
    while seen is not None:
        causes.append(f"{type(seen).__name__}: {seen}")
        inner = getattr(seen, "schema_errors", None)
        if inner:
            causes.extend(str(e.message) for e in inner)
        seen = seen.__cause__
    return " <- ".join(causes)


def checker(document: bytes, parsed: dict[str, Any]) -> Checker:
    """One checker per distinct document (building one parses and checks the document)."""
    digest = hashlib.sha256(document).hexdigest()
    found = _CHECKERS.get(digest)
    if found is None:
        found = _CHECKERS[digest] = Checker(parsed)
    return found
