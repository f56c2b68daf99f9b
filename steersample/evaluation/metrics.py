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

from steersample.reference.ratio import COPY_THRESHOLD, ratio_from_distances
from steersample.reference.reference_set import ReferenceSet

# novelty against held-out data (Meehan et al. 2020; Kynkäänniemi et al. 2019)
from steersample.evaluation.novelty import (DataCopying, PrecisionRecall, data_copying,
                                            nearest_training_distance, precision_recall,
                                            relative_distance)

__all__ = ["COPY_THRESHOLD", "nn_ratio", "copy_rate", "data_copying", "DataCopying",
           "precision_recall", "PrecisionRecall", "relative_distance", "nearest_training_distance"]


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
    return ratio_from_distances(dist)


def copy_rate(samples: torch.Tensor, reference: ReferenceSet,
              labels: int | torch.Tensor | None = None,
              threshold: float = COPY_THRESHOLD) -> float:
    """Share of samples whose :func:`nn_ratio` is below ``threshold`` (default 1/3)."""
    ratio = nn_ratio(samples, reference, labels)
    return float((ratio < threshold).to(torch.float64).mean())


# steersample 0.1 re-exported the digit judge here (ss.metrics.classify, ...); that name now lives
# in steersample.evaluation.judge only and is forwarded, with a warning, for one release
_JUDGE_NAMES = ("class_accuracy", "classify", "copy_flags", "digit_features", "diversity",
                "frechet_distance", "judge", "judge_classifier")


def __getattr__(name: str):
    if name in _JUDGE_NAMES:
        import importlib
        import warnings

        warnings.warn(f"steersample.metrics.{name} moved to steersample.evaluation.judge.{name}; "
                      "import it from there (the alias goes away in the next release)",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("steersample.evaluation.judge"), name)
    raise AttributeError(f"module 'steersample.evaluation.metrics' has no attribute {name!r}")
