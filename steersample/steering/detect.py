"""Memorisation detectors: per-sample scores recorded in telemetry at every step.

A detector is a passive steerer (it returns the prediction unchanged) whose telemetry holds one
score per sample; pass it with the steerers, ``steering=[..., ConditionalDeviation()]``, and read
``out.telemetry.steps[i].scores["<name>.score"]``. Higher means "more likely a copy".

=========================  =================================================================
``ConditionalDeviation``   ‖v_cond − v_uncond‖₂ per sample (Wen et al., ICLR 2024,
                           arXiv 2407.21720); reference-free; NaN at steps where guidance
                           skipped the unconditional pass.
``SpikinessDetector``      std across channels of the per-channel token max of a hooked
                           transformer block (Zhang et al., arXiv 2512.20963); reference-free.
``PosteriorConcentration`` top-1 weight of the empirical-oracle posterior of (x_σ, σ) over the
                           sample's nearest reference samples (Liu et al., arXiv 2512.02826);
                           needs ``reference=``.
=========================  =================================================================

Scores over the first k steps are combined by :func:`aggregate` (mean over the steps seen, as
Wen et al. average over steps); :func:`auroc` and :func:`tpr_at_fpr` evaluate a score against
copy labels (TPR at 1 % FPR: the threshold is the 99th percentile of the non-copies' scores, as
in Zhang et al.'s code); :func:`detection_curve` does both for every k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from steersample.steering.hull import class_neighbour_count, nearest
from steersample.steering.representation import RepresentationRun
from steersample.sampling.protocol import SteeringOutput

if TYPE_CHECKING:  # pragma: no cover
    from steersample.sampling.protocol import StepState
    from steersample.sampling.telemetry import Telemetry

__all__ = [
    "ConditionalDeviation",
    "SpikinessDetector",
    "PosteriorConcentration",
    "DETECTORS",
    "score_matrix",
    "aggregate",
    "auroc",
    "tpr_at_fpr",
    "DetectionPoint",
    "detection_curve",
]


class ConditionalDeviation:
    """Wen et al.'s detector for flow models: ``score = ‖v_cond − v_uncond‖₂`` per sample.

    Reference-free. Needs the unconditional pass, i.e. a guidance scale ≠ 1 at the step (with
    guidance skipped the score is NaN at that step).
    """

    name: ClassVar[str] = "cond_deviation"
    needs_reference: ClassVar[bool] = False

    def __repr__(self) -> str:
        return "ConditionalDeviation()"

    def __call__(self, state: "StepState") -> SteeringOutput:
        if state.pred_uncond is None:
            score = torch.full((state.latents.shape[0],), math.nan)
        else:
            diff = (state.pred_cond - state.pred_uncond).detach().flatten(1).float()
            score = diff.norm(dim=1).cpu()
        return SteeringOutput(state.pred, {"score": score})


class SpikinessDetector:
    """Zhang et al.'s representation spikiness of each sample at each step, reference-free.

    Hooks the blocks ``layers`` (default: the middle transformer block) for the run; the score
    is the spikiness of the conditional pass (see ``steersample.steering.representation``).
    """

    name: ClassVar[str] = "spikiness"
    needs_reference: ClassVar[bool] = False
    strength: ClassVar[float] = 0.0      # read by the run: record only, never damp
    sigma_max: ClassVar[float] = 0.0
    spread: ClassVar[float] = 0.0

    def __init__(self, layers: Sequence[str] | None = None) -> None:
        if layers is not None:
            layers = (layers,) if isinstance(layers, str) else tuple(layers)
        self.layers = layers

    def __repr__(self) -> str:
        return f"SpikinessDetector(layers={self.layers})"

    def bind(self, pipeline: Any) -> "_SpikinessRun":
        model = pipeline if isinstance(pipeline, torch.nn.Module) else getattr(pipeline, "transformer", None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                "SpikinessDetector hooks the model's transformer blocks, so it needs the pipeline: "
                "call it through a steered pipeline (steering=[...]) or sample(..., pipeline=pipe)"
            )
        return _SpikinessRun(self, model)

    def __call__(self, state: "StepState") -> SteeringOutput:
        raise ValueError(
            "SpikinessDetector was called without a run: pass it in a steered pipeline's "
            "steering=[...] so the loop binds it to the model"
        )


class _SpikinessRun(RepresentationRun):
    def __call__(self, state: "StepState") -> SteeringOutput:
        out = super().__call__(state)
        return SteeringOutput(out.prediction, {"score": out.telemetry["spikiness"]})


class PosteriorConcentration:
    """Reference-aware: top-1 posterior weight of the empirical oracle at (x_σ, σ).

    γ_k ∝ exp(−‖x_σ/(1 − σ) − x⁽ᵏ⁾‖² / (2 (σ/(1 − σ))²)) over the ``neighbours`` nearest
    reference samples (of the sample's class when labelled); outside them the posterior mass is
    negligible once it concentrates, which is what the score is for. Needs ``reference=``.
    """

    name: ClassVar[str] = "posterior"
    needs_reference: ClassVar[bool] = True

    def __init__(self, neighbours: int = 8) -> None:
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 2:
            raise ValueError(f"neighbours must be an int >= 2, got {neighbours!r}")
        self.neighbours = neighbours

    def __repr__(self) -> str:
        return f"PosteriorConcentration(neighbours={self.neighbours})"

    def __call__(self, state: "StepState") -> SteeringOutput:
        reference = state.reference
        if reference is None:
            raise ValueError(
                "PosteriorConcentration needs a reference set: pass "
                "reference=steersample.ReferenceSet(latents, labels) to the pipeline call"
            )
        batch, sigma = state.latents.shape[0], float(state.sigma)
        if sigma >= 1.0 - 1e-6:
            return SteeringOutput(state.pred, {"score": torch.zeros(batch, dtype=torch.float64)})
        k, labels = class_neighbour_count(reference, state.labels, self.neighbours)
        y = state.layout.unpack(state.latents).detach().float() / (1.0 - sigma)
        dist, _ = nearest(reference, y, k, labels)
        noise = sigma / (1.0 - sigma)
        logits = -dist.square() / (2.0 * noise * noise)
        return SteeringOutput(state.pred, {"score": torch.softmax(logits, dim=1)[:, 0]})


DETECTORS: dict[str, type] = {
    cls.name: cls for cls in (ConditionalDeviation, SpikinessDetector, PosteriorConcentration)
}
"""Detector name -> class (the telemetry key is ``"<name>.score"``)."""


# ----------------------------------------------------------------------------- evaluation
def score_matrix(telemetry: "Telemetry", name: str) -> torch.Tensor:
    """``(S, B)`` float64 scores of detector ``name`` from a run's telemetry."""
    key = f"{name}.score"
    rows = [step.scores.get(key) for step in telemetry.steps]
    if not rows or any(r is None for r in rows):
        known = sorted({k for s in telemetry.steps for k in s.scores})
        raise ValueError(f"telemetry has no {key!r} at every step; recorded scores: {known}")
    return torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in rows])


def aggregate(scores: torch.Tensor, steps: int) -> torch.Tensor:
    """Mean over the first ``steps`` rows of ``(S, B)`` scores, ignoring NaN; ``(B,)``."""
    if not 1 <= steps <= scores.shape[0]:
        raise ValueError(f"steps must lie in 1..{scores.shape[0]}, got {steps}")
    seen = scores[:steps]
    finite = torch.isfinite(seen)
    total = torch.where(finite, seen, torch.zeros_like(seen)).sum(0)
    count = finite.sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def _check_binary(scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    positive = torch.as_tensor(positive).reshape(-1).bool()
    if scores.shape != positive.shape:
        raise ValueError(f"got {scores.numel()} scores but {positive.numel()} labels")
    return scores, positive


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (NaN scores rank lowest).

    Equals P(score of a random positive > score of a random negative) + ½ P(tie); NaN when one
    class is empty.
    """
    scores, positive = _check_binary(scores, positive)
    if bool(positive.all()) or not bool(positive.any()):
        return math.nan
    s = torch.nan_to_num(scores, nan=-math.inf)
    pos, neg = s[positive], s[~positive]
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def tpr_at_fpr(scores: torch.Tensor, positive: torch.Tensor, fpr: float = 0.01) -> float:
    """True-positive rate at the threshold that the top ``fpr`` of negatives exceed.

    The threshold is the ``1 − fpr`` quantile of the negatives' scores (Zhang et al.'s 99th
    percentile at 1 %); a positive counts when its score is strictly above it.
    """
    scores, positive = _check_binary(scores, positive)
    if bool(positive.all()) or not bool(positive.any()):
        return math.nan
    s = torch.nan_to_num(scores, nan=-math.inf)
    neg = s[~positive]
    threshold = torch.quantile(neg[torch.isfinite(neg)], 1.0 - fpr) if bool(torch.isfinite(neg).any()) \
        else torch.tensor(-math.inf, dtype=torch.float64)
    return float((s[positive] > threshold).double().mean())


@dataclass(frozen=True)
class DetectionPoint:
    """AUROC and TPR at 1 % FPR of a detector after ``steps`` steps (``fraction`` of the run)."""

    steps: int
    fraction: float
    auroc: float
    tpr_at_1pct: float


def detection_curve(scores: torch.Tensor, positive: torch.Tensor) -> tuple[DetectionPoint, ...]:
    """One :class:`DetectionPoint` per number of steps seen, ``k = 1 .. S`` (scores ``(S, B)``)."""
    total = scores.shape[0]
    points = []
    for k in range(1, total + 1):
        agg = aggregate(scores, k)
        points.append(DetectionPoint(k, k / total, auroc(agg, positive), tpr_at_fpr(agg, positive)))
    return tuple(points)
