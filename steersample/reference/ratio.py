"""The ratio copy test on nearest-neighbour distances (SCIENCE.md §6).

    ratio(x) = ||x - NN_1(x)|| / ||x - NN_2(x)||        (0/0 := 0: an exact copy of a duplicate)
    copy(x)  = ratio(x) < 1/3

Kept beside the reference set because both the loop's telemetry and the evaluation metrics
(``steersample.evaluation.metrics.nn_ratio``) compute it from ``ReferenceSet.nearest``.
"""

from __future__ import annotations

import torch

__all__ = ["COPY_THRESHOLD", "ratio_from_distances"]

COPY_THRESHOLD = 1.0 / 3.0


def ratio_from_distances(dist: torch.Tensor) -> torch.Tensor:
    """``(B, >=2)`` ascending neighbour distances -> ``(B,)`` float64 d1 / d2 (0 where d2 = 0)."""
    dist = torch.as_tensor(dist).to(torch.float64)
    d1, d2 = dist[:, 0], dist[:, 1]
    return torch.where(d2 > 0, d1 / torch.where(d2 > 0, d2, torch.ones_like(d2)), torch.zeros_like(d1))
