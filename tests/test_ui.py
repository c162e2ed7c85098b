"""The dashboard in a real headless Chromium against a real ``jobledger serve``.

Each test signs in with a key made beside the server, seeds jobs through the HTTP API, and reads
what the browser shows; events appended through the API while a page is open must appear in it.
The tests of a pytest worker share one Chromium (``shared_chromium``); each gets a fresh tab with
nothing stored for its origin (``driver``, ``tests/browser.py SharedChromium``).
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from tests.browser import (
    MISSING,
    SharedChromium,
    browser_errors,
    sign_in,
    texts,
    visible,
    wait_for,
)
from tests.conftest import store_key
from tests.serverproc import Key, Server, served

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="session")
def shared_chromium() -> Iterator[SharedChromium]:
    """This worker's Chromium: started by its first browser test, quit at the end of the run."""
    shared = SharedChromium()
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture
def driver(shared_chromium: SharedChromium) -> Iterator[WebDriver]:
    """A fresh tab of the worker's Chromium, 1280 x 900, with an empty console log."""
    yield shared_chromium.fresh(1280, 900)
    shared_chromium.leave()


SEED = (
    ("j-scrape-1", "scraper", "a1"),
    ("j-scrape-2", "scraper", "a2"),
    ("j-write-1", "writer", "a1"),
)


async def _call(http: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> Any:
    async with http.request(method, path, json=body) as resp:
        answer = await resp.json()
        assert resp.status in (200, 201), f"{method} {path}: {resp.status} {answer}"
        return answer


async def append(http: aiohttp.ClientSession, job_id: str, type_: str, **data: Any) -> Any:
    body = {"type": type_, "data": data} if data else {"type": type_}
    return await _call(http, "POST", f"/v1/jobs/{job_id}/events", body)


async def seed(http: aiohttp.ClientSession) -> None:
    """Prices, three jobs: j-scrape-1 completed, j-write-1 running, j-scrape-2 queued."""
    await _call(http, "POST", "/v1/prices", {"agent": "scraper", "per_job": "2", "per_row": "0.5"})
    await _call(http, "POST", "/v1/prices", {"agent": "writer", "per_job": "5"})
    await _call(http, "POST", "/v1/credits/grants", {"account": "a1", "amount": "100"})
    for job_id, agent, account in SEED:
        await _call(http, "POST", "/v1/jobs", {"id": job_id, "agent": agent, "account": account})
    await append(http, "j-scrape-1", "job.started")
    await append(http, "j-scrape-1", "job.completed", row_count=4)
    await append(http, "j-write-1", "job.started")


@asynccontextmanager
async def ledger(db_url: str) -> AsyncIterator[tuple[Server, Key, aiohttp.ClientSession]]:
    """A server over ``db_url``, an admin key of tenant acme, and a seeded API session."""
    async with served(db_url) as server:
        admin = await store_key(db_url, "acme")
        async with aiohttp.ClientSession(server.base, headers=admin.headers) as http:
            await seed(http)
            yield server, admin, http


def job_rows(driver: WebDriver) -> set[str]:
    return {
        r.get_attribute("data-job") or ""
        for r in driver.find_elements(By.CSS_SELECTOR, "#jobs-body tr")
    }


def wait_rows(driver: WebDriver, expected: set[str]) -> None:
    wait_for(driver, lambda d: job_rows(d) == expected, f"exactly the jobs {sorted(expected)}")


def apply_filter(driver: WebDriver, **fields: str) -> None:
    Select(driver.find_element(By.ID, "f-status")).select_by_visible_text("any")
    for name in ("agent", "account", "project", "q"):
        driver.find_element(By.ID, f"f-{name}").clear()
    for name in ("after", "before"):  # datetime-local takes a locale's keys; set it directly
        driver.execute_script("arguments[0].value = ''", driver.find_element(By.ID, f"f-{name}"))
    for name, value in fields.items():
        if name == "status":
            Select(driver.find_element(By.ID, "f-status")).select_by_visible_text(value)
        elif name in ("after", "before"):
            field = driver.find_element(By.ID, f"f-{name}")
            driver.execute_script("arguments[0].value = arguments[1]", field, value)
        else:
            driver.find_element(By.ID, f"f-{name}").send_keys(value)
    driver.find_element(By.ID, "f-apply").click()


async def test_sign_in_filter_open_a_job_and_see_events_arrive(
    db_url: str, driver: WebDriver
) -> None:
    """A signed-in admin filters the list, opens a job, and sees appended events appear live."""
    async with ledger(db_url) as (server, admin, http):
        sign_in(driver, server.base, admin.secret)
        wait_rows(driver, {"j-scrape-1", "j-scrape-2", "j-write-1"})
        assert "acme · admin" in driver.find_element(By.ID, "who-text").text

        apply_filter(driver, agent="scraper")
        wait_rows(driver, {"j-scrape-1", "j-scrape-2"})
        apply_filter(driver, agent="scraper", status="completed")
        wait_rows(driver, {"j-scrape-1"})
        apply_filter(driver, account="a1")
        wait_rows(driver, {"j-scrape-1", "j-write-1"})
        apply_filter(driver, q="write")
        wait_rows(driver, {"j-write-1"})
        apply_filter(driver, before="2020-01-01T00:00")
        wait_rows(driver, set())
        assert driver.find_element(By.ID, "jobs-empty").is_displayed()
        apply_filter(driver, after="2020-01-01T00:00", agent="writer")
        wait_rows(driver, {"j-write-1"})

        apply_filter(driver)
        wait_rows(driver, {"j-scrape-1", "j-scrape-2", "j-write-1"})
        await _call(http, "POST", "/v1/jobs", {"id": "j-new", "agent": "writer", "account": "a2"})
        wait_rows(driver, {"j-scrape-1", "j-scrape-2", "j-write-1", "j-new"})

        driver.find_element(By.LINK_TEXT, "j-scrape-2").click()
        wait_for(driver, lambda d: d.find_element(By.ID, "job-id").text == "j-scrape-2", "the job")
        wait_for(
            driver, lambda d: texts(d, "#timeline .etype") == ["job.queued"], "its queued event"
        )
        assert driver.find_element(By.ID, "job-status").text == "queued"

        started = await append(http, "j-scrape-2", "job.started")
        event = started["events"][0]
        node = wait_for(
            driver,
            lambda d: visible(d, f'#timeline li[data-position="{event["position"]}"]'),
            "the job.started event appended while the page was open",
        )
        assert node.get_attribute("data-type") == "job.started"
        assert (
            node.find_element(By.CSS_SELECTOR, "code.hash").get_attribute("title") == event["hash"]
        )
        wait_for(driver, lambda d: d.find_element(By.ID, "job-status").text == "running", "running")

        await append(http, "j-scrape-2", "job.completed", row_count=2)
        wait_for(
            driver,
            lambda d: (
                texts(d, "#timeline .etype") == ["job.queued", "job.started", "job.completed"]
            ),
            "the whole history in order",
        )
        wait_for(
            driver,
            lambda d: d.find_element(By.ID, "job-status").text == "completed",
            "completed",
        )
        facts = driver.find_element(By.ID, "job-facts").text
        assert "Credits used\n3" in facts  # per_job 2 + 2 rows x 0.5
        assert re.search(r"Running\n[\d.]+ s", driver.find_element(By.ID, "job-times").text)
        assert browser_errors(driver) == []


async def test_running_jobs_and_stats_pages(db_url: str, driver: WebDriver) -> None:
    """Running jobs show grouped by account with elapsed times; stats count by status and agent."""
    async with ledger(db_url) as (server, admin, http):
        sign_in(driver, server.base, admin.secret)
        driver.get(f"{server.base}/ui/#/running")
        card = wait_for(driver, lambda d: visible(d, '#running section[data-account="a1"]'), "a1")
        assert "j-write-1" in card.text and "writer" in card.text
        assert re.search(r"\b\d\d:\d\d\b", card.find_element(By.CSS_SELECTOR, ".elapsed").text)
        assert visible(driver, '#running section[data-account="a2"]') is None

        await append(http, "j-scrape-2", "job.started")
        wait_for(driver, lambda d: visible(d, '#running section[data-account="a2"]'), "a2 live")

        driver.get(f"{server.base}/ui/#/stats")
        wait_for(driver, lambda d: visible(d, '#stats-status tr[data-status="running"]'), "stats")
        cells = {
            r.get_attribute("data-status"): r.text.split()[-1]
            for r in driver.find_elements(By.CSS_SELECTOR, "#stats-status tbody tr")
        }
        assert cells["running"] == "2" and cells["completed"] == "1" and cells["queued"] == "0"
        agents = texts(driver, "#stats-agents tbody tr")
        assert any(a.startswith("scraper 2") for a in agents), agents
        assert any(a.startswith("writer 1") for a in agents), agents
        bars = driver.find_elements(By.CSS_SELECTOR, "#stats-status-chart rect.bar")
        assert {b.get_attribute("data-label"): b.get_attribute("data-value") for b in bars}[
            "running"
        ] == "2"


def plot(driver: WebDriver) -> dict[str, float]:
    """The usage plot as the browser drew it: the sum of each agent's bars."""
    out: dict[str, float] = {}
    for bar in driver.find_elements(By.CSS_SELECTOR, "#usage-plot rect.bar"):
        agent = bar.get_attribute("data-agent") or ""
        out[agent] = out.get(agent, 0.0) + float(bar.get_attribute("data-amount") or 0)
    return out


async def test_credits_plot_reads_the_usage_and_follows_new_charges(
    db_url: str, driver: WebDriver
) -> None:
    """The credits plot shows each agent's daily usage, the API's numbers, and updates live."""
    async with ledger(db_url) as (server, admin, http):
        sign_in(driver, server.base, admin.secret)
        driver.get(f"{server.base}/ui/#/credits")
        wait_for(driver, lambda d: plot(d) == {"scraper": 4.0}, "scraper's 4 credits in the plot")
        usage = await _call(http, "GET", "/v1/credits/usage?days=30")
        assert {a: sum(v) for a, v in usage["by_agent"].items()} == {"scraper": 4}
        row = driver.find_element(By.CSS_SELECTOR, '#accounts tr[data-account="a1"]')
        assert row.text.split()[-3:] == ["100", "4", "96"]  # granted, used, balance

        await append(http, "j-write-1", "job.completed")
        wait_for(driver, lambda d: plot(d) == {"scraper": 4.0, "writer": 5.0}, "writer's charge")
        days = {
            b.get_attribute("data-day")
            for b in driver.find_elements(By.CSS_SELECTOR, "#usage-plot rect.bar")
        }
        assert days == {usage["days"][-1]}  # every charge is today's
        legend = texts(driver, "#usage-plot .legend li")
        assert [x.strip() for x in legend] == ["scraper", "writer"]
        credits = await _call(http, "GET", "/v1/credits")
        assert credits["by_agent"] == {"scraper": 4, "writer": 5}

        driver.find_element(By.ID, "st-account").send_keys("a1")
        driver.find_element(By.CSS_SELECTOR, "#statement-form button").click()
        wait_for(
            driver,
            lambda d: (
                d.find_element(By.ID, "statement-msg").text
                == "Statement downloaded: 2 charged jobs."
            ),
            "the statement of a1 (j-scrape-1 and j-write-1)",
        )


async def test_a_reader_of_another_tenant_sees_nothing_of_acme(
    db_url: str, driver: WebDriver
) -> None:
    """Signed in as globex, the list, a job link, the feed and the credits hold none of acme."""
    async with ledger(db_url) as (server, _admin, http):
        globex_admin = await store_key(db_url, "globex")
        reader = await store_key(db_url, "globex", role="reader")
        async with aiohttp.ClientSession(server.base, headers=globex_admin.headers) as globex:
            await _call(
                globex, "POST", "/v1/jobs", {"id": "g-1", "agent": "scraper", "account": "g"}
            )
            sign_in(driver, server.base, reader.secret)
            wait_rows(driver, {"g-1"})
            assert "globex · reader" in driver.find_element(By.ID, "who-text").text
            assert not driver.find_element(By.ID, "nav-audit").is_displayed()

            await append(http, "j-scrape-2", "job.started")  # acme's, while globex looks
            await _call(
                globex, "POST", "/v1/jobs", {"id": "g-2", "agent": "scraper", "account": "g"}
            )
            wait_rows(driver, {"g-1", "g-2"})
            assert driver.find_element(By.ID, "live").text == "live · 1 new event"

            driver.get(f"{server.base}/ui/#/job/j-scrape-1")
            wait_for(
                driver,
                lambda d: "No job j-scrape-1" in d.find_element(By.ID, "job-error").text,
                "not found for acme's job",
            )
            assert texts(driver, "#timeline li") == []

            driver.get(f"{server.base}/ui/#/credits")
            wait_for(driver, lambda d: visible(d, '#accounts tr[data-account="g"]'), "g")
            assert texts(driver, "#accounts tbody tr[data-account]") == [
                driver.find_element(By.CSS_SELECTOR, '#accounts tr[data-account="g"]').text
            ]
            assert plot(driver) == {}

            driver.get(f"{server.base}/ui/#/audit")
            wait_for(
                driver,
                lambda d: "admin keys" in d.find_element(By.ID, "verify-result").text,
                "no audit",
            )


async def test_audit_head_and_verification_on_the_server_and_in_the_browser(
    db_url: str, driver: WebDriver
) -> None:
    """The audit page shows the chain head; both verify buttons answer OK with that head."""
    async with ledger(db_url) as (server, admin, http):
        head = await _call(http, "GET", "/v1/audit/head")
        sign_in(driver, server.base, admin.secret)
        driver.get(f"{server.base}/ui/#/audit")
        wait_for(driver, lambda d: d.find_element(By.ID, "head-hash").text == head["hash"], "head")
        driver.find_element(By.ID, "verify-server").click()
        result = wait_for(
            driver,
            lambda d: (
                d.find_element(By.ID, "verify-result").text.startswith("OK")
                and d.find_element(By.ID, "verify-result").text
            ),
            "the server's verdict",
        )
        assert f"OK: {head['count']} events, the chain ends at {head['hash']}" in result
        driver.find_element(By.ID, "verify-browser").click()
        result = wait_for(
            driver,
            lambda d: (
                "in this browser" in d.find_element(By.ID, "verify-result").text
                and d.find_element(By.ID, "verify-result").text
            ),
            "the browser's verdict",
        )
        assert result.startswith(f"OK: {head['count']} events, the chain ends at {head['hash']}")


async def test_a_wrong_key_is_refused(db_url: str, driver: WebDriver) -> None:
    """A bad key gets a clear message, and the dashboard stays signed out."""
    async with served(db_url) as server:
        await store_key(db_url, "acme")
        driver.get(f"{server.base}/")
        key = wait_for(driver, lambda d: visible(d, "#key"), "the sign-in form")
        assert driver.current_url == f"{server.base}/ui/"
        key.send_keys("not-a-key")
        driver.find_element(By.ID, "signin-submit").click()
        wait_for(
            driver,
            lambda d: d.find_element(By.ID, "signin-error").text == "That key is not valid.",
            "the refusal",
        )
        assert not driver.find_element(By.ID, "nav").is_displayed()
        assert [e["message"] for e in browser_errors(driver)] == [
            f"{server.base}/v1/me - Failed to load resource: the server responded with a "
            "status of 401 (Unauthorized)"
        ]


async def test_docs_render_offline(tmp_path: Path, driver: WebDriver) -> None:
    """/docs renders the API from same-origin files only.

    On one backend: the page and the OpenAPI document it renders are built from the code and
    the package's files, and read nothing from the database (Swagger UI's rendering is 2-3 s
    of the browser's CPU)."""
    async with served(str(tmp_path / "ledger.db")) as server:
        driver.get(f"{server.base}/docs")
        wait_for(
            driver,
            lambda d: "jobledger" in " ".join(texts(d, ".swagger-ui .info .title")),
            "the API's title in Swagger UI",
        )
        wait_for(driver, lambda d: visible(d, ".opblock-summary-path"), "the operations")
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert resources and all(r.startswith(server.base) for r in resources), resources
        assert browser_errors(driver) == []


class _Blank(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>a page</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def blank_site() -> Iterator[str]:
    """An origin of its own: a page served on a free port of 127.0.0.1."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


STORE = """
const done = arguments[arguments.length - 1];
localStorage.setItem("k", "local");
sessionStorage.setItem("k", "session");
document.cookie = "k=cookie; max-age=3600";
const open = indexedDB.open("kept", 1);
open.onupgradeneeded = () => open.result.createObjectStore("s");
open.onsuccess = () => { open.result.close(); done(true); };
open.onerror = () => done(false);
"""

STORED = """
const done = arguments[arguments.length - 1];
indexedDB.databases().then(dbs => done({
  local: localStorage.getItem("k"),
  session: sessionStorage.getItem("k"),
  cookie: document.cookie,
  indexeddb: dbs.map(d => d.name),
}));
"""


def test_the_next_test_gets_a_fresh_tab_with_nothing_stored_and_nothing_logged(
    shared_chromium: SharedChromium,
) -> None:
    """What a test's page stored, logged or resized is gone for the next test on that origin."""
    nothing = {"local": None, "session": None, "cookie": "", "indexeddb": []}
    with blank_site() as site, blank_site() as other_port:
        first = shared_chromium.fresh(1280, 900)
        first.get(site)
        assert first.execute_async_script(STORE) is True
        assert first.execute_async_script(STORED) == {
            "local": "local",
            "session": "session",
            "cookie": "k=cookie",
            "indexeddb": ["kept"],
        }
        first.execute_script("console.error('an error of the earlier test')")
        old_tab = first.current_window_handle
        shared_chromium.leave()

        # the next test, whose server got the same port, or another one (cookies ignore ports)
        starts = shared_chromium.starts
        driver = shared_chromium.fresh(800, 600)
        assert shared_chromium.starts == starts  # the same browser
        assert driver.window_handles == [driver.current_window_handle]
        assert driver.current_window_handle != old_tab
        assert browser_errors(driver) == []
        assert driver.get_window_size() == {"width": 800, "height": 600}
        driver.get(other_port)
        assert driver.execute_async_script(STORED) == nothing
        driver.get(site)
        assert driver.execute_async_script(STORED) == nothing
        shared_chromium.leave()


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started, from any of its threads."""
    tasks = Path(f"/proc/{pid}/task").glob("*/children")
    return [int(c) for task in tasks for c in task.read_text().split()]


def test_a_crashed_tab_or_a_dead_browser_is_replaced_for_the_next_test(
    shared_chromium: SharedChromium,
) -> None:
    """The test after a crash gets a working browser instead of the broken one's errors."""
    driver = shared_chromium.fresh()
    with pytest.raises(WebDriverException):
        driver.execute_cdp_cmd("Page.crash", {})  # the tab crashes during a test
    shared_chromium.leave()
    starts = shared_chromium.starts
    driver = shared_chromium.fresh()
    assert driver.execute_script("return 6 * 7") == 42
    assert shared_chromium.starts == starts + 1

    shared_chromium.leave()
    service = driver.service  # type: ignore[attr-defined]
    (browser,) = _children(service.process.pid)  # chromedriver's one child: the browser
    os.kill(browser, signal.SIGKILL)  # the browser dies between two tests
    driver = shared_chromium.fresh()
    assert driver.execute_script("return 6 * 7") == 42
    assert shared_chromium.starts == starts + 2
