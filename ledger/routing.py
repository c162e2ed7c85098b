"""Where a read may go: the primary, or a read replica that has replayed far enough.

A request that only reads and may be answered a little behind the primary sets a ``ReadRoute``
for its duration (``reading``); a backend with replicas (``ledger/backends/replicas.py``)
consults it in ``Backend.read()``. Without a route every read goes to the primary: the writer,
the commands' own reads, the wake-ups of long polls and streams, the CLI. A leaf module:
it imports nothing of ours, so the API can set routes without importing a driver.

Read-your-writes: ``position`` is the newest position of the tenant's chain the reader must
see (a write's ``X-Ledger-Position``); a replica answers only once its ``chain_heads`` row for
the tenant has reached it. Each tenant's chain head is exact and only moves forward, so the
check is sound whatever order transactions of different tenants commit in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class ReadRoute:
    """One request's permission to read from a replica, and where its reads went.

    Once the first read has chosen (a replica, or ``None`` for the primary), every later read
    of the request goes to the same place, so one answer never mixes two servers' views.
    """

    tenant: str
    position: int = 0  # the tenant's chain must have reached this position; 0: any replica
    wait_s: float = 0.5  # how long to wait for a replica to replay that far, else the primary
    decided: bool = False
    server: Any = None  # the replica chosen, or None for the primary (once ``decided``)


READ_ROUTE: ContextVar[ReadRoute | None] = ContextVar("jobledger_read_route", default=None)


@contextlib.contextmanager
def reading(route: ReadRoute | None) -> Iterator[None]:
    """Route the reads of this block (and of tasks it starts) by ``route``; ``None``: primary."""
    token = READ_ROUTE.set(route)
    try:
        yield
    finally:
        READ_ROUTE.reset(token)
