"""The studio in a real browser: headless Chromium from Debian, driven by Playwright.

What a person sees: downloads disabled before a run; a run started from the seed box (Enter)
and from the button, which reads "Running…" and is disabled while the run lasts (a second
click is refused, visibly); at 1024 px each seed's plain and steered tile share a row; tiles,
plot and reset buttons have readable names; moving a control marks the results stale; a refused
request leaves the results on screen and its reason readable after the toast has gone; on a
390 px phone the results come before the controls.

Set ``STEERSAMPLE_SCREENSHOTS=docs`` to write the README's pictures (``studio.png`` at
1400 px, ``studio-phone.png`` at 390 px). Uses the embedded default model when its weights are
present (the README pictures), else the tiny test model. Needs ``/usr/bin/chromium`` (CI
installs it with apt; nothing is downloaded) and the ``playwright`` Python package.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")

from _studio_fixtures import prompt_model, serve, tiny_model  # noqa: E402
from steersample.studio import page as page_module  # noqa: E402
from steersample.studio.settings import steerer_names  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists(),
                       reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"),
]
SAMPLES = 4
TIMEOUT_MS = 120_000
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


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


def _tiles(page):
    return page.locator("#results-gallery .thumbnail-item img")


def _wait_for_tiles(page, seed: int) -> None:
    page.wait_for_function(
        "([n, seed]) => { const imgs = document.querySelectorAll("
        "'#results-gallery .thumbnail-item img');"
        " return imgs.length === n && imgs[0].alt.includes('seed ' + seed + ':'); }",
        arg=[2 * SAMPLES, seed])
    page.wait_for_function("() => !document.querySelector('#generate').disabled")


def _shot(page, name: str, folder: Path) -> Path:
    page.mouse.move(0, 0)  # no hover effects in the picture
    path = folder / name
    page.screenshot(path=str(path), full_page=True, type="png")
    from PIL import Image  # keep the README's pictures small: 64 colours are plenty

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(64)
    small.save(path, optimize=True)
    return path


@pytest.fixture
def chromium():
    """A headless Chromium page (1024 px wide), closed afterwards."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


@pytest.fixture
def prompt_studio():
    """The studio serving the shipped prompt testbed (``steersample demo --model prompt``)."""
    from steersample.studio.app import build_app

    with serve(build_app(models=[prompt_model()])) as url:
        yield url


@pytest.fixture
def gate(monkeypatch):
    """Runs wait on this event while it is clear (set by default)."""
    event = threading.Event()
    event.set()
    run = page_module.run_comparison

    def gated(*args, **kwargs):
        assert event.wait(TIMEOUT_MS / 1000)
        return run(*args, **kwargs)

    monkeypatch.setattr(page_module, "run_comparison", gated)
    return event


def test_studio_in_headless_chromium(tmp_path, gate):
    demo, model = _studio()
    folder = Path(os.environ.get("STEERSAMPLE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    with serve(demo) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 900},
                                    accept_downloads=True)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url, wait_until="load")
            page.wait_for_selector("#generate")
            assert page.title() == "steersample studio"

            # before any run: no results, downloads disabled and saying when they come
            assert page.locator("#download-report").is_disabled()
            assert page.locator("#download-sheet").is_disabled()
            page.wait_for_function(
                "() => document.querySelector('#run-info').innerText.includes('No results yet')")

            _set_number(page, "num-samples", SAMPLES)
            _set_number(page, "steps", 12)
            steerer = next((n for n in steerer_names() if n != "none"), None)
            if steerer is not None:  # pick a registered steerer, as a user would
                page.locator("#steering input").click()
                page.get_by_role("option", name=steerer, exact=True).click()
                page.wait_for_function(
                    "s => document.querySelector('#steering input').value === s", arg=steerer)
            strength = page.locator("#strength input[type=range]")
            page.wait_for_function("() => !document.querySelector('#strength input[type=range]')"
                                   ".disabled")
            before = float(strength.input_value())
            strength.focus()
            for _ in range(4):
                strength.press("ArrowRight")
            moved = float(strength.input_value())
            assert moved > before
            page.wait_for_function(  # the page says the strength left the preset
                "() => document.querySelector('#preset-info').innerText.includes('moved away')")
            assert "Steering strength" in page.locator("#preset-info").inner_text()

            # Enter in the seed box runs; while the run is held the button is visibly refused
            gate.clear()
            seed_box = page.locator("#seed input")
            seed_box.fill("7")
            seed_box.press("Enter")
            page.wait_for_function("() => document.querySelector('#generate').disabled")
            assert page.locator("#generate").inner_text() == "Running…"
            page.locator("#generate").click(force=True)  # a second click: refused
            gate.set()
            _wait_for_tiles(page, 7)
            assert page.locator("#generate").inner_text() == "Generate"
            assert "seeds 7–10" in page.locator("#run-info").inner_text()

            # at 1024 px the plain and steered tile of each seed share a row, plain left
            tiles = _tiles(page)
            assert tiles.count() == 2 * SAMPLES
            for k in range(SAMPLES):
                plain, steered = tiles.nth(2 * k), tiles.nth(2 * k + 1)
                assert plain.get_attribute("alt").startswith(f"plain · seed {7 + k}:")
                assert steered.get_attribute("alt").startswith(f"steered · seed {7 + k}:")
                a, b = plain.bounding_box(), steered.bounding_box()
                assert abs(a["y"] - b["y"]) < 1 and a["x"] + a["width"] <= b["x"]
            if model.digits:
                assert "judge reads a" in tiles.first.get_attribute("alt")
            if model.heldout is not None:
                assert "held-out" in tiles.first.get_attribute("alt")
            # one page, no scroll box of its own, and no button that empties the results
            gallery = page.locator("#results-gallery .grid-wrap")
            assert gallery.evaluate("e => e.scrollHeight <= e.clientHeight + 1")
            assert page.locator("#results-gallery button[aria-label='Clear']").count() == 0
            alt = page.locator("#phase-plot img").get_attribute("alt")
            assert alt.startswith("Phase plot: oracle top-1 weight against σ")
            names = page.locator("button.reset-button").evaluate_all(
                "bs => bs.map(b => b.getAttribute('aria-label'))")
            assert len(names) == len(set(names)) and "Reset Steps to its starting value" in names
            assert page.locator("#download-report").is_enabled()

            with page.expect_download() as download:
                page.locator("#download-report").click()
            assert download.value.suggested_filename.startswith("steersample-class")
            report = json.loads(Path(download.value.path()).read_text())
            assert report["request"]["strength"] == pytest.approx(moved)
            assert report["request"]["seed"] == 7 and report["request"]["num_samples"] == SAMPLES
            assert report["model"] == model.name

            # the enlarged tile's caption is whole: nothing cut at either end
            tiles.first.click()
            caption = page.locator("#results-gallery .preview .caption")
            caption.wait_for()
            assert caption.evaluate("e => e.scrollWidth <= e.clientWidth + 1")
            strip = page.locator("#results-gallery .preview .thumbnails").bounding_box()
            box = caption.bounding_box()
            assert box["y"] + box["height"] <= strip["y"] + 1  # not under the thumbnail strip
            assert caption.inner_text().startswith("plain · seed 7:")
            page.keyboard.press("Escape")

            page.set_viewport_size({"width": 1400, "height": 1000})
            _shot(page, "studio.png", folder)

            # on a phone the results come before the controls
            page.set_viewport_size({"width": 390, "height": 844})
            results = page.locator("#results-column").bounding_box()
            controls = page.locator("#controls-column").bounding_box()
            assert results["y"] + results["height"] <= controls["y"] + 1
            _shot(page, "studio-phone.png", folder)
            page.set_viewport_size({"width": 1024, "height": 900})

            # moving a control marks the results on screen stale, naming the control
            _set_number(page, "steps", 13)
            page.wait_for_function(
                "() => document.querySelector('#run-info').innerText.includes('Stale')")
            assert "Steps 12 → 13" in page.locator("#run-info").inner_text()
            _set_number(page, "steps", 12)
            page.wait_for_function(
                "() => !document.querySelector('#run-info').innerText.includes('Stale')")

            # controls that cannot act are disabled, and the strength stops where the steerer does
            def pick(name):
                page.locator("#steering input").click()
                page.get_by_role("option", name=name, exact=True).click()

            pick("none")
            page.wait_for_function("() => document.querySelector('#strength input[type=range]')"
                                   ".disabled")
            assert "choose a steering method" in page.locator("#strength").inner_text()
            if "representation" in steerer_names():
                pick("representation")
                page.wait_for_function("() => document.querySelector("
                                       "'#strength input[type=range]').max === '1'")
            if steerer is not None:
                pick(steerer)
            page.locator("#strength input[type=number]").fill(str(moved))
            page.locator("#strength input[type=number]").press("Enter")
            page.wait_for_function(
                "() => !document.querySelector('#run-info').innerText.includes('Stale')")

            # a refused request: results stay, the reason stays readable after the toast goes
            shown = tiles.first.get_attribute("src")
            page.locator("#window-relative input").uncheck()
            _set_number(page, "window-lo", 0.9)
            _set_number(page, "window-hi", 0.4)
            page.locator("#generate").click()
            message = page.locator("#message")
            page.wait_for_function(
                "() => document.querySelector('#message').innerText.includes('must be below')")
            page.locator("[data-testid='toast-body']").first.wait_for(state="detached")
            assert "low σ (0.9) must be below high σ (0.4)" in message.inner_text()
            assert message.is_visible() and "Traceback" not in page.content()
            assert tiles.count() == 2 * SAMPLES and tiles.first.get_attribute("src") == shown
            assert tiles.first.is_visible()
            assert page.locator("#stats-steered").inner_text().strip()

        finally:
            browser.close()
    assert (folder / "studio.png").stat().st_size > 10_000


def test_prompt_studio_in_headless_chromium(prompt_studio, chromium):
    """A prompt picked from the chooser runs; each seed's plain and steered tile share a row
    and show the sample beside its nearest training image (decoded from the store)."""
    page = chromium
    page.goto(prompt_studio, wait_until="load")
    page.wait_for_selector("#generate")
    box = page.locator("#prompt textarea, #prompt input").first
    # the testbed's store labels its prompts, so "best steering" is compare's: novelty steering
    page.wait_for_function("() => document.querySelector('#steering input').value === 'novelty'")
    page.locator("#prompt-choice input").click()
    page.get_by_role("option", name="a digit two", exact=True).click()
    page.wait_for_function(
        "() => { const b = document.querySelector('#prompt textarea, #prompt input');"
        " return b && b.value === 'a digit two'; }")
    assert box.input_value() == "a digit two"
    _set_number(page, "num-samples", 2)
    _set_number(page, "steps", 6)
    page.locator("#generate").click()
    page.wait_for_function(
        "() => { const imgs = document.querySelectorAll('#results-gallery .thumbnail-item img');"
        " return imgs.length === 4 && imgs[0].alt.includes('seed 0:')"
        " && imgs[0].naturalWidth > 0; }")
    page.wait_for_function("() => !document.querySelector('#generate').disabled")
    assert "a digit two" in page.locator("#run-info").inner_text()
    tiles = _tiles(page)
    for k in range(2):
        plain, steered = tiles.nth(2 * k), tiles.nth(2 * k + 1)
        assert plain.get_attribute("alt").startswith(f"plain · seed {k}:")
        assert steered.get_attribute("alt").startswith(f"steered · seed {k}:")
        a, b = plain.bounding_box(), steered.bounding_box()
        assert abs(a["y"] - b["y"]) < 1 and a["x"] + a["width"] <= b["x"]
        for tile in (plain, steered):
            alt = tile.get_attribute("alt")
            assert "nearest training image #" in alt and "held-out" in alt
            assert "COPY" in alt or "novel" in alt
            # the sample and its nearest training image side by side: a wide tile
            width, height = tile.evaluate("e => [e.naturalWidth, e.naturalHeight]")
            assert width > height
