"""Many jobs, fast: straight through the store's command API, thousands per command.

The HTTP API costs a round trip per job; a test that needs thousands of jobs (full lists,
pages, bulk deletes) loads them here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ledger import commands
from ledger.events import JobQueued
from ledger.ids import new_job_id
from ledger.store import EventStore, UnitOfWork

BATCH = 2000


async def load_jobs(
    store: EventStore,
    tenant: str,
    count: int,
    *,
    agents: Sequence[str] = ("bulk/agent",),
    project: str | None = None,
    batch: int = BATCH,
) -> int:
    """Create ``count`` queued jobs of ``tenant`` (agents in turn); the number created."""
    made = 0
    while made < count:
        size = min(batch, count - made)
        start = made

        async def command(uow: UnitOfWork, start: int = start, size: int = size) -> None:
            for i in range(start, start + size):
                queued = JobQueued(agent=agents[i % len(agents)], project=project)
                await commands.create_job(
                    uow, tenant, new_job_id(), queued, actor="bulkload", fresh_id=True
                )

        await store.execute(command, tenants=[tenant])
        made += size
        await asyncio.sleep(0)
    return made
