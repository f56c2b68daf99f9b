"""Novelty judged against held-out real data: the data-copying test, distance ratio, precision/recall.

The ratio test (``metrics.nn_ratio``) asks whether a sample sits on *one* training sample. These
metrics ask whether it sits as close to the training set as *unseen real data* does, which a blend
of two training images does not (``research/novelty-and-schedules.md`` §2):

- **Data-copying test** (Meehan, Chaudhuri & Dasgupta, AISTATS 2020, arXiv 2004.05675). Each
  generated sample x and each held-out real sample h gets its distance to the nearest training
  sample, ``d(x) = min_j ||x - t_j||``. Within a cell π of the instance space, the Mann-Whitney U
  statistic of generated against held-out distances (U counts pairs with ``d(x) > d(h)``, ties
  1/2) is standardised under H0 (same distribution)::

      Z_U(π) = (U - m n / 2) / sqrt(m n (m + n + 1) / 12)      m samples, n held-out in π

  Z_U ≪ 0: samples are closer to the training set than real unseen data (data copying);
  Z_U ≫ 0: farther (under-fitting). Under H0, Z_U ≈ N(0, 1). Cells are class labels when given,
  otherwise k-means cells of the training set (as in the paper). The paper's aggregate
  ``C_T = Σ_π P_n(π) Z_U(π) / Σ_π P_n(π)`` averages over cells holding more than a share ``tau``
  of the samples, weighted by the held-out mass ``P_n(π)``.
- **Distance ratio**: ``median d(x) / median d(h)`` (per cell and overall); 1 is "as far from the
  training set as unseen real data".
- **Precision and recall** (Kynkäänniemi et al., NeurIPS 2019, arXiv 1904.06991) with k = 3:
  precision is the share of samples inside the k-NN ball (radius: distance to the k-th nearest
  other point) of some held-out sample; recall the share of held-out samples inside the k-NN
  ball of some generated sample.

All distances are ℓ2 on flattened latents (pixels for the embedded default), in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from steersample.reference.reference_set import ReferenceSet

__all__ = ["DataCopying", "data_copying", "PrecisionRecall", "precision_recall", "novelty_by_class",
           "nearest_training_distance", "relative_distance", "z_u"]

_BLOCK = 1 << 22  # float64 elements of one block of pairwise distances (32 MB)


def _rows(x, name: str) -> torch.Tensor:
    """``(N, *shape)`` tensor or ReferenceSet -> ``(N, D)`` float64, checked."""
    if isinstance(x, ReferenceSet):
        x = x.latents
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, *shape) or a ReferenceSet, "
                        f"got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, *shape) with N >= 1, got {tuple(x.shape)}")
    flat = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    if not torch.isfinite(flat).all():
        raise ValueError(f"{name} holds NaN or inf values; drop or fix those rows first")
    return flat


def _labels(labels, count: int, name: str) -> torch.Tensor:
    labels = torch.as_tensor(labels).reshape(-1).to(torch.long)
    if labels.numel() == 1 and count > 1:
        labels = labels.expand(count)
    if labels.numel() != count:
        raise ValueError(f"{name} must hold one label per row: {count} rows, {labels.numel()} labels")
    return labels.cpu()


def _kth_distance(a: torch.Tensor, b: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    """For each row of ``a``, its k-th smallest distance to rows of ``b`` (``(len(a),)``)."""
    out = torch.empty(a.shape[0], dtype=torch.float64)
    step = max(1, _BLOCK // max(1, b.shape[0]))
    for start in range(0, a.shape[0], step):
        dist = torch.cdist(a[start:start + step], b)
        if exclude_self:
            rows = torch.arange(dist.shape[0])
            dist[rows, rows + start] = math.inf
        out[start:start + step] = dist.kthvalue(k, dim=1).values
    return out


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """``(len(points),)`` bool: inside the ball of at least one centre."""
    out = torch.zeros(points.shape[0], dtype=torch.bool)
    step = max(1, _BLOCK // max(1, centres.shape[0]))
    for start in range(0, points.shape[0], step):
        dist = torch.cdist(points[start:start + step], centres)
        out[start:start + step] = (dist <= radii[None, :]).any(dim=1)
    return out


def nearest_training_distance(samples, reference: ReferenceSet) -> torch.Tensor:
    """``(B,)`` float64 distance of each sample to its nearest training (reference) sample.

    Uses ``reference.nearest`` (exact for in-memory sets, FAISS for large stores) over all
    reference samples, whatever their labels.
    """
    if not isinstance(reference, ReferenceSet):
        raise TypeError(f"reference must be a steersample.ReferenceSet, got {type(reference).__name__}; "
                        "wrap your training latents: ReferenceSet(latents, labels)")
    x = samples.latents if isinstance(samples, ReferenceSet) else samples
    _rows(x, "samples")
    dist, _ = reference.nearest(x.detach().float().cpu(), k=1)
    return torch.as_tensor(dist)[:, 0].to(torch.float64)


def z_u(sample_distances: torch.Tensor, heldout_distances: torch.Tensor) -> float:
    """Meehan et al.'s standardised Mann-Whitney statistic of two distance samples.

    ``U`` (``scipy.stats.mannwhitneyu``, first argument the generated distances) counts pairs
    with generated > held-out, ties 1/2; ``Z_U = (U - m n / 2) / sqrt(m n (m + n + 1) / 12)``.
    NaN when either side is empty.
    """
    from scipy.stats import mannwhitneyu

    m, n = int(sample_distances.numel()), int(heldout_distances.numel())
    if m == 0 or n == 0:
        return math.nan
    u = float(mannwhitneyu(sample_distances.numpy(), heldout_distances.numpy(),
                           alternative="two-sided", method="asymptotic").statistic)
    return (u - m * n / 2) / math.sqrt(m * n * (m + n + 1) / 12)


@dataclass(frozen=True)
class DataCopying:
    """The data-copying test's result (see the module docstring).

    Attributes:
        z_u: cell -> Z_U (NaN for a cell without samples or held-out data); < 0 is copying.
        c_t: Meehan's aggregate over cells holding more than ``tau`` of the samples.
        distance_ratio: median nearest-training distance of the samples over that of held-out.
        cell_distance_ratio: cell -> the same ratio within the cell.
        sample_counts, heldout_counts: cell -> number of samples / held-out rows in it.
        sample_distances, heldout_distances: ``(m,)`` / ``(n,)`` nearest-training distances.
        sample_cells, heldout_cells: the cell of each sample / held-out row.
        cells_from: ``"labels"`` or ``"kmeans"``.
    """

    z_u: Mapping[int, float]
    c_t: float
    distance_ratio: float
    cell_distance_ratio: Mapping[int, float]
    sample_counts: Mapping[int, int]
    heldout_counts: Mapping[int, int]
    sample_distances: torch.Tensor
    heldout_distances: torch.Tensor
    sample_cells: torch.Tensor
    heldout_cells: torch.Tensor
    cells_from: str


def _median_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0 or b.numel() == 0:
        return math.nan
    denominator = float(b.median())
    return float(a.median()) / denominator if denominator > 0 else math.inf


def _kmeans_cells(reference: ReferenceSet, samples: torch.Tensor, heldout: torch.Tensor,
                  num_cells: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.cluster import KMeans

    train = _rows(reference.latents, "reference")
    num_cells = min(num_cells, train.shape[0])
    km = KMeans(n_clusters=num_cells, n_init=4, random_state=seed).fit(train.numpy())
    return (torch.as_tensor(km.predict(samples.numpy()), dtype=torch.long),
            torch.as_tensor(km.predict(heldout.numpy()), dtype=torch.long))


def data_copying(samples: torch.Tensor, reference: ReferenceSet, heldout,
                 labels=None, heldout_labels=None, *, num_cells: int = 10, tau: float = 0.02,
                 seed: int = 0) -> DataCopying:
    """Meehan et al.'s data-copying test of ``samples`` against ``heldout`` real data.

    Args:
        samples: ``(m, *shape)`` generated latents (same layout as the reference).
        reference: the training set (``ReferenceSet``); distances go to its nearest sample.
        heldout: ``(n, *shape)`` real samples the model never saw, a tensor or a ReferenceSet
            (whose labels serve as ``heldout_labels``).
        labels: ``(m,)`` class of each sample (an int for all): cells are then classes. None:
            ``num_cells`` k-means cells of the training set (the paper's partition).
        heldout_labels: ``(n,)`` held-out classes (needed with ``labels`` unless ``heldout``
            is a labelled ReferenceSet).
        num_cells: k-means cells when there are no labels.
        tau: C_T counts cells holding more than this share of the samples.
        seed: k-means seed.

    Raises:
        ValueError: shapes that differ from the reference's, NaN rows, labels of the wrong
            length, or labels for the samples without held-out labels.
    """
    if not isinstance(reference, ReferenceSet):
        raise TypeError(f"reference must be a steersample.ReferenceSet, got {type(reference).__name__}")
    if isinstance(heldout, ReferenceSet) and heldout_labels is None:
        heldout_labels = heldout.labels
    x, h = _rows(samples, "samples"), _rows(heldout, "heldout")
    dim = math.prod(reference.latents.shape[1:])
    for name, rows in (("samples", x), ("heldout", h)):
        if rows.shape[1] != dim:
            raise ValueError(f"{name} rows have {rows.shape[1]} values but reference samples have "
                             f"{dim} (shape {tuple(reference.latents.shape[1:])}); pass latents in "
                             "the reference set's layout")
    if not 0 <= tau < 1:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    d_x = nearest_training_distance(samples, reference)
    d_h = nearest_training_distance(heldout, reference)
    if labels is not None:
        if heldout_labels is None:
            raise ValueError("labels were given for the samples but the held-out set has none; "
                             "pass heldout_labels= or a labelled ReferenceSet as heldout")
        cells_x = _labels(labels, x.shape[0], "labels")
        cells_h = _labels(heldout_labels, h.shape[0], "heldout_labels")
        cells_from = "labels"
    else:
        cells_x, cells_h = _kmeans_cells(reference, x, h, num_cells, seed)
        cells_from = "kmeans"
    cells = sorted(set(cells_x.tolist()) | set(cells_h.tolist()))
    scores, ratios, m_counts, n_counts = {}, {}, {}, {}
    for cell in cells:
        in_x, in_h = d_x[cells_x == cell], d_h[cells_h == cell]
        scores[cell] = z_u(in_x, in_h)
        ratios[cell] = _median_ratio(in_x, in_h)
        m_counts[cell], n_counts[cell] = int(in_x.numel()), int(in_h.numel())
    # C_T: held-out-mass-weighted mean of Z_U over cells with enough samples
    kept = [c for c in cells if m_counts[c] > tau * x.shape[0] and not math.isnan(scores[c])]
    weight = sum(n_counts[c] for c in kept)
    c_t = sum(n_counts[c] * scores[c] for c in kept) / weight if weight else math.nan
    return DataCopying(z_u=scores, c_t=c_t, distance_ratio=_median_ratio(d_x, d_h),
                       cell_distance_ratio=ratios, sample_counts=m_counts, heldout_counts=n_counts,
                       sample_distances=d_x, heldout_distances=d_h, sample_cells=cells_x,
                       heldout_cells=cells_h, cells_from=cells_from)


def relative_distance(samples: torch.Tensor, reference: ReferenceSet, heldout,
                      labels=None, heldout_labels=None) -> torch.Tensor:
    """``(B,)`` each sample's nearest-training distance over the median of held-out data's.

    1 means "as far from the training set as a typical unseen real sample"; a copy scores near
    0. With ``labels``, each sample is compared with the held-out rows of its own class.
    """
    if isinstance(heldout, ReferenceSet) and heldout_labels is None:
        heldout_labels = heldout.labels
    d_x = nearest_training_distance(samples, reference)
    d_h = nearest_training_distance(heldout, reference)
    if labels is None:
        return d_x / float(d_h.median())
    if heldout_labels is None:
        raise ValueError("labels were given but the held-out set has none; pass heldout_labels=")
    cells_x = _labels(labels, d_x.numel(), "labels")
    cells_h = _labels(heldout_labels, d_h.numel(), "heldout_labels")
    out = torch.full_like(d_x, math.nan)
    for cell in cells_x.unique().tolist():
        ref = d_h[cells_h == cell]
        if ref.numel():
            out[cells_x == cell] = d_x[cells_x == cell] / float(ref.median())
    return out


@dataclass(frozen=True)
class PrecisionRecall:
    """Kynkäänniemi et al.'s improved precision and recall.

    Attributes:
        precision: share of samples inside some held-out sample's k-NN ball.
        recall: share of held-out samples inside some generated sample's k-NN ball.
        precise: ``(m,)`` bool, per sample.
        k: the neighbourhood size.
    """

    precision: float
    recall: float
    precise: torch.Tensor
    k: int


def precision_recall(samples: torch.Tensor, heldout, k: int = 3) -> PrecisionRecall:
    """Improved precision/recall (arXiv 1904.06991) of ``samples`` against held-out real data.

    Args:
        samples: ``(m, *shape)`` generated latents.
        heldout: ``(n, *shape)`` real samples (tensor or ReferenceSet), n > k.
        k: neighbourhood size (the paper's 3).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    x, h = _rows(samples, "samples"), _rows(heldout, "heldout")
    if x.shape[1] != h.shape[1]:
        raise ValueError(f"samples rows have {x.shape[1]} values, heldout rows {h.shape[1]}; "
                         "pass both in the same layout")
    if h.shape[0] <= k:
        raise ValueError(f"precision needs more than k={k} held-out samples, got {h.shape[0]}")
    real_radii = _kth_distance(h, h, k, exclude_self=True)
    precise = _covered(x, h, real_radii)
    recall = math.nan
    if x.shape[0] > k:
        fake_radii = _kth_distance(x, x, k, exclude_self=True)
        recall = float(_covered(h, x, fake_radii).double().mean())
    return PrecisionRecall(precision=float(precise.double().mean()), recall=recall,
                           precise=precise, k=k)


def novelty_by_class(samples: torch.Tensor, labels: torch.Tensor, reference: ReferenceSet,
                     heldout_x: torch.Tensor, heldout_y: torch.Tensor,
                     groups: Mapping[str, "list[int] | tuple[int, ...]"] | None = None,
                     k: int = 3) -> dict:
    """Data-copying Z_U, distance ratio and precision/recall per class and per group of classes.

    Each class's samples are judged against that class's held-out rows (precision/recall and
    Z_U alike). A group's ``z_u`` is Meehan's C_T over its classes (held-out-mass weighted),
    ``z_u_min`` its worst class, ``distance_ratio`` the pooled median ratio and ``precision`` /
    ``recall`` the mean over its classes. Figures are plain floats,
    class has no samples or too few held-out rows; JSON-ready: None where a figure is undefined
    (a class without held-out rows, recall with k or fewer samples).

    Returns:
        ``{"per_class": {c: {...}}, "groups": {name: {...}}}``.
    """
    labels = _labels(labels, samples.shape[0], "labels")
    heldout_y = _labels(heldout_y, heldout_x.shape[0], "heldout_y")
    classes = [c for c in sorted(set(labels.tolist()))]
    test = data_copying(samples, reference, heldout_x, labels=labels, heldout_labels=heldout_y)
    per_class = {}
    for c in classes:
        mask, held = labels == c, heldout_y == c
        pr = (precision_recall(samples[mask], heldout_x[held], k=k)
              if int(held.sum()) > k else None)
        per_class[c] = {"z_u": test.z_u.get(c, math.nan),
                        "distance_ratio": test.cell_distance_ratio.get(c, math.nan),
                        "precision": pr.precision if pr else math.nan,
                        "recall": pr.recall if pr else math.nan}
    out_groups = {}
    for name, members in (groups or {}).items():
        members = [c for c in members if c in per_class]
        if not members:
            continue
        in_x = torch.isin(test.sample_cells, torch.tensor(members))
        in_h = torch.isin(test.heldout_cells, torch.tensor(members))
        weights = [test.heldout_counts.get(c, 0) for c in members]
        scores = [per_class[c]["z_u"] for c in members]
        kept = [(w, z) for w, z in zip(weights, scores) if w and not math.isnan(z)]
        out_groups[name] = {
            "classes": members,
            "z_u": sum(w * z for w, z in kept) / sum(w for w, _ in kept) if kept else math.nan,
            "z_u_min": min((z for _, z in kept), default=math.nan),
            "distance_ratio": _median_ratio(test.sample_distances[in_x], test.heldout_distances[in_h]),
            "precision": _mean(per_class[c]["precision"] for c in members),
            "recall": _mean(per_class[c]["recall"] for c in members),
        }
    return {"per_class": {c: _json_ready(v) for c, v in per_class.items()},
            "groups": {n: _json_ready(v) for n, v in out_groups.items()}}


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _json_ready(figures: dict) -> dict:
    return {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in figures.items()}
