"""``jobledger jobs list|show``, ``stats`` and ``credits``: real subprocesses on a real database.

The ``--json`` answers must be the very JSON the HTTP API gives for the same reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api
from tests.serverproc import Done, acli, acreate_key
from tests.test_cli import one_line_error


@pytest.fixture
async def seeded(db_url: str, api: Api) -> tuple[str, Api]:
    """Tenant acme with prices, grants and four jobs in several states; the API to compare."""
    await api.post("/v1/prices", {"agent": "scraper", "per_job": "1.5"})
    await api.post("/v1/credits/grants", {"account": "a1", "amount": "10"})
    for job_id, agent, account in (
        ("c1", "scraper", "a1"),
        ("c2", "scraper", "a2"),
        ("c3", "writer", "a1"),
        ("c4", "writer", "a2"),
    ):
        await api.post("/v1/jobs", {"id": job_id, "agent": agent, "account": account})
    await api.post("/v1/jobs/c1/events", {"type": "job.started"})
    await api.post("/v1/jobs/c1/events", {"type": "job.completed", "data": {"row_count": 7}})
    await api.post("/v1/jobs/c3/events", {"type": "job.started"})
    return db_url, api


def ok_json(done: Done) -> Any:
    assert done.code == 0, (done.code, done.out, done.err)
    assert done.err == ""
    return json.loads(done.out)


async def test_jobs_list_json_is_the_apis_list(seeded: tuple[str, Api]) -> None:
    """`jobs list --json` answers what GET /v1/jobs answers, filters included."""
    db, api = seeded
    assert ok_json(await acli("jobs", "list", "--db", db, "--json")) == await api.get("/v1/jobs")
    for flags, query in (
        (["--status", "running,completed"], "status=running,completed"),
        (["--agent", "writer"], "agent=writer"),
        (["--account", "a2"], "account=a2"),
        (["-q", "c4"], "q=c4"),
        (["--limit", "2"], "limit=2"),
    ):
        got = ok_json(await acli("jobs", "list", "--db", db, "--json", *flags))
        want = await api.get(f"/v1/jobs?{query}")
        assert [j["id"] for j in got["jobs"]] == [j["id"] for j in want["jobs"]], flags
        assert got["has_more"] == want["has_more"]
    later = ok_json(await acli("jobs", "list", "--db", db, "--json", "--since", "2999-01-01"))
    assert later["jobs"] == []


async def test_jobs_show_with_events_is_the_job_and_its_history(
    seeded: tuple[str, Api],
) -> None:
    """`jobs show ID --events --json` is GET /v1/jobs/ID plus GET /v1/jobs/ID/events."""
    db, api = seeded
    shown = ok_json(await acli("jobs", "show", "c1", "--db", db, "--events", "--json"))
    events = shown.pop("events")
    assert shown == await api.get("/v1/jobs/c1")
    assert events == (await api.get("/v1/jobs/c1/events"))["events"]
    assert [e["type"] for e in events] == ["job.queued", "job.started", "job.completed"]
    bare = ok_json(await acli("jobs", "show", "c1", "--db", db, "--json"))
    assert "events" not in bare and bare["credits_used"] == 1.5


async def test_stats_and_credits_json_are_the_apis(
    seeded: tuple[str, Api],
) -> None:
    """`stats --json` and `credits --json` match /v1/jobs/stats, /v1/credits, /v1/accounts."""
    db, api = seeded
    assert ok_json(await acli("stats", "--db", db, "--json")) == await api.get("/v1/jobs/stats")
    report = ok_json(await acli("credits", "--db", db, "--json", "--days", "2"))
    assert report["totals"] == await api.get("/v1/credits")
    assert report["accounts"] == (await api.get("/v1/accounts"))["accounts"]
    usage = await api.get("/v1/credits/usage?days=2")
    assert report["usage"] == {"days": usage["days"], "by_agent": usage["by_agent"]}
    one = ok_json(await acli("credits", "--db", db, "--json", "--account", "a1"))
    assert one["totals"] == await api.get("/v1/credits?account=a1")
    assert [a["account"] for a in one["accounts"]] == ["a1"]
    assert one["accounts"][0]["credits"] == {"granted": 10, "used": 1.5, "balance": 8.5}


async def test_tables_on_a_terminal_show_the_reads(
    seeded: tuple[str, Api],
) -> None:
    """Without --json the reads print tables holding the same facts."""
    db, _ = seeded
    listing = await acli("jobs", "list", "--db", db)
    assert listing.code == 0 and listing.err == ""
    assert all(job in listing.out for job in ("c1", "c2", "c3", "c4"))
    assert "status" in listing.out and "completed" in listing.out
    shown = await acli("jobs", "show", "c1", "--db", db, "--events")
    assert shown.code == 0 and "job.completed" in shown.out and "scraper" in shown.out
    stats = await acli("stats", "--db", db)
    assert stats.code == 0 and "acme: 4 jobs" in stats.out and "writer" in stats.out
    credits = await acli("credits", "--db", db)
    assert credits.code == 0 and "granted 10, used 1.5, balance 8.5" in credits.out


async def test_reads_name_their_problem_in_one_line(
    seeded: tuple[str, Api], tmp_path: Path
) -> None:
    """Unknown jobs, tenants, statuses and databases are one line on stderr, exit 1."""
    db, _ = seeded
    assert "no job nope" in one_line_error(await acli("jobs", "show", "nope", "--db", db))
    assert "unknown status" in one_line_error(
        await acli("jobs", "list", "--db", db, "--status", "done")
    )
    assert "unknown tenant 'globex'" in one_line_error(
        await acli("stats", "--db", db, "--tenant", "globex")
    )
    assert "not an RFC 3339 time" in one_line_error(
        await acli("jobs", "list", "--db", db, "--since", "soon")
    )
    assert "no account zz" in one_line_error(await acli("credits", "--db", db, "--account", "zz"))
    await acreate_key(db, "globex")
    line = one_line_error(await acli("stats", "--db", db))
    assert "--tenant" in line and "acme" in line and "globex" in line
    assert (
        ok_json(await acli("stats", "--db", db, "--tenant", "globex", "--json"))["total_jobs"] == 0
    )
    missing = tmp_path / "missing.db"
    assert "missing.db" in one_line_error(await acli("jobs", "list", "--db", str(missing)))
    assert not missing.exists()
