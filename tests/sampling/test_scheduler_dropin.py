"""PhaseAwareFlowMatchScheduler inside stock diffusers pipelines (tiny offline models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from steersample.sampling.scheduler import PhaseAwareFlowMatchScheduler
from steersample.sampling.schedules import count_above
from steersample.testing import tiny_flux_pipeline, tiny_sd3_pipeline

SD3_CONFIGS = [{"shift": 3.0}, {"use_dynamic_shifting": True}, {"shift": 3.0, "stochastic_sampling": True}]


def run(pipe, **kwargs) -> np.ndarray:
    # stock pipelines call scheduler.step without a generator, so stochastic sampling draws
    # from the global RNG: seed it too
    torch.manual_seed(123)
    return pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


@pytest.mark.parametrize("config", SD3_CONFIGS)
def test_sd3_output_equals_stock_when_phase_options_unset(sd3, config):
    pipe = sd3
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**config)
    args = {"prompt": "a cat", "num_inference_steps": 4, "guidance_scale": 5.0, "height": 8, "width": 8}
    stock = run(pipe, **args)
    pipe.scheduler = PhaseAwareFlowMatchScheduler.from_config(pipe.scheduler.config)
    ours = run(pipe, **args)
    assert np.array_equal(ours, stock)


def test_sd3_phase_mode_runs_on_the_phase_grid(sd3):
    pipe = sd3
    pipe.scheduler = PhaseAwareFlowMatchScheduler.from_config(
        FlowMatchEulerDiscreteScheduler(shift=3.0).config, phase_boundary=0.5, navigation_fraction=0.25
    )
    seen = []

    def record(p, i, t, kwargs):
        seen.append(float(t))
        return kwargs

    images = run(pipe, prompt="a cat", num_inference_steps=8, height=8, width=8, callback_on_step_end=record)
    assert np.isfinite(images).all() and images.shape == (1, 8, 8, 3)
    assert count_above(torch.tensor(seen) / 1000, 0.5) == 2
    assert seen == pipe.scheduler.timesteps.tolist()


def test_flux_output_equals_stock_and_phase_mode_runs(flux):
    pipe = flux
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    args = {"prompt": "a cat", "num_inference_steps": 4, "height": 16, "width": 16}
    stock = run(pipe, **args)
    pipe.scheduler = PhaseAwareFlowMatchScheduler.from_config(pipe.scheduler.config)
    assert np.array_equal(run(pipe, **args), stock)
    pipe.scheduler = PhaseAwareFlowMatchScheduler.from_config(pipe.scheduler.config, phase_boundary=0.6)
    phase = run(pipe, **args)
    assert np.isfinite(phase).all() and not np.array_equal(phase, stock)
    assert count_above(pipe.scheduler.sigmas[:-1], 0.6) == 2


def test_pipeline_save_and_reload_keeps_the_scheduler(sd3, tmp_path):
    pipe = sd3
    pipe.scheduler = PhaseAwareFlowMatchScheduler(shift=3.0, phase_boundary=0.4, navigation_fraction=0.6)
    pipe.scheduler.save_pretrained(tmp_path / "scheduler")
    loaded = PhaseAwareFlowMatchScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert loaded.config.phase_boundary == 0.4 and loaded.config.navigation_fraction == 0.6
    args = {"prompt": "a cat", "num_inference_steps": 5, "height": 8, "width": 8}
    first = run(pipe, **args)
    pipe.scheduler = loaded
    assert np.array_equal(run(pipe, **args), first)
