"""Read models folded from the ledger's events: jobs, counts, credits, keys, agents, webhooks."""

from __future__ import annotations

from ledger.records import Projector
from ledger.sql import Backend
from ledger.store import EventStore
from projections.agents import AgentsProjector
from projections.base import SqlProjector
from projections.counts import CountsProjector
from projections.credits import CreditsProjector
from projections.jobs import JobsProjector
from projections.keys import KeysProjector
from projections.webhooks import WebhooksProjector

PROJECTORS: dict[str, type[SqlProjector]] = {
    "jobs": JobsProjector,
    "counts": CountsProjector,
    "credits": CreditsProjector,
    "keys": KeysProjector,
    "agents": AgentsProjector,
    "webhooks": WebhooksProjector,
}


def all_projectors() -> list[Projector]:
    return [cls() for cls in PROJECTORS.values()]


def new_store(backend: Backend) -> EventStore:
    """An event store over ``backend`` with every read model, credits as its balance port."""
    balances = CreditsProjector()
    projectors: list[Projector] = [
        balances if cls is CreditsProjector else cls() for cls in PROJECTORS.values()
    ]
    return EventStore(backend, projectors, balances=balances)
