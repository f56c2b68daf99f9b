"""The empirical oracle: the exact posterior over a reference set, and the phase profile.

``EmpiricalOracle`` (``empirical``; kernels in ``_math``, the top-k tail estimate in ``_tail``)
gives the memorising denoiser x̂₀* and velocity v*; ``PhaseProfile`` (``phases``) finds the
navigation -> refinement boundary σ*. Built on ``steersample.reference``.
"""

from __future__ import annotations

from steersample._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "EmpiricalOracle": "steersample.oracle.empirical",
    "Posterior": "steersample.oracle.empirical",
    "OracleOutput": "steersample.oracle.empirical",
    "PhaseProfile": "steersample.oracle.phases",
    "default_sigma_grid": "steersample.oracle.phases",
    "crossing_sigma": "steersample.oracle.phases",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
