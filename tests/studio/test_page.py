"""What the studio page promises a person, through its API and its pure parts.

Nothing lost (a refused request keeps the results and returns its reason), nothing hidden
(downloads disabled before a run, the JSON lists only the controls that applied, each tile
says what the judge reads and how far it lies from the training set against held-out data),
presets and controls that cannot act say so. Browser-side behaviour is in test_browser.py.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from gradio_client import Client  # noqa: E402

from _studio_fixtures import FAST_REQUEST, TINY, serve, tiny_model  # noqa: E402
from steersample.studio import page as page_module  # noqa: E402
from steersample.studio.app import build_app  # noqa: E402
from steersample.studio.downloads import report_dict, sheet_png  # noqa: E402
from steersample.studio.engine import run_comparison  # noqa: E402
from steersample.studio.render import arm_summary, verdict  # noqa: E402
from steersample.studio.settings import (parse_request, preset_values,  # noqa: E402
                                         steerer_names, steerer_strength_range)
from steersample.studio.status import (active_preset, applied_controls,  # noqa: E402
                                       changed_controls, outer_scale_reasons, preset_changes,
                                       strength_state)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def demo(model):
    return build_app(models=[model])


@pytest.fixture(scope="module")
def server(demo):
    with serve(demo) as url:
        yield url


def _generate(client: Client, **overrides):
    return client.predict(**{**FAST_REQUEST, **overrides}, api_name="/generate")


def _unchanged(output) -> bool:
    return isinstance(output, dict) and output.get("__type__") == "update" and "value" not in output


def _comparison(model, **overrides):
    return run_comparison(model, parse_request({**FAST_REQUEST, **overrides},
                                               models={TINY: model}))


# ----------------------------------------------------------------------------- API
def test_a_refused_request_keeps_the_results_and_returns_the_reason(server):
    client = Client(server, verbose=False)
    good = _generate(client)
    refused = _generate(client, window_lo=0.9, window_hi=0.2)
    reason = refused[6]
    assert "low σ (0.9) must be below high σ (0.2)" in reason
    assert "results below are from the last good run" in reason
    # every result output is "no change": gallery, summaries, plot, downloads, settings line
    assert all(_unchanged(out) for out in refused[:6]) and _unchanged(refused[7])
    again = _generate(client)
    assert again[6] == "" and [t["caption"] for t in again[0]] == [t["caption"] for t in good[0]]


def test_a_run_that_fails_unexpectedly_also_keeps_the_results(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(page_module, "run_comparison", broken)
    out = _generate(Client(server, verbose=False))
    assert out[6].startswith("**Generation failed** (RuntimeError: out of memory)")
    assert all(_unchanged(o) for o in out[:6])


def test_a_second_request_during_a_run_is_queued_and_served(server, model, monkeypatch):
    gate, started = threading.Event(), threading.Event()

    def held(*args, **kwargs):  # the first run waits until the second has been submitted
        started.set()
        assert gate.wait(60)
        return run_comparison(*args, **kwargs)

    monkeypatch.setattr(page_module, "run_comparison", held)
    client = Client(server, verbose=False)
    first = client.submit(**{**FAST_REQUEST, "seed": 11}, api_name="/generate")
    assert started.wait(60)
    second = client.submit(**{**FAST_REQUEST, "seed": 21}, api_name="/generate")
    assert not first.done()
    gate.set()
    for job, seed in ((first, 11), (second, 21)):
        tiles = job.result(timeout=120)[0]
        assert tiles[0]["caption"].startswith(f"plain · seed {seed}")


def test_downloads_are_disabled_before_any_run(demo):
    buttons = {c["props"].get("elem_id"): c["props"] for c in demo.config["components"]
               if c["props"].get("elem_id") in ("download-report", "download-sheet")}
    assert set(buttons) == {"download-report", "download-sheet"}
    assert all(props["interactive"] is False and props.get("value") is None
               for props in buttons.values())


def test_download_names_carry_class_seed_and_preset_and_the_sheet_is_a_labelled_grid(server):
    out = _generate(Client(server, verbose=False), num_samples=3)
    report, sheet = out[4], out[5]
    assert report.endswith("steersample-class3-seed5-paper-window-report.json")
    assert sheet.endswith("steersample-class3-seed5-paper-window-sheet.png")
    from PIL import Image

    with Image.open(sheet) as image:
        width, height = image.size
    assert width >= 800 and height > 3 * 250  # a header and one row per seed, not a strip


def test_json_lists_only_the_controls_that_applied(server):
    client = Client(server, verbose=False)
    relative = json.load(open(_generate(client, window_relative=True, below_boundary=0.1,
                                        above_boundary=1.0)[4]))["request"]
    assert {"below_boundary", "above_boundary"} <= set(relative)
    assert not {"window_lo", "window_hi", "strength", "navigation_fraction"} & set(relative)
    assert "scale_above" not in relative  # the window reaches σ = 1
    absolute = json.load(open(_generate(client)[4]))
    assert absolute["request"]["window_lo"] == 0.4 and "below_boundary" not in absolute["request"]
    assert {"scale_above", "scale_below"} <= set(absolute["request"])  # window (0.4, 0.9]
    assert absolute["preset"] == "paper window"
    steerer = next((n for n in steerer_names() if n != "none"), None)
    if steerer is not None:
        steered = json.load(open(_generate(client, steering=steerer, strength=0.5)[4]))
        assert steered["request"]["strength"] == 0.5


def test_every_tile_says_what_the_judge_reads_and_its_distance_to_held_out(server, model):
    out = _generate(Client(server, verbose=False))
    for tile in out[0]:
        assert "judge reads a" in tile["caption"]
        assert "times a held-out sample's" in tile["caption"]
    data = json.load(open(out[4]))
    expected = _comparison(model)
    for arm in ("plain", "steered"):
        distances = [s["relative_distance"] for s in data[arm]["samples"]]
        assert distances == pytest.approx(list(getattr(expected, arm).relative_distances))
        assert all(d > 0 for d in distances)


def test_seed_minus_one_draws_a_random_seed_and_records_it(server):
    client = Client(server, verbose=False)
    seeds = set()
    for _ in range(2):
        out = _generate(client, seed=-1)
        request = json.load(open(out[4]))["request"]
        assert request["random_seed"] is True and 0 <= request["seed"] < 2**31 - 1
        assert f"seeds {request['seed']}–" in out[7] and "(random)" in out[7]
        seeds.add(request["seed"])
    assert len(seeds) == 2


# ----------------------------------------------------------------------------- pure parts
def test_an_illegible_or_off_class_sample_is_never_called_novel(model):
    assert verdict(is_copy=False, judged=4, target=8) == "off-class"
    assert verdict(is_copy=False, judged=8, target=8) == "novel"
    assert verdict(is_copy=True, judged=8, target=8) == "COPY"
    assert verdict(is_copy=None, judged=8, target=8) is None
    result = _comparison(model)
    for arm in (result.plain, result.steered):
        for k, judged in enumerate(arm.judge_labels):
            if judged != FAST_REQUEST["class_id"] and not arm.copies[k]:
                assert verdict(arm.copies[k], judged, FAST_REQUEST["class_id"]) == "off-class"


def test_summary_states_the_shift_in_phase_aware_mode(model):
    result = _comparison(model, schedule="phase-aware", shift=2.5, steps=8)
    text = arm_summary(result.steered, result)
    assert "phase-aware grid" in text and "shift 2.5" in text


def test_stale_marker_names_the_moved_control(model):
    result = _comparison(model)
    applied = applied_controls(result.request, result.plan.window)
    assert changed_controls(applied, FAST_REQUEST) == []
    assert changed_controls(applied, {**FAST_REQUEST, "guidance_scale": 8.0}) == ["guidance_scale"]
    # a control that did not apply does not make the results stale
    assert changed_controls(applied, {**FAST_REQUEST, "below_boundary": 0.3}) == []
    random_run = applied_controls(result.request, result.plan.window, random_seed=True)
    assert changed_controls(random_run, {**FAST_REQUEST, "seed": -1}) == []


def test_presets_are_recognised_and_moves_away_named(model):
    values = {**FAST_REQUEST, **preset_values("paper window", 2.0, model.shift)}
    assert active_preset(values, model.shift) == "paper window"
    moved = {**values, "window_hi": 0.8}
    assert active_preset(moved, model.shift) is None
    assert preset_changes("paper window", moved, model.shift) == [("window_hi", 0.9, 0.8)]


def test_controls_that_cannot_act_say_why():
    whole = dict(window_relative=False, window_lo=0.0, window_hi=1.0,
                 below_boundary=0.1, above_boundary=0.4)
    above, below = outer_scale_reasons(whole, None)
    assert "reaches σ = 1" in above and "reaches σ = 0" in below
    assert outer_scale_reasons({**whole, "window_lo": 0.4, "window_hi": 0.9}, None) == (None, None)
    relative = {**whole, "window_relative": True}
    assert outer_scale_reasons(relative, 0.5) == (None, None)
    assert outer_scale_reasons(relative, None) == (None, None)  # σ* unknown: the run will say
    enabled, _, why = strength_state("none")
    assert not enabled and "choose a steering method" in why
    if "representation" in steerer_names():
        assert steerer_strength_range("representation") == (0.0, 1.0)
        enabled, maximum, _ = strength_state("representation")
        assert enabled and maximum == 1.0


def test_sheet_and_report_work_without_held_out_data():
    from steersample.studio.engine import StudioModel
    from steersample.testing import tiny_flow_pipeline

    from _studio_fixtures import tiny_reference

    plain = StudioModel(TINY, tiny_flow_pipeline(), tiny_reference())
    result = run_comparison(plain, parse_request(FAST_REQUEST, models={TINY: plain}))
    assert result.plain.relative_distances is None and result.plain.judge_labels is None
    report = report_dict(result)
    assert report["relative_distance"] is None
    assert "relative_distance" not in report["plain"]["samples"][0]
    assert sheet_png(result)[:4] == b"\x89PNG"
    assert np.isfinite(result.plain.ratios).all()


def test_the_profile_schedule_uses_from_profile_and_drops_the_shift(server, model):
    from steersample.sampling.scheduler import PhaseAwareFlowMatchScheduler

    out = _generate(Client(server, verbose=False), schedule="profile", shift=3.0, steps=8)
    data = json.load(open(out[4]))
    assert data["steered"]["scheduler"] == {"from_profile": True}
    assert "shift" not in data["request"] and data["request"]["schedule"] == "profile"
    assert "profile grid" in out[2]
    expected = PhaseAwareFlowMatchScheduler.from_profile(model.pipe.scheduler.config,
                                                         model.profile(FAST_REQUEST["class_id"]))
    expected.set_timesteps(8)
    assert data["steered"]["telemetry"]["sigma"] == pytest.approx(expected.sigmas[:-1].tolist(),
                                                                  abs=1e-6)
