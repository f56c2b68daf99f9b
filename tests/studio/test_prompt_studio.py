"""The studio on a text-to-image model: the shipped prompt testbed (SD3 pipeline, training
latents in a reference store, held-out latents, a prompts file), through ``gradio_client``.

A run gives plain and steered tiles of each seed, each with the nearest training image (decoded
by the pipeline's VAE from the store's latents), the copy badge and the distance to the training
set relative to held-out data; two clients on different prompts each get their own prompt's
results; bad inputs are refused at startup, naming the fix.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from gradio_client import Client  # noqa: E402

from _studio_fixtures import PROMPT_MODEL, PROMPT_REQUEST, prompt_model, serve  # noqa: E402
from steersample.studio.app import build_app  # noqa: E402
from steersample.studio.engine import load_prompt_model, run_comparison  # noqa: E402
from steersample.studio.render import comparison_tiles  # noqa: E402
from steersample.studio.settings import parse_request  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return prompt_model()


@pytest.fixture(scope="module")
def server(model):
    with serve(build_app(models=[model])) as url:
        yield url


def _pixels(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _expected(model, **overrides):
    request = parse_request({**PROMPT_REQUEST, **overrides}, models={PROMPT_MODEL: model})
    return run_comparison(model, request)


def _same_tiles(gallery, comparison) -> bool:
    expected = comparison_tiles(comparison)
    return len(gallery) == len(expected) and all(
        item["caption"] == caption
        and np.array_equal(_pixels(item["image"]), np.asarray(tile.convert("RGB")))
        for item, (tile, caption) in zip(gallery, expected))


def test_prompt_model_offers_novelty_on_its_labelled_prompts_only(model):
    """The testbed's store labels name its prompts, so novelty is offered and runs on a known
    prompt (the prompt's label reaches the steerer); free text has no class and is refused."""
    assert model.kind == "prompt" and model.prompts[0] == "a digit zero"
    assert "a digit two" in model.prompts and model.prompt_labels["a digit two"] == 2
    assert "attractor" in model.steerers and "novelty" in model.steerers
    assert "novelty steering works on them" in model.description
    with pytest.raises(ValueError, match="needs the prompt's class in the store.*or use attractor"):
        parse_request({**PROMPT_REQUEST, "steering": "novelty", "prompt": "a red fox"},
                      models={PROMPT_MODEL: model})
    request = parse_request({**PROMPT_REQUEST, "steering": "novelty", "num_samples": 2},
                            models={PROMPT_MODEL: model})
    comparison = run_comparison(model, request)
    # the rare prompt "a digit two": plain copies, novelty moves the samples away
    assert not torch.equal(comparison.plain.latents, comparison.steered.latents)


def test_best_preset_is_compares_steered_run_on_a_labelled_store(model):
    """The store labels its prompts: "best steering" is compare's NoveltySteering(); a store
    without prompt labels falls back to attractor steering at its default strength."""
    from dataclasses import replace

    from steersample.commands._prompt_compare import prompt_settings
    from steersample.studio.settings import preset_values

    best = preset_values("best steering", 4.0, model.shift, model.kind, model.labelled)
    steered = prompt_settings(4.0, labelled=True)[1].steering[0]
    assert model.labelled and best["steering"] == steered.name == "novelty"
    assert best["strength"] == steered.strength == 1.0
    unlabelled = replace(model, prompt_labels={})
    fallback = preset_values("best steering", 4.0, model.shift, unlabelled.kind, unlabelled.labelled)
    assert not unlabelled.labelled and fallback["steering"] == "attractor"


def test_a_store_without_prompt_labels_offers_no_novelty(model):
    from dataclasses import replace

    from steersample.studio.settings import CLASS_ONLY_STEERERS

    unlabelled = replace(model, prompt_labels={})
    assert "novelty" not in unlabelled.steerers and "attractor" in unlabelled.steerers
    with pytest.raises(ValueError, match=re.escape(CLASS_ONLY_STEERERS["novelty"][:40])):
        parse_request({**PROMPT_REQUEST, "steering": "novelty"}, models={PROMPT_MODEL: unlabelled})


def test_prompt_run_returns_both_sides_with_nearest_image_badge_and_distance(server, model):
    client = Client(server, verbose=False)
    out = client.predict(**PROMPT_REQUEST, api_name="/generate")
    tiles, plain_md, steered_md, plot, report, sheet, message, run_info = out
    assert message == "" and "a digit two" in run_info
    assert [t["caption"].split(":")[0] for t in tiles] == [
        "plain · seed 5", "steered · seed 5", "plain · seed 6", "steered · seed 6"]
    for tile in tiles:
        caption = tile["caption"]
        assert re.search(r": (COPY|novel), ratio \d\.\d\d", caption), caption
        assert re.search(r"distance to the training set \d+\.\d\d times a held-out", caption)
        assert re.search(r"nearest training image #\d+", caption)
    expected = _expected(model)
    for arm in (expected.plain, expected.steered):
        assert arm.nearest_images is not None and arm.nearest_images.shape == arm.images.shape
        assert arm.relative_distances is not None and len(arm.relative_distances) == 2
    # the tile is the sample beside its decoded nearest training image: wider than tall
    assert _pixels(tiles[0]["image"]).shape[1] > _pixels(tiles[0]["image"]).shape[0]
    assert _same_tiles(tiles, expected)
    assert plot.startswith("<figure") and sheet.endswith(".png")
    # the rare prompt is copied plain; attractor steering moves samples off the copies
    assert expected.plain.copies == [True, True]
    assert np.mean(expected.steered.ratios) > np.mean(expected.plain.ratios)


def test_two_clients_on_different_prompts_each_get_their_own(server, model):
    one, two = Client(server, verbose=False), Client(server, verbose=False)
    job_a = one.submit(**{**PROMPT_REQUEST, "prompt": "a digit two"}, api_name="/generate")
    job_b = two.submit(**{**PROMPT_REQUEST, "prompt": "a digit seven"}, api_name="/generate")
    a, b = job_a.result(timeout=300), job_b.result(timeout=300)
    assert a[6] == "" and b[6] == ""
    assert "a digit two" in a[7] and "a digit seven" in b[7]
    assert _same_tiles(a[0], _expected(model, prompt="a digit two"))
    assert _same_tiles(b[0], _expected(model, prompt="a digit seven"))
    assert not np.array_equal(_pixels(a[0][0]["image"]), _pixels(b[0][0]["image"]))


def test_free_text_prompt_runs_without_a_prompt_label(model):
    comparison = _expected(model, prompt="a digit two, drawn again", num_samples=1, steps=4)
    assert comparison.plain.nearest_images is not None
    assert comparison.plain.relative_distances is not None


def _bad_reference(tmp_path):
    from steersample.reference.reference_set import ReferenceSet

    path = tmp_path / "bad.safetensors"
    ReferenceSet(torch.zeros(6, 1, 8, 8)).save(path)
    return path


def test_reference_of_another_latent_shape_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\).*\(4, 8, 8\).*index build"):
        load_prompt_model("prompt", reference=_bad_reference(tmp_path))


def test_demo_command_refuses_bad_inputs_before_serving(tmp_path):
    from steersample.commands import demo

    def args(**kw):
        base = dict(model=[], reference=None, prompts=None, heldout=None, host="127.0.0.1",
                    port=None)
        return argparse.Namespace(**{**base, **kw})

    with pytest.raises(ValueError, match="index build"):
        demo.run(args(model=[demo.Path("prompt")], reference=_bad_reference(tmp_path)))
    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        demo.run(args(model=[demo.Path("prompt")], prompts=empty))
    with pytest.raises(ValueError, match="exactly one"):
        demo.run(args(reference=_bad_reference(tmp_path)))


def test_a_flux_folder_is_served_with_its_store_unpacked_and_guided(tmp_path):
    """Flux samples packed latents; tiles and distances use the store's (C, H, W) layout, and
    classifier-free guidance runs (an empty negative prompt, as compare runs it)."""
    import json

    from steersample.reference.reference_set import ReferenceSet
    from steersample.testing import tiny_flux_pipeline

    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    (tmp_path / "flux" / "metadata.json").write_text(json.dumps(
        {"call": {"height": 16, "width": 16, "max_sequence_length": 8}}))
    g = torch.Generator().manual_seed(0)
    ReferenceSet(torch.randn(6, 1, 16, 16, generator=g)).save(tmp_path / "ref.safetensors")
    ReferenceSet(torch.randn(6, 1, 16, 16, generator=g)).save(tmp_path / "held.safetensors")
    (tmp_path / "p.txt").write_text("a cat\na fox\n")
    flux = load_prompt_model(tmp_path / "flux", tmp_path / "ref.safetensors", tmp_path / "p.txt",
                             tmp_path / "held.safetensors")
    assert flux.prompts == ("a cat", "a fox")
    request = parse_request({**PROMPT_REQUEST, "model": flux.name, "prompt": "a fox",
                             "steps": 2, "window_lo": 0.5}, models={flux.name: flux})
    comparison = run_comparison(flux, request)
    assert tuple(comparison.plain.latents.shape) == (2, 1, 16, 16)
    assert comparison.plain.model_evals == 4   # cond and uncond at each of 2 steps
    for arm in (comparison.plain, comparison.steered):
        assert arm.nearest_images.shape == arm.images.shape == (2, 16, 16, 3)
        assert len(arm.relative_distances) == 2 and len(arm.ratios) == 2


def test_picking_the_prompt_model_offers_its_prompts_and_keeps_what_it_can_run(model):
    from dataclasses import replace

    from steersample.studio.page import _model_controls

    class_box, prompt, chooser, info, shift, steering = _model_controls(model, "novelty")
    assert class_box["visible"] is False
    assert prompt["visible"] is True and prompt["value"] == "a digit zero"
    assert chooser["visible"] is True and "a digit two" in chooser["choices"]
    assert "novelty" in steering["choices"] and steering["value"] == "novelty"
    assert _model_controls(model, "none")[5]["value"] == "none"
    unlabelled = _model_controls(replace(model, prompt_labels={}), "novelty")[5]
    assert "novelty" not in unlabelled["choices"] and unlabelled["value"] == "attractor"
