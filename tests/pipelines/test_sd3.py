"""SteeredStableDiffusion3Pipeline against the stock StableDiffusion3Pipeline (tiny, CPU, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from steersample.sampling.guidance import GuidanceSchedule
from steersample.pipelines import SteeredStableDiffusion3Pipeline
from steersample.steering.registry import NoSteering
from steersample.testing import tiny_sd3_pipeline

STEPS = 4
PROMPTS = ["a red cat", "two dogs"]


@pytest.fixture(scope="module")
def stock():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def steered(stock):
    pipe = SteeredStableDiffusion3Pipeline.from_pipe(stock)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def call(pipe, **kw):
    args = dict(prompt=PROMPTS, height=8, width=8, num_inference_steps=STEPS, output_type="latent")
    args.update(kw)
    args.setdefault("generator", gen())
    return pipe(**args).images


def max_diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


class Counter:
    """Counts transformer evaluations: a call on k*B rows counts k (batched CFG counts 2)."""

    def __init__(self, module, batch):
        self.calls = self.evals = 0
        self.batch = batch
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        self.evals += kwargs["hidden_states"].shape[0] // self.batch

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_from_pipe_shares_components_and_round_trips(stock, steered):
    assert isinstance(steered, StableDiffusion3Pipeline)
    assert steered.transformer is stock.transformer and steered.vae is stock.vae
    assert steered.text_encoder_3 is None
    back = StableDiffusion3Pipeline.from_pipe(steered)
    assert type(back) is StableDiffusion3Pipeline and back.transformer is stock.transformer


@pytest.mark.parametrize(
    "kw",
    [
        dict(guidance_scale=5.0, output_type="np"),
        dict(),  # stock default guidance_scale 7.0
        dict(guidance_scale=1.0),  # no CFG
        dict(guidance_scale=0.5),  # stock: scale <= 1 means no CFG
        dict(guidance_scale=3.0, num_images_per_prompt=2, negative_prompt=["blurry", "dark"]),
        dict(guidance_scale=3.0, skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
             skip_layer_guidance_stop=0.6),
        dict(guidance_scale=4.0, joint_attention_kwargs={"scale": 1.0}, clip_skip=1),
    ],
)
def test_parity_with_stock(stock, steered, kw):
    assert max_diff(call(stock, **kw), call(steered, **kw)) <= 1e-6


def test_guidance_argument_forms_agree(steered):
    a = call(steered, guidance_scale=5.0)
    assert torch.equal(a, call(steered, guidance=5.0))
    assert torch.equal(a, call(steered, guidance=GuidanceSchedule(scale=5.0)))
    assert torch.equal(a, call(steered, guidance=GuidanceSchedule.constant(5.0), guidance_scale=5.0))
    assert torch.equal(a, call(steered, guidance_scale=5.0, steering=[NoSteering()]))


def test_window_counts_and_empty_window_equals_stock_at_guidance_one(stock, steered):
    g = GuidanceSchedule(scale=5.0, window=(0.3, 0.8))
    scheduler = type(stock.scheduler).from_config(stock.scheduler.config)
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler.sigmas[:-1].tolist()
    inside = sum(g.needs_uncond(s) for s in sigmas)
    assert 0 < inside < STEPS
    with Counter(steered.transformer, len(PROMPTS)) as count:
        out = steered(prompt=PROMPTS, height=8, width=8, num_inference_steps=STEPS, output_type="latent",
                      guidance=g, generator=gen(), return_telemetry=True)
    assert count.evals == STEPS + inside and count.calls == STEPS
    assert out.telemetry.model_evals.tolist() == [1 + int(g.needs_uncond(s)) for s in sigmas]
    assert out.telemetry.guidance_scales.tolist() == [g.scale_at(s) for s in sigmas]

    empty = GuidanceSchedule(scale=5.0, window=(sigmas[2] + 1e-3, sigmas[1] - 1e-3))
    with Counter(steered.transformer, len(PROMPTS)) as count:
        a = call(steered, guidance=empty, output_type="np")
    assert count.evals == STEPS
    assert max_diff(a, call(stock, guidance_scale=1.0, output_type="np")) <= 1e-6


def test_windowed_guidance_differs_from_both_ends(steered):
    g = GuidanceSchedule(scale=5.0, window=(0.3, 0.8))
    windowed = call(steered, guidance=g)
    assert max_diff(windowed, call(steered, guidance_scale=5.0)) > 1e-4
    assert max_diff(windowed, call(steered, guidance_scale=1.0)) > 1e-4


def test_callbacks_behave_as_in_stock(stock, steered):
    def edit(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.9 + 0.05} if i % 2 == 0 else {}

    kw = dict(guidance_scale=4.0, callback_on_step_end=edit)
    edited = call(steered, **kw)
    assert max_diff(edited, call(stock, **kw)) <= 1e-6
    assert max_diff(edited, call(steered, guidance_scale=4.0)) > 1e-4

    # without CFG the stock pipeline also hands callbacks the conditional embeddings
    def embeds(pipe, i, t, kwargs):
        return {"prompt_embeds": kwargs["prompt_embeds"] * 1.5} if i == 0 else {}

    kw = dict(guidance_scale=1.0, callback_on_step_end=embeds,
              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert max_diff(call(steered, **kw), call(stock, **kw)) <= 1e-6


def test_sample_k_is_batch_independent_with_per_sample_generators(steered):
    batch = call(steered, guidance_scale=3.0, generator=[gen(5), gen(6)])
    for k in range(2):
        alone = call(steered, prompt=PROMPTS[k], guidance_scale=3.0, generator=[gen(5 + k)])
        assert max_diff(alone[0], batch[k]) <= 1e-6


def test_outputs_and_telemetry_shapes(steered):
    out = steered(prompt=PROMPTS, height=8, width=8, num_inference_steps=STEPS, output_type="np",
                  generator=gen(), return_telemetry=True)
    assert out.images.shape == (2, 8, 8, 3)
    tel = out.telemetry
    assert tel.sigmas.shape == (STEPS,) and tel.steering_magnitude.shape == (STEPS, 2)
    assert tel.oracle_top1 is None and tel.final is None
    assert steered(prompt=PROMPTS, height=8, width=8, num_inference_steps=2,
                   return_telemetry=False).telemetry is None
    default = steered(prompt=PROMPTS, height=8, width=8, num_inference_steps=2)
    assert default.telemetry is not None and default.telemetry.sigmas.shape == (2,)
    images, telemetry = steered(prompt=PROMPTS, height=8, width=8, num_inference_steps=2,
                                return_dict=False, return_telemetry=True)
    assert len(images) == 2 and len(telemetry.steps) == 2
    assert len(steered(prompt=PROMPTS, height=8, width=8, num_inference_steps=2, return_dict=False)) == 1


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(guidance_scale=3.0, guidance=GuidanceSchedule(scale=5.0)), ValueError, "pass only one"),
        (dict(guidance_scale=7.0, guidance=GuidanceSchedule(scale=7.0, window=(0.4, 0.9))), ValueError,
         "disagree"),
        (dict(steering=["definitely-not-a-steerer"]), ValueError, "unknown steerer"),
        (dict(latents=torch.full((2, 4, 8, 8), float("nan"))), ValueError, "NaN"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), ValueError, "expected"),
    ],
)
def test_bad_input_fails_before_any_model_call(steered, kw, error, match):
    with Counter(steered.transformer, 1) as count, Counter(steered.text_encoder, 1) as text:
        with pytest.raises(error, match=match):
            call(steered, **kw)
    assert count.calls == 0 and text.calls == 0


def test_reference_shape_mismatch(steered):
    from steersample.reference.reference_set import ReferenceSet

    ref = ReferenceSet(torch.randn(4, 4, 16, 16))
    with Counter(steered.transformer, 1) as count:
        with pytest.raises(ValueError, match=r"per-sample shape \(4, 16, 16\).*\(4, 8, 8\)"):
            call(steered, reference=ref)
    assert count.calls == 0


def _labelled_reference(per_class=(2, 40, 40)):
    """A labelled reference in this call's latent shape: class 0 scarce (2 < 40 / 4), 1 and 2 frequent."""
    from steersample.reference.reference_set import ReferenceSet

    g = torch.Generator().manual_seed(3)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    return ReferenceSet(torch.randn(len(labels), 4, 8, 8, generator=g), labels=labels)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(reference_labels=[0, 1]), "needs reference=ReferenceSet"),
        (dict(reference_labels=[0, 1, 1]), "3 entries; pass one per prompt \\(2\\) or one per generated image \\(2\\)"),
        (dict(reference_labels=[0.0, 1.0]), "integer class ids"),
        (dict(reference_labels=[0, 7]), r"\[7\] are not labels of the reference set"),
    ],
)
def test_reference_labels_are_checked_before_any_model_call(steered, kw, match):
    kw = dict(kw)
    if "needs reference" not in match:
        kw["reference"] = _labelled_reference()
    with Counter(steered.transformer, 1) as count:
        with pytest.raises(ValueError, match=match):
            call(steered, **kw)
    assert count.calls == 0


def test_reference_labels_let_novelty_steer_the_scarce_prompt_only(steered):
    """Prompt 0 names the scarce class, prompt 1 the frequent one: NoveltySteering changes the
    first sample, leaves the second bit for bit; without labels it changes nothing."""
    import steersample as ss

    ref = _labelled_reference()
    kw = dict(guidance_scale=3.0, generator=[gen(1), gen(2)], num_inference_steps=6)
    plain = call(steered, **kw)
    kw["generator"] = [gen(1), gen(2)]
    steered_out = call(steered, steering=[ss.NoveltySteering()], reference=ref, reference_labels=[0, 1], **kw)
    assert max_diff(steered_out[0], plain[0]) > 1e-3
    assert torch.equal(torch.as_tensor(steered_out[1]), torch.as_tensor(plain[1]))
    kw["generator"] = [gen(1), gen(2)]
    unlabelled = call(steered, steering=[ss.NoveltySteering()], reference=ref, **kw)
    assert torch.equal(torch.as_tensor(unlabelled), torch.as_tensor(plain))


def test_reference_labels_per_prompt_repeat_for_each_image(steered):
    from steersample.pipelines._common import check_reference_labels

    ref = _labelled_reference()
    assert check_reference_labels([1, 0], 2, 6, ref).tolist() == [1, 1, 1, 0, 0, 0]
    assert check_reference_labels(torch.tensor([0, 1, 1]), 1, 3, ref).tolist() == [0, 1, 1]
    assert check_reference_labels(None, 2, 2, None) is None
