"""PhaseAwareFlowMatchScheduler: parity with FlowMatchEulerDiscreteScheduler, phase grid, round trips."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import steersample as ss
from steersample.sampling.scheduler import PhaseAwareFlowMatchScheduler
from steersample.sampling.schedules import count_above

TOL = 1e-7
STEPS = (1, 4, 28)

# (scheduler config, set_timesteps kwargs builder(n)); every option the stock scheduler accepts
CONFIGS = {
    "default": ({}, lambda n: {}),
    "shift3": ({"shift": 3.0}, lambda n: {}),
    "dynamic_exponential": ({"use_dynamic_shifting": True}, lambda n: {"mu": 0.83}),
    "dynamic_linear": ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, lambda n: {"mu": 1.4}),
    "shift_terminal": ({"shift": 3.0, "shift_terminal": 0.05}, lambda n: {}),
    "dynamic_shift_terminal": (
        {"use_dynamic_shifting": True, "shift_terminal": 0.1},
        lambda n: {"mu": 1.1},
    ),
    "custom_sigmas_flux": (
        {"use_dynamic_shifting": True, "max_shift": 1.15},
        lambda n: {"sigmas": np.linspace(1.0, 1 / n, n), "mu": 0.9},
    ),
    "custom_sigmas_static": ({"shift": 3.0}, lambda n: {"sigmas": list(np.linspace(0.95, 0.05, n))}),
    "custom_sigmas_and_timesteps": (
        {},
        lambda n: {"sigmas": list(np.linspace(1.0, 0.1, n)), "timesteps": list(np.linspace(990.0, 90.0, n))},
    ),
    "stochastic": ({"shift": 3.0, "stochastic_sampling": True}, lambda n: {}),
    "stochastic_dynamic": ({"use_dynamic_shifting": True, "stochastic_sampling": True}, lambda n: {"mu": 0.7}),
    "karras": ({"shift": 3.0, "use_karras_sigmas": True}, lambda n: {}),
    "exponential": ({"use_exponential_sigmas": True}, lambda n: {}),
    "invert_sigmas": ({"invert_sigmas": True}, lambda n: {}),
}
if importlib.util.find_spec("scipy") is not None:
    CONFIGS["beta"] = ({"use_beta_sigmas": True}, lambda n: {})


def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in model, smooth in x and t."""
    return 0.7 * x - torch.sin(x) + t / 1000.0


def trajectory(scheduler, n: int, kwargs: dict, steps: int | None = None) -> list[torch.Tensor]:
    scheduler.set_timesteps(**(kwargs if "sigmas" in kwargs else {"num_inference_steps": n, **kwargs}))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(7)
    out = [x]
    for t in scheduler.timesteps[: steps or len(scheduler.timesteps)]:
        x = scheduler.step(velocity(x, t), t, x, generator=gen).prev_sample
        out.append(x)
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b|, with NaN in the same places counted as equal (infinite otherwise)."""
    a, b = a.double(), b.double()
    if not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    keep = ~a.isnan()
    return (a[keep] - b[keep]).abs().max().item() if keep.any() else 0.0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_stock(name, n):
    config, make_kwargs = CONFIGS[name]
    stock = FlowMatchEulerDiscreteScheduler(**config)
    ours = PhaseAwareFlowMatchScheduler.from_config(stock.config)
    assert not ours.phase_aware
    # construction-time grid
    assert max_diff(ours.sigmas, stock.sigmas) <= TOL and max_diff(ours.timesteps, stock.timesteps) <= TOL
    kwargs = make_kwargs(n)
    set_kwargs = kwargs if "sigmas" in kwargs else {"num_inference_steps": n, **kwargs}
    stock.set_timesteps(**set_kwargs)
    ours.set_timesteps(**set_kwargs)
    assert max_diff(ours.sigmas, stock.sigmas) <= TOL
    if stock.sigmas.isnan().any():
        # stock degenerates (shift_terminal with one step divides 0 by 0); ours degenerates alike
        return
    a, b = trajectory(stock, n, kwargs), trajectory(ours, n, kwargs)
    assert ours.sigmas.shape == stock.sigmas.shape and ours.timesteps.shape == stock.timesteps.shape
    assert max_diff(ours.sigmas, stock.sigmas) <= TOL
    assert max_diff(ours.timesteps, stock.timesteps) <= TOL
    assert len(a) == len(b) == n + 1
    for xa, xb in zip(a, b):
        assert max_diff(xa, xb) <= TOL


@pytest.mark.parametrize("name", ["default", "shift3", "dynamic_exponential", "stochastic", "custom_sigmas_flux"])
def test_ten_step_trajectory_parity(name):
    config, make_kwargs = CONFIGS[name]
    stock = FlowMatchEulerDiscreteScheduler(**config)
    ours = PhaseAwareFlowMatchScheduler(**config)
    a, b = trajectory(stock, 10, make_kwargs(10)), trajectory(ours, 10, make_kwargs(10))
    assert len(a) == 11
    assert max(max_diff(xa, xb) for xa, xb in zip(a, b)) <= TOL


def test_stock_errors_are_kept():
    ours = PhaseAwareFlowMatchScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="`mu` must be passed"):
        ours.set_timesteps(4)
    with pytest.raises(ValueError, match="Only one of"):
        PhaseAwareFlowMatchScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)


def test_scale_noise_and_per_token_parity():
    stock, ours = FlowMatchEulerDiscreteScheduler(shift=3.0), PhaseAwareFlowMatchScheduler(shift=3.0)
    for s in (stock, ours):
        s.set_timesteps(6)
    x0, eps = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), torch.randn(2, 4)
    t = stock.timesteps[2:3]
    assert torch.equal(stock.scale_noise(x0, t, eps), ours.scale_noise(x0, t, eps))
    # per-token timesteps (LTX-style): (B, L) timesteps for a (B, L, C) sample
    sample = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2))
    per_token = stock.timesteps[1].expand(2, 5).clone()
    per_token[:, :2] = stock.timesteps[3]
    a = stock.step(torch.ones_like(sample), stock.timesteps[1], sample, per_token_timesteps=per_token)
    b = ours.step(torch.ones_like(sample), ours.timesteps[1], sample, per_token_timesteps=per_token)
    assert torch.equal(a.prev_sample, b.prev_sample)


# ------------------------------------------------------------------ phase-aware mode
@pytest.mark.parametrize("n, fraction", [(2, 0.5), (10, 0.5), (20, 0.7), (28, 0.25), (50, 0.6)])
@pytest.mark.parametrize("config", [{}, {"shift": 3.0}])
def test_phase_grid_in_scheduler(n, fraction, config):
    sched = PhaseAwareFlowMatchScheduler(**config, phase_boundary=0.55, navigation_fraction=fraction)
    stock = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(n)
    stock.set_timesteps(n)
    sig = sched.sigmas
    assert sig.shape == (n + 1,) and sig.dtype == torch.float32
    assert count_above(sig[:-1], 0.55) == round(fraction * n)
    assert (sig.diff() < 0).all()
    assert sig[0] == stock.sigmas[0] and sig[-2] == stock.sigmas[-2] and sig[-1] == 0  # same endpoints
    assert torch.equal(sched.timesteps, sig[:-1] * 1000)


def test_phase_mode_runs_steps_and_dynamic_shift():
    sched = PhaseAwareFlowMatchScheduler(use_dynamic_shifting=True, phase_boundary=0.6)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=1.0)  # what FluxPipeline passes
    assert count_above(sched.sigmas[:-1], 0.6) == 4 and sched.effective_navigation_fraction == 0.5
    x = torch.zeros(1, 2)
    for t in sched.timesteps:
        x = sched.step(torch.ones_like(x), t, x).prev_sample
    assert torch.allclose(x, -torch.ones_like(x))  # Euler with v = 1 integrates sigma from 1 to 0


class _Profile:  # duck-typed PhaseProfile
    boundary_sigma = 0.37


def test_profile_is_stored_as_float_and_round_trips(tmp_path):
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = PhaseAwareFlowMatchScheduler.from_config(stock.config, phase_boundary=_Profile(), navigation_fraction=0.6)
    assert sched.config.phase_boundary == 0.37 and isinstance(sched.config.phase_boundary, float)
    json.dumps(dict(sched.config))  # JSON-able
    sched.save_pretrained(tmp_path)
    loaded = PhaseAwareFlowMatchScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(sched.config)
    again = PhaseAwareFlowMatchScheduler.from_config(loaded.config)
    for s in (sched, loaded, again):
        s.set_timesteps(12)
    assert torch.equal(sched.sigmas, loaded.sigmas) and torch.equal(sched.sigmas, again.sigmas)
    # stock round trip too, and the public name
    plain = ss.PhaseAwareFlowMatchScheduler.from_config(stock.config)
    plain.save_pretrained(tmp_path / "plain")
    assert public(PhaseAwareFlowMatchScheduler.from_pretrained(tmp_path / "plain").config) == public(plain.config)
    # a stock scheduler can read our saved config back (extra keys are ignored by diffusers)
    back = FlowMatchEulerDiscreteScheduler.from_config(plain.config)
    back.set_timesteps(5)
    plain.set_timesteps(5)
    assert torch.equal(back.sigmas, plain.sigmas)


def test_phase_options_can_be_switched_off_again():
    sched = PhaseAwareFlowMatchScheduler(phase_boundary=0.5, navigation_fraction=0.7)
    stock_again = PhaseAwareFlowMatchScheduler.from_config(sched.config, phase_boundary=None, navigation_fraction=None)
    assert not stock_again.phase_aware


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"phase_boundary": 1.0}, ValueError, "phase_boundary must lie strictly between 0"),
        ({"phase_boundary": 0.0}, ValueError, "phase_boundary must lie strictly between 0"),
        ({"phase_boundary": float("nan")}, ValueError, "phase_boundary must lie strictly between 0"),
        ({"phase_boundary": "0.5"}, TypeError, "phase_boundary must be a noise level"),
        ({"phase_boundary": 0.5, "navigation_fraction": 1.0}, ValueError, "navigation_fraction must lie"),
        ({"phase_boundary": 0.5, "navigation_fraction": 0.0}, ValueError, "navigation_fraction must lie"),
        ({"navigation_fraction": 0.5}, ValueError, "needs a phase_boundary"),
        ({"phase_boundary": 0.5, "use_karras_sigmas": True}, ValueError, "cannot be combined"),
        ({"phase_boundary": 0.5, "invert_sigmas": True}, ValueError, "cannot be combined"),
    ],
)
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PhaseAwareFlowMatchScheduler(**kwargs)


def test_bad_calls():
    with pytest.raises(TypeError, match="did you mean 'phase_boundary'"):
        PhaseAwareFlowMatchScheduler.from_config(FlowMatchEulerDiscreteScheduler().config, phase_boundry=0.5)
    sched = PhaseAwareFlowMatchScheduler(phase_boundary=0.5)
    with pytest.raises(ValueError, match="too few steps for the split"):
        sched.set_timesteps(1)
    with pytest.raises(ValueError, match="explicit timesteps conflict"):
        sched.set_timesteps(sigmas=[1.0, 0.5, 0.1], timesteps=[1000.0, 500.0, 100.0])
    # the stock grid ends above the boundary
    high_end = PhaseAwareFlowMatchScheduler(shift_terminal=0.7, phase_boundary=0.5)
    with pytest.raises(ValueError, match="phase boundary must lie inside the grid"):
        high_end.set_timesteps(10)
