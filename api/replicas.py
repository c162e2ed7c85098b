"""Which requests may read from a replica, and read-your-writes (``X-Ledger-Position``).

Every write answer carries ``X-Ledger-Position``: the newest position of the tenant's chain once
the write committed (its own last event, or the head it left untouched). A read request may
be answered by a PostgreSQL hot standby (``serve --replica``) when it is a ``GET`` or ``HEAD``
of a route that needs a key, is not a long poll (``wait``) or an event stream (their wake-ups
come from the primary's ``NOTIFY``, which a standby does not replay) and is not marked
``primary_only``. Such a read sees at least:

- the position the request presents in ``X-Ledger-Position``, and
- the last position its key wrote through this process,

for the caller's tenant: the standby answers once it has replayed that far, else, after
waiting up to ``--replica-wait`` (0.5 s), the primary answers. ``docs/postgres.md`` states the
rule for operators and clients.
"""

from __future__ import annotations

from collections import OrderedDict

from aiohttp import web

from api.auth import Caller
from api.context import CALLER, SETTINGS
from api.http import MAX_INT, Handler
from api.settings import Settings
from ledger.errors import Invalid
from ledger.routing import READ_ROUTE, ReadRoute

POSITION_HEADER = "X-Ledger-Position"
KEYS_REMEMBERED = 100_000  # keys whose last write this process remembers (oldest forgotten)
READ_METHODS = frozenset({"GET", "HEAD"})


class WrittenPositions:
    """The last chain position each API key wrote through this process (a bounded LRU)."""

    def __init__(self, limit: int = KEYS_REMEMBERED) -> None:
        self._limit = limit
        self._positions: OrderedDict[str, int] = OrderedDict()

    def wrote(self, key_id: str, position: int) -> None:
        self._positions[key_id] = max(position, self._positions.pop(key_id, 0))
        if len(self._positions) > self._limit:
            self._positions.popitem(last=False)

    def last(self, key_id: str) -> int:
        return self._positions.get(key_id, 0)


WRITTEN = web.AppKey("written_positions", WrittenPositions)


def primary_only(handler: Handler) -> Handler:
    """Mark a read route that must read the primary (say, one that waits for wake-ups)."""
    handler.__primary__ = True  # type: ignore[attr-defined]
    return handler


def presented_position(request: web.Request) -> int:
    """The ``X-Ledger-Position`` a request presents (0 if none); 422 if it is not a position."""
    text = request.headers.get(POSITION_HEADER)
    if text is None or not text.strip():
        return 0
    text = text.strip()
    # ASCII digits only: str.isdigit also takes "²" and "١", which int() reads or refuses
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_INT:
        raise Invalid(
            f"{POSITION_HEADER} must be an event position (a whole number, as a write answered)",
            field=POSITION_HEADER,
        )
    return int(text)


def wrote(request: web.Request, response: web.StreamResponse, position: int) -> None:
    """A write committed at ``position``: say so in the answer and remember it for the key."""
    response.headers[POSITION_HEADER] = str(position)
    who: Caller | None = request.get(CALLER)
    written = request.config_dict.get(WRITTEN)
    if who is not None and written is not None:
        written.wrote(who.key_id, position)


def route_for(
    request: web.Request, who: Caller | None = None, settings: Settings | None = None
) -> ReadRoute | None:
    """The replica route of a request, or ``None`` when only the primary may answer it.

    ``who`` and ``settings``: the request's caller and settings where the caller has them at
    hand (every request pays for this; ``config_dict`` is a chain of mappings, not a dict).
    """
    if who is None:
        who = request.get(CALLER)
        if who is None:
            return None  # a public route: it reads nothing of a tenant's
    position = presented_position(request)  # checked on every backend alike
    config = None
    if settings is None:
        config = request.config_dict
        settings = config[SETTINGS]
    if not settings.replicas or request.method not in READ_METHODS:
        return None
    handler = request.match_info.handler
    if getattr(handler, "__primary__", False) or (
        request.query_string and request.query.get("wait", "0") not in ("", "0")
    ):
        return None
    written = (config or request.config_dict).get(WRITTEN)
    if written is not None:
        position = max(position, written.last(who.key_id))
    return ReadRoute(tenant=who.tenant, position=position, wait_s=settings.replica_wait_s)


class Routed:
    """Route the reads of the request's handler (``ledger/routing.py``).

    A class rather than a generator: it wraps every request.
    """

    __slots__ = ("_request", "_settings", "_token", "_who")

    def __init__(
        self, request: web.Request, who: Caller | None = None, settings: Settings | None = None
    ) -> None:
        self._request = request
        self._who = who
        self._settings = settings

    def __enter__(self) -> None:
        self._token = READ_ROUTE.set(route_for(self._request, self._who, self._settings))

    def __exit__(self, *exc: object) -> None:
        READ_ROUTE.reset(self._token)
