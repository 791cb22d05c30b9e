"""Browser tests: Debian's Chromium, headless, driven by Playwright against live_server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connections

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _unavailable(reason: str) -> None:
    """Skip where there is no browser, unless this run must drive one."""
    if os.environ.get("PRECEDENT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (PRECEDENT_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


@pytest.fixture
def browser_page(monkeypatch) -> Iterator:
    """A fresh Chromium page. Playwright's sync API runs an event loop in this thread,
    and Django refuses ORM calls while one runs unless told the calls are safe (they are:
    the test and the live server thread stay synchronous)."""
    if not CHROMIUM.exists():
        _unavailable(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(30_000)
            # expect() waits 5 s by default: too short for an upload that is stored,
            # embedded and triaged before it answers, on a machine busy with other work.
            expect.set_options(timeout=30_000)
            yield page
        finally:
            browser.close()
            # ORM calls made while Playwright runs get a connection of their own (Django
            # keys connections by context); left open, it keeps the test database from
            # being dropped at the end of the session.
            connections.close_all()
