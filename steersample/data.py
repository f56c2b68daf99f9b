"""The bundled 8x8 digits and a deterministic train / held-out split.

``load_digits()`` reads scikit-learn's bundled copy of the UCI optical digits (1,797 images,
no download) and scales pixel values 0..16 linearly to [-1, 1]:

    image = pixels / 8 - 1          shape (1797, 1, 8, 8), float32; labels (1797,), int64

``split_indices(labels, per_class, seed)`` picks, for every class c, ``per_class[c]`` training
images uniformly at random without replacement (a ``torch.Generator`` seeded with ``seed``,
one ``randperm`` per class in ascending class order); everything else is held out. Both index
tensors are sorted, disjoint and cover every sample, and the result depends only on
``(labels, per_class, seed)``, so later issues (the embedded default model, its quality
reference) can rebuild exactly the same split.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch

from steersample._checks import check_tensor

__all__ = ["load_digits", "split_indices", "DIGITS_SHAPE", "NUM_DIGIT_CLASSES"]

DIGITS_SHAPE: tuple[int, int, int] = (1, 8, 8)
NUM_DIGIT_CLASSES = 10


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: float32 ``(1797, 1, 8, 8)`` in [-1, 1] and int64 ``(1797,)``."""
    from sklearn.datasets import load_digits as _sk_load_digits  # bundled with scikit-learn

    bunch = _sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).reshape(-1, *DIGITS_SHAPE)
    images = images / 8.0 - 1.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images.contiguous(), labels.contiguous()


def split_indices(labels: torch.Tensor, per_class: int | Mapping[int, int],
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample indices into ``(train_idx, heldout_idx)``, both sorted int64 tensors.

    Args:
        labels: ``(N,)`` integer class labels.
        per_class: training images per class, either one int for every class or a mapping
            ``{class: count}`` that names every class present in ``labels`` (an imbalanced split:
            e.g. 5 images for "rare" classes and 120 for "frequent" ones).
        seed: seed of the ``torch.Generator`` that draws the random subsets.

    A count of 0 puts the whole class into the held-out set; a count equal to the class size
    puts it all into training.
    """
    labels = check_tensor(labels, "labels")
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} and dtype "
            f"{labels.dtype}; pass e.g. the labels returned by load_digits()"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    labels = labels.to("cpu", torch.int64)
    classes = [int(c) for c in torch.unique(labels)]
    counts = _per_class_counts(per_class, classes)

    generator = torch.Generator().manual_seed(int(seed))
    train_parts: list[torch.Tensor] = []
    for c in classes:  # ascending class order: part of the documented recipe
        members = (labels == c).nonzero().flatten()
        want = counts[c]
        if want > members.numel():
            raise ValueError(
                f"per_class asks for {want} training images of class {c}, but only "
                f"{members.numel()} exist; lower it to at most {members.numel()}"
            )
        order = torch.randperm(members.numel(), generator=generator)
        train_parts.append(members[order[:want]])
    train = torch.cat(train_parts) if train_parts else torch.empty(0, dtype=torch.int64)
    train = torch.sort(train).values
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[train] = False
    heldout = mask.nonzero().flatten()
    return train, heldout


def _per_class_counts(per_class: int | Mapping[int, int], classes: list[int]) -> dict[int, int]:
    if isinstance(per_class, Mapping):
        unknown = sorted(set(int(k) for k in per_class) - set(classes))
        if unknown:
            raise ValueError(
                f"per_class names class(es) {unknown} that do not occur in labels "
                f"(classes present: {classes}); remove them"
            )
        missing = [c for c in classes if c not in {int(k) for k in per_class}]
        if missing:
            raise ValueError(
                f"per_class has no count for class(es) {missing}; give every class a count "
                f"(0 holds the whole class out)"
            )
        raw = {int(k): v for k, v in per_class.items()}
    elif isinstance(per_class, numbers.Integral) and not isinstance(per_class, bool):
        raw = {c: per_class for c in classes}
    else:
        raise TypeError(
            f"per_class must be an int or a dict {{class: count}}, got {type(per_class).__name__}"
        )
    for c, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 0:
            raise ValueError(f"per_class[{c}] must be a non-negative int, got {v!r}")
    return {c: int(v) for c, v in raw.items()}
