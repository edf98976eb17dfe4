"""The paradigm report in headless Chromium (Debian's, driven by Playwright), opened from disk: no broken
image, every section present and visible, no console error, no script run from the data. Skips when
Chromium or Playwright is missing, unless DIFFALIGN_REQUIRE_BROWSER=1 (CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffalign.demo.report_html import SECTIONS, render_report
from tests.demo.test_report_html import EVIL, write_synthetic_report

# The same browser and flags as tests/collect/test_browser.py (not imported: that module pulls in the
# collection server and its database stack).
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
IMAGES = "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth}))"


def _playwright_or_skip():
    """Playwright's sync API, or a skip (a failure if DIFFALIGN_REQUIRE_BROWSER=1) naming what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright, reason = None, "the playwright package is not installed (pip install -e '.[dev]')"
    else:
        reason = None if CHROMIUM.exists() else f"no Chromium at {CHROMIUM} (.ci/chromium.sh installs it)"
    if reason is not None:
        if os.environ.get("DIFFALIGN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DIFFALIGN_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return sync_playwright


def test_report_renders_in_chromium_without_broken_images(tmp_path: Path):
    sync_playwright = _playwright_or_skip()
    data = write_synthetic_report(tmp_path)
    data["systems"][2]["name"] = f"dpo {EVIL}"
    report = render_report(data, tmp_path)
    grids = sum(len(s["grids"]) for s in data["systems"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on(
                "console", lambda message: errors.append(message.text) if message.type == "error" else None
            )
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(report.as_uri(), wait_until="load")
            images = page.evaluate(IMAGES)
            for key, heading in SECTIONS:
                section = page.locator(f"section#{key}")
                assert section.count() == 1, key
                assert section.is_visible(), key
                assert section.locator("h2").inner_text() == heading
            shown = page.locator("section#paradigms tbody tr td:first-child").all_inner_texts()
            injected = page.evaluate("window.__injected")

            # The probe can fail: a page with an image that does not decode reports naturalWidth 0.
            page.set_content("<img alt='broken' src='data:image/png;base64,AAAA'>", wait_until="load")
            broken = page.evaluate(IMAGES)
        finally:
            browser.close()
    assert len(images) == grids + 2  # the grids, the curves and the over-optimisation plot
    assert [i for i in images if not i["complete"] or i["width"] == 0] == []
    assert errors == []
    assert shown == ["base", "grpo", f"dpo {EVIL}", "fk"]  # the name shown as text, tag and all
    assert injected is None  # the script in the name never ran
    assert broken == [{"alt": "broken", "complete": True, "width": 0}]


def inspect_report(report: Path) -> tuple[list[dict], list[str], list[str]]:
    """Open `report` in Chromium: (its images, console/page errors, section ids missing or hidden)."""
    sync_playwright = _playwright_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(report.resolve().as_uri(), wait_until="load")
            images = page.evaluate(IMAGES)
            missing = [
                key
                for key, _ in SECTIONS
                if page.locator(f"section#{key}").count() != 1
                or not page.locator(f"section#{key}").is_visible()
            ]
        finally:
            browser.close()
    return images, errors, missing


def test_a_demo_report_renders_in_chromium():
    """The report of a real `diffalign demo` run (.ci/run runs `diffalign demo --quick` and sets
    DIFFALIGN_DEMO_REPORT to its report.html)."""
    path = os.environ.get("DIFFALIGN_DEMO_REPORT")
    if not path:
        pytest.skip("DIFFALIGN_DEMO_REPORT is not set (.ci/run sets it to the quick demo's report)")
    report = Path(path)
    assert report.is_file(), f"DIFFALIGN_DEMO_REPORT={path}: no such file"
    images, errors, missing = inspect_report(report)
    assert len(images) >= 6 * 5 + 1  # a grid per task and system, and at least the curves
    assert [i for i in images if not i["complete"] or i["width"] == 0] == []
    assert errors == [] and missing == []
