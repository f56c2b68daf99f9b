"""The Gradio studio through its API (``gradio_client``), plus its pure parts.

A tiny class-conditional DiT (random weights) and 80 real digits stand in for the default
model, so every request takes a fraction of a second. The server binds to 127.0.0.1 on a free
port and is closed at the end of the module.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from gradio_client import Client  # noqa: E402

from _studio_fixtures import FAST_REQUEST, TINY, serve, tiny_model  # noqa: E402
from steersample.studio.app import build_app  # noqa: E402
from steersample.studio.engine import run_comparison  # noqa: E402
from steersample.studio.render import comparison_tiles  # noqa: E402
from steersample.studio.settings import (LIMITS, PRESETS, parse_request, plan_runs,  # noqa: E402
                                         preset_values, steerer_names)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def server(model):
    demo = build_app(models=[model])
    with serve(demo) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def _generate(client: Client, **overrides):
    return client.predict(**{**FAST_REQUEST, **overrides}, api_name="/generate")


def _pixels(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _report(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    for arm in ("plain", "steered"):
        report[arm].pop("seconds")  # the one field allowed to differ between runs
    return report


def _expected(model, **overrides):
    """What the app must return for a request, computed in-process by the engine."""
    request = parse_request({**FAST_REQUEST, **overrides}, models={TINY: model})
    return run_comparison(model, request)


def _same_tiles(gallery: list[dict], comparison) -> bool:
    expected = comparison_tiles(comparison)
    if len(gallery) != len(expected):
        return False
    return all(np.array_equal(_pixels(item["image"]), np.asarray(tile.convert("RGB")))
               and item["caption"] == caption
               for item, (tile, caption) in zip(gallery, expected))


# ----------------------------------------------------------------------------- end to end
def test_generate_returns_both_galleries_and_report_identical_for_a_seed(client, model):
    first = _generate(client)
    second = _generate(client)
    tiles, plain_md, steered_md, plot, report, sheet, message, run_info = first
    # one gallery, each seed's plain and steered tile in turn (a row each in two columns)
    assert len(tiles) == 2 * FAST_REQUEST["num_samples"]
    assert [t["caption"].split(":")[0] for t in tiles] == [
        "plain · seed 5", "steered · seed 5", "plain · seed 6", "steered · seed 6"]
    assert "model evaluations" in plain_md and "Steered" in steered_md
    assert plot.startswith("<figure") and "data:image/png;base64," in plot
    assert 'alt="Phase plot: oracle top-1 weight against σ' in plot
    assert sheet.endswith(".png") and _pixels(sheet).shape[0] > 50
    assert message == "" and "seeds 5–6" in run_info and "preset paper window" in run_info

    # identical for the same seed: every gallery pixel, caption and report entry
    a, b = first[0], second[0]
    assert [i["caption"] for i in a] == [i["caption"] for i in b]
    assert all(np.array_equal(_pixels(x["image"]), _pixels(y["image"])) for x, y in zip(a, b))
    assert _report(report) == _report(second[4])

    # and equal to what the engine computes in-process for that request
    expected = _expected(model)
    assert _same_tiles(tiles, expected)
    data = _report(report)
    assert data["request"]["seed"] == FAST_REQUEST["seed"]
    assert [s["seed"] for s in data["steered"]["samples"]] == [5, 6]
    assert data["guidance_window"] == [0.4, 0.9]
    assert data["plain"]["guidance"]["scale"] == data["steered"]["guidance"]["scale"] == 2.0
    # 4 steps; plain guides every step (2 evals each), steered only inside (0.4, 0.9]
    assert data["plain"]["model_evals"] == 8
    sigmas = data["steered"]["telemetry"]["sigma"]
    inside = sum(0.4 < s <= 0.9 for s in sigmas)
    assert data["steered"]["model_evals"] == 4 + inside


def test_different_seeds_give_different_samples(client):
    a = _generate(client, seed=1)[0]
    b = _generate(client, seed=2)[0]
    assert not np.array_equal(_pixels(a[0]["image"]), _pixels(b[0]["image"]))


def test_relative_window_and_phase_aware_schedule_follow_sigma_star(client):
    out = _generate(client, window_relative=True, below_boundary=0.1, above_boundary=0.2,
                    schedule="phase-aware", navigation_fraction=0.75, steps=8)
    data = _report(out[4])
    star = data["boundary_sigma"]
    assert 0.0 < star < 1.0
    assert data["guidance_window"] == pytest.approx([star - 0.1, min(1.0, star + 0.2)])
    assert data["steered"]["scheduler"]["phase_boundary"] == pytest.approx(star)
    sigmas = data["steered"]["telemetry"]["sigma"]
    assert sum(s > star for s in sigmas) == 6  # 75% of 8 steps above sigma*


def test_eight_simultaneous_requests_each_get_their_own_results(server, model):
    seeds = [100 + 7 * i for i in range(8)]

    def one(seed: int):
        client = Client(server, verbose=False)  # one session per simulated user
        return seed, client.predict(**{**FAST_REQUEST, "seed": seed}, api_name="/generate")

    start = threading.Barrier(8)

    def synchronised(seed: int):
        start.wait()
        return one(seed)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(synchronised, seeds))
    assert len(results) == 8
    for seed, (tiles, _, _, _, report, _sheet, _, _) in results:
        expected = _expected(model, seed=seed)
        assert _same_tiles(tiles, expected), f"seed {seed}: the gallery is not its own"
        data = _report(report)
        assert data["request"]["seed"] == seed
        assert [s["seed"] for s in data["plain"]["samples"]] == [seed, seed + 1]


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=500), r"Steps must lie between 2 and 100, got 500"),
    (dict(num_samples=0), r"Samples must lie between 1 and 16, got 0"),
    (dict(seed=-3), r"Seed must lie between 0 and 2147483647 \(−1: a random seed\), got -3"),
    (dict(seed=2**31), r"Seed must lie between 0 and 2147483647 .*, got 2147483648"),
    (dict(seed=1.5), r"Seed: expected a whole number between 0 and 2147483647, got 1.5"),
    (dict(guidance_scale="strong"), r"Guidance scale w: expected a number between -10 and 20"),
    (dict(class_id=42), r"Class 42 does not exist: model 'tiny' has classes 0..9"),
    (dict(model="../../etc/passwd"), r"unknown model '../../etc/passwd'; the studio serves"),
    (dict(window_lo=0.9, window_hi=0.4), r"low σ \(0.9\) must be below high σ \(0.4\)"),
    (dict(window_relative="yes"), r"Relative to phase boundary: expected true or false"),
    (dict(steering="no-such-steerer"), r"Steering: unknown method 'no-such-steerer'"),
    (dict(schedule="cosine"), r"Schedule: choose one of \['shift', 'phase-aware', 'profile'\]"),
])
def test_bad_input_gives_a_readable_reason_and_the_app_keeps_serving(client, overrides, message):
    out = _generate(client, **overrides)
    reason = out[6]
    assert re.search(message, reason) and reason.startswith("**Not generated**")
    assert "Traceback" not in reason
    tiles = _generate(client)[0]  # still serving
    assert len(tiles) == 2 * FAST_REQUEST["num_samples"]


# ----------------------------------------------------------------------------- pure parts
def test_every_preset_gives_a_valid_plan(model):
    for name in PRESETS:
        values = {**FAST_REQUEST, **preset_values(name, 2.0, model.shift)}
        request = parse_request(values, models={TINY: model})
        plan = plan_runs(request, model.boundary_sigma(request.class_id))
        assert plan.plain_guidance.scale_at(0.7) == 2.0, name
    opposite = preset_values("Jain opposite", 3.0)
    assert opposite["scale_above"] < 0 and opposite["window_relative"]
    paper = preset_values("paper window", 3.0)
    assert (paper["window_lo"], paper["window_hi"]) == (0.4, 0.9)


def test_best_steering_preset_is_compare_commands_steered_setting():
    from steersample.commands.compare import settings

    steered = settings(2.5)[1]
    values = preset_values("best steering", 2.5)
    assert (values["window_lo"], values["window_hi"]) == steered.guidance.window
    assert values["scale_above"] == steered.guidance.scale_above
    assert values["steering"] == (steered.steering[0].name if steered.steering else "none")


def test_plain_preset_makes_both_sides_identical(model):
    values = {**FAST_REQUEST, **preset_values("plain", 2.0, model.shift)}
    result = run_comparison(model, parse_request(values, models={TINY: model}))
    assert np.array_equal(result.plain.images, result.steered.images)
    assert result.plain.model_evals == result.steered.model_evals


def test_parse_request_names_the_control_and_the_fix(model):
    with pytest.raises(ValueError, match=r"Steps must lie between 2 and 100, got 1"):
        parse_request({**FAST_REQUEST, "steps": 1}, models={TINY: model})
    with pytest.raises(ValueError, match=r"Class 12 does not exist: model 'tiny' has classes 0..9"):
        parse_request({**FAST_REQUEST, "class_id": 12}, models={TINY: model})
    with pytest.raises(ValueError, match=r"unknown model '/tmp/x'.*chosen when the studio is launched"):
        parse_request({**FAST_REQUEST, "model": "/tmp/x"}, models={TINY: model})
    with pytest.raises(ValueError, match=r"Seed: expected a whole number"):
        parse_request({**FAST_REQUEST, "seed": 1.5}, models={TINY: model})
    with pytest.raises(ValueError, match="phase-aware schedule needs σ\\* strictly inside"):
        plan_runs(parse_request({**FAST_REQUEST, "schedule": "phase-aware"},
                                models={TINY: model}), boundary_sigma=1.0)


def test_steerers_are_listed_from_the_registry_and_get_the_strength(model):
    from steersample.steering.registry import STEERERS, SteeringOutput, register_steerer

    @register_steerer
    class _Scaled:
        name = "test-scaled"
        needs_reference = False

        def __init__(self, strength: float = 0.5):
            self.strength = strength

        def __call__(self, state):
            return SteeringOutput(state.pred * (1.0 + 0.1 * self.strength))

    try:
        assert "test-scaled" in steerer_names() and steerer_names()[0] == "none"
        request = parse_request({**FAST_REQUEST, "steering": "test-scaled", "strength": 2.0},
                                models={TINY: model})
        plan = plan_runs(request, None)
        assert plan.steering[0].strength == 2.0
        result = run_comparison(model, request)
        assert not np.array_equal(result.plain.images, result.steered.images)
        assert float(result.steered.telemetry.steering_magnitude.sum()) > 0
    finally:
        STEERERS.pop("test-scaled")


def test_limits_are_consistent():
    for name, limit in LIMITS.items():
        assert limit.minimum <= limit.default <= limit.maximum, name


def test_steersample_never_imports_gradio():
    code = ("import sys, steersample, steersample.cli; steersample.cli.build_parser(); "
            "import steersample.commands.demo; print('gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_demo_command_rejects_a_missing_model_folder(tmp_path, capsys):
    import argparse

    from steersample.commands import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "missing"), "--port", "1"])
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        demo.run(args)
    with pytest.raises(ValueError, match="--port must lie in 1..65535"):
        demo.run(parser.parse_args(["--port", "70000"]))


def test_model_folder_of_a_saved_flow_pipeline_loads_as_a_class_model(tmp_path):
    from steersample.studio.engine import load_model_folder
    from steersample.testing import tiny_flow_pipeline

    tiny_flow_pipeline().save_pretrained(tmp_path / "flow")
    loaded = load_model_folder(tmp_path / "flow")
    assert loaded.kind == "class" and loaded.num_classes == 10 and loaded.reference is None
    assert loaded.name == "flow"  # the UI shows the folder's name, never its path
    with pytest.raises(ValueError, match="no model_index.json"):
        load_model_folder(tmp_path)


def test_model_folder_of_a_saved_sd3_pipeline_serves_prompts(tmp_path):
    from steersample.studio.engine import load_model_folder
    from steersample.testing import tiny_sd3_pipeline

    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    sd3 = load_model_folder(tmp_path / "sd3")
    assert sd3.kind == "prompt" and type(sd3.pipe).__name__ == "SteeredStableDiffusion3Pipeline"
    values = {**FAST_REQUEST, "model": "sd3", "class_id": None, "prompt": "a red square"}
    with pytest.raises(ValueError, match="Prompt: type a prompt"):
        parse_request({**values, "prompt": "  "}, models={"sd3": sd3})
    result = run_comparison(sd3, parse_request(values, models={"sd3": sd3}))
    assert result.plain.images.shape[0] == 2 and result.plain.copies is None
    assert result.plain.model_evals == 8 and result.steered.model_evals < 8  # window saves passes
    with pytest.raises(ValueError, match="no training set, so it has no phase boundary"):
        run_comparison(sd3, parse_request({**values, "schedule": "phase-aware"},
                                          models={"sd3": sd3}))


def test_python_demos_app_py_launches_the_default_and_binds_to_localhost():
    import time
    import urllib.request
    from pathlib import Path

    from _studio_fixtures import free_port
    from steersample.default import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "metadata.json").is_file():
        pytest.skip("the embedded default model is not built yet")
    app = Path(__file__).resolve().parents[2] / "demos" / "app.py"
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(app), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the studio exited: {proc.stdout.read()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                    assert page.status == 200 and "steersample studio" in page.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "the studio did not start within 120 s"
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_digits_models_get_the_judges_reading_of_every_sample():
    from steersample.evaluation.judge import classify
    from steersample.studio.downloads import report_dict
    from steersample.studio.engine import StudioModel
    from steersample.studio.render import arm_summary
    from steersample.testing import tiny_flow_pipeline

    from _studio_fixtures import tiny_reference

    digits = StudioModel(TINY, tiny_flow_pipeline(), tiny_reference(), digits=True)
    result = run_comparison(digits, parse_request(FAST_REQUEST, models={TINY: digits}))
    expected = classify(result.steered.latents.clamp(-1, 1)).tolist()
    assert list(result.steered.judge_labels) == expected
    assert [s["judge_class"] for s in report_dict(result)["steered"]["samples"]] == expected
    hits = sum(c == FAST_REQUEST["class_id"] for c in expected)
    assert f"judge reads **{hits}/2** as a 3" in arm_summary(result.steered, result)


def test_the_packages_public_steerers_are_listed_with_their_strength_argument():
    import steersample
    from steersample.steering.registry import STEERERS
    from steersample.studio.settings import steerer_default_strength, steerer_strength_parameter

    names = steerer_names()
    public = {cls.name for n in steersample._EXPORTS
              if isinstance(cls := getattr(steersample, n), type) and cls in STEERERS.values()}
    assert public <= set(names) and names[0] == "none"
    for name in names:
        param = steerer_strength_parameter(name)
        if param is not None:
            default = steerer_default_strength(name)
            assert getattr(STEERERS[name](**{param: default}), param) == default
