"""RepresentationSteering and the spikiness measure: formulas, hooks on the tiny DiT, SD3 and
Flux transformers (removed after every run, also on errors), damping only in late steps,
concurrent runs on one pipeline, and bad input."""

from __future__ import annotations

import threading

import pytest
import torch

from steersample.steering.representation import (RepresentationSteering, block_names, damp, l4_over_l2,
                                        resolve_layers, spikiness)
from steersample.steering.registry import STEERERS
from steersample.testing import tiny_flow_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

STEPS = 4


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def flow():
    return tiny_flow_pipeline(num_layers=2)


def run_flow(pipe, steering=None, **kw):
    return pipe(class_labels=[0, 3, 7], num_inference_steps=STEPS, generator=gen(), guidance_scale=2.0,
                output_type="latent", steering=steering, return_telemetry=True, **kw)


# ----------------------------------------------------------------------------- measures
def test_spikiness_is_std_of_channel_max():
    h = torch.randn(3, 5, 7, generator=gen())
    m = h.max(dim=1).values
    assert torch.allclose(spikiness(h), m.std(dim=1, unbiased=False))
    assert torch.allclose(l4_over_l2(h), (m ** 4).sum(1) ** 0.25 / (m ** 2).sum(1).sqrt())
    # conv layout (R, C, H, W): the max over H x W per channel
    conv = torch.randn(2, 4, 3, 3, generator=gen(1))
    assert torch.allclose(spikiness(conv), conv.flatten(2).max(2).values.std(1, unbiased=False))


def test_a_spiky_code_scores_higher_than_a_balanced_one():
    balanced = torch.ones(1, 4, 16)
    spiky = torch.zeros(1, 4, 16)
    spiky[0, 0, 3] = 16.0                      # one unit fires hard, same total
    assert float(spikiness(spiky)) > float(spikiness(balanced)) == 0.0
    assert float(l4_over_l2(spiky)) > float(l4_over_l2(balanced))


def test_damp_clips_above_tau():
    h = torch.tensor([[[0.0, 1.0, 10.0, -10.0]]])
    m = h.amax(1)
    tau = float(m.mean() + 0.5 * m.std(unbiased=False))
    clipped = damp(h, 1.0, 0.5)
    assert float(clipped.abs().max()) == pytest.approx(tau)
    assert torch.equal(damp(h, 0.0, 0.5), h)
    assert torch.equal(clipped[..., :2], h[..., :2])


# ----------------------------------------------------------------------------- layers
def test_block_names_and_unknown_layers(flow):
    names = block_names(flow.transformer)
    assert names == ["transformer_blocks.0", "transformer_blocks.1"]
    assert resolve_layers(flow.transformer, None) == ("transformer_blocks.1",)
    with pytest.raises(ValueError, match=r"no layer\(s\) \['blocks.9'\]; available blocks: "
                                         r"\['transformer_blocks.0', 'transformer_blocks.1'\]"):
        run_flow(flow, [RepresentationSteering(layers=["blocks.9"])])
    assert hook_count(flow.transformer) == 0


@pytest.mark.parametrize("strength", [-0.5, 1.5, float("nan"), float("inf")])
def test_bad_strength(strength):
    with pytest.raises(ValueError, match=r"strength must be a finite number in \[0, 1\]"):
        RepresentationSteering(strength=strength)


def test_other_bad_input():
    with pytest.raises(TypeError, match="layers must be a list of block names"):
        RepresentationSteering(layers=[3])
    with pytest.raises(ValueError, match="needs the pipeline"):
        RepresentationSteering().bind(None)
    with pytest.raises(ValueError, match="without a run"):
        RepresentationSteering()(None)
    assert STEERERS["representation"] is RepresentationSteering


# ----------------------------------------------------------------------------- on the DiT
def test_records_spikiness_and_damps_only_late(flow):
    plain = run_flow(flow)
    record = run_flow(flow, [RepresentationSteering(strength=0.0)])
    assert torch.equal(record.images, plain.images)                  # strength 0: bit for bit
    scores = torch.stack([s.scores["representation.spikiness"] for s in record.telemetry.steps])
    assert scores.shape == (STEPS, 3) and bool(torch.isfinite(scores).all())
    assert hook_count(flow.transformer) == 0
    # never late (sigma_max below every step's sigma): identical to plain
    never = run_flow(flow, [RepresentationSteering(strength=1.0, sigma_max=0.0)])
    assert torch.equal(never.images, plain.images)
    damped = run_flow(flow, [RepresentationSteering(strength=1.0, sigma_max=1.0, spread=0.0)])
    assert (damped.images - plain.images).abs().max() > 1e-4
    assert hook_count(flow.transformer) == 0


def test_hooks_removed_when_the_run_fails(flow):
    def boom(pipe, i, t, kw):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run_flow(flow, [RepresentationSteering()], callback_on_step_end=boom)
    assert hook_count(flow.transformer) == 0


def test_concurrent_runs_on_one_pipeline(flow):
    settings = [RepresentationSteering(strength=1.0, sigma_max=1.0, spread=0.0), None,
                RepresentationSteering(strength=0.0)]
    sequential = [run_flow(flow, [s] if s else None).images for s in settings]
    results = [None] * len(settings)

    def work(k):
        for _ in range(3):
            results[k] = run_flow(flow, [settings[k]] if settings[k] else None).images

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, sequential):
        assert torch.equal(got, want)
    assert hook_count(flow.transformer) == 0


# ----------------------------------------------------------------------------- SD3 and Flux
def test_sd3_and_flux_transformers():
    from steersample.pipelines import SteeredFluxPipeline, SteeredStableDiffusion3Pipeline

    sd3 = tiny_sd3_pipeline(pipeline_class=SteeredStableDiffusion3Pipeline, num_layers=2)
    kw = dict(prompt=["a cat", "a dog"], height=8, width=8, num_inference_steps=STEPS,
              output_type="latent", return_telemetry=True)
    plain = sd3(generator=gen(), **kw)
    out = sd3(generator=gen(), steering=[RepresentationSteering(strength=1.0, sigma_max=1.0, spread=0.0)], **kw)
    assert out.telemetry.steps[0].scores["representation.spikiness"].shape == (2,)
    assert (out.images - plain.images).abs().max() > 1e-5
    assert hook_count(sd3.transformer) == 0

    flux = tiny_flux_pipeline(pipeline_class=SteeredFluxPipeline)
    assert block_names(flux.transformer) == ["transformer_blocks.0", "single_transformer_blocks.0"]
    kw = dict(prompt=["a cat", "a dog"], height=16, width=16, num_inference_steps=STEPS,
              max_sequence_length=16, output_type="latent", return_telemetry=True,
              negative_prompt="blurry", true_cfg_scale=2.0)
    plain = flux(generator=gen(), **kw)
    steer = RepresentationSteering(strength=1.0, sigma_max=1.0, spread=0.0,
                                   layers=["single_transformer_blocks.0"])
    out = flux(generator=gen(), steering=[steer], **kw)
    assert out.telemetry.steps[0].scores["representation.spikiness"].shape == (2,)
    assert (out.images - plain.images).abs().max() > 1e-5
    assert hook_count(flux.transformer) == 0
