"""One adapter from "a model" to ``denoise_fn(x, sigma) -> x̂₀`` for the geometry tools.

``as_denoiser(model, labels=..., cond=...)`` accepts

* an :class:`~steersample.EmpiricalOracle` or a :class:`~steersample.ReferenceSet`: the
  closed-form x̂₀* = Σ_i γ_i x_i (SCIENCE.md §1), re-written here in plain differentiable torch
  ops (float64) so ``torch.func`` can take its Jacobian (the oracle itself streams through
  FAISS and float64 bookkeeping that autograd cannot see). ``labels=c`` restricts it to class c;
* a steered pipeline (anything with the loop's model adapter ``_model_fn(x, t, cond, branch)``,
  e.g. ``SteeredFlowPipeline``, ``SteeredStableDiffusion3Pipeline``, ``SteeredFluxPipeline``):
  v̂ = _model_fn(x, 1000σ, cond, "cond"); for ``SteeredFlowPipeline`` ``labels=c`` is enough;
* a diffusers transformer called as ``transformer(hidden_states=x, timestep=1000σ, **cond)``
  predicting v (e.g. ``DiTTransformer2DModel`` with ``labels=c``, i.e. ``cond={"class_labels":
  tensor([c])}``; extra output channels such as a learned variance are dropped).

For the velocity models, x̂₀ = x - σ·v̂ (the diffusers flow convention, v = ε - x₀). Every
conditioning tensor has one row; it is repeated when the model is called on a batch.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

import torch

__all__ = ["as_denoiser", "OracleDenoiser", "VelocityDenoiser"]


class OracleDenoiser:
    """Differentiable empirical-oracle denoiser over a reference set (optionally one class).

    ``x̂₀*(x, σ) = Σ_i γ_i x_i`` with ``γ = softmax_i((1 - σ) x·x_i - (1 - σ)²‖x_i‖²/2) / σ²)``
    (the softmax of -‖x - (1 - σ) x_i‖²/(2σ²) with the per-query constant ‖x‖²/(2σ²) removed),
    in float64, returned in x's dtype. ``top_k`` keeps only the K heaviest samples per query
    (the rest carries a negligible weight once σ is small); ``None`` uses all of them.
    """

    def __init__(self, reference: Any, label: int | None = None, top_k: int | None = None) -> None:
        from steersample.oracle.empirical import EmpiricalOracle
        from steersample.reference.reference_set import ReferenceSet

        if isinstance(reference, EmpiricalOracle):
            if top_k is None:
                top_k = reference.top_k
            reference = reference.reference
        if not isinstance(reference, ReferenceSet):
            raise TypeError(f"expected an EmpiricalOracle or ReferenceSet, got {type(reference).__name__}")
        rows = reference.indices(label)  # validates the label against the set's classes
        self.label = label
        self.sample_shape = reference.sample_shape
        self.points = reference.flat[rows.to(reference.flat.device)].to(torch.float64)
        self.squared_norms = self.points.square().sum(1)
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
                raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        self.top_k = None if top_k is None or top_k >= len(rows) else int(top_k)

    def __repr__(self) -> str:
        return (f"OracleDenoiser(N={self.points.shape[0]}, label={self.label}, "
                f"top_k={self.top_k})")

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        a = 1.0 - float(sigma)
        inv_s2 = 1.0 / float(sigma) ** 2
        points = self.points.to(x.device)
        q = x.reshape(x.shape[0], -1).to(torch.float64)
        logits = (a * q @ points.T - 0.5 * a * a * self.squared_norms.to(x.device)) * inv_s2
        if self.top_k is None:
            x0 = torch.softmax(logits, dim=1) @ points
        else:
            top, idx = torch.topk(logits, self.top_k, dim=1)
            x0 = torch.einsum("bk,bkd->bd", torch.softmax(top, dim=1), points[idx])
        return x0.reshape(x.shape).to(x.dtype)


class VelocityDenoiser:
    """x̂₀ = x - σ·v̂ for a velocity model ``velocity(x, sigma) -> v̂`` (diffusers convention)."""

    def __init__(self, velocity: Any, description: str) -> None:
        self.velocity = velocity
        self.description = description

    def __repr__(self) -> str:
        return f"VelocityDenoiser({self.description})"

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x - float(sigma) * self.velocity(x, float(sigma))


def as_denoiser(model: Any, *, labels: int | torch.Tensor | None = None,
                cond: Mapping[str, Any] | None = None, top_k: int | None = None):
    """Wrap ``model`` as ``denoise_fn(x, sigma) -> x̂₀`` (see the module docstring).

    Args:
        model: an ``EmpiricalOracle``/``ReferenceSet``, a steered pipeline, or a transformer.
        labels: one class id (int or one-element tensor): the oracle's class, or the
            ``class_labels`` of a class-conditional pipeline / transformer.
        cond: keyword tensors of the model call with one row each (e.g. SD3's
            ``encoder_hidden_states``, ``pooled_projections``, ``joint_attention_kwargs``).
        top_k: oracle only: keep the K heaviest reference samples per query.
    """
    from steersample.oracle.empirical import EmpiricalOracle
    from steersample.reference.reference_set import ReferenceSet

    label = _one_label(labels)
    if isinstance(model, (EmpiricalOracle, ReferenceSet)):
        if cond is not None:
            raise ValueError("cond does not apply to the oracle; restrict it with labels=class_id")
        return OracleDenoiser(model, label, top_k)
    if top_k is not None:
        raise ValueError("top_k applies to the oracle only; drop it for a model")
    if cond is None:
        cond = {} if label is None else {"class_labels": torch.tensor([label])}
    elif label is not None:
        raise ValueError("pass either labels=... or cond={'class_labels': ...}, not both")
    cond = dict(cond)

    model_fn = getattr(model, "_model_fn", None)
    if callable(model_fn) and hasattr(model, "transformer"):
        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            t = torch.tensor(1000.0 * sigma, device=x.device)
            return model_fn(x, t, _rows(cond, x), "cond")
        return VelocityDenoiser(velocity, f"{type(model).__name__}._model_fn")

    if isinstance(model, torch.nn.Module):
        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            dtype = next(model.parameters()).dtype
            t = torch.full((x.shape[0],), 1000.0 * sigma, device=x.device)
            out = model(hidden_states=x.to(dtype), timestep=t, return_dict=False, **_rows(cond, x))[0]
            return out[:, : x.shape[1]].to(x.dtype)
        return VelocityDenoiser(velocity, type(model).__name__)

    raise TypeError(
        f"as_denoiser cannot wrap {type(model).__name__}; pass an EmpiricalOracle or ReferenceSet, "
        f"a steered pipeline (SteeredFlowPipeline, ...) or a diffusers transformer predicting v; "
        f"or write denoise_fn(x, sigma) -> x0_hat yourself"
    )


def _rows(cond: Mapping[str, Any], x: torch.Tensor) -> dict[str, Any]:
    """Conditioning on x's device; one-row tensors repeated to x's batch size."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor):
            value = value.to(x.device)
            if value.dim() >= 1 and value.shape[0] == 1 and x.shape[0] > 1:
                value = value.expand(x.shape[0], *value.shape[1:])
        out[key] = value
    return out


def _one_label(labels: int | torch.Tensor | None) -> int | None:
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        if labels.numel() != 1 or labels.is_floating_point():
            raise ValueError(f"labels must be one integer class id, got a tensor of shape "
                             f"{tuple(labels.shape)} and dtype {labels.dtype}")
        return int(labels.item())
    if isinstance(labels, bool) or not isinstance(labels, numbers.Integral):
        raise TypeError(f"labels must be one integer class id, got {labels!r}")
    return int(labels)
