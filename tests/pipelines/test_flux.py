"""SteeredFluxPipeline against the stock FluxPipeline: true CFG with a negative prompt, the
distilled guidance embedding, windows, callbacks and the packed-latent reference layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from steersample.sampling.guidance import GuidanceSchedule
from steersample.pipelines import SteeredFluxPipeline
from steersample.testing import tiny_flux_pipeline

STEPS = 4
PROMPTS = ["a red cat", "two dogs"]


@pytest.fixture(scope="module")
def stock():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def steered(stock):
    pipe = SteeredFluxPipeline.from_pipe(stock)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def call(pipe, **kw):
    args = dict(prompt=PROMPTS, height=16, width=16, num_inference_steps=STEPS, output_type="latent",
                max_sequence_length=16)
    args.update(kw)
    args.setdefault("generator", gen())
    return pipe(**args).images


def max_diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


class Counter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_from_pipe(stock, steered):
    assert isinstance(steered, FluxPipeline) and steered.transformer is stock.transformer
    assert type(FluxPipeline.from_pipe(steered)) is FluxPipeline


@pytest.mark.parametrize(
    "kw",
    [
        dict(negative_prompt="blurry", true_cfg_scale=4.0, output_type="np"),
        dict(negative_prompt=["blurry", "dark"], true_cfg_scale=2.5, num_images_per_prompt=2),
        dict(),  # no true CFG
        dict(true_cfg_scale=4.0),  # stock: no negative prompt -> no CFG
    ],
)
def test_parity_with_stock(stock, steered, kw):
    assert max_diff(call(stock, **kw), call(steered, **kw)) <= 1e-6


def test_parity_with_distilled_guidance_embedding():
    stock = tiny_flux_pipeline(guidance_embeds=True)
    steered = SteeredFluxPipeline.from_pipe(stock)
    steered.set_progress_bar_config(disable=True)
    kw = dict(guidance_scale=2.0, negative_prompt="blurry", true_cfg_scale=3.0)
    assert max_diff(call(stock, **kw), call(steered, **kw)) <= 1e-6
    assert max_diff(call(steered, **kw), call(steered, **{**kw, "guidance_scale": 5.0})) > 1e-5


def test_guidance_schedule_drives_true_cfg(stock, steered):
    a = call(steered, negative_prompt="blurry", true_cfg_scale=4.0)
    assert torch.equal(a, call(steered, negative_prompt="blurry", guidance=4.0))
    # explicit guidance without a negative prompt uses the empty prompt
    assert max_diff(call(steered, guidance=3.0), call(stock, negative_prompt="", true_cfg_scale=3.0)) <= 1e-6
    with pytest.raises(ValueError, match="pass only one"):
        call(steered, negative_prompt="x", true_cfg_scale=2.0, guidance=GuidanceSchedule(scale=3.0))


def test_window_counts_and_empty_window_equals_stock_without_cfg(stock, steered):
    g = GuidanceSchedule(scale=4.0, window=(0.3, 0.8))
    with Counter(steered.transformer) as count:
        out = steered(prompt=PROMPTS, negative_prompt="blurry", height=16, width=16, max_sequence_length=16,
                      num_inference_steps=STEPS, guidance=g, generator=gen(), output_type="latent",
                      return_telemetry=True)
    sigmas = out.telemetry.sigmas.tolist()
    inside = sum(g.needs_uncond(s) for s in sigmas)
    assert 0 < inside < STEPS
    assert count.calls == STEPS + inside == out.telemetry.total_model_evals

    empty = GuidanceSchedule(scale=4.0, window=(sigmas[2] + 1e-3, sigmas[1] - 1e-3))
    with Counter(steered.transformer) as count:
        a = call(steered, negative_prompt="blurry", guidance=empty, output_type="np")
    assert count.calls == STEPS
    assert max_diff(a, call(stock, output_type="np")) <= 1e-6


def test_callback_editing_latents_matches_stock(stock, steered):
    def edit(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.8} if i == 1 else {}

    kw = dict(negative_prompt="blurry", true_cfg_scale=3.0, callback_on_step_end=edit)
    edited = call(steered, **kw)
    assert max_diff(edited, call(stock, **kw)) <= 1e-6
    assert max_diff(edited, call(steered, negative_prompt="blurry", true_cfg_scale=3.0)) > 1e-4


def test_sample_k_is_batch_independent_with_per_sample_generators(steered):
    kw = dict(negative_prompt="blurry", true_cfg_scale=3.0)
    batch = call(steered, generator=[gen(3), gen(4)], **kw)
    for k in range(2):
        alone = call(steered, prompt=PROMPTS[k], generator=[gen(3 + k)], **kw)
        assert max_diff(alone[0], batch[k]) <= 1e-6


def test_reference_layout_is_unpacked_latents(steered):
    from steersample.reference.reference_set import ReferenceSet

    with pytest.raises(ValueError, match=r"per-sample shape \(4, 8, 8\).*\(1, 16, 16\)"):
        call(steered, reference=ReferenceSet(torch.randn(3, 4, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        call(steered, latents=torch.full((2, 64, 4), float("nan")))

    packed = call(steered, guidance_scale=3.5)
    unpacked = steered._unpack_latents(packed, 16, 16, steered.vae_scale_factor)
    assert unpacked.shape == (2, 1, 16, 16)
    # a reference set made of the outputs themselves (plus distractors): each output is a copy
    distractors = torch.randn(6, 1, 16, 16, generator=gen(9)) * 3
    ref = ReferenceSet(torch.cat([unpacked, distractors]))
    out = steered(prompt=PROMPTS, height=16, width=16, num_inference_steps=STEPS, max_sequence_length=16,
                  generator=gen(), output_type="latent", reference=ref, return_telemetry=True)
    tel = out.telemetry
    assert tel.final.is_copy.tolist() == [True, True]
    assert tel.final.nearest_index.tolist() == [0, 1]
    assert tel.oracle_top1.shape == (STEPS, 2) and tel.nearest_index.shape == (STEPS, 2)


def test_reference_labels_reach_the_steerers_and_are_checked(steered):
    from steersample.reference.reference_set import ReferenceSet
    from steersample.sampling.protocol import SteeringOutput

    seen = []

    class Recorder:
        name = "recorder"

        def __call__(self, state):
            seen.append(None if state.labels is None else state.labels.tolist())
            return SteeringOutput(state.pred, {})

    recorder = Recorder()

    ref = ReferenceSet(torch.randn(6, 1, 16, 16, generator=gen(4)), labels=torch.tensor([0, 0, 1, 1, 2, 2]))
    call(steered, steering=[recorder], reference=ref, reference_labels=[2, 0], num_images_per_prompt=2)
    assert seen and all(s == [2, 2, 0, 0] for s in seen)
    seen.clear()
    call(steered, steering=[recorder], reference=ref)
    assert seen and all(s is None for s in seen)
    with pytest.raises(ValueError, match=r"\[5\] are not labels of the reference set"):
        call(steered, steering=[recorder], reference=ref, reference_labels=[5, 0])
