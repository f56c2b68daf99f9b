"""steersample: memorisation-aware sampling for flow-matching diffusion models.

Conventions (``SCIENCE.md``): noise level ``sigma`` in [0, 1], ``sigma = 1`` is pure noise,
``x_sigma = (1 - sigma) * x0 + sigma * eps``, models predict ``v = eps - x0``.

Layout (each package imports only those above it)::

    reference/   ReferenceSet, sharded stores, FAISS indexes, the VAE encoder
    oracle/      EmpiricalOracle (exact, top-k, tail), PhaseProfile
    sampling/    the denoising loop and steerer protocol, sigma grids, scheduler, guidance, telemetry
    steering/    the steerer registry, AttractorRepulsion (+ hull), RepresentationSteering, detectors
    evaluation/  metrics (copy tests), the independent judge, the audit
    geometry/    local dimension, ridges, traces
    commands/    `steersample ...` (cli.py builds the parser)

The top-level names are imported lazily, so ``import steersample`` stays light (no diffusers,
no FAISS, never gradio) until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from steersample import _moved
from steersample._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it (one table; the submodules own the code)
_EXPORTS: dict[str, str] = {
    "ReferenceSet": "steersample.reference.reference_set",
    "ShardedReferenceSet": "steersample.reference.sharded",
    "EmpiricalOracle": "steersample.oracle.empirical",
    "Posterior": "steersample.oracle.empirical",
    "PhaseProfile": "steersample.oracle.phases",
    "GuidanceSchedule": "steersample.sampling.guidance",
    "PhaseAwareFlowMatchScheduler": "steersample.sampling.scheduler",
    "ScheduledClassifierFreeGuidance": "steersample.sampling.guider",
    "StepState": "steersample.sampling.loop",
    "SteeringOutput": "steersample.sampling.protocol",
    "Telemetry": "steersample.sampling.telemetry",
    "load_default": "steersample.default",
    "AttractorRepulsion": "steersample.steering.attractor",
    "RepresentationSteering": "steersample.steering.representation",
    "NoveltySteering": "steersample.steering.novelty",
    "NoSteering": "steersample.sampling.protocol",
    "recommended_steering": "steersample.steering.recommended",
}

# modules reachable as attributes, e.g. ``ss.metrics.copy_rate``
_SUBMODULES: dict[str, str] = {
    name: f"steersample.{name}"
    for name in ("data", "reference", "oracle", "sampling", "steering", "evaluation", "geometry",
                 "default", "cli")
}
_SUBMODULES["metrics"] = "steersample.evaluation.metrics"

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)

_getattr, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES)
_moved.install()


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS and name not in _SUBMODULES and f"steersample.{name}" in _moved.MOVED:
        # 0.1's flat modules as attributes (ss.schedules): deprecated, warns via the finder
        return importlib.import_module(f"steersample.{name}")
    return _getattr(name)
