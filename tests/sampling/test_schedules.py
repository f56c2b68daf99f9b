"""steersample.sampling.schedules: formulas versus diffusers, and the phase-aware grid's guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from steersample.sampling import schedules as S


def stock_grid(config: dict, n: int, **kwargs) -> torch.Tensor:
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(n, **kwargs) if "sigmas" not in kwargs else sched.set_timesteps(**kwargs)
    return sched.sigmas[:-1]


def test_static_shift_formula():
    sig = torch.linspace(1, 0.01, 50, dtype=torch.float64)
    s = 3.0
    assert torch.allclose(S.static_shift(sig, s), s * sig / (1 + (s - 1) * sig), rtol=0, atol=1e-15)
    assert torch.equal(S.static_shift(sig, 1.0), sig)
    # static shift s equals the exponential dynamic shift with mu = ln s
    assert torch.allclose(S.static_shift(sig, s), S.dynamic_shift(sig, math.log(s)), atol=1e-12)
    assert S.static_shift([0.5], 3.0).dtype == torch.float32


def test_dynamic_shift_formulas():
    sig = torch.linspace(1, 0.01, 50, dtype=torch.float64)
    mu = 0.8
    assert torch.allclose(S.dynamic_shift(sig, mu), math.exp(mu) / (math.exp(mu) + 1 / sig - 1), atol=1e-15)
    assert torch.allclose(S.dynamic_shift(sig, mu, "linear"), mu / (mu + 1 / sig - 1), atol=1e-15)


@pytest.mark.parametrize("n", [1, 4, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_stock_sigmas_equal_diffusers(n, shift):
    assert torch.equal(S.stock_sigmas(n, shift), stock_grid({"shift": shift}, n))


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_dynamic_stock_and_flux_sigmas_equal_diffusers(kind):
    mu = S.calculate_mu(1024)
    config = {"use_dynamic_shifting": True, "time_shift_type": kind}
    assert torch.equal(S.stock_sigmas(20, mu=mu, time_shift_type=kind), stock_grid(config, 20, mu=mu))
    flux = stock_grid(config, 20, sigmas=np.linspace(1.0, 1 / 20, 20), mu=mu)
    assert torch.equal(S.flux_sigmas(20, mu, kind), flux)


def test_calculate_mu_and_seq_len_match_pipelines():
    for length in (64, 256, 1024, 4096, 9000):
        assert S.calculate_mu(length) == calculate_shift(length)
        assert S.calculate_mu(length, max_shift=1.16) == calculate_shift(length, max_shift=1.16)
    assert S.image_seq_len(128, 96, 2) == 64 * 48
    assert S.image_seq_len(9, 9, 2) == 16


@pytest.mark.parametrize("n", [2, 3, 5, 10, 20, 28, 50, 200])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.6, 0.9])
@pytest.mark.parametrize("boundary", [0.05, 0.3, 0.55, 0.95])
def test_phase_aware_grid_share_order_endpoints(n, fraction, boundary):
    k = round(fraction * n)
    if not 1 <= k <= n - 1:
        with pytest.raises(ValueError, match="too few steps for the split"):
            S.phase_aware_sigmas(n, boundary, fraction)
        return
    sig = S.phase_aware_sigmas(n, boundary, fraction)
    assert sig.shape == (n,) and sig.dtype == torch.float32
    assert sig[0].item() == 1.0 and sig[-1].item() == pytest.approx(1e-3, rel=1e-6)
    assert (sig.diff() < 0).all()  # strictly decreasing
    assert int((sig > boundary).sum()) == k == S.navigation_steps(n, fraction)
    assert not (sig == boundary).any()


def test_phase_aware_grid_is_linear_on_each_side():
    n, boundary, fraction = 20, 0.4, 0.7
    sig = S.phase_aware_sigmas(n, boundary, fraction, sigma_min=0.01, dtype=torch.float64)
    k = 14
    up, down = sig[:k].diff(), sig[k:].diff()
    assert torch.allclose(up, torch.full_like(up, -(1 - boundary) / (k - 0.5)), atol=1e-12)
    assert torch.allclose(down, torch.full_like(down, -(boundary - 0.01) / (n - 1 - (k - 0.5))), atol=1e-12)
    # sigma* sits half-way (in step index) between the last navigation and first refinement step
    assert (sig[k - 1] - boundary).item() == pytest.approx(-up[0].item() / 2)
    assert (boundary - sig[k]).item() == pytest.approx(-down[0].item() / 2)


def test_phase_aware_grid_custom_range_dtype_device():
    sig = S.phase_aware_sigmas(8, 0.5, 0.5, sigma_max=0.9, sigma_min=0.1, dtype=torch.float64, device="cpu")
    assert sig.dtype == torch.float64 and sig[0] == 0.9 and sig[-1] == 0.1
    assert S.count_above(sig, 0.5) == 4


def test_navigation_steps_rounding_is_pythons():
    assert S.navigation_steps(5, 0.5) == round(2.5) == 2
    assert S.navigation_steps(7, 0.5) == round(3.5) == 4
    assert S.navigation_steps(10, 0.34) == 3


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((10, 0.5, 0.0), {}, ValueError, "navigation_fraction must lie strictly between 0 and 1"),
        ((10, 0.5, 1.0), {}, ValueError, "navigation_fraction must lie strictly between 0 and 1"),
        ((10, 0.5, math.nan), {}, ValueError, "navigation_fraction must lie strictly between 0 and 1"),
        ((10, 1.0, 0.5), {}, ValueError, "boundary_sigma must lie strictly between 0 and 1"),
        ((10, 0.0, 0.5), {}, ValueError, "boundary_sigma must lie strictly between 0 and 1"),
        ((10, "0.5", 0.5), {}, TypeError, "boundary_sigma must be a number"),
        ((1, 0.5, 0.5), {}, ValueError, "too few steps for the split"),
        ((10, 0.5, 0.04), {}, ValueError, r"round\(0.4\) = 0 steps above"),
        ((10, 0.5, 0.97), {}, ValueError, "too few steps for the split"),
        ((0, 0.5, 0.5), {}, ValueError, "num_steps must be a positive integer"),
        ((10, 0.5, 0.5), {"sigma_min": 0.6}, ValueError, "phase boundary must lie inside the grid"),
        ((10, 0.5, 0.5), {"sigma_max": 0.4}, ValueError, "phase boundary must lie inside the grid"),
    ],
)
def test_phase_aware_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        S.phase_aware_sigmas(*args, **kwargs)


def test_shift_bad_input():
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        S.static_shift([0.5], 0.0)
    with pytest.raises(ValueError, match="mu must be a finite number"):
        S.dynamic_shift([0.5], math.inf)
    with pytest.raises(ValueError, match="kind must be"):
        S.dynamic_shift([0.5], 0.5, "cosine")  # type: ignore[arg-type]
