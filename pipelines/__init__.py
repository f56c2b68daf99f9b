"""Steered diffusers pipelines, installed as ``steersample.pipelines``.

Each pipeline file also loads on its own as a diffusers custom pipeline, so the files use
absolute imports only.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SteeredFlowPipeline": "steersample.pipelines.pipeline_steered_flow",
    "SteeredStableDiffusion3Pipeline": "steersample.pipelines.pipeline_steered_sd3",
    "SteeredFluxPipeline": "steersample.pipelines.pipeline_steered_flux",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'steersample.pipelines' has no attribute {name!r}")
