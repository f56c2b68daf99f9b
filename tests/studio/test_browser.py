"""The studio in a real browser: headless Chromium from Debian, driven by Playwright.

It loads the page, sets steps and samples, moves the strength slider with the keyboard, clicks
Generate, waits for both galleries, checks they hold the requested number of images, checks
the downloaded JSON report carries the moved strength, and saves a screenshot. Then it sends
an impossible window and checks that the error is shown as a message while the galleries keep
the last good results. Set
``STEERSAMPLE_SCREENSHOT=docs/studio.png`` to write the README's screenshot.

Uses the embedded default model when its weights are present (the README picture), else the
tiny test model. Needs ``/usr/bin/chromium`` (CI installs it with apt; nothing is downloaded)
and the ``playwright`` Python package; skipped without them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the studio needs gradio: pip install -e '.[test]'")
playwright = pytest.importorskip(
    "playwright.sync_api", reason="needs the playwright Python package: pip install -e '.[test]'"
)

from _studio_fixtures import serve, tiny_model  # noqa: E402
from steersample.studio.settings import steerer_names  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists(),
                       reason=f"no Chromium at {CHROMIUM}: install Debian's package with "
                              "`apt-get update && apt-get install -y chromium` (README, tests)"),
]
SAMPLES = 4
TIMEOUT_MS = 120_000


def _studio():
    from steersample.studio.app import build_app, default_models

    try:
        models = default_models()
    except (FileNotFoundError, ValueError):  # default weights not built yet
        models = [tiny_model()]
    return build_app(models=models), models[0]


def _set_number(page, elem_id: str, value) -> None:
    """Type into the number box of a Gradio slider/number and commit it (like a user)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_studio_in_headless_chromium(tmp_path):
    demo, model = _studio()
    screenshot = Path(os.environ.get("STEERSAMPLE_SCREENSHOT") or tmp_path / "studio.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with serve(demo) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000},
                                    accept_downloads=True)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url, wait_until="networkidle")
            assert page.title() == "steersample studio"

            _set_number(page, "num-samples", SAMPLES)
            _set_number(page, "steps", 12)
            steerer = next((n for n in steerer_names() if n != "none"), None)
            if steerer is not None:  # pick a registered steerer, as a user would
                page.locator("#steering input").click()
                page.get_by_role("option", name=steerer, exact=True).click()
                page.wait_for_function(
                    "s => document.querySelector('#steering input').value === s", arg=steerer)

            # move the strength slider: focus its range input and press arrow keys
            strength = page.locator("#strength input[type=range]")
            before = float(strength.input_value())
            strength.focus()
            for _ in range(4):
                strength.press("ArrowRight")
            moved = float(strength.input_value())
            assert moved > before

            page.locator("#generate").click()
            for gallery in ("#gallery-plain", "#gallery-steered"):
                page.wait_for_function(
                    "([sel, n]) => document.querySelectorAll(sel + ' img').length >= n",
                    arg=[gallery, SAMPLES])
            page.wait_for_selector("#phase-plot img")
            assert page.locator("#gallery-plain img").count() == SAMPLES
            assert page.locator("#gallery-steered img").count() == SAMPLES
            assert "model evaluations" in page.locator("#stats-steered").inner_text()

            with page.expect_download() as download:
                page.locator("#download-report").click()
            report = json.loads(Path(download.value.path()).read_text())
            assert report["request"]["strength"] == pytest.approx(moved)
            assert report["request"]["steering"] == (steerer or "none")
            assert report["request"]["num_samples"] == SAMPLES
            assert report["model"] == model.name

            page.mouse.move(0, 0)  # no hover effects in the picture
            page.screenshot(path=str(screenshot), full_page=True)

            # a bad request shows a readable message and leaves the last good results
            shown = page.locator("#gallery-plain img").first.get_attribute("src")
            page.locator("#window-relative input").uncheck()
            _set_number(page, "window-lo", 0.9)
            _set_number(page, "window-hi", 0.4)
            page.locator("#generate").click()
            toast = page.get_by_text("must be below high σ")
            toast.wait_for()
            assert "Traceback" not in page.content()
            assert page.locator("#gallery-plain img").count() == SAMPLES
            assert page.locator("#gallery-plain img").first.get_attribute("src") == shown
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
