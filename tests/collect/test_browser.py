"""End to end in headless Chromium (Debian's, driven by Playwright): vote by keyboard, find the votes
in the store. Skips when Chromium or Playwright is missing, unless DIFFALIGN_REQUIRE_BROWSER=1 (CI)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from diffalign.collect.queue import PairTask, add_pairs
from tests.collect.conftest import png
from tests.collect.server import Server

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
EVIL = "<script>window.__injected = 1</script>"


def _browser_or_skip():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright package is not installed (pip install -e '.[dev]')"
    if reason is None and not CHROMIUM.exists():
        reason = f"no Chromium at {CHROMIUM} (.ci/chromium.sh installs Debian's chromium)"
    if reason is not None:
        if os.environ.get("DIFFALIGN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DIFFALIGN_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return sync_playwright


def _until(condition, timeout: float = 30.0) -> None:
    """Poll from Python (the page's Content-Security-Policy forbids Playwright's in-page eval polling)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the page did not reach the expected state")
        time.sleep(0.05)


@pytest.mark.slow
def test_keyboard_votes_reach_the_store(sqlite_store, tmp_path: Path):
    sync_playwright = _browser_or_skip()
    from diffalign.collect.storage import write_transaction
    from diffalign.collect.tokens import add_rater

    prompts = [f"a red circle {EVIL}", "a blue square", "two triangles", "a green star"]
    pairs = [PairTask(p, png(2 * i), png(2 * i + 1)) for i, p in enumerate(prompts)]
    add_pairs(sqlite_store, pairs, 1, "e2e")
    with write_transaction(sqlite_store) as (conn, _):
        token = add_rater(conn, "ann")
    server = Server(sqlite_store.url, sqlite_store.images_dir, tmp_path / "server.log").start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
            page = browser.new_page()
            page.goto(f"{server.url}/annotate?token={token}")
            shown = []
            for key in ("ArrowLeft", "ArrowRight", "ArrowDown", "Space"):
                page.wait_for_selector("body[data-state=ready]")
                _until(lambda: page.evaluate("document.getElementById('left').complete"))
                shown.append(page.inner_text("#prompt"))
                assert page.evaluate("document.getElementById('left').naturalWidth") == 8  # the image loaded
                assignment = page.get_attribute("body", "data-assignment")
                page.keyboard.press(key)
                if key == "ArrowLeft":
                    page.keyboard.press(key)  # a double press while the first vote is in flight
                _until(
                    lambda a=assignment: (
                        page.get_attribute("body", "data-state") == "done"
                        or (
                            page.get_attribute("body", "data-state") == "ready"
                            and page.get_attribute("body", "data-assignment") != a
                        )
                    )
                )
            page.wait_for_selector("body[data-state=done]")
            assert page.inner_text("#progress-text").strip() == "4 / 4 done"
            assert page.evaluate("window.__injected") is None  # the script in the prompt never ran
            browser.close()
    finally:
        server.kill()
    assert shown[0] == prompts[0]  # shown as text, tag and all
    stored = {c.prompt: (c.choice, c.chosen) for c in sqlite_store.comparisons(source="collect")}
    assert len(stored) == 4
    by_key = dict(zip(("ArrowLeft", "ArrowRight", "ArrowDown", "Space"), shown))
    assert stored[by_key["ArrowLeft"]] == ("image", 0)
    assert stored[by_key["ArrowRight"]] == ("image", 1)
    assert stored[by_key["ArrowDown"]] == ("tie", None)
    assert stored[by_key["Space"]] == ("skip", None)
