"""Small validation helpers shared by the public entry points.

Every helper raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, bad
value) with a message that names the offending argument, what was received, and how to fix it.
They never use ``assert`` (asserts vanish under ``python -O``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "check_tensor",
    "check_floating",
    "check_finite",
    "check_sample_shape",
    "check_sigma",
    "check_labels",
    "check_positive_int",
]


def check_tensor(value: object, name: str) -> torch.Tensor:
    """Return ``value`` if it is a ``torch.Tensor``, else raise ``TypeError`` with the fix."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(value).__name__}; "
            f"convert it first, e.g. {name} = torch.as_tensor({name}, dtype=torch.float32)"
        )
    return value


def check_floating(value: torch.Tensor, name: str) -> torch.Tensor:
    """Require a floating-point tensor (latents and queries are real vectors)."""
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {value.dtype}; "
            f"cast it with {name}.float()"
        )
    return value


def check_finite(value: torch.Tensor, name: str) -> torch.Tensor:
    """Raise ``ValueError`` if ``value`` holds any NaN or Inf, naming how many and where."""
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        first = tuple(int(i) for i in (~finite).nonzero()[0])
        raise ValueError(
            f"{name} contains {bad} NaN/Inf value(s) (first at index {first}); "
            f"remove or repair those entries (e.g. torch.nan_to_num) before calling"
        )
    return value


def check_sample_shape(x: torch.Tensor, shape: Sequence[int], name: str = "x",
                       against: str = "the reference set") -> torch.Tensor:
    """Require ``x`` of shape ``(B, *shape)`` with ``B >= 1``."""
    shape = tuple(int(s) for s in shape)
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but {against} holds samples of shape {shape}; "
            f"pass a batch of shape (B, {', '.join(map(str, shape))})"
            + (" (add a batch dimension with x.unsqueeze(0))" if tuple(x.shape) == shape else "")
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); pass at least one sample")
    return x


def check_sigma(sigma: object, batch: int, *, device: torch.device | str | None = None,
                name: str = "sigma") -> torch.Tensor:
    """Return ``sigma`` as a float64 tensor of shape ``(batch,)``, each value in (0, 1].

    Accepts a Python number, a 0-d tensor, or a tensor of shape ``(batch,)`` (one noise level per
    sample). ``sigma = 1`` is pure noise; ``sigma = 0`` would be data and has no posterior, so it
    is rejected.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (numbers.Real, torch.Tensor)):
        raise TypeError(
            f"{name} must be a float or a (B,) tensor, got {type(sigma).__name__}; "
            f"pass e.g. {name}=0.5 or {name}=torch.full((B,), 0.5)"
        )
    if isinstance(sigma, torch.Tensor):
        if sigma.is_complex() or sigma.dtype == torch.bool:
            raise TypeError(f"{name} must be a real tensor, got dtype {sigma.dtype}")
        s = sigma.detach().to(device=device, dtype=torch.float64)
        if s.dim() == 0:
            s = s.expand(batch)
        elif s.dim() != 1 or s.shape[0] != batch:
            raise ValueError(
                f"{name} has shape {tuple(sigma.shape)} but the batch has {batch} sample(s); "
                f"pass a float or a tensor of shape ({batch},)"
            )
    else:
        s = torch.full((batch,), float(sigma), dtype=torch.float64, device=device)
    bad = ~((s > 0) & (s <= 1))  # also catches NaN
    if bool(bad.any()):
        value = s[bad][0].item()
        raise ValueError(
            f"{name} must lie in (0, 1] (1 = pure noise, values near 0 = data), got {value}; "
            f"clamp it, e.g. {name}.clamp(1e-4, 1.0)"
        )
    return s.contiguous()


def check_labels(labels: object, batch: int, known: torch.Tensor | None,
                 name: str = "labels") -> torch.Tensor | None:
    """Return per-sample integer labels of shape ``(batch,)`` (int64) or ``None``.

    ``labels`` may be ``None`` (no restriction), an ``int`` (the same class for every sample) or
    an integer tensor of shape ``(batch,)``. ``known`` is the sorted tensor of classes present
    in the reference set, or ``None`` when the reference set is unlabelled.
    """
    if labels is None:
        return None
    if known is None:
        raise ValueError(
            f"{name} were given but the reference set has no labels; build it with "
            f"ReferenceSet(latents, labels=...) or call without {name}"
        )
    if isinstance(labels, bool) or not isinstance(labels, (numbers.Integral, torch.Tensor)):
        raise TypeError(
            f"{name} must be an int or an integer tensor of shape ({batch},), "
            f"got {type(labels).__name__}"
        )
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}; use {name}.long()")
        lab = labels.detach().to("cpu", torch.int64)
        if lab.dim() == 0:
            lab = lab.expand(batch)
        elif lab.dim() != 1 or lab.shape[0] != batch:
            raise ValueError(
                f"{name} has shape {tuple(labels.shape)} but the batch has {batch} sample(s); "
                f"pass an int or a tensor of shape ({batch},)"
            )
    else:
        lab = torch.full((batch,), int(labels), dtype=torch.int64)
    unknown = ~torch.isin(lab, known.to("cpu", torch.int64))
    if bool(unknown.any()):
        raise ValueError(
            f"unknown label {int(lab[unknown][0])} in {name}; the reference set has classes "
            f"{_short_list(known)}; pass one of those (or labels=None for the whole set)"
        )
    return lab.contiguous()


def check_positive_int(value: object, name: str) -> int:
    """Require a positive Python/NumPy integer (not bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {int(value)}")
    return int(value)


def _short_list(values: torch.Tensor, limit: int = 20) -> str:
    items = [int(v) for v in values.flatten()[:limit]]
    more = "" if values.numel() <= limit else f", ... ({values.numel()} in all)"
    return "[" + ", ".join(map(str, items)) + more + "]"
