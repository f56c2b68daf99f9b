"""Argument handling shared by the steered pipelines (no loop here: that is ``steersample.sampling.loop``).

Every steered pipeline resolves its extra arguments the same way, before any model call:

- :func:`resolve_guidance`: ``guidance=`` (a ``GuidanceSchedule`` or a float) versus the stock
  scale argument (``guidance_scale`` for SD3 and the class-conditional pipeline,
  ``true_cfg_scale`` for Flux), which means ``GuidanceSchedule(scale=w)``;
- :func:`steersample.steering.registry.resolve_steering`: names or instances, reference requirements;
- :func:`check_reference`, :func:`check_latents`: shapes and finiteness;
- :func:`per_run_scheduler`: a copy of the pipeline's scheduler with its timesteps set, so that
  concurrent calls on one pipeline do not share scheduler state.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from diffusers.utils import BaseOutput

__all__ = [
    "SteeredPipelineOutput",
    "resolve_guidance",
    "check_reference",
    "check_latents",
    "check_num_inference_steps",
    "per_run_scheduler",
    "uses_uncond",
    "finish",
    "quiet_transformers",
    "wants_telemetry",
]


@dataclass
class SteeredPipelineOutput(BaseOutput):
    """Output of the steered pipelines.

    Attributes:
        images: as the stock pipeline returns them (list of PIL images, ``(B, H, W, C)`` numpy
            array, ``(B, C, H, W)`` tensor, or latents for ``output_type="latent"``).
        telemetry: ``steersample.Telemetry`` of the run (``return_telemetry`` left at its default
            or True); None when the call had ``return_telemetry=False``.
    """

    images: Any
    telemetry: Any = None


def resolve_guidance(guidance: Any, scale: float | None, default: float, scale_name: str):
    """The run's ``GuidanceSchedule`` from ``guidance=`` and the stock scale argument.

    The stock argument keeps its stock meaning, ``GuidanceSchedule.from_guidance_scale(w)``:
    CFG with scale ``w`` when ``w > 1``, no CFG otherwise (so any stock call gives stock
    output). ``guidance=w`` (a number) is ``GuidanceSchedule(scale=w)``, where every scale but
    exactly 1.0 is applied (``0 < w < 1``, ``w = 0``, and negative "opposite" guidance).

    Args:
        guidance: None, a number (constant scale), or a ``GuidanceSchedule``.
        scale: the stock argument's value (None when the caller did not pass it).
        default: the stock default of that argument.
        scale_name: its name, for error messages.

    Raises:
        ValueError: both are given and ``guidance`` is not the constant schedule ``scale`` means.
        TypeError: ``guidance`` is neither a number nor a schedule.
    """
    from steersample.sampling.guidance import GuidanceSchedule

    if guidance is not None and not isinstance(guidance, GuidanceSchedule):
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise TypeError(
                f"guidance must be a steersample.GuidanceSchedule or a number (constant scale), "
                f"got {type(guidance).__name__}: {guidance!r}"
            )
        guidance = GuidanceSchedule(scale=float(guidance))
    if guidance is None:
        return GuidanceSchedule.from_guidance_scale(default if scale is None else scale)
    if scale is not None and _constant_value(guidance) != max(float(scale), 1.0):
        raise ValueError(
            f"got both {scale_name}={scale!r} and guidance={guidance!r}, which disagree; pass only "
            f"one ({scale_name}=w means guidance=GuidanceSchedule(scale=w) for w > 1)"
        )
    return guidance


def _constant_value(guidance: Any) -> float | None:
    """The scale of a schedule that is constant on (0, 1], else None."""
    lo, hi = guidance.window
    values = {guidance.scale}
    if hi < 1.0:
        values.add(guidance.scale_above)
    if lo > 0.0:
        values.add(guidance.scale_below)
    return values.pop() if len(values) == 1 else None


def uses_uncond(guidance: Any, sigmas: torch.Tensor) -> bool:
    """True when ``guidance`` needs an unconditional pass at any of the run's step sigmas."""
    return any(guidance.needs_uncond(s) for s in sigmas[:-1].tolist())


def check_reference(reference: Any, shape: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``reference.latents`` has per-sample shape ``shape``."""
    if reference is None:
        return
    latents = getattr(reference, "latents", None)
    if not isinstance(latents, torch.Tensor):
        raise TypeError(
            f"reference must be a steersample.ReferenceSet, got {type(reference).__name__}"
        )
    if tuple(latents.shape[1:]) != tuple(shape):
        raise ValueError(
            f"reference latents have per-sample shape {tuple(latents.shape[1:])}, but this call's "
            f"latents have shape {tuple(shape)}; build the ReferenceSet from latents of the same "
            "size (same height/width, the pipeline's latent space: VAE latents scaled as the "
            "transformer sees them, or pixels in [-1, 1] without a VAE)"
        )


def check_reference_labels(reference_labels: Any, batch_size: int, num_samples: int,
                           reference: Any) -> torch.Tensor | None:
    """``(num_samples,)`` int64 reference class ids of a text call's samples, or None.

    ``reference_labels`` names, per prompt (``batch_size`` entries, repeated for each image of
    the prompt) or per sample (``num_samples``), the class of the labelled reference set the
    prompt asks for, so that steerers acting per class (``NoveltySteering``, the scarce-class
    delay of ``AttractorRepulsion``) and telemetry treat text prompts like class labels.
    """
    if reference_labels is None:
        return None
    if reference is None or getattr(reference, "labels", None) is None:
        raise ValueError(
            "reference_labels needs reference=ReferenceSet(latents, labels) with class labels "
            "(the store's labels, e.g. prompt ids); pass a labelled reference or drop reference_labels"
        )
    labels = torch.as_tensor(reference_labels).reshape(-1)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise ValueError(f"reference_labels must be integer class ids, e.g. [2, 7]; got {reference_labels!r}")
    if labels.numel() == batch_size and num_samples != batch_size:
        labels = labels.repeat_interleave(num_samples // batch_size)
    if labels.numel() != num_samples:
        raise ValueError(
            f"reference_labels has {labels.numel()} entries; pass one per prompt ({batch_size}) or one "
            f"per generated image ({num_samples})"
        )
    known = torch.unique(reference.labels.detach().cpu())
    unknown = sorted(set(labels.tolist()) - set(known.tolist()))
    if unknown:
        raise ValueError(
            f"reference_labels {unknown} are not labels of the reference set (it has "
            f"{known.tolist()[:20]}{' ...' if known.numel() > 20 else ''}); use the store's class ids"
        )
    return labels.long()


def check_latents(latents: torch.Tensor | None, shape: Sequence[int] | None = None) -> None:
    """Raise ``ValueError`` if user ``latents`` contain NaN/inf or do not have ``shape``."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if shape is not None and tuple(latents.shape) != tuple(shape):
        raise ValueError(
            f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)} for this call "
            "(batch size x latent shape); pass matching latents or leave latents=None"
        )
    if not torch.isfinite(latents).all():
        raise ValueError(
            "latents contain NaN or infinite values; pass finite initial noise "
            "(e.g. torch.randn with a generator) or leave latents=None"
        )


def check_num_inference_steps(num_inference_steps: Any, sigmas: Any = None) -> None:
    """Raise unless ``num_inference_steps`` is a positive integer (it is not read when ``sigmas``
    is given: the grid is then ``sigmas``, as in the stock pipelines).

    Without this, 0 or a negative count reaches NumPy's ``linspace`` ("Number of samples, -3,
    must be non-negative") or builds an empty grid."""
    if sigmas is not None:
        return
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
        raise TypeError(
            f"num_inference_steps must be a positive integer, got "
            f"{type(num_inference_steps).__name__}: {num_inference_steps!r}"
        )
    if num_inference_steps < 1:
        raise ValueError(
            f"num_inference_steps must be at least 1, got {num_inference_steps}; pass a positive "
            "number of denoising steps (e.g. 28), or the sigma grid itself with sigmas=[...]"
        )


@contextlib.contextmanager
def quiet_transformers():
    """Transformers' logger at ERROR for the duration of one import, then restored.

    Importing diffusers' SD3 pipeline module (for ``retrieve_timesteps``) builds transformers'
    CLIP/SigLIP image processors, which warn on every run that torchvision is missing; none of
    that concerns a steered pipeline's timesteps."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - diffusers without transformers
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def per_run_scheduler(
    scheduler: Any,
    num_inference_steps: int | None,
    device: torch.device | str,
    sigmas: Sequence[float] | None = None,
    **kwargs: Any,
):
    """A deep copy of ``scheduler`` with timesteps set (``retrieve_timesteps`` semantics).

    Returns ``(scheduler_copy, timesteps)``. The copy keeps the run's step index and sigma grid
    off the shared pipeline, so one pipeline can serve concurrent calls.
    """
    with quiet_transformers():
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            retrieve_timesteps,
        )

    run_scheduler = copy.deepcopy(scheduler)
    timesteps, _ = retrieve_timesteps(
        run_scheduler, num_inference_steps, device, sigmas=sigmas, **kwargs
    )
    return run_scheduler, timesteps


def wants_telemetry(return_dict: bool, return_telemetry: bool | None) -> bool:
    """Whether the run records telemetry. ``return_telemetry=None`` (the default) means: attach it
    to the output object (``output.telemetry``), but keep the stock ``(images,)`` tuple for
    ``return_dict=False`` (so nothing is recorded that nobody receives); True/False force it.
    With a reference set, recording includes the exact oracle's top-1 weight at every step
    (about 6 ms per step for 320 samples on the embedded default's 940 references, CPU);
    pass ``return_telemetry=False`` for the fastest call."""
    if return_telemetry is None:
        return bool(return_dict)
    if not isinstance(return_telemetry, bool):
        raise TypeError(f"return_telemetry must be True, False or None, got {return_telemetry!r}")
    return return_telemetry


def finish(images: Any, telemetry: Any, return_dict: bool, return_telemetry: bool | None):
    """Stock-shaped return value: an output object (with ``telemetry``), or ``(images,)``, or
    ``(images, telemetry)`` for ``return_dict=False, return_telemetry=True``."""
    if not return_dict:
        return (images, telemetry) if return_telemetry else (images,)
    return SteeredPipelineOutput(images=images, telemetry=telemetry)
