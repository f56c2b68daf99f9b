"""Copy tests against a reference set (SCIENCE.md §6).

The ratio test compares each sample's distance to its nearest reference sample with the
distance to the second nearest:

    ratio(x) = ||x - NN_1(x)|| / ||x - NN_2(x)||        (0/0 := 0: an exact copy of a duplicate)
    copy(x)  = ratio(x) < 1/3

A sample sitting on one training image is much closer to it than to any other (ratio near 0);
a novel sample is roughly equidistant from its two nearest neighbours (ratio near 1).
"""

from __future__ import annotations

import torch

from steersample.reference import ReferenceSet

__all__ = ["COPY_THRESHOLD", "nn_ratio", "copy_rate",
           # judge (steersample.judge)
           "class_accuracy", "classify", "copy_flags", "digit_features", "diversity",
           "frechet_distance", "judge", "judge_classifier"]

COPY_THRESHOLD = 1.0 / 3.0


def nn_ratio(samples: torch.Tensor, reference: ReferenceSet,
             labels: int | torch.Tensor | None = None) -> torch.Tensor:
    """d(NN_1) / d(NN_2) for each sample, ``(B,)`` float64, against ``reference``.

    Args:
        samples: ``(B, *shape)``, the same sample shape as the reference.
        reference: at least two reference samples (per label when ``labels`` is given).
        labels: optional per-sample class restriction of the neighbours.
    """
    if not isinstance(reference, ReferenceSet):
        raise TypeError(
            f"reference must be a steersample.ReferenceSet, got {type(reference).__name__}; "
            f"wrap your tensor: ReferenceSet(latents)"
        )
    if len(reference) < 2:
        raise ValueError("the ratio test needs at least 2 reference samples; add more reference samples")
    dist, _ = reference.nearest(samples, k=2, labels=labels)
    dist = dist.to(torch.float64)
    d1, d2 = dist[:, 0], dist[:, 1]
    return torch.where(d2 > 0, d1 / torch.where(d2 > 0, d2, torch.ones_like(d2)), torch.zeros_like(d1))


def copy_rate(samples: torch.Tensor, reference: ReferenceSet,
              labels: int | torch.Tensor | None = None,
              threshold: float = COPY_THRESHOLD) -> float:
    """Share of samples whose :func:`nn_ratio` is below ``threshold`` (default 1/3)."""
    ratio = nn_ratio(samples, reference, labels)
    return float((ratio < threshold).to(torch.float64).mean())

# the independent judge of generated digits (steersample.judge), reachable as ss.metrics.*
from steersample.judge import (class_accuracy, classify, copy_flags, digit_features,  # noqa: E402
                               diversity, frechet_distance, judge, judge_classifier)
