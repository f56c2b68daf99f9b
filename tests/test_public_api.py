"""The public API contract of ``../shared/DESIGN.md``, called exactly as written there.

Outside tests call these names; this file runs the contract's snippet line by line on small
data (and the embedded default model), checking shapes, types and the documented relations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import steersample as ss


@pytest.fixture(scope="module")
def ref():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(40, 1, 4, 4, generator=g)
    labels = torch.arange(40) % 4
    return ss.ReferenceSet(latents, labels=labels)


def test_reference_set_contract(ref, tmp_path):
    assert ref.latents.shape == (40, 1, 4, 4) and ref.labels.shape == (40,) and len(ref) == 40
    assert ss.ReferenceSet(ref.latents).labels is None
    ref.save(tmp_path / "ref.safetensors")
    back = ss.ReferenceSet.load(tmp_path / "ref.safetensors")
    assert torch.equal(back.latents, ref.latents) and torch.equal(back.labels, ref.labels)
    dist, idx = ref.nearest(ref.latents[:3], k=2, labels=None)
    assert dist.shape == idx.shape == (3, 2)
    assert torch.equal(idx[:, 0], torch.arange(3)) and torch.allclose(dist[:, 0], torch.zeros(3), atol=1e-3)


def test_oracle_contract(ref):
    oracle = ss.EmpiricalOracle(ref)
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for sigma in (0.3, torch.full((5,), 0.3)):
        post = oracle.posterior(x, sigma, labels=None)
        for field in (post.top1, post.index, post.entropy, post.effective_count):
            assert field.shape == (5,)
        x0 = oracle.denoise(x, sigma, labels=None)
        assert x0.shape == x.shape
        v = oracle.velocity(x, sigma, labels=None)
        torch.testing.assert_close(v, (x - x0) / 0.3, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([0, 1, 2, 3, 0])
    post = oracle.posterior(x, 0.3, labels=labels)
    assert torch.equal(ref.labels[post.index], labels)


def test_phase_profile_contract(ref):
    profile = ss.PhaseProfile.estimate(ref, generator=torch.Generator().manual_seed(0))
    assert 0.0 < profile.boundary_sigma < 1.0
    sigmas = torch.as_tensor(profile.sigmas)
    assert len(sigmas) == len(profile.top1) and bool((sigmas[:-1] > sigmas[1:]).all())


def test_guidance_schedule_contract():
    g = ss.GuidanceSchedule(scale=5.0, window=(0.4, 0.9), scale_above=1.0, scale_below=1.0)
    assert g.scale_at(0.9) == 5.0 and g.scale_at(0.4) == 1.0 and g.scale_at(0.95) == 1.0
    assert g.needs_uncond(0.5) and not g.needs_uncond(0.95)
    assert ss.GuidanceSchedule(scale=-2.0).scale_at(0.5) == -2.0


def test_scheduler_contract():
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = ss.PhaseAwareFlowMatchScheduler.from_config(stock.config)
    stock.set_timesteps(10)
    sched.set_timesteps(10)
    assert torch.equal(stock.sigmas, sched.sigmas)
    phased = ss.PhaseAwareFlowMatchScheduler.from_config(stock.config, phase_boundary=0.6,
                                                         navigation_fraction=0.5)
    phased.set_timesteps(10)
    assert int((phased.sigmas[:-1] > 0.6).sum()) == 5


def test_metrics_contract(ref):
    ratio = ss.metrics.nn_ratio(ref.latents[:4], ref)
    assert ratio.shape == (4,) and torch.allclose(ratio, torch.zeros_like(ratio), atol=1e-3)
    assert ss.metrics.copy_rate(ref.latents[:4], ref) == 1.0


def test_geometry_contract():
    from steersample import geometry

    res = geometry.local_dimension(lambda x, sigma: x * 0.0, torch.zeros(1, 1, 2, 2), 0.1)
    assert res.dimension == 0 and len(res.singular_values) == 4


def test_pipelines_and_default_contract():
    from steersample.pipelines import (SteeredFluxPipeline, SteeredFlowPipeline,  # noqa: F401
                                       SteeredStableDiffusion3Pipeline)

    pipe, ref = ss.load_default()
    assert isinstance(pipe, SteeredFlowPipeline) and isinstance(ref, ss.ReferenceSet)
    bare = SteeredFlowPipeline(transformer=pipe.transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    assert bare.transformer is pipe.transformer
    g = ss.GuidanceSchedule(scale=4.0)
    out = pipe(class_labels=[3, 7], guidance=g, steering=[ss.AttractorRepulsion()], reference=ref,
               num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert isinstance(out.images, np.ndarray) and out.images.shape[0] == 2
    assert out.telemetry is not None and out.telemetry.sigmas.shape == (4,)
    assert out.telemetry.oracle_top1.shape == (4, 2)   # a reference was given
    same = pipe(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=4,
                generator=torch.Generator().manual_seed(0), output_type="np")
    plain = pipe(class_labels=[3, 7], guidance=g, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0), output_type="np")
    np.testing.assert_array_equal(same.images, plain.images)   # guidance_scale=w == GuidanceSchedule(w)
