"""The seed dialects: five public job APIs answered from the same read models (section 8).

Each module maps routing, status words, field names, envelopes and time formats onto the
native read models. Each is an aiohttp sub-application mounted at its prefix, with its own
middleware: its own credential header and its own error shape, so nothing global changes
when a dialect module is imported.
"""

from __future__ import annotations

from aiohttp import web

from api.compat import mcrit, mentionlab, mindcase, mintlify, useapi
from api.compat.common import Dialect

DIALECTS: list[Dialect] = [
    mindcase.DIALECT,
    useapi.DIALECT,
    mcrit.DIALECT,
    mentionlab.DIALECT,
    mintlify.DIALECT,
]


def mount(app: web.Application) -> None:
    """Add every dialect's sub-application to ``app`` at its prefix."""
    for dialect in DIALECTS:
        app.add_subapp(dialect.prefix, dialect.app())


def paths() -> list[tuple[str, str]]:
    """``(method, full path)`` of every dialect route."""
    return [p for dialect in DIALECTS for p in dialect.paths()]
