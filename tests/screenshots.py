"""Screenshots of the dashboard for the docs: ``python -m tests.screenshots [--out docs/img]``.

Starts ``jobledger serve`` on a fresh database, writes two weeks of demo jobs through the HTTP
API (times set with ``occurred_at``), signs in with headless Chromium and saves one PNG per page.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from selenium.webdriver.common.by import By

from tests.browser import MISSING, chromium, sign_in, visible, wait_for
from tests.serverproc import acreate_key, served

AGENTS = {"scraper": "0.5", "summarizer": "2", "translator": "1.25"}
ACCOUNTS = ("research", "sales", "support")


def at(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def post(http: aiohttp.ClientSession, path: str, body: Any) -> Any:
    async with http.post(path, json=body) as resp:
        answer = await resp.json()
        assert resp.status in (200, 201), (path, resp.status, answer)
        return answer


async def demo(http: aiohttp.ClientSession) -> str:
    """Two weeks of jobs; the id of one with a rich history."""
    rng = random.Random(17)
    now = datetime.now(UTC)
    for agent, per_job in AGENTS.items():
        await post(http, "/v1/prices", {"agent": agent, "per_job": per_job, "per_row": "0.01"})
    for account, amount in zip(ACCOUNTS, ("500", "250", "120"), strict=True):
        await post(http, "/v1/credits/grants", {"account": account, "amount": amount})
    n = 0
    for day in range(13, -1, -1):
        for _ in range(rng.randint(2, 6)):
            n += 1
            agent = rng.choice(list(AGENTS))
            created = now - timedelta(days=day, hours=rng.randint(1, 6), minutes=rng.randint(0, 59))
            if created > now - timedelta(minutes=30):
                created = now - timedelta(minutes=30 + n)
            job_id = f"job-{n:03d}"
            await post(
                http,
                "/v1/jobs",
                {
                    "id": job_id,
                    "agent": agent,
                    "account": rng.choice(ACCOUNTS),
                    "occurred_at": at(created),
                    "params": {"url": f"https://example.com/page/{n}"},
                },
            )
            outcome = rng.random()
            started = created + timedelta(seconds=rng.randint(2, 40))
            ended = started + timedelta(seconds=rng.randint(20, 900))
            path = f"/v1/jobs/{job_id}/events"
            await post(http, path, {"type": "job.started", "occurred_at": at(started)})
            if outcome < 0.8:
                await post(
                    http,
                    path,
                    {
                        "type": "job.completed",
                        "occurred_at": at(ended),
                        "data": {"row_count": rng.randint(10, 400), "result": {"ok": True}},
                    },
                )
            else:
                await post(
                    http,
                    path,
                    {
                        "type": "job.failed",
                        "occurred_at": at(ended),
                        "data": {"error": {"code": "timeout", "message": "upstream timed out"}},
                    },
                )
    # a job with a full history, finished a minute ago
    rich = "job-report-7"
    base = now - timedelta(minutes=6)
    await post(
        http,
        "/v1/jobs",
        {
            "id": rich,
            "agent": "summarizer",
            "account": "research",
            "executions_total": 3,
            "model": "small-1",
            "occurred_at": at(base),
            "params": {"topic": "quarterly report"},
        },
    )
    path = f"/v1/jobs/{rich}/events"
    steps: list[dict[str, Any]] = [
        {"type": "job.started"},
        {"type": "job.execution_succeeded", "data": {"execution_id": "ex-1"}},
        {"type": "job.execution_retrying", "data": {"execution_id": "ex-2"}},
        {"type": "job.execution_succeeded", "data": {"execution_id": "ex-2"}},
        {"type": "job.progressed", "data": {"row_count": 40, "message": "two of three"}},
        {"type": "job.pr_linked", "data": {"pr_link": "https://example.com/pr/42"}},
        {"type": "job.execution_succeeded", "data": {"execution_id": "ex-3"}},  # completes it
    ]
    for i, step in enumerate(steps):
        await post(http, path, {**step, "occurred_at": at(base + timedelta(seconds=20 + 35 * i))})
    # running and queued jobs right now
    for i, (agent, account) in enumerate(
        (("scraper", "research"), ("translator", "sales"), ("scraper", "sales"))
    ):
        job_id = f"job-live-{i + 1}"
        await post(
            http,
            "/v1/jobs",
            {
                "id": job_id,
                "agent": agent,
                "account": account,
                "occurred_at": at(now - timedelta(minutes=3 + i)),
            },
        )
        await post(
            http,
            f"/v1/jobs/{job_id}/events",
            {"type": "job.started", "occurred_at": at(now - timedelta(minutes=2 + i, seconds=10))},
        )
    await post(http, "/v1/jobs", {"id": "job-next", "agent": "summarizer", "account": "support"})
    return rich


async def shoot(out: Path) -> list[Path]:
    saved: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="jobledger-shots-") as scratch:
        db = str(Path(scratch) / "demo.db")
        async with served(db) as server:
            admin = await acreate_key(db, "acme")
            async with aiohttp.ClientSession(server.base, headers=admin.headers) as http:
                rich = await demo(http)
            with chromium(1280, 900) as driver:
                sign_in(driver, server.base, admin.secret)
                pages: list[tuple[str, str, str]] = [
                    ("dashboard-jobs", "#/jobs", "#jobs-body tr"),
                    ("dashboard-job", f"#/job/{rich}", "#timeline li[data-position]"),
                    ("dashboard-running", "#/running", "#running section"),
                    ("dashboard-stats", "#/stats", "#stats-status-chart rect"),
                    ("dashboard-credits", "#/credits", "#usage-plot rect.bar"),
                    ("dashboard-audit", "#/audit", "#head-hash"),
                ]
                for name, fragment, ready in pages:
                    driver.set_window_size(1280, 1500 if name == "dashboard-job" else 900)
                    driver.get(f"{server.base}/ui/{fragment}")
                    wait_for(driver, lambda d, css=ready: visible(d, css), name)
                    if name == "dashboard-audit":
                        driver.find_element(By.ID, "verify-browser").click()
                        wait_for(
                            driver,
                            lambda d: d.find_element(By.ID, "verify-result").text.startswith("OK"),
                            "the verdict",
                        )
                    driver.execute_script("window.scrollTo(0, 0)")
                    path = out / f"{name}.png"
                    driver.save_screenshot(str(path))
                    saved.append(path)
                driver.set_window_size(1280, 900)
                driver.get(f"{server.base}/docs")
                wait_for(driver, lambda d: visible(d, ".opblock-summary-path"), "the docs")
                path = out / "docs.png"
                driver.save_screenshot(str(path))
                saved.append(path)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args()
    if MISSING is not None:
        raise SystemExit(MISSING)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(shoot(Path(args.out))):
        print(path)  # noqa: T201


if __name__ == "__main__":
    main()
