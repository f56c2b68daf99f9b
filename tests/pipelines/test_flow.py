"""SteeredFlowPipeline: parity with a plain reference loop, evaluation counts, callbacks,
generators, pixel/VAE outputs and bad input (tiny random DiT, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from steersample.sampling.guidance import GuidanceSchedule
from steersample.pipelines import SteeredFlowPipeline
from steersample.testing import tiny_dit_transformer, tiny_flow_pipeline

STEPS = 5
LABELS = [0, 3, 9]


@pytest.fixture(scope="module")
def pipe():
    return tiny_flow_pipeline()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Counter:
    """Forward pre-hook: counts transformer calls and evaluations (rows / batch size)."""

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


def reference_loop(dit, labels, x, steps, w, null):
    """The plain algorithm: linear sigma grid, batched [null, labels] CFG, Euler steps."""
    sigmas = torch.linspace(1.0, 1e-3, steps).tolist() + [0.0]
    labels = torch.tensor(labels)
    both = torch.cat([torch.full_like(labels, null), labels])
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((2 * x.shape[0],), 1000.0 * sigma)
        v_uncond, v_cond = dit(hidden_states=torch.cat([x, x]), timestep=t, class_labels=both).sample.chunk(2)
        v = v_uncond + w * (v_cond - v_uncond)
        x = x + (sigma_next - sigma) * v
    return x


def test_parity_with_reference_loop(pipe):
    noise = torch.randn(3, 1, 8, 8, generator=gen(1))
    out = pipe(class_labels=LABELS, num_inference_steps=STEPS, guidance_scale=3.0, latents=noise.clone(),
               output_type="latent")
    expected = reference_loop(pipe.transformer, LABELS, noise.clone(), STEPS, 3.0, pipe.null_class)
    assert (out.images - expected).abs().max().item() <= 1e-6
    # pixel space: output_type "pt" is the latent mapped from [-1, 1] to [0, 1]
    pt = pipe(class_labels=LABELS, num_inference_steps=STEPS, guidance_scale=3.0, latents=noise.clone(),
              output_type="pt").images
    torch.testing.assert_close(pt, (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)


def test_guidance_float_and_schedule_equal_guidance_scale(pipe):
    kw = dict(class_labels=LABELS, num_inference_steps=3, output_type="latent")
    a = pipe(**kw, guidance_scale=2.5, generator=gen()).images
    b = pipe(**kw, guidance=2.5, generator=gen()).images
    c = pipe(**kw, guidance=GuidanceSchedule(scale=2.5), guidance_scale=2.5, generator=gen()).images
    assert torch.equal(a, b) and torch.equal(a, c)


def test_window_counts_and_empty_window_equals_no_guidance(pipe):
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas[:-1].tolist()
    g = GuidanceSchedule(scale=4.0, window=(0.3, 0.8))
    inside = sum(g.needs_uncond(s) for s in sigmas)
    assert 0 < inside < STEPS
    kw = dict(class_labels=LABELS, num_inference_steps=STEPS, output_type="latent")
    with Counter(pipe.transformer, len(LABELS)) as count:
        out = pipe(**kw, guidance=g, generator=gen(), return_telemetry=True)
    assert count.evals == STEPS + inside and count.calls == STEPS
    assert out.telemetry.total_model_evals == STEPS + inside

    # a window between two step sigmas holds no step: identical to no guidance at all
    empty = GuidanceSchedule(scale=4.0, window=(sigmas[2] + 1e-3, sigmas[1] - 1e-3))
    with Counter(pipe.transformer, len(LABELS)) as count:
        a = pipe(**kw, guidance=empty, generator=gen()).images
    assert count.evals == STEPS
    b = pipe(**kw, guidance_scale=1.0, generator=gen()).images
    assert torch.equal(a, b)


def test_callback_editing_latents_is_honoured(pipe):
    kw = dict(class_labels=LABELS, guidance_scale=2.0, output_type="latent")
    seen = []

    def halve(p, i, t, kwargs):
        seen.append(i)
        return {"latents": kwargs["latents"] * 0.5} if i == 1 else {}

    edited = pipe(**kw, num_inference_steps=STEPS, generator=gen(), callback_on_step_end=halve).images
    assert seen == list(range(STEPS))

    # the same edit by hand: interrupt after step 1, halve, resume on the rest of the grid
    def stop(p, i, t, kwargs):
        if i == 1:
            p._interrupt = True
        return {}

    head = pipe(**kw, num_inference_steps=STEPS, generator=gen(), callback_on_step_end=stop).images
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(STEPS)
    rest = sched.sigmas[2:-1].tolist()
    resumed = pipe(**kw, sigmas=rest, latents=head * 0.5).images
    assert (resumed - edited).abs().max().item() <= 1e-6
    plain = pipe(**kw, num_inference_steps=STEPS, generator=gen()).images
    assert (plain - edited).abs().max().item() > 1e-3


def test_per_sample_generators_make_sample_k_batch_independent(pipe):
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="latent")
    batch = pipe(class_labels=LABELS, generator=[gen(10 + k) for k in range(3)], **kw).images
    for k in range(3):
        alone = pipe(class_labels=[LABELS[k]], generator=[gen(10 + k)], **kw).images
        assert (alone[0] - batch[k]).abs().max().item() <= 1e-6


def test_output_types_pixel_and_vae():
    pipe = tiny_flow_pipeline()
    np_img = pipe(class_labels=[2], num_inference_steps=2, output_type="np").images
    assert np_img.shape == (1, 8, 8, 1) and np_img.min() >= 0 and np_img.max() <= 1
    pil = pipe(class_labels=[2, 5], num_inference_steps=2).images
    assert len(pil) == 2 and pil[0].mode == "L" and pil[0].size == (8, 8)
    vae_pipe = tiny_flow_pipeline(vae=True)
    out = vae_pipe(class_labels=[2, 5], num_inference_steps=2, output_type="np")
    assert out.images.shape == (2, 8, 8, 3)
    latents = vae_pipe(class_labels=[2], num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)


def test_shared_scheduler_is_not_mutated(pipe):
    before = pipe.scheduler.timesteps.clone() if pipe.scheduler.timesteps is not None else None
    pipe(class_labels=[1], num_inference_steps=4, output_type="latent")
    assert pipe.scheduler.step_index is None
    if before is not None:
        assert torch.equal(before, pipe.scheduler.timesteps)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(class_labels=[3, 10]), ValueError, r"class_labels \[10\] are outside 0..9"),
        (dict(class_labels=[-1]), ValueError, "outside 0..9"),
        (dict(class_labels=[1.5]), ValueError, "integer class ids"),
        (dict(class_labels=["three"]), ValueError, "integer class ids"),
        (dict(class_labels=[]), ValueError, "integer class ids"),
        (dict(class_labels=[1], latents=torch.full((1, 1, 8, 8), float("nan"))), ValueError, "NaN"),
        (dict(class_labels=[1], latents=torch.zeros(2, 1, 8, 8)), ValueError, r"expected \(1, 1, 8, 8\)"),
        (dict(class_labels=[1], guidance_scale=3.0, guidance=GuidanceSchedule(scale=5.0)), ValueError,
         "pass only one"),
        (dict(class_labels=[1], guidance="strong"), TypeError, "GuidanceSchedule or a number"),
        (dict(class_labels=[1], return_telemetry="yes"), TypeError, "return_telemetry must be True, False or None"),
        (dict(class_labels=[1], steering=["no-such-steerer"]), ValueError, "unknown steerer"),
        (dict(class_labels=[1], callback_on_step_end_tensor_inputs=["prompt_embeds"]), ValueError,
         "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_input_fails_before_any_model_call(pipe, kwargs, error, match):
    with Counter(pipe.transformer, 1) as count:
        with pytest.raises(error, match=match):
            pipe(num_inference_steps=2, output_type="latent", **kwargs)
    assert count.calls == 0


def test_reference_shape_mismatch_fails_before_any_model_call(pipe):
    from steersample.reference.reference_set import ReferenceSet

    ref = ReferenceSet(torch.randn(5, 1, 4, 4))
    with Counter(pipe.transformer, 1) as count:
        with pytest.raises(ValueError, match=r"per-sample shape \(1, 4, 4\).*\(1, 8, 8\)"):
            pipe(class_labels=[1], num_inference_steps=2, reference=ref)
    assert count.calls == 0


def test_null_class_is_the_last_label_id():
    dit = tiny_dit_transformer(num_classes=7)
    pipe = SteeredFlowPipeline(transformer=dit, scheduler=FlowMatchEulerDiscreteScheduler())
    assert pipe.num_classes == 7 and pipe.null_class == 7
    assert dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 8
    labels_seen = []
    dit.register_forward_pre_hook(lambda m, a, k: labels_seen.append(k["class_labels"].tolist()),
                                  with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    pipe(class_labels=[2], num_inference_steps=1, guidance_scale=2.0, output_type="latent")
    assert labels_seen == [[7, 2]]


def test_from_pipe_shares_components(pipe):
    other = SteeredFlowPipeline.from_pipe(pipe)
    assert other.transformer is pipe.transformer and other.vae is None
    other.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[4], num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(other(**kw, generator=gen()).images, pipe(**kw, generator=gen()).images)


def test_concurrent_calls_on_one_pipeline_match_sequential_calls(pipe):
    """Per-run state lives in the loop (and a per-run scheduler copy), not on the pipeline."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [
        dict(class_labels=[1, 2], num_inference_steps=6, guidance=GuidanceSchedule(scale=3.0, window=(0.3, 0.8))),
        dict(class_labels=[5], num_inference_steps=3, guidance_scale=2.0),
        dict(class_labels=[7, 8, 9], num_inference_steps=4, guidance_scale=1.0),
    ]

    def run(job, seed):
        return pipe(**job, generator=gen(seed), output_type="latent").images

    sequential = [run(job, k) for k, job in enumerate(jobs)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        for _ in range(2):
            concurrent = list(pool.map(run, jobs, range(len(jobs))))
            for a, b in zip(sequential, concurrent):
                assert torch.equal(a, b)


def test_progress_bar_is_the_pipelines_tqdm(capsys):
    pipe = tiny_flow_pipeline()
    pipe.set_progress_bar_config(disable=False, desc="denoise")
    pipe(class_labels=[1], num_inference_steps=4, output_type="latent")
    err = capsys.readouterr().err
    assert "denoise" in err and "4/4" in err


def test_importing_and_running_the_pipeline_prints_no_transformers_warnings(tmp_path):
    """diffusers' SD3 module (calculate_shift, retrieve_timesteps) builds transformers' image
    processors, which warn without torchvision; the flow pipeline keeps that quiet."""
    import subprocess
    import sys

    code = ("import torch, steersample.pipelines.pipeline_steered_flow as f\n"
            "from steersample.pipelines._common import per_run_scheduler\n"
            "from diffusers import FlowMatchEulerDiscreteScheduler\n"
            "per_run_scheduler(FlowMatchEulerDiscreteScheduler(), 2, 'cpu')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "[transformers]" not in done.stderr and "torchvision" not in done.stderr
