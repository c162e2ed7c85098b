"""Validate answers against the OpenAPI document the server serves, so drift fails a test.

``tests/conftest.py``'s ``Api`` client passes every answer it receives through ``check``: the
status must be documented for the operation, the content type must be one the response
documents, and the body and the documented headers must match their schemas. Routes the
document does not describe (the dialects, a method a route does not have) are not checked
here; ``tests/test_security.py`` and the dialect tests cover those.

The schemas are JSON Schema 2020-12 (OpenAPI 3.1), checked by jsonschema-rs with formats
asserted (``date-time`` and the like). A validator is compiled once per response schema and
reused; what is left to this module is what OpenAPI adds around the schemas: finding the
operation (a literal path segment wins over a template), the response for the status, the
media type, and the headers' values (``simple`` style: an integer header is a decimal
integer). openapi-core did all of it before, at 4-18 ms an answer; it was a quarter of the
suite's CPU in its own processes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema_rs

_CHECKERS: dict[str, Checker] = {}

# Text answers (CSV, NDJSON, Server-Sent Events) are documented as strings: they are checked
# as such, and may be empty (an export that matches nothing).
_TEXT_TYPES = frozenset({"text/csv", "application/x-ndjson", "text/event-stream"})


@dataclass(frozen=True, slots=True)
class _Operation:
    path: str
    method: str
    responses: dict[str, Any]


class Checker:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.validators: dict[str, Any] = {}  # by the schema's JSON text
        routes = []
        for path, item in document["paths"].items():
            # literal segments first: /v1/jobs/stats is not /v1/jobs/{id}
            rank = tuple(segment.startswith("{") for segment in path.split("/"))
            pattern = re.compile("^" + re.sub(r"\{\w+\}", "[^/]+", path) + "$")
            operations = {
                method: _Operation(path, method, operation.get("responses", {}))
                for method, operation in item.items()
                if isinstance(operation, dict) and "responses" in operation
            }
            routes.append((rank, pattern, operations))
        routes.sort(key=lambda route: route[0])
        self.routes = [(pattern, operations) for _, pattern, operations in routes]

    def _operation(self, method: str, path: str) -> _Operation | None:
        for pattern, operations in self.routes:
            if pattern.match(path):
                return operations.get(method.lower())
        return None

    def documented(self, method: str, path: str) -> bool:
        return self._operation(method, path) is not None

    def _resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            found: Any = self.document
            for part in node["$ref"].removeprefix("#/").split("/"):
                found = found[part.replace("~1", "/").replace("~0", "~")]
            node = found
        return node

    def _validator(self, schema: dict[str, Any]) -> Any:
        key = json.dumps(schema, sort_keys=True)
        validator = self.validators.get(key)
        if validator is None:
            # the schema with the document's components, so "#/components/..." references resolve
            wrapped = {**schema, "components": self.document.get("components", {})}
            validator = jsonschema_rs.Draft202012Validator(wrapped, validate_formats=True)
            self.validators[key] = validator
        return validator

    def errors(
        self, method: str, path: str, status: int, headers: dict[str, str], body: bytes
    ) -> list[str]:
        """Every way the answer differs from the document (empty: it matches)."""
        operation = self._operation(method, path)
        if method.upper() == "HEAD" or operation is None:
            return []
        responses = operation.responses
        found = next(
            (
                responses[k]
                for k in (str(status), f"{status // 100}XX", "default")
                if k in responses
            ),
            None,
        )
        if found is None:
            return [f"status {status} is not documented for {method} {operation.path}"]
        response = self._resolve(found)
        problems = self._header_errors(response, headers)
        content = response.get("content")
        if not content:
            return problems
        media = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media not in content:
            return [*problems, f"content type {media!r} is not one of {sorted(content)}"]
        if media in _TEXT_TYPES:
            instance: Any = body.decode()
        elif not body:
            return [*problems, "the body is empty"]
        else:
            try:
                instance = json.loads(body)
            except ValueError as exc:
                return [*problems, f"the body is not JSON: {exc}"]
        schema = content[media].get("schema", {})
        validator = self._validator(schema)
        problems += [
            f"body at /{'/'.join(map(str, error.instance_path))}: {error.message}"
            for error in validator.iter_errors(instance)
        ]
        return problems

    def _header_errors(self, response: dict[str, Any], got: dict[str, str]) -> list[str]:
        problems = []
        lowered = {name.lower(): value for name, value in got.items()}
        for name, declared in response.get("headers", {}).items():
            header = self._resolve(declared)
            value = lowered.get(name.lower())
            if value is None:
                if header.get("required"):
                    problems.append(f"header {name} is required and missing")
                continue
            schema = header.get("schema", {})
            instance: Any = value
            if schema.get("type") == "integer":
                if not re.fullmatch(r"-?[0-9]+", value):
                    problems.append(f"header {name}: {value!r} is not an integer")
                    continue
                instance = int(value)
            for error in self._validator(schema).iter_errors(instance):
                problems.append(f"header {name}: {error.message}")
        return problems

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
        errors = self.errors(method, path, status, headers, body)
        if errors:
            content_type = headers.get("Content-Type", "").split(";")[0].strip()
            raise AssertionError(
                f"{method} {path} answered {status} ({content_type}) against the OpenAPI "
                f"document: {'; '.join(errors)}\nbody: {body[:500]!r}"
            )


def checker(document: bytes, parsed: dict[str, Any]) -> Checker:
    """One checker per distinct document (its validators are compiled as answers need them)."""
    digest = hashlib.sha256(document).hexdigest()
    found = _CHECKERS.get(digest)
    if found is None:
        found = _CHECKERS[digest] = Checker(parsed)
    return found
