"""Profile-derived σ grids (issue #16): formulas against brute force, the scheduler's from_profile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import steersample as ss
from steersample.sampling import schedules as S
from steersample.sampling.scheduler import PhaseAwareFlowMatchScheduler

# a small sigmoid-shaped profile, σ descending like PhaseProfile's, plus a ragged (noisy) one
SIG = torch.linspace(1.0, 0.05, 20, dtype=torch.float64)
TOP1 = torch.sigmoid((0.45 - SIG) * 20)
RAGGED = TOP1 + 0.03 * torch.sin(SIG * 90)


def fine_cdf(sigmas, top1, mixing, grid):
    """Brute force: ∫₀^σ ((1 − λ) + λ |p'|/V) with p the linear interpolant (np.interp), Riemann sums."""
    s, y = np.asarray(sigmas)[::-1], np.asarray(top1)[::-1]   # ascending for np.interp
    p = np.interp(grid, s, y)                                  # flat outside [s_min, s_max]
    dp = np.abs(np.diff(p))
    variation = np.concatenate([[0.0], np.cumsum(dp)])
    return (1 - mixing) * grid + mixing * variation / variation[-1]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 30])
def test_uniform_sigmas_formula(n):
    grid = S.uniform_sigmas(n)
    assert grid.shape == (n,) and grid.dtype == torch.float32
    assert torch.allclose(grid.double(), 1 - torch.arange(n, dtype=torch.float64) / n, atol=1e-7)
    assert grid[0] == 1.0 and float(grid[-1]) == pytest.approx(1 / n)


@pytest.mark.parametrize("top1", [TOP1, RAGGED], ids=["smooth", "ragged"])
@pytest.mark.parametrize("mixing", [0.0, 0.2, 0.7])
def test_profile_cdf_and_density_against_brute_force(top1, mixing):
    grid = np.linspace(0.0, 1.0, 200_001)
    brute = fine_cdf(SIG, top1, mixing, grid)
    knots, cdf = S.profile_cdf(SIG, top1, mixing)
    assert knots[0] == 0 and knots[-1] == 1 and cdf[0] == 0 and cdf[-1] == 1
    assert bool((cdf.diff() > 0).all())
    assert np.allclose(cdf.numpy(), np.interp(knots.numpy(), grid, brute), atol=1e-5)
    # the density integrates to F, and to 1 over [0, 1]
    mid = (grid[1:] + grid[:-1]) / 2
    dens = S.profile_density(torch.as_tensor(mid), SIG, top1, mixing).numpy()
    integral = np.concatenate([[0.0], np.cumsum(dens * np.diff(grid))])
    assert integral[-1] == pytest.approx(1.0, abs=1e-9)
    assert np.allclose(integral, brute, atol=1e-5)
    assert float(dens.min()) >= 1 - mixing - 1e-12


@pytest.mark.parametrize("n", [1, 2, 4, 10, 30])
@pytest.mark.parametrize("mixing", [0.0, 0.2, 0.6])
def test_profile_sigmas_equal_mass_quantiles(n, mixing):
    grid = S.profile_sigmas(n, SIG, TOP1, mixing, dtype=torch.float64)
    assert grid.shape == (n,) and grid[0] == 1.0
    assert bool((grid.diff() < 0).all()) and float(grid[-1]) > 0
    fine = np.linspace(0.0, 1.0, 200_001)
    mass = np.interp(grid.numpy(), fine, fine_cdf(SIG, TOP1, mixing, fine))
    assert np.allclose(mass, 1 - np.arange(n) / n, atol=1e-5)   # every step carries 1/N, last one too
    steps = -torch.cat([grid, torch.zeros(1, dtype=grid.dtype)]).diff()
    assert float(steps.max()) <= 1 / ((1 - mixing) * n) + 1e-12


@pytest.mark.parametrize("mixing", [0.0, 0.2, 0.6])
def test_last_step_is_a_full_step_where_the_posterior_has_saturated(mixing):
    """top-1 flat (= 1) below σ = 0.2: the last evaluated σ is 1/((1 − λ)·N) ≥ 1/N, not ~0."""
    top1 = torch.where(SIG < 0.2, torch.ones_like(SIG), torch.sigmoid((0.45 - SIG) * 20) / torch.sigmoid(
        torch.tensor(0.25 * 20, dtype=torch.float64)))
    for n in (20, 30, 40):
        grid = S.profile_sigmas(n, SIG, top1.clamp(max=1.0), mixing, dtype=torch.float64)
        assert float(grid[-1]) == pytest.approx(1 / ((1 - mixing) * n), rel=1e-9)


def test_profile_sigmas_mixing_zero_is_uniform_and_mass_moves_to_the_boundary():
    assert torch.allclose(S.profile_sigmas(8, SIG, TOP1, 0.0), S.uniform_sigmas(8), atol=1e-7)
    near = lambda g: int(((g > 0.3) & (g < 0.6)).sum())  # noqa: E731
    assert near(S.profile_sigmas(20, SIG, TOP1, 0.6)) > near(S.uniform_sigmas(20))


def test_profile_sigmas_order_free_and_dtype_device():
    a = S.profile_sigmas(6, SIG, TOP1)
    b = S.profile_sigmas(6, SIG.flip(0).tolist(), TOP1.flip(0).tolist())
    assert torch.equal(a, b) and a.dtype == torch.float32


@pytest.mark.parametrize("n", [0, -3, True, 2.0])
def test_bad_step_counts_name_the_fix(n):
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        S.profile_sigmas(n, SIG, TOP1)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        S.uniform_sigmas(n)


def test_bad_profiles_name_the_fix():
    nan = TOP1.clone()
    nan[3] = math.nan
    with pytest.raises(ValueError, match="NaN or inf.*PhaseProfile.estimate"):
        S.profile_sigmas(4, SIG, nan)
    with pytest.raises(ValueError, match="at least 2 points"):
        S.profile_sigmas(4, SIG, TOP1[:-1])
    with pytest.raises(ValueError, match="does not change.*uniform_sigmas"):
        S.profile_sigmas(4, SIG, torch.ones_like(SIG))
    with pytest.raises(ValueError, match=r"lie in \(0, 1\]"):
        S.profile_sigmas(4, SIG * 2, TOP1)
    with pytest.raises(ValueError, match="distinct"):
        S.profile_sigmas(4, torch.tensor([0.5, 0.5, 0.2]), torch.tensor([0.1, 0.2, 0.9]))
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match=r"mixing must lie in \[0, 1\)"):
            S.profile_sigmas(4, SIG, TOP1, bad)
    with pytest.raises(TypeError, match="mixing must be a number"):
        S.profile_sigmas(4, SIG, TOP1, "0.2")
    with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\]"):
        S.profile_density(1.5, SIG, TOP1)


# ----------------------------------------------------------------------------- scheduler
@pytest.fixture(scope="module")
def tiny_profile():
    """A real PhaseProfile of a tiny latent-shaped reference set (C, H, W) = (4, 8, 8)."""
    latents = torch.randn(24, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return ss.PhaseProfile.estimate(ss.ReferenceSet(latents), torch.Generator().manual_seed(1), num_queries=16)


@pytest.mark.parametrize("n", [1, 2, 5, 28])
def test_from_profile_set_timesteps_semantics(tiny_profile, n):
    sched = PhaseAwareFlowMatchScheduler.from_profile(FlowMatchEulerDiscreteScheduler().config, tiny_profile)
    assert sched.profile_aware and not sched.phase_aware
    assert sched.config.profile_mixing is None   # the share follows the step count
    sched.set_timesteps(n)
    grid = S.acceleration_sigmas(n, tiny_profile.sigmas, tiny_profile.acceleration)
    assert len(sched.timesteps) == n and sched.sigmas.shape == (n + 1,)
    assert torch.equal(sched.sigmas[:-1], grid) and sched.sigmas[-1] == 0 and sched.sigmas[0] == 1
    assert torch.equal(sched.timesteps, grid * 1000)
    # stock Euler step on this grid: x_next = x + (σ_next − σ)·v, one call per evaluated σ
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for i, t in enumerate(sched.timesteps):
        v = 0.3 * x - 0.1
        expect = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * v
        x = sched.step(v, t, x, return_dict=False)[0]
        assert torch.allclose(x, expect, atol=1e-6)
    assert sched.step_index == n


def test_from_profile_config_round_trip_and_stock_parity_untouched(tiny_profile, tmp_path):
    sched = PhaseAwareFlowMatchScheduler.from_profile({"shift": 3.0}, tiny_profile, mixing=0.4)
    sched.save_config(tmp_path)
    loaded = PhaseAwareFlowMatchScheduler.from_pretrained(tmp_path)
    sched.set_timesteps(6)
    loaded.set_timesteps(6)
    assert torch.equal(sched.sigmas, loaded.sigmas) and loaded.config.profile_mixing == 0.4
    # from_config keeps the stock grid (no profile by default)
    plain = PhaseAwareFlowMatchScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain.set_timesteps(6)
    stock.set_timesteps(6)
    assert not plain.profile_aware and torch.equal(plain.sigmas, stock.sigmas)


def test_from_profile_flux_style_call_sets_only_the_count(tiny_profile):
    cfg = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    sched = PhaseAwareFlowMatchScheduler.from_profile(cfg, tiny_profile)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 7, 7), mu=1.1)
    assert torch.equal(sched.sigmas[:-1], S.acceleration_sigmas(7, tiny_profile.sigmas, tiny_profile.acceleration))


def test_from_profile_errors_name_the_fix(tiny_profile):
    cfg = FlowMatchEulerDiscreteScheduler().config
    with pytest.raises(TypeError, match="PhaseProfile.estimate"):
        PhaseAwareFlowMatchScheduler.from_profile(cfg, 0.5)
    bad = type("P", (), {"sigmas": tiny_profile.sigmas, "top1": tiny_profile.top1 * math.nan})()
    with pytest.raises(ValueError, match="NaN"):
        PhaseAwareFlowMatchScheduler.from_profile(cfg, bad, density="top1")
    bad.acceleration = tiny_profile.acceleration * math.nan
    with pytest.raises(ValueError, match="NaN"):
        PhaseAwareFlowMatchScheduler.from_profile(cfg, bad)
    with pytest.raises(TypeError, match="drop phase_boundary"):
        PhaseAwareFlowMatchScheduler.from_profile(cfg, tiny_profile, phase_boundary=0.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        PhaseAwareFlowMatchScheduler.from_profile(cfg, tiny_profile, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="mixing must lie"):
        PhaseAwareFlowMatchScheduler.from_profile(cfg, tiny_profile, mixing=1.0)
    with pytest.raises(ValueError, match="two different grids"):
        PhaseAwareFlowMatchScheduler(phase_boundary=0.5, profile_sigmas=[1.0, 0.1], profile_top1=[0.0, 1.0])
    with pytest.raises(ValueError, match="needs a profile"):
        PhaseAwareFlowMatchScheduler(profile_mixing=0.3)
    sched = PhaseAwareFlowMatchScheduler.from_profile(cfg, tiny_profile)
    with pytest.raises(ValueError, match="explicit timesteps"):
        sched.set_timesteps(timesteps=[900.0, 500.0])
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        sched.set_timesteps(sigmas=[])


def test_from_profile_in_stock_sd3_and_flux_pipelines(tiny_profile):
    """Drop-in: n steps are n transformer calls (CFG batched) in diffusers' own pipelines."""
    from steersample import testing

    for build, kwargs in ((testing.tiny_sd3_pipeline, {"height": 8, "width": 8, "guidance_scale": 2.0}),
                          (testing.tiny_flux_pipeline, {"height": 16, "width": 16})):
        pipe = build()
        pipe.scheduler = PhaseAwareFlowMatchScheduler.from_profile(pipe.scheduler.config, tiny_profile)
        calls = []
        hook = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
        out = pipe("a", num_inference_steps=3, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **kwargs)
        hook.remove()
        assert len(calls) == 3 and torch.isfinite(out.images).all()


# ----------------------------------------------------------------------------- acceleration grid
# a bump-shaped acceleration (where the posterior decides) that vanishes at small σ, like the oracle's
ACC = 20.0 * torch.exp(-(((SIG - 0.5) / 0.15) ** 2)) * (SIG > 0.15)
POSITIVE = 1.0 + 30.0 * torch.exp(-(((SIG - 0.5) / 0.15) ** 2))


def fine_acc_cdf(sigmas, acc, mixing, power, grid):
    """Brute force: ∫₀^σ ((1 − λ) + λ w/W) with w = a^p, each profile interval at the mean of its ends."""
    s, w = np.asarray(sigmas)[::-1], np.asarray(acc)[::-1] ** power
    knots = np.concatenate([[0.0], s, [1.0] if s[-1] < 1 else []])
    height = np.concatenate([[w[0]], (w[1:] + w[:-1]) / 2, [w[-1]] if s[-1] < 1 else []])
    mid = (grid[1:] + grid[:-1]) / 2
    dens = height[np.clip(np.searchsorted(knots, mid, side="right") - 1, 0, len(height) - 1)]
    mass = np.concatenate([[0.0], np.cumsum(dens * np.diff(grid))])
    return (1 - mixing) * grid + mixing * mass / mass[-1]


@pytest.mark.parametrize("acc", [ACC, POSITIVE], ids=["bump", "positive"])
@pytest.mark.parametrize("mixing", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("power", [0.5, 1.0])
def test_acceleration_cdf_and_density_against_brute_force(acc, mixing, power):
    grid = np.linspace(0.0, 1.0, 200_001)
    brute = fine_acc_cdf(SIG, acc, mixing, power, grid)
    knots, cdf = S.acceleration_cdf(SIG, acc, mixing, power)
    assert knots[0] == 0 and knots[-1] == 1 and cdf[0] == 0 and cdf[-1] == 1
    assert bool((cdf.diff() > 0).all()) or mixing == 0.0 and bool((cdf.diff() >= 0).all())
    assert np.allclose(cdf.numpy(), np.interp(knots.numpy(), grid, brute), atol=1e-5)
    mid = (grid[1:] + grid[:-1]) / 2
    dens = S.acceleration_density(torch.as_tensor(mid), SIG, acc, mixing, power).numpy()
    assert np.concatenate([[0.0], np.cumsum(dens * np.diff(grid))])[-1] == pytest.approx(1.0, abs=1e-9)
    assert float(dens.min()) >= 1 - mixing - 1e-12
    # the density is (1 − λ) + λ·a^p/∫a^p: at the profile's points (interval means) ∝ a^p
    j = np.searchsorted(grid, np.asarray(SIG[1:-1]))
    w = (np.asarray(acc[1:-1]) ** power + np.asarray(acc[2:]) ** power) / 2
    if mixing > 0:
        shape = (dens[j - 1] - (1 - mixing)) / mixing
        assert np.allclose(shape / shape.max(), w / w.max(), atol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 4, 10, 30])
@pytest.mark.parametrize("mixing", [0.0, 0.5, 0.8])
def test_acceleration_sigmas_equal_mass_quantiles_end_at_zero(n, mixing):
    grid = S.acceleration_sigmas(n, SIG, POSITIVE, mixing, dtype=torch.float64)
    assert grid.shape == (n,) and grid[0] == 1.0
    assert bool((grid.diff() < 0).all()) and float(grid[-1]) > 0
    fine = np.linspace(0.0, 1.0, 200_001)
    mass = np.interp(grid.numpy(), fine, fine_acc_cdf(SIG, POSITIVE, mixing, 0.5, fine))
    assert np.allclose(mass, 1 - np.arange(n) / n, atol=1e-5)   # every step carries 1/N, last one too


@pytest.mark.parametrize("mixing", [0.2, 0.5])
def test_acceleration_grid_last_step_is_full_where_the_oracle_has_settled(mixing):
    """a = 0 below σ = 0.15: the last evaluated σ is 1/((1 − λ)·N), not ~0 (and not 1/1000)."""
    for n in (20, 30):
        grid = S.acceleration_sigmas(n, SIG, ACC, mixing, dtype=torch.float64)
        assert float(grid[-1]) == pytest.approx(1 / ((1 - mixing) * n), rel=1e-9)


def test_sqrt_acceleration_equidistributes_and_minimises_eulers_error():
    """ρ ∝ √a: each of N steps makes the same local error h²·a, and ∫ a/ρ is smallest among densities."""
    sig = torch.linspace(1.0, 0.001, 2000, dtype=torch.float64)       # a finely sampled curve
    acc = 1.0 + 30.0 * torch.exp(-(((sig - 0.5) / 0.15) ** 2))
    s = np.linspace(0.0, 1.0, 100_001)
    a = np.interp(s, sig.flip(0).numpy(), acc.flip(0).numpy())
    n, pure = 400, 1 - 1e-12                               # λ → 1: all the density follows √a
    grid = S.acceleration_sigmas(n, sig, acc, pure, dtype=torch.float64).numpy()
    edges = np.concatenate([grid, [0.0]])
    h = -np.diff(edges)
    local = h ** 2 * np.interp((edges[1:] + edges[:-1]) / 2, s, a)
    assert local.max() / local.min() < 1.1                # equal local error per step (to O(h))

    def bound(rho):                                      # Euler's global error ∝ ∫ a/ρ, ∫ρ = 1
        rho = rho / np.trapezoid(rho, s)
        return np.trapezoid(a / rho, s)

    best = bound(S.acceleration_density(torch.as_tensor(s), sig, acc, pure).numpy())
    assert best == pytest.approx(np.trapezoid(np.sqrt(a), s) ** 2, rel=1e-3)   # Cauchy–Schwarz bound
    for other in (np.ones_like(s), a, a ** 0.25, S.acceleration_density(torch.as_tensor(s), sig, acc, 0.5).numpy()):
        assert bound(other) > best


def test_acceleration_mixing_zero_is_uniform_on_a_flat_curve_and_bad_curves_name_the_fix():
    flat = torch.ones_like(SIG)
    assert torch.allclose(S.acceleration_sigmas(8, SIG, flat, 0.7), S.uniform_sigmas(8), atol=1e-7)
    assert torch.allclose(S.acceleration_sigmas(8, SIG, ACC, 0.0), S.uniform_sigmas(8), atol=1e-7)
    near = lambda g: int(((g > 0.35) & (g < 0.65)).sum())  # noqa: E731
    assert near(S.acceleration_sigmas(20, SIG, ACC)) > near(S.uniform_sigmas(20))
    nan = ACC.clone()
    nan[2] = math.nan
    with pytest.raises(ValueError, match="NaN or inf.*PhaseProfile.estimate"):
        S.acceleration_sigmas(4, SIG, nan)
    with pytest.raises(ValueError, match="zero everywhere.*uniform_sigmas"):
        S.acceleration_sigmas(4, SIG, torch.zeros_like(SIG))
    with pytest.raises(ValueError, match="cannot be negative"):
        S.acceleration_sigmas(4, SIG, -ACC)
    with pytest.raises(ValueError, match="same length"):
        S.acceleration_sigmas(4, SIG, ACC[:-1])
    with pytest.raises(ValueError, match=r"mixing must lie in \[0, 1\)"):
        S.acceleration_sigmas(4, SIG, ACC, 1.0)
    with pytest.raises(ValueError, match="power must be"):
        S.acceleration_sigmas(4, SIG, ACC, 0.5, 0.0)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        S.acceleration_sigmas(0, SIG, ACC)


def test_from_profile_density_choice_and_config_round_trip(tiny_profile, tmp_path):
    cfg = FlowMatchEulerDiscreteScheduler().config
    new = PhaseAwareFlowMatchScheduler.from_profile(cfg, tiny_profile)
    old = PhaseAwareFlowMatchScheduler.from_profile(cfg, tiny_profile, density="top1")
    assert new.config.profile_mixing is None
    assert old.config.profile_mixing == S.DEFAULT_PROFILE_MIXING and old.config.profile_acceleration is None
    new.set_timesteps(7)
    old.set_timesteps(7)
    acc = S.acceleration_sigmas(7, tiny_profile.sigmas, tiny_profile.acceleration)
    assert torch.equal(new.sigmas[:-1], acc) and new.sigmas[-1] == 0 and new.sigmas[0] == 1
    assert torch.equal(old.sigmas[:-1], S.profile_sigmas(7, tiny_profile.sigmas, tiny_profile.top1))
    for i, sched in enumerate((new, old)):
        sched.save_config(tmp_path / str(i))
        loaded = PhaseAwareFlowMatchScheduler.from_pretrained(tmp_path / str(i))
        loaded.set_timesteps(7)
        assert torch.equal(loaded.sigmas, sched.sigmas)
    # a config saved before the acceleration curve existed (no key) keeps its top-1 grid
    legacy = {k: v for k, v in dict(old.config).items() if k != "profile_acceleration"}
    again = PhaseAwareFlowMatchScheduler.from_config(legacy)
    again.set_timesteps(7)
    assert torch.equal(again.sigmas, old.sigmas)


def test_from_profile_without_an_acceleration_curve_names_the_fix(tiny_profile):
    cfg = FlowMatchEulerDiscreteScheduler().config
    bare = type("P", (), {"sigmas": tiny_profile.sigmas, "top1": tiny_profile.top1})()
    with pytest.raises(ValueError, match="no acceleration curve.*density='top1'"):
        PhaseAwareFlowMatchScheduler.from_profile(cfg, bare)
    assert PhaseAwareFlowMatchScheduler.from_profile(cfg, bare, density="top1").profile_aware
    with pytest.raises(ValueError, match="density must be"):
        PhaseAwareFlowMatchScheduler.from_profile(cfg, tiny_profile, density="entropy")
    with pytest.raises(TypeError, match="drop profile_acceleration"):
        PhaseAwareFlowMatchScheduler.from_profile(cfg, tiny_profile, profile_acceleration=[1.0])


# ----------------------------------------------------------------------------- step-count-dependent share
def test_acceleration_mixing_is_the_limit_minus_one_step():
    lam = S.DEFAULT_ACCELERATION_MIXING
    for n in (1, 2, 3, 4, 5, 7, 10, 30, 1000):
        assert S.acceleration_mixing(n) == pytest.approx(max(0.0, lam - 1.0 / n), abs=1e-15)
        # the uniform part carries (1 − λ∞)·N + 1 of the N steps' mass once λ_N > 0
        if lam - 1.0 / n > 0:
            assert n * (1 - S.acceleration_mixing(n)) == pytest.approx((1 - lam) * n + 1)
    assert S.acceleration_mixing(1) == 0.0 and S.acceleration_mixing(5, 0.5) == pytest.approx(0.3)
    assert S.acceleration_mixing(10) < S.acceleration_mixing(11) < lam   # grows towards the limit
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        S.acceleration_mixing(0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        S.acceleration_mixing(5, 1.0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 12])
def test_acceleration_sigmas_default_share_follows_the_step_count(n):
    default = S.acceleration_sigmas(n, SIG, ACC, dtype=torch.float64)
    explicit = S.acceleration_sigmas(n, SIG, ACC, S.acceleration_mixing(n), dtype=torch.float64)
    assert torch.equal(default, explicit)
    if n == 1:
        assert default.tolist() == [1.0]
    # with few steps the grid is closer to uniform than the large-N share would make it
    if n >= 3:
        limit = S.acceleration_sigmas(n, SIG, ACC, S.DEFAULT_ACCELERATION_MIXING, dtype=torch.float64)
        uni = S.uniform_sigmas(n, dtype=torch.float64)
        assert float((default - uni).abs().sum()) < float((limit - uni).abs().sum())


def test_from_profile_explicit_mixing_is_fixed_across_step_counts(tiny_profile):
    cfg = FlowMatchEulerDiscreteScheduler().config
    fixed = PhaseAwareFlowMatchScheduler.from_profile(cfg, tiny_profile, mixing=0.5)
    auto = PhaseAwareFlowMatchScheduler.from_profile(cfg, tiny_profile)
    for n in (3, 9):
        fixed.set_timesteps(n)
        auto.set_timesteps(n)
        acc = (tiny_profile.sigmas, tiny_profile.acceleration)
        assert torch.equal(fixed.sigmas[:-1], S.acceleration_sigmas(n, *acc, 0.5))
        assert torch.equal(auto.sigmas[:-1], S.acceleration_sigmas(n, *acc, S.acceleration_mixing(n)))
