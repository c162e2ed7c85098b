"""Many jobs, fast: an imported export, or straight through the store's command API.

The HTTP API costs a round trip per job; a test or a benchmark that needs 100 000 jobs to show
that no request stalls the server loads them here, before the server starts.

- ``import_jobs`` fills an empty database: it writes the jobs as an audit export with every
  hash computed (``bench.datagen.write_history``) and loads it with the real ``jobledger
  import``, which checks every hash again and builds the read models: 100 000 jobs for about a
  third of the CPU of the store's way.
- ``load_jobs`` adds jobs to a database in use, through the store, thousands per command.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

from bench.datagen import write_history
from ledger import commands
from ledger.events import JobQueued
from ledger.ids import new_job_id
from ledger.store import EventStore, UnitOfWork
from tests.serverproc import acli

BATCH = 2000


async def import_jobs(db_url: str, tenant: str, count: int, folder: Path) -> None:
    """``count`` queued jobs of ``tenant`` (and nothing else) in the empty database ``db_url``,
    imported with ``jobledger import``; the export is written into ``folder``."""
    export = folder / "bulk-export.ndjson"
    await asyncio.to_thread(
        write_history, export, tenant, n_jobs=count, events_per_job=1, key_role=None
    )
    done = await acli("import", "--db", db_url, "--tenant", tenant, str(export))
    assert done.code == 0, f"jobledger import: {done.code} {done.err}"
    assert json.loads(done.last_line)["jobs"] == count
    export.unlink()


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
