"""steersample: memorisation-aware sampling for flow-matching diffusion models.

Conventions (``SCIENCE.md``): noise level ``sigma`` in [0, 1], ``sigma = 1`` is pure noise,
``x_sigma = (1 - sigma) * x0 + sigma * eps``, models predict ``v = eps - x0``.

The top-level names are imported lazily, so ``import steersample`` stays light (no diffusers,
no FAISS, never gradio) until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (one table; the submodules own the code)
_EXPORTS: dict[str, str] = {
    "ReferenceSet": "steersample.reference",
    "ShardedReferenceSet": "steersample.sharded",
    "EmpiricalOracle": "steersample.oracle",
    "Posterior": "steersample.oracle",
    "PhaseProfile": "steersample.phases",
    "GuidanceSchedule": "steersample.guidance",
    "PhaseAwareFlowMatchScheduler": "steersample.scheduler",
    "ScheduledClassifierFreeGuidance": "steersample.guider",
    "StepState": "steersample.sampling",
    "Telemetry": "steersample.telemetry",
    "load_default": "steersample.default",
    "AttractorRepulsion": "steersample.attractor",
    "RepresentationSteering": "steersample.representation",
    "NoSteering": "steersample.steering",
}

# submodules reachable as attributes, e.g. ``ss.metrics.copy_rate``
_SUBMODULES = (
    "data",
    "reference",
    "oracle",
    "phases",
    "metrics",
    "schedules",
    "scheduler",
    "guidance",
    "guider",
    "sampling",
    "telemetry",
    "steering",
    "detect",
    "geometry",
    "default",
    "cli",
)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f"steersample.{name}")
    raise AttributeError(f"module 'steersample' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
