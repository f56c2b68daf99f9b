"""``PhaseProfile``: where sampling switches from navigation to refinement (SCIENCE.md §1).

Liu et al. (arXiv 2512.02826) measure how sharp the oracle posterior is on forward-noised
reference samples. For queries built from reference samples x_k and Gaussian noise,

    x_σ = (1 - σ) x_k + σ ε,      ε ~ N(0, I),

the profile is the mean top-1 posterior weight  top1(σ) = mean_k max_i γ_i(x_σ, σ)  on a σ grid.
It rises from 1/N at σ = 1 to 1 as σ → 0. The navigation → refinement boundary σ* is where the
curve crosses 0.5 (``boundary_sigma``); ``refinement_sigma`` is where it reaches 0.9. Crossings
are located on the grid and linearly interpolated in σ between the two bracketing points
(scanning from the noise end, the first grid point at or above the level).

The **acceleration** curve (``acceleration``; issue #16) measures how fast the oracle's
posterior mean moves along its own probability-flow ODE: ``a(σ) = E‖dx̂₀*/dσ‖/σ``, which is
``‖d²x/dσ²‖`` of the ODE trajectories (``v = (x − x̂₀*)/σ``). The forward-noised queries above
are exact samples of the oracle ODE's marginal at σ, so at each query the derivative is a
finite difference along the ODE: one Euler step ``x' = x − δ·v*``, ``σ' = σ − δ``
(``δ = min(10⁻⁴, σ/100)``), and ``‖x̂₀*(x', σ') − x̂₀*(x, σ)‖/(δ·σ)``, averaged over the queries.
It costs one more oracle pass per σ. ``PhaseAwareFlowMatchScheduler.from_profile`` spaces its
steps by ``√a`` (``steersample.sampling.schedules.acceleration_sigmas``).

Per class: ``label=c`` draws the queries from class c and scores them with the class-conditional
oracle (the posterior over class c only), which is what a class-conditional model memorises.
The same query indices and noise draws are reused at every σ (common random numbers), so the
curve is smooth; randomness comes only from the explicit ``generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from steersample._checks import check_positive_int
from steersample.oracle.empirical import EmpiricalOracle
from steersample.reference.reference_set import ReferenceSet

__all__ = ["PhaseProfile", "default_sigma_grid", "crossing_sigma"]

_QUERY_ELEMENTS = 1 << 22   # float64 query values built per oracle call


def default_sigma_grid() -> torch.Tensor:
    """Descending σ grid, float64: 1.0, 0.98, ..., 0.02, then 0.015, 0.01, 0.005, 0.002, 0.001."""
    coarse = torch.linspace(1.0, 0.02, 50, dtype=torch.float64)
    fine = torch.tensor([0.015, 0.01, 0.005, 0.002, 0.001], dtype=torch.float64)
    return torch.cat([coarse, fine])


def crossing_sigma(sigmas: torch.Tensor, top1: torch.Tensor, level: float) -> float:
    """σ where ``top1`` first reaches ``level`` scanning from high σ, linearly interpolated.

    Returns ``sigmas[0]`` if the curve already starts at or above ``level`` and ``nan`` if it
    never reaches it on the grid (the crossing lies below the smallest σ).
    """
    above = (top1 >= level).nonzero().flatten()
    if above.numel() == 0:
        return math.nan
    j = int(above[0])
    if j == 0:
        return float(sigmas[0])
    s0, s1 = float(sigmas[j - 1]), float(sigmas[j])
    t0, t1 = float(top1[j - 1]), float(top1[j])
    return s0 + (level - t0) * (s1 - s0) / (t1 - t0)


@dataclass(frozen=True)
class PhaseProfile:
    """Mean top-1 oracle weight on forward-noised reference queries, as a function of σ.

    Attributes:
        sigmas: ``(G,)`` float64 grid, descending.
        top1: ``(G,)`` mean top-1 posterior weight at each σ.
        top1_std: ``(G,)`` standard deviation of the top-1 weight across the queries.
        boundary_sigma: σ* where ``top1`` crosses 0.5 (navigation above, refinement below).
        refinement_sigma: σ where ``top1`` reaches 0.9.
        label: the class the profile is restricted to, or ``None`` for the whole set.
        num_reference: samples the oracle weighs (N, or the class size).
        dim: flattened sample dimension D.
        num_queries: noised queries averaged per σ.
        acceleration: ``(G,)`` mean ``‖dx̂₀*/dσ‖/σ`` along the oracle ODE at each σ (see the
            module docstring), or None when not estimated (``acceleration=False``, or a profile
            built before the field existed).
    """

    sigmas: torch.Tensor
    top1: torch.Tensor
    top1_std: torch.Tensor
    boundary_sigma: float
    refinement_sigma: float
    label: int | None
    num_reference: int
    dim: int
    num_queries: int
    acceleration: torch.Tensor | None = None

    def sigma_at(self, level: float) -> float:
        """σ where the mean top-1 weight reaches ``level`` (see :func:`crossing_sigma`)."""
        if not (0.0 < float(level) <= 1.0):
            raise ValueError(f"level must lie in (0, 1], got {level}")
        return crossing_sigma(self.sigmas, self.top1, float(level))

    @classmethod
    def estimate(cls, reference: ReferenceSet, generator: torch.Generator | None = None, *,
                 sigmas: torch.Tensor | None = None, num_queries: int = 256,
                 label: int | None = None, oracle: EmpiricalOracle | None = None,
                 acceleration: bool = True) -> "PhaseProfile":
        """Estimate the profile of ``reference`` (optionally of one class ``label``).

        Args:
            reference: the reference set.
            generator: source of the query indices and noise (default: seed 0).
            sigmas: the σ grid (sorted descending here); default :func:`default_sigma_grid`.
            num_queries: noised queries per σ (drawn without replacement when N allows).
            label: restrict queries and posterior to this class.
            oracle: the oracle to use (default: the exact ``EmpiricalOracle(reference)``).
            acceleration: also estimate the ``acceleration`` curve (one more oracle pass per σ;
                ``from_profile``'s default grid needs it). The top-1 curve is the same either way.
        """
        if not isinstance(reference, ReferenceSet):
            raise TypeError(f"reference must be a steersample.ReferenceSet, got {type(reference).__name__}")
        num_queries = check_positive_int(num_queries, "num_queries")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        grid = _check_grid(sigmas)
        oracle = oracle if oracle is not None else EmpiricalOracle(reference)
        pool = reference.indices(label)
        n = pool.numel()
        if n >= num_queries:
            pick = pool[torch.randperm(n, generator=generator)[:num_queries]]
        else:
            pick = pool[torch.randint(n, (num_queries,), generator=generator)]
        x0 = reference.latents[pick.to(reference.latents.device)].to("cpu", torch.float64)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        # several σ per oracle call (per-sample σ), about _QUERY_ELEMENTS query values each
        per_call = max(1, _QUERY_ELEMENTS // (num_queries * reference.dim))
        weights, speeds = [], []
        ones = [1] * (x0.dim() - 1)
        for part in torch.split(grid, per_call):
            s = part.repeat_interleave(num_queries)          # σ-major: all queries at part[0], ...
            s_b = s.reshape(-1, *ones)
            x = (1.0 - s_b) * x0.repeat(part.numel(), *ones) + s_b * eps.repeat(part.numel(), *ones)
            if acceleration:
                out = oracle.evaluate(x, s, labels=label)
                post = out.posterior
                # one Euler step of the oracle ODE towards data, then the change of x̂₀* per unit σ
                delta = torch.clamp(s / 100, max=1e-4)
                d_b = delta.reshape(-1, *ones)
                x_next = x - d_b * out.velocity.to(x.dtype)
                moved = oracle.denoise(x_next, s - delta, labels=label).to("cpu", torch.float64)
                change = (moved - out.denoised.to("cpu", torch.float64)).flatten(1).norm(dim=1)
                speeds.append((change / (delta * s)).reshape(part.numel(), num_queries))
            else:
                post = oracle.posterior(x, s, labels=label)
            weights.append(post.top1.to("cpu", torch.float64).reshape(part.numel(), num_queries))
        weights = torch.cat(weights)
        top1 = weights.mean(1)
        stds = weights.std(1, unbiased=False)
        return cls(sigmas=grid, top1=top1, top1_std=stds,
                   boundary_sigma=crossing_sigma(grid, top1, 0.5),
                   refinement_sigma=crossing_sigma(grid, top1, 0.9),
                   label=label, num_reference=n, dim=reference.dim, num_queries=num_queries,
                   acceleration=torch.cat(speeds).mean(1) if acceleration else None)

    @classmethod
    def estimate_per_class(cls, reference: ReferenceSet, generator: torch.Generator | None = None, *,
                           sigmas: torch.Tensor | None = None, num_queries: int = 256,
                           oracle: EmpiricalOracle | None = None,
                           acceleration: bool = True) -> dict[int, "PhaseProfile"]:
        """One class-conditional profile per label, ``{label: PhaseProfile}`` in label order.

        The options mean what they mean in :meth:`estimate`; one generator feeds all classes.
        """
        if not isinstance(reference, ReferenceSet):
            raise TypeError(f"reference must be a steersample.ReferenceSet, got {type(reference).__name__}")
        if reference.classes is None:
            raise ValueError("per-class profiles need a labelled reference set; pass labels= to ReferenceSet")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        oracle = oracle if oracle is not None else EmpiricalOracle(reference)
        return {int(c): cls.estimate(reference, generator, sigmas=sigmas, num_queries=num_queries,
                                     label=int(c), oracle=oracle, acceleration=acceleration)
                for c in reference.classes}


def _check_grid(sigmas: torch.Tensor | None) -> torch.Tensor:
    if sigmas is None:
        return default_sigma_grid()
    grid = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if grid.numel() < 2:
        raise ValueError(f"sigmas needs at least 2 grid points, got {grid.numel()}")
    if bool(((grid <= 0) | (grid > 1) | ~torch.isfinite(grid)).any()):
        raise ValueError("every sigma in the grid must lie in (0, 1]; e.g. torch.linspace(1, 0.01, 50)")
    return torch.sort(grid, descending=True).values
