"""Headless Chromium for the dashboard's tests and screenshots: Debian's browser and driver.

Selenium drives ``/usr/bin/chromium`` through ``/usr/bin/chromedriver`` (the ``chromium`` and
``chromium-driver`` packages, installed by ``.ci/install-browser``); it never downloads a browser
or a driver. ``MISSING`` names what is absent, so the tests can skip with that reason.

``chromium()`` starts a browser and quits it (the screenshots); ``SharedChromium`` keeps one for
many tests (``tests/test_ui.py``: one per pytest worker) and gives each a fresh tab.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

T = TypeVar("T")

CHROMIUM = os.environ.get("JOBLEDGER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (
    os.environ.get("JOBLEDGER_CHROMEDRIVER")
    or shutil.which("chromedriver")
    or "/usr/bin/chromedriver"
)
WAIT_SECONDS = 20.0  # a page that has not shown what we wait for by then fails the test

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


def _missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is missing: install Debian's {package} (.ci/install-browser)"
    return None


MISSING = _missing()


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[WebDriver]:
    """A fresh headless Chromium with its own profile; always quit afterwards."""
    with tempfile.TemporaryDirectory(prefix="jobledger-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--window-size={width},{height}")
        options.add_argument(f"--user-data-dir={profile}")
        # downloads (the statement) land in the profile, removed with it, not in ~/Downloads
        options.add_experimental_option(
            "prefs", {"download.default_directory": os.path.join(profile, "downloads")}
        )
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            driver.set_page_load_timeout(WAIT_SECONDS)
            yield driver
        finally:
            driver.quit()


class SharedChromium:
    """One headless Chromium for many tests, started on the first ``fresh()``; each test a tab.

    ``fresh()`` opens a new tab, closes the others (their ``sessionStorage`` goes with them),
    clears every cookie and the HTTP cache, sets the window size and drains the console log, so
    ``browser_errors`` reports only what the new test's pages log. ``leave()`` clears all that is
    stored for the origin each tab shows at the test's end (local storage, IndexedDB, cache
    storage, service workers...; a test's pages stay on its server's origin): a later test's
    server may get the same port, hence the same origin. A browser
    that fails any of this (a crashed tab, a dead browser, a broken session) is quit and the
    next ``fresh()`` starts a new one.
    """

    def __init__(self) -> None:
        self._stack: ExitStack | None = None
        self.driver: WebDriver | None = None
        self.starts = 0

    def fresh(self, width: int = 1280, height: int = 900) -> WebDriver:
        if self.driver is not None:
            try:
                _reset(self.driver, width, height)
                return self.driver
            except Exception:  # WebDriverException, or no driver to answer at all
                self.close()
        self._stack = ExitStack()
        self.driver = self._stack.enter_context(chromium(width, height))
        self.starts += 1
        _reset(self.driver, width, height)
        return self.driver

    def leave(self) -> None:
        """After a test: forget what its pages stored, and stop them (``about:blank``)."""
        if self.driver is None:
            return
        driver = self.driver
        try:
            for handle in driver.window_handles:
                driver.switch_to.window(handle)
                url = urlsplit(driver.current_url)
                if url.scheme in ("http", "https"):
                    driver.execute_cdp_cmd(
                        "Storage.clearDataForOrigin",
                        {"origin": f"{url.scheme}://{url.netloc}", "storageTypes": "all"},
                    )
                driver.get("about:blank")
        except Exception:  # what it stored may outlive it: the next test gets a new browser
            self.close()

    def close(self) -> None:
        stack, self._stack, self.driver = self._stack, None, None
        if stack is not None:
            try:
                stack.close()
            except Exception:  # quitting a browser or a driver that is already gone
                pass


def _reset(driver: WebDriver, width: int, height: int) -> None:
    old = driver.window_handles
    driver.switch_to.new_window("tab")
    tab = driver.current_window_handle
    for handle in old:
        driver.switch_to.window(handle)
        driver.close()
    driver.switch_to.window(tab)
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})  # cookies ignore the port
    driver.execute_cdp_cmd("Network.clearBrowserCache", {})
    driver.set_window_size(width, height)
    driver.get_log("browser")  # drained: what earlier tests' pages logged is not this test's


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], T], what: str) -> T:
    """Wait until ``condition`` answers something truthy; fail naming ``what`` otherwise."""

    def check(d: WebDriver) -> T | bool:
        try:
            return condition(d)
        except StaleElementReferenceException:  # the page re-rendered under us: ask again
            return False

    try:
        return WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.05).until(check)  # type: ignore[return-value]
    except TimeoutException:
        raise AssertionError(
            f"the page never showed {what}; it shows:\n{page_text(driver)}"
        ) from None


def page_text(driver: WebDriver) -> str:
    try:
        text: str = driver.find_element(By.TAG_NAME, "body").text
        return text[:3000]
    except Exception:
        return "(no page)"


def visible(driver: WebDriver, css: str) -> WebElement | None:
    for node in driver.find_elements(By.CSS_SELECTOR, css):
        if node.is_displayed():
            return node
    return None


def texts(driver: WebDriver, css: str) -> list[str]:
    return [n.text for n in driver.find_elements(By.CSS_SELECTOR, css)]


def sign_in(driver: WebDriver, base: str, secret: str, project: str | None = None) -> None:
    """Open the dashboard, sign in with ``secret`` and wait for the jobs list."""
    driver.get(f"{base}/ui/")
    key = wait_for(driver, lambda d: visible(d, "#key"), "the sign-in form")
    key.send_keys(secret)
    if project:
        driver.find_element(By.ID, "signin-project").send_keys(project)
    driver.find_element(By.ID, "signin-submit").click()
    wait_for(driver, lambda d: visible(d, "#view-jobs"), "the jobs list after signing in")
    wait_for(driver, lambda d: "live" in d.find_element(By.ID, "live").text, "the live feed")


def browser_errors(driver: WebDriver) -> list[dict[str, Any]]:
    """Severe console messages (script errors, refused resources) since the last call."""
    logs: list[dict[str, Any]] = driver.get_log("browser")
    return [e for e in logs if e.get("level") == "SEVERE"]
