"""The recommended steering: what ``steersample compare``'s steered run, the studio's best preset
and a user's pipeline call share.

    kw = ss.recommended_steering(reference, scale=4.0)
    out = pipe(class_labels=labels, reference=reference, **kw)   # guidance=..., steering=[...]

One function so that the CLI, the studio and the README cannot drift apart; it is the setting
``steersample audit`` ranks best on the embedded default (README, "Memorisation steering,
measured"), with defaults derived from the reference set rather than tuned to one data set.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from steersample.reference.reference_set import ReferenceSet
from steersample.sampling.guidance import GuidanceSchedule
from steersample.steering.attractor import AttractorRepulsion
from steersample.steering.novelty import NoveltySteering

__all__ = ["recommended_steering", "recommended_for_scale", "RECOMMENDED_STRENGTH",
           "NAVIGATION_SIGMA"]

RECOMMENDED_STRENGTH = 0.5   # AttractorRepulsion's, for reference sets without class labels
NAVIGATION_SIGMA = 0.6       # with class labels: CFG only for σ > this, unconditional below


def recommended_steering(reference: ReferenceSet, scale: float = 4.0) -> dict[str, Any]:
    """Keyword arguments ``{"guidance": GuidanceSchedule, "steering": [steerers]}`` for a
    steered pipeline call at CFG ``scale`` against the training set ``reference``.

    With class labels on the reference set (a class-conditional model's training set, or a
    prompt model's store whose labels name the prompts): CFG ``scale`` in navigation only
    (σ > :data:`NAVIGATION_SIGMA`, the unconditional prediction below: the frequent classes,
    over-saturated by CFG 4 throughout, come closer to held-out data) plus
    :class:`NoveltySteering` (scarce classes held at the distance unseen data has from the
    training set; it replaces their prediction below σ 0.9, so the window does not touch them;
    the audit's best on the digits default and on the prompt testbed by the data-copying
    test). Without labels: constant CFG plus ``AttractorRepulsion(strength=0.5)``
    (NoveltySteering needs classes; AttractorRepulsion was measured with constant CFG).

    Raises:
        TypeError: ``reference`` is not a ReferenceSet (steering reads the training set).
        ValueError: ``scale`` is not a finite number.
    """
    if not isinstance(reference, ReferenceSet):
        raise TypeError(f"reference must be a steersample.ReferenceSet (the training set), got "
                        f"{type(reference).__name__}; build one with ss.ReferenceSet(latents, labels)")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (the CFG scale), got {scale!r}")
    return recommended_for_scale(float(scale), labelled=reference.labels is not None)


def recommended_for_scale(scale: float, labelled: bool = True) -> dict[str, Any]:
    """:func:`recommended_steering` for a reference set with (``labelled``) or without class
    labels, for callers that build settings before the reference set is loaded (the reference
    is passed to the pipeline call, not held by the steerers)."""
    if not labelled:
        return {"guidance": GuidanceSchedule.constant(scale),
                "steering": [AttractorRepulsion(strength=RECOMMENDED_STRENGTH)]}
    return {"guidance": GuidanceSchedule(scale=scale, window=(NAVIGATION_SIGMA, 1.0), scale_below=0.0),
            "steering": [NoveltySteering()]}
