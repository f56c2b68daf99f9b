"""Noise-level grids for flow-matching samplers: pure functions that return tensors.

Convention (``SCIENCE.md``): σ ∈ [0, 1], σ = 1 is noise, diffusers ``timestep = 1000·σ``. A *grid*
here is the list of **evaluated** noise levels ``σ_0 > σ_1 > … > σ_{N−1}`` (one model call
each, what diffusers' ``set_timesteps(sigmas=...)`` takes); a scheduler appends the terminal
σ_N = 0, which is never evaluated.

* :func:`static_shift` — σ' = s·σ / (1 + (s − 1)·σ) (SD3's ``shift``).
* :func:`dynamic_shift` — resolution-dependent shift, ``exponential``:
  σ' = e^μ / (e^μ + (1/σ − 1)), or ``linear``: σ' = μ / (μ + (1/σ − 1)).
* :func:`calculate_mu` and :func:`image_seq_len` — μ from the image token count, as the Flux and
  SD3 pipelines compute it.
* :func:`stock_sigmas` and :func:`flux_sigmas` — the grids stock diffusers samples on.
* :func:`phase_aware_sigmas` — a grid with an exact share of steps above the phase boundary σ*
  (Liu et al., arXiv 2512.02826: navigation above σ*, refinement below it).
* :func:`uniform_sigmas` — ``σ_i = 1 − i/N``: every step spent, the last one lands on 0 from 1/N.
* :func:`profile_sigmas` — quantiles of a step density drawn from a phase profile (the rate at
  which the reference posterior's top-1 weight changes) mixed with uniform; :func:`profile_cdf`
  and :func:`profile_density` expose that density.
* :func:`acceleration_sigmas` — quantiles of ``ρ ∝ (1 − λ) + λ·√a(σ)``, ``a`` the reference
  oracle's trajectory acceleration (``PhaseProfile.acceleration``): Euler's error
  equidistributed over the steps; :func:`acceleration_cdf` and :func:`acceleration_density`
  expose that density. The default grid of ``PhaseAwareFlowMatchScheduler.from_profile``.

These match ``FlowMatchEulerDiscreteScheduler`` to float32 rounding (see ``tests/sampling/test_schedules.py``);
the scheduler itself (``steersample.sampling.scheduler``) calls diffusers' own code for stock grids.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "static_shift",
    "dynamic_shift",
    "calculate_mu",
    "image_seq_len",
    "stock_sigmas",
    "flux_sigmas",
    "phase_aware_sigmas",
    "navigation_steps",
    "count_above",
    "uniform_sigmas",
    "profile_cdf",
    "profile_density",
    "profile_sigmas",
    "DEFAULT_PROFILE_MIXING",
    "acceleration_cdf",
    "acceleration_density",
    "acceleration_mixing",
    "acceleration_sigmas",
    "DEFAULT_ACCELERATION_MIXING",
    "ACCELERATION_POWER",
]

DEFAULT_PROFILE_MIXING = 0.2
"""Share λ of :func:`profile_sigmas`' step density that follows the posterior's rate of change
(the rest is uniform). Fitted once on the embedded digits default and checked unchanged on the
letters default (``benchmarks/quality_per_nfe.py --fit``); not a per-model knob."""

DEFAULT_ACCELERATION_MIXING = 0.65
"""Large-``N`` limit λ∞ of the share of :func:`acceleration_sigmas`' step density that follows
``√a`` (the rest is uniform); at ``N`` steps the share is ``λ_N = λ∞ − 1/N``
(:func:`acceleration_mixing`). Fitted once on the embedded digits default with seeds disjoint
from the benchmark's (``benchmarks/quality_per_nfe.py --fit``: λ∞ ∈ {0.55, …, 0.75}, largest
smallest saving of model evaluations against the stock grid over 4-10 steps) and checked
unchanged on the letters and prompt testbeds; not a per-model knob."""

ACCELERATION_POWER = 0.5
"""Exponent ``p`` of the acceleration in :func:`acceleration_sigmas`' density, ``ρ ∝ a^p``:
1/2 minimises Euler's global error bound (see there). Not fitted: on the digits fit seeds the
best λ at p = 0.75 and p = 1 tied with p = 1/2 (mean FD relative to uniform 0.9729, 0.9728 and
0.9729), so the theory's value stands."""


def _as_tensor(sigmas: Tensor | list[float], dtype: torch.dtype = torch.float32) -> Tensor:
    if isinstance(sigmas, Tensor):
        return sigmas if sigmas.is_floating_point() else sigmas.to(dtype)
    return torch.as_tensor(sigmas, dtype=dtype)


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _check_open_unit(name: str, value: float, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1), got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}; {hint}")
    return value


def static_shift(sigmas: Tensor | list[float], shift: float) -> Tensor:
    """Static timestep shift ``σ' = s·σ / (1 + (s − 1)·σ)``; ``s > 1`` moves steps towards noise.

    Args:
        sigmas: noise levels, any shape (a list is read as float32).
        shift: ``s > 0``; ``s = 1`` is the identity.

    Returns:
        Shifted σ, same shape, dtype and device as ``sigmas``.
    """
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}; SD3 uses 3.0, 1.0 is no shift.")
    sigmas = _as_tensor(sigmas)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift(
    sigmas: Tensor | list[float], mu: float, kind: Literal["exponential", "linear"] = "exponential"
) -> Tensor:
    """Resolution-dependent shift (diffusers ``time_shift`` with exponent 1).

    ``exponential``: ``σ' = e^μ / (e^μ + (1/σ − 1))`` (equals :func:`static_shift` with s = e^μ);
    ``linear``: ``σ' = μ / (μ + (1/σ − 1))``. μ comes from :func:`calculate_mu`.

    Returns:
        Shifted σ, same shape, dtype and device as ``sigmas``.
    """
    if not (isinstance(mu, (int, float)) and math.isfinite(mu)):
        raise ValueError(f"mu must be a finite number, got {mu!r}; compute it with calculate_mu(image_seq_len).")
    sigmas = _as_tensor(sigmas)
    if kind == "exponential":
        c = torch.full_like(sigmas, math.exp(mu))
    elif kind == "linear":
        if mu <= 0:
            raise ValueError(f"linear time shift needs mu > 0, got {mu!r}.")
        c = torch.full_like(sigmas, mu)
    else:
        raise ValueError(f"kind must be 'exponential' or 'linear', got {kind!r}.")
    # tensor / tensor divisions (correctly rounded, like numpy's) rather than scalar / tensor,
    # which torch evaluates as a reciprocal times the scalar (two roundings)
    return c / (c + (torch.ones_like(sigmas) / sigmas - 1))


def calculate_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """μ for :func:`dynamic_shift`: linear in the image token count ``L``, as Flux and SD3 do.

    ``μ = m·L + b`` with ``m = (max_shift − base_shift)/(max_seq_len − base_seq_len)`` and
    ``b = base_shift − m·base_seq_len``. Pass the scheduler config's values (SD3's pipeline falls
    back to ``max_shift = 1.16`` when its config lacks the key, Flux's to 1.15).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def image_seq_len(latent_height: int, latent_width: int, patch_size: int) -> int:
    """Image token count ``(H // p)·(W // p)`` of a latent ``(C, H, W)`` with patch size ``p``.

    SD3: the transformer's ``patch_size`` (2). Flux packs 2×2 latent patches, so its count is
    ``image_seq_len(h, w, 2)`` for the unpacked latent ``h × w``.
    """
    return (latent_height // patch_size) * (latent_width // patch_size)


def stock_sigmas(
    num_steps: int,
    shift: float = 1.0,
    *,
    mu: float | None = None,
    time_shift_type: Literal["exponential", "linear"] = "exponential",
    num_train_timesteps: int = 1000,
) -> Tensor:
    """The default grid of ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)``.

    diffusers spaces ``N`` timesteps linearly from ``1000·σ_max`` to ``1000·σ_min`` where
    ``σ_max = 1`` and ``σ_min`` is the *already shifted* ``1/num_train_timesteps``, then shifts
    again: static ``shift``, or :func:`dynamic_shift` with ``mu`` when ``mu`` is given (its
    ``σ_min`` is then unshifted, as in diffusers' ``use_dynamic_shifting``).

    Returns:
        ``(num_steps,)`` float32 evaluated σ (without the terminal 0).
    """
    _check_positive_int("num_steps", num_steps)
    # diffusers' __init__: float32 grid of num_train_timesteps levels, statically shifted
    t_min = torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32)
    if mu is None:
        t_min = static_shift(t_min, shift)
    # set_timesteps: float64 linspace of timesteps, shift in float64, cast to float32 at the end
    timesteps = torch.linspace(
        float(num_train_timesteps), t_min.item() * num_train_timesteps, num_steps, dtype=torch.float64
    )
    sigmas = timesteps / num_train_timesteps
    sigmas = static_shift(sigmas, shift) if mu is None else dynamic_shift(sigmas, mu, time_shift_type)
    return sigmas.to(torch.float32)


def flux_sigmas(num_steps: int, mu: float, time_shift_type: Literal["exponential", "linear"] = "exponential") -> Tensor:
    """The grid ``FluxPipeline`` samples on: ``linspace(1, 1/N, N)`` shifted with ``mu``.

    Returns:
        ``(num_steps,)`` float32 evaluated σ (without the terminal 0).
    """
    _check_positive_int("num_steps", num_steps)
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).to(torch.float32)
    return dynamic_shift(sigmas, mu, time_shift_type)


def navigation_steps(num_steps: int, navigation_fraction: float) -> int:
    """Steps above σ* in :func:`phase_aware_sigmas`: ``K = round(navigation_fraction · num_steps)``.

    Python's ``round`` (ties go to the even integer, e.g. 0.5·5 = 2.5 → 2). Raises unless
    ``1 ≤ K ≤ num_steps − 1`` (the grid starts above σ* and ends below it).
    """
    _check_positive_int("num_steps", num_steps)
    fraction = _check_open_unit(
        "navigation_fraction", navigation_fraction, "it is the share of steps above the phase boundary, e.g. 0.5."
    )
    k = round(fraction * num_steps)
    if not 1 <= k <= num_steps - 1:
        raise ValueError(
            f"too few steps for the split: navigation_fraction={fraction!r} of num_steps={num_steps} gives "
            f"round({fraction * num_steps!r}) = {k} steps above the phase boundary and {num_steps - k} below; "
            "a phase-aware grid needs at least one on each side. Use more steps (at least 2) or a "
            "fraction nearer 0.5."
        )
    return k


def phase_aware_sigmas(
    num_steps: int,
    boundary_sigma: float,
    navigation_fraction: float,
    *,
    sigma_max: float = 1.0,
    sigma_min: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """A grid that spends an exact share of its steps above the phase boundary σ*.

    **How the share is counted.** Of the ``N = num_steps`` *evaluated* noise levels
    ``σ_0 … σ_{N−1}`` (the terminal 0 a scheduler appends is not evaluated and not counted),
    exactly ``K = round(navigation_fraction · N)`` (:func:`navigation_steps`, Python rounding)
    satisfy ``σ_i > σ*``, the rest ``σ_i < σ*``; checked again after the cast to ``dtype``.

    **Shape.** σ* sits half-way between steps ``K − 1`` and ``K`` (fractional index
    ``p = K − ½``); σ is linear in the step index on each side::

        σ_i = σ_max − (σ_max − σ*)·i / p                    for i < K     (navigation)
        σ_i = σ* − (σ* − σ_min)·(i − p) / (N − 1 − p)        for i ≥ K     (refinement)

    so ``σ_0 = σ_max``, ``σ_{N−1} = σ_min``, uniform steps ``Δ_nav = (σ_max − σ*)/p`` above σ*
    and ``Δ_ref = (σ* − σ_min)/(N − 1 − p)`` below it, and the step across σ* is their mean.

    Args:
        num_steps: ``N ≥ 2``.
        boundary_sigma: σ* in ``(sigma_min, sigma_max)``, e.g. ``PhaseProfile.boundary_sigma``.
        navigation_fraction: share of steps above σ*, in (0, 1).
        sigma_max: first evaluated σ (1.0 = pure noise).
        sigma_min: last evaluated σ (default 1e-3, diffusers' ``1/num_train_timesteps``).
        dtype, device: of the returned tensor (computed in float64).

    Returns:
        ``(num_steps,)`` strictly decreasing σ.
    """
    k = navigation_steps(num_steps, navigation_fraction)
    boundary = _check_open_unit(
        "boundary_sigma", boundary_sigma, "pass PhaseProfile.boundary_sigma or a noise level such as 0.6."
    )
    for name, value in (("sigma_max", sigma_max), ("sigma_min", sigma_min)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    if not sigma_min < boundary < sigma_max:
        raise ValueError(
            f"the phase boundary must lie inside the grid, sigma_min < boundary_sigma < sigma_max, got "
            f"{sigma_min!r} < {boundary!r} < {sigma_max!r}; lower sigma_min (or shift_terminal) or check the boundary."
        )
    n = num_steps
    p = k - 0.5
    i = torch.arange(n, dtype=torch.float64)
    upper = sigma_max - (sigma_max - boundary) * i / p
    lower = boundary - (boundary - sigma_min) * (i - p) / (n - 1 - p)
    sigmas = torch.where(i < k, upper, lower)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact endpoints
    sigmas = sigmas.to(dtype=dtype, device=device)
    above = count_above(sigmas, boundary)
    if above != k or bool((sigmas.diff() >= 0).any()):
        raise ValueError(
            f"{n} steps are too many to resolve in {dtype} around sigma*={boundary!r}; use float64 or fewer steps."
        )
    return sigmas


def count_above(sigmas: Tensor | list[float], boundary_sigma: float) -> int:
    """Number of noise levels strictly above ``boundary_sigma`` (navigation steps of a grid)."""
    sigmas = _as_tensor(sigmas)
    return int((sigmas.double() > float(boundary_sigma)).sum())


def uniform_sigmas(
    num_steps: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """The uniform grid that ends at 0: ``σ_i = 1 − i/N`` for ``i = 0 … N − 1``.

    Every step moves σ by exactly ``1/N``; the last evaluated σ is ``1/N`` and the scheduler's
    appended terminal 0 is reached by a full step (unlike :func:`stock_sigmas`, whose last
    evaluated σ is ``1/1000``). Same as Flux's ``linspace(1, 1/N, N)`` before its shift.

    Returns:
        ``(num_steps,)`` strictly decreasing σ.
    """
    _check_positive_int("num_steps", num_steps)
    i = torch.arange(num_steps, dtype=torch.float64)
    return (1.0 - i / num_steps).to(dtype=dtype, device=device)


def _check_mixing(mixing: float, follows: str = "profile", example: float = DEFAULT_PROFILE_MIXING) -> float:
    if isinstance(mixing, bool) or not isinstance(mixing, (int, float)):
        raise TypeError(f"mixing must be a number in [0, 1), got {mixing!r} ({type(mixing).__name__}).")
    mixing = float(mixing)
    if not (math.isfinite(mixing) and 0.0 <= mixing < 1.0):
        raise ValueError(
            f"mixing must lie in [0, 1), got {mixing!r}; it is the share of the step density that follows "
            f"the {follows} (the rest is uniform, which keeps every step spent), e.g. {example}."
        )
    return mixing


def _curve(sigmas: Tensor | list[float], values: Tensor | list[float], what: str, hint: str,
           name: str) -> tuple[Tensor, Tensor]:
    """A validated curve over σ: float64 ``(s, y)`` sorted by σ ascending, σ in (0, 1], distinct."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten()
    y = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    if s.numel() != y.numel() or s.numel() < 2:
        raise ValueError(
            f"{what} needs sigmas and {name} of the same length, at least 2 points each; got {s.numel()} "
            f"sigmas and {y.numel()} values. {hint}"
        )
    if not bool(torch.isfinite(s).all() & torch.isfinite(y).all()):
        raise ValueError(
            f"{what} contains NaN or inf (in sigmas or {name}); re-estimate it with "
            "PhaseProfile.estimate(reference) on finite reference latents."
        )
    if bool(((s <= 0) | (s > 1)).any()):
        raise ValueError(f"profile sigmas must lie in (0, 1], got min {float(s.min())!r}, max {float(s.max())!r}.")
    order = torch.argsort(s)
    s, y = s[order], y[order]
    if bool((s.diff() <= 0).any()):
        raise ValueError("profile sigmas must be distinct; pass the profile's own grid (no repeated noise levels).")
    return s, y


def _profile_knots(sigmas: Tensor | list[float], top1: Tensor | list[float]) -> tuple[Tensor, Tensor]:
    """Validated profile as float64 knots ``s`` ascending on [0, 1] (0 and 1 added) and the rate
    ``|Δtop1/Δσ|`` on each of the ``len(s) − 1`` intervals (0 outside the profile's σ range)."""
    s, y = _curve(sigmas, top1, "a profile", "Pass PhaseProfile.estimate(reference) (its .sigmas and .top1).",
                  "top1")
    rate = (y.diff() / s.diff()).abs()
    knots = torch.cat([torch.zeros(1, dtype=torch.float64), s])
    rate = torch.cat([torch.zeros(1, dtype=torch.float64), rate])  # flat below the smallest profile σ
    if float(s[-1]) < 1.0:
        knots = torch.cat([knots, torch.ones(1, dtype=torch.float64)])
        rate = torch.cat([rate, torch.zeros(1, dtype=torch.float64)])  # flat above the largest
    if not float((rate * knots.diff()).sum()) > 0.0:
        raise ValueError(
            "the profile's top-1 weight does not change over its sigma grid, so it defines no step density; "
            "estimate it on a grid that spans the navigation -> refinement boundary (the default grid does), "
            "or use uniform_sigmas(num_steps)."
        )
    return knots, rate


def profile_cdf(
    sigmas: Tensor | list[float], top1: Tensor | list[float], mixing: float = DEFAULT_PROFILE_MIXING
) -> tuple[Tensor, Tensor]:
    """Knots of the step distribution :func:`profile_sigmas` takes quantiles of.

    With the profile's top-1 curve ``p(σ)`` linearly interpolated between its grid points (flat
    outside its σ range) and ``V(σ) = ∫₀^σ |dp/dσ'| dσ'`` (its total variation from the data end)::

        F(σ) = (1 − λ)·σ + λ·V(σ)/V(1),     density  ρ(σ) = (1 − λ) + λ·|dp/dσ| / V(1)

    ``F`` is piecewise linear, ``F(0) = 0``, ``F(1) = 1``, strictly increasing for ``λ < 1``.

    Returns:
        ``(knots, cdf)``: float64 ``(K,)`` σ ascending from 0 to 1 and ``F`` there.
    """
    mixing = _check_mixing(mixing)
    knots, rate = _profile_knots(sigmas, top1)
    mass = rate * knots.diff()
    variation = torch.cat([torch.zeros(1, dtype=torch.float64), mass.cumsum(0)])
    cdf = (1.0 - mixing) * knots + mixing * variation / variation[-1]
    cdf[-1] = 1.0
    return knots, cdf


def profile_density(
    sigma: Tensor | list[float], sigmas: Tensor | list[float], top1: Tensor | list[float],
    mixing: float = DEFAULT_PROFILE_MIXING,
) -> Tensor:
    """The step density ``ρ(σ) = (1 − λ) + λ·|dp/dσ|/V(1)`` of :func:`profile_cdf` at ``sigma``.

    Piecewise constant on the profile's intervals (right-continuous at a knot); integrates to 1
    over [0, 1]. Returns float64 with ``sigma``'s shape.
    """
    mixing = _check_mixing(mixing)
    knots, rate = _profile_knots(sigmas, top1)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if bool(((sigma < 0) | (sigma > 1) | ~torch.isfinite(sigma)).any()):
        raise ValueError("sigma must lie in [0, 1] (0 is data, 1 is noise).")
    j = (torch.searchsorted(knots, sigma.flatten(), right=True) - 1).clamp(0, rate.numel() - 1)
    total = float((rate * knots.diff()).sum())
    return ((1.0 - mixing) + mixing * rate[j] / total).reshape(sigma.shape)


def profile_sigmas(
    num_steps: int,
    sigmas: Tensor | list[float],
    top1: Tensor | list[float],
    mixing: float = DEFAULT_PROFILE_MIXING,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """A grid with equal step-density mass between consecutive levels, the terminal 0 included.

    ``σ_i = F⁻¹(1 − i/N)`` for ``i = 0 … N − 1`` (``F`` from :func:`profile_cdf`), so
    ``σ_0 = 1``, every step (the last one, ``σ_{N−1} → 0``, too) carries mass ``1/N``, and
    steps are short where the reference posterior changes fast (around the navigation →
    refinement boundary σ*, Liu et al., arXiv 2512.02826) and long where it is flat. The
    uniform share ``1 − λ`` bounds every step by ``1/((1 − λ)·N)``. Near σ = 0 the top-1 weight
    has saturated (flat profile), so there the last evaluated σ is ``1/((1 − λ)·N) ≥ 1/N``: the
    last step is a full one, not diffusers' ``1/1000 → 0``. ``λ = 0`` is :func:`uniform_sigmas`.

    Args:
        num_steps: ``N ≥ 1`` evaluated levels.
        sigmas, top1: a phase profile's curve (``PhaseProfile.sigmas``, ``.top1``), any order.
        mixing: λ in [0, 1), default :data:`DEFAULT_PROFILE_MIXING`.
        dtype, device: of the returned tensor (computed in float64).

    Returns:
        ``(num_steps,)`` strictly decreasing σ in (0, 1].
    """
    _check_positive_int("num_steps", num_steps)
    knots, cdf = profile_cdf(sigmas, top1, mixing)
    return _quantiles(num_steps, knots, cdf, dtype, device)


def _quantiles(num_steps: int, knots: Tensor, cdf: Tensor, dtype: torch.dtype, device) -> Tensor:
    """``σ_i = F⁻¹(1 − i/N)`` for a piecewise-linear, strictly increasing ``F`` (knots, cdf)."""
    targets = 1.0 - torch.arange(num_steps, dtype=torch.float64) / num_steps
    # inverse of the piecewise-linear F: locate each target's interval, interpolate inside it
    j = (torch.searchsorted(cdf, targets, right=True) - 1).clamp(0, cdf.numel() - 2)
    frac = (targets - cdf[j]) / (cdf[j + 1] - cdf[j])
    grid = knots[j] + frac * (knots[j + 1] - knots[j])
    grid[0] = 1.0
    grid = grid.to(dtype=dtype, device=device)
    if num_steps > 1 and bool((grid.diff() >= 0).any()):
        raise ValueError(f"{num_steps} steps are too many to resolve in {dtype}; use float64 or fewer steps.")
    return grid


# ----------------------------------------------------------------------------- acceleration grid
def acceleration_mixing(num_steps: int, limit: float = DEFAULT_ACCELERATION_MIXING) -> float:
    """The share ``λ_N = max(0, λ∞ − 1/N)`` of :func:`acceleration_sigmas`' density that follows ``√a``.

    The ``√a`` density is the large-``N`` optimum of Euler's error (see
    :func:`acceleration_sigmas`); with few steps each step is wider than the peak of ``a`` and the
    asymptotic ``h²·a`` error model overstates what concentrating steps there gains. The uniform
    share ``1 − λ_N = (1 − λ∞) + 1/N`` therefore keeps one step's worth of mass on top of the
    asymptotic share: its ``N·(1 − λ_N) = (1 − λ∞)·N + 1`` uniform steps. On the digits fit seeds
    this raised the smallest saving over 4-10 steps from 24.8 % (constant λ = 0.5) to 25.7 %, and
    on letters from 25 to 28 % at 10 steps (``benchmarks/quality_per_nfe.py --fit``).

    Args:
        num_steps: ``N ≥ 1`` evaluated levels.
        limit: λ∞ in [0, 1), default :data:`DEFAULT_ACCELERATION_MIXING`.
    """
    _check_positive_int("num_steps", num_steps)
    limit = _check_mixing(limit, "acceleration", DEFAULT_ACCELERATION_MIXING)
    return max(0.0, limit - 1.0 / num_steps)


def _acceleration_knots(
    sigmas: Tensor | list[float], acceleration: Tensor | list[float], power: float
) -> tuple[Tensor, Tensor]:
    """Validated curve as float64 knots ``s`` ascending on [0, 1] (0 and 1 added) and the mean of
    ``a^p`` at the two ends of each of the ``len(s) − 1`` intervals (trapezoid; flat beyond the
    curve's σ range)."""
    s, a = _curve(sigmas, acceleration, "an acceleration curve",
                  "Pass a PhaseProfile's .sigmas and .acceleration.", "acceleration")
    if bool((a < 0).any()):
        raise ValueError("the acceleration is a norm, so it cannot be negative; pass PhaseProfile.acceleration.")
    if not (isinstance(power, (int, float)) and not isinstance(power, bool) and math.isfinite(power) and power > 0):
        raise ValueError(
            f"power must be a finite number > 0, got {power!r}; {ACCELERATION_POWER} minimises Euler's error."
        )
    w = a ** float(power)
    knots = torch.cat([torch.zeros(1, dtype=torch.float64), s])
    height = torch.cat([w[:1], (w[1:] + w[:-1]) / 2])   # flat below the smallest σ
    if float(s[-1]) < 1.0:
        knots = torch.cat([knots, torch.ones(1, dtype=torch.float64)])
        height = torch.cat([height, w[-1:]])             # flat above the largest
    if not float((height * knots.diff()).sum()) > 0.0:
        raise ValueError(
            "the acceleration curve is zero everywhere, so it defines no step density; estimate it with "
            "PhaseProfile.estimate(reference) (the default sigma grid spans the boundary), or use "
            "uniform_sigmas(num_steps)."
        )
    return knots, height


def acceleration_cdf(
    sigmas: Tensor | list[float],
    acceleration: Tensor | list[float],
    mixing: float = DEFAULT_ACCELERATION_MIXING,
    power: float = ACCELERATION_POWER,
) -> tuple[Tensor, Tensor]:
    """Knots of the step distribution :func:`acceleration_sigmas` takes quantiles of.

    With ``w = a^p`` taken piecewise constant between the curve's points (each interval the mean of
    its two ends, flat beyond the curve's σ range) and ``W(σ) = ∫₀^σ w``::

        F(σ) = (1 − λ)·σ + λ·W(σ)/W(1),     density  ρ(σ) = (1 − λ) + λ·w(σ)/W(1)

    ``F`` is piecewise linear, ``F(0) = 0``, ``F(1) = 1``, strictly increasing for ``λ < 1``.

    Returns:
        ``(knots, cdf)``: float64 ``(K,)`` σ ascending from 0 to 1 and ``F`` there.
    """
    mixing = _check_mixing(mixing, "acceleration", DEFAULT_ACCELERATION_MIXING)
    knots, height = _acceleration_knots(sigmas, acceleration, power)
    mass = torch.cat([torch.zeros(1, dtype=torch.float64), (height * knots.diff()).cumsum(0)])
    cdf = (1.0 - mixing) * knots + mixing * mass / mass[-1]
    cdf[-1] = 1.0
    return knots, cdf


def acceleration_density(
    sigma: Tensor | list[float],
    sigmas: Tensor | list[float],
    acceleration: Tensor | list[float],
    mixing: float = DEFAULT_ACCELERATION_MIXING,
    power: float = ACCELERATION_POWER,
) -> Tensor:
    """The step density ``ρ(σ) = (1 − λ) + λ·a(σ)^p / ∫₀¹ a^p`` of :func:`acceleration_cdf` at ``sigma``.

    Piecewise constant on the curve's intervals (right-continuous at a knot); integrates to 1
    over [0, 1]. Returns float64 with ``sigma``'s shape.
    """
    mixing = _check_mixing(mixing, "acceleration", DEFAULT_ACCELERATION_MIXING)
    knots, height = _acceleration_knots(sigmas, acceleration, power)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if bool(((sigma < 0) | (sigma > 1) | ~torch.isfinite(sigma)).any()):
        raise ValueError("sigma must lie in [0, 1] (0 is data, 1 is noise).")
    j = (torch.searchsorted(knots, sigma.flatten(), right=True) - 1).clamp(0, height.numel() - 1)
    total = float((height * knots.diff()).sum())
    return ((1.0 - mixing) + mixing * height[j] / total).reshape(sigma.shape)


def acceleration_sigmas(
    num_steps: int,
    sigmas: Tensor | list[float],
    acceleration: Tensor | list[float],
    mixing: float | None = None,
    power: float = ACCELERATION_POWER,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Euler steps that equidistribute the local error: ``ρ(σ) ∝ (1 − λ) + λ·√a(σ)``, ending at 0.

    **Why √a.** Euler on ``dx/dσ = v`` with step ``h(σ) = 1/(N·ρ(σ))`` makes a local error
    ``½·h²·‖x''‖`` per step, so a global error ``≈ (1/2N)·∫ a(σ)/ρ(σ) dσ`` with
    ``a = ‖d²x/dσ²‖`` along the trajectories; over densities with ``∫ρ = 1`` this is smallest
    for ``ρ ∝ √a`` (Cauchy–Schwarz; the classic equidistribution of step sizes, as calibrated
    from trajectories by Align Your Steps, Sabour et al. arXiv 2404.14507, and SharpEuler,
    arXiv 2605.11547). In the diffusers convention ``x_σ = (1 − σ)x₀ + σε``, ``v = (x − x̂₀)/σ``,
    and along the ODE ``d²x/dσ² = −(dx̂₀/dσ)/σ``, so ``a(σ) = ‖dx̂₀/dσ‖/σ``: large where the
    posterior mean moves, i.e. where the reference posterior decides (around σ*), zero where it
    has settled. ``PhaseProfile.acceleration`` measures it with the reference set's exact
    oracle. That oracle memorises (x̂₀ stops moving at small σ) where a trained model still
    refines, so a uniform share ``1 − λ`` is kept: it bounds every step by ``1/((1 − λ)·N)`` and
    makes the last step, ``σ_{N−1} → 0``, a full one. By default λ depends on the step count,
    ``λ_N = λ∞ − 1/N`` (:func:`acceleration_mixing`): few steps are wider than the peak of ``a``.

    ``σ_i = F⁻¹(1 − i/N)`` for ``i = 0 … N − 1`` (``F`` from :func:`acceleration_cdf`), so
    ``σ_0 = 1`` and every step (the last one too) carries mass ``1/N``. ``λ = 0`` is
    :func:`uniform_sigmas`.

    Args:
        num_steps: ``N ≥ 1`` evaluated levels.
        sigmas, acceleration: the curve (``PhaseProfile.sigmas``, ``.acceleration``), any order.
        mixing: λ in [0, 1); None (default) means :func:`acceleration_mixing` ``(num_steps)``,
            ``λ∞ − 1/N`` with λ∞ = :data:`DEFAULT_ACCELERATION_MIXING`.
        power: the exponent ``p`` of ``ρ ∝ a^p``, default :data:`ACCELERATION_POWER` (1/2).
        dtype, device: of the returned tensor (computed in float64).

    Returns:
        ``(num_steps,)`` strictly decreasing σ in (0, 1].
    """
    _check_positive_int("num_steps", num_steps)
    if mixing is None:
        mixing = acceleration_mixing(num_steps)
    knots, cdf = acceleration_cdf(sigmas, acceleration, mixing, power)
    return _quantiles(num_steps, knots, cdf, dtype, device)
