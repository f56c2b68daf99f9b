"""``ReferenceSet``: reference latents (the training set, or a class of it) plus optional labels.

A reference set is what the empirical oracle memorises and what copy tests compare against:

    ref = ReferenceSet(latents, labels=None)   # latents (N, *shape) float; labels (N,) int or None
    dist, idx = ref.nearest(x, k=2)            # (B, k) true l2 distances (ascending), (B, k) indices

Nearest neighbours go through FAISS: an exact brute-force search (``faiss.knn``, no copy of a
float32 reference) by default, or, with ``approximate=True``, an inverted-file index
(``faiss.IndexIVFFlat``) over a PCA projection, built once on first use (:meth:`build_ivf`).
FAISS ranks with float32 squared distances, which cancel for near-duplicates, so ``nearest``
asks FAISS for a few extra candidates and re-ranks them by distances recomputed in float64 from
the differences: the returned distances are true l2 distances (not squared), accurate to
float64 rounding.

Files are safetensors with the keys ``"latents"`` and, when labelled, ``"labels"``; the metadata
records a format tag and the SHA-256 of the tensor bytes, checked on load.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from steersample._checks import (check_finite, check_floating, check_labels, check_positive_int,
                                 check_sample_shape, check_tensor)
from steersample.reference.index import FLAT_MAX

__all__ = ["ReferenceSet", "AUTO_INDEX_MIN"]

AUTO_INDEX_MIN = FLAT_MAX
"""``approximate=None`` (the oracle's and AttractorRepulsion's default) searches an approximate
index only for sets with more rows than this; smaller sets are searched exactly (at this size a
brute-force FAISS search costs about what an index probe does)."""

_FORMAT = "steersample.ReferenceSet"
_VERSION = "1"
_QUERY_BLOCK_ELEMENTS = 1 << 20  # float64 elements per block when re-ranking candidates


class ReferenceSet:
    """Reference latents ``(N, *shape)`` with optional integer labels ``(N,)``.

    The tensors are kept as given (same dtype and device); do not modify them in place after
    construction, because derived quantities (squared norms, FAISS indexes) are cached.
    """

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        latents = check_floating(check_tensor(latents, "latents"), "latents")
        if latents.dim() < 2:
            raise ValueError(
                f"latents must have shape (N, *sample_shape), got {tuple(latents.shape)}; "
                f"for N vectors of length D pass a tensor of shape (N, D)"
            )
        if latents.shape[0] == 0 or latents[0].numel() == 0:
            raise ValueError(
                f"the reference set is empty (latents shape {tuple(latents.shape)}); "
                f"pass at least one non-empty reference sample"
            )
        check_finite(latents, "latents")
        if labels is not None:
            labels = check_tensor(labels, "labels")
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise TypeError(f"labels must have an integer dtype, got {labels.dtype}; use labels.long()")
            if labels.dim() != 1 or labels.shape[0] != latents.shape[0]:
                raise ValueError(
                    f"labels has shape {tuple(labels.shape)} but latents hold {latents.shape[0]} "
                    f"samples; pass one integer label per sample, shape ({latents.shape[0]},)"
                )
        self._latents = latents.contiguous()
        self._labels = None if labels is None else labels.contiguous()
        self._cache: dict[object, object] = {}

    # ----------------------------------------------------------------------------- basics
    @property
    def latents(self) -> torch.Tensor:
        """The reference samples, ``(N, *shape)``."""
        return self._latents

    @property
    def labels(self) -> torch.Tensor | None:
        """The labels, ``(N,)``, or ``None`` for an unlabelled set."""
        return self._labels

    def __len__(self) -> int:
        return int(self._latents.shape[0])

    def __repr__(self) -> str:
        lab = "unlabelled" if self._labels is None else f"{len(self.classes)} classes"
        return (f"ReferenceSet(N={len(self)}, shape={self.sample_shape}, "
                f"dtype={self._latents.dtype}, {lab})")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``latents.shape[1:]``."""
        return tuple(self._latents.shape[1:])

    @property
    def dim(self) -> int:
        """Flattened sample dimension D."""
        return int(self._latents[0].numel())

    @property
    def flat(self) -> torch.Tensor:
        """The latents as a ``(N, D)`` view."""
        return self._latents.reshape(len(self), self.dim)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Flattened latents of rows ``idx`` (any shape): ``(idx.numel(), D)``, in the storage
        dtype and device (``index_select``: several times faster than advanced indexing for
        scattered rows on the CPU). :class:`ShardedReferenceSet` gathers from its memory maps."""
        flat = self.flat
        return torch.index_select(flat, 0, idx.reshape(-1).to(flat.device, torch.int64))

    def _wants_index(self, approximate: bool | None) -> bool:
        """Whether a search with this ``approximate`` argument uses the approximate index:
        ``None`` decides by size (``N > AUTO_INDEX_MIN``)."""
        return len(self) > AUTO_INDEX_MIN if approximate is None else bool(approximate)

    @property
    def classes(self) -> torch.Tensor | None:
        """Sorted distinct labels (int64, CPU), or ``None`` when unlabelled."""
        if self._labels is None:
            return None
        if "classes" not in self._cache:
            self._cache["classes"] = torch.unique(self._labels.to("cpu", torch.int64))
        return self._cache["classes"]  # type: ignore[return-value]

    def indices(self, label: int | None = None) -> torch.Tensor:
        """Sorted int64 indices (CPU) of the samples with ``label`` (all samples for ``None``)."""
        if label is None:
            return torch.arange(len(self))
        check_labels(int(label), 1, self.classes)
        key = ("indices", int(label))
        if key not in self._cache:
            self._cache[key] = (self._labels.to("cpu") == int(label)).nonzero().flatten()
        return self._cache[key]  # type: ignore[return-value]

    def squared_norms(self) -> torch.Tensor:
        """``||x_i||^2`` in float64, ``(N,)``, on the latents' device (cached)."""
        if "sqnorm" not in self._cache:
            sq = torch.zeros(len(self), dtype=torch.float64, device=self._latents.device)
            step = max(1, _QUERY_BLOCK_ELEMENTS // self.dim)
            for i in range(0, len(self), step):
                sq[i:i + step] = self.flat[i:i + step].double().square().sum(1)
            self._cache["sqnorm"] = sq
        return self._cache["sqnorm"]  # type: ignore[return-value]

    def _float64_flat(self) -> torch.Tensor:
        """A cached float64 ``(N, D)`` copy (only for small sets: it doubles the memory)."""
        if "flat64" not in self._cache:
            self._cache["flat64"] = self.flat.to(torch.float64).contiguous()
        return self._cache["flat64"]  # type: ignore[return-value]

    # ----------------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """Write a safetensors file (keys ``latents`` and, if labelled, ``labels``)."""
        from safetensors.torch import save_file

        tensors = {"latents": self._latents.detach().cpu().contiguous()}
        if self._labels is not None:
            tensors["labels"] = self._labels.detach().cpu().contiguous()
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta.update(format=_FORMAT, version=_VERSION, sha256=_digest(tensors))
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "ReferenceSet":
        """Read a file written by :meth:`save`, validating keys, dtypes, shapes and checksum."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no reference-set file at {path}; check the path")
        fix = "re-create it with ReferenceSet(latents, labels).save(path)"
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in keys}
        except Exception as err:  # safetensors raises its own error type for bad bytes
            raise ValueError(
                f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); "
                f"it may be truncated or corrupt: {fix}"
            ) from None
        if "latents" not in keys or not keys <= {"latents", "labels"}:
            raise ValueError(
                f"{path} has keys {sorted(keys)} but a reference set needs 'latents' and "
                f"optionally 'labels'; {fix}"
            )
        latents, labels = tensors["latents"], tensors.get("labels")
        if not latents.is_floating_point():
            raise ValueError(f"{path}: 'latents' has dtype {latents.dtype}, expected floating point; {fix}")
        if labels is not None and (labels.is_floating_point() or labels.dtype == torch.bool):
            raise ValueError(f"{path}: 'labels' has dtype {labels.dtype}, expected an integer dtype; {fix}")
        if "sha256" in meta and meta["sha256"] != _digest(tensors):
            raise ValueError(f"{path}: checksum mismatch, the tensor data are corrupt; {fix}")
        try:
            return cls(latents.to(device), None if labels is None else labels.to(device))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid reference set ({err}); {fix}") from None

    # ----------------------------------------------------------------------------- kNN
    def nearest(self, x: torch.Tensor, k: int = 2, labels: int | torch.Tensor | None = None, *,
                approximate: bool | None = False, nprobe: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest reference samples of each query, by l2 distance.

        Args:
            x: ``(B, *shape)`` queries.
            k: neighbours per query (at most the number of candidates).
            labels: ``None``, an int, or ``(B,)`` ints: restrict query b to samples of its label.
            approximate: search the approximate index (:meth:`build_ivf`, built on first use);
                ``None``: only when ``N > AUTO_INDEX_MIN``, else exactly.
            nprobe: IVF lists visited per query (default: the index's setting).

        Returns:
            ``(dist, idx)``: ``(B, k)`` true l2 distances, ascending (float64 for float64
            queries, float32 otherwise), and ``(B, k)`` int64 indices into this set.
        """
        x = self._check_queries(x)
        k = check_positive_int(k, "k")
        lab = check_labels(labels, x.shape[0], self.classes)
        out_dist = torch.empty(x.shape[0], k, dtype=torch.float64)
        out_idx = torch.empty(x.shape[0], k, dtype=torch.int64)
        for label, rows in _groups(lab, x.shape[0]):
            pool = self.indices(label)
            if k > pool.numel():
                where = "the reference set" if label is None else f"class {label}"
                raise ValueError(f"k={k} exceeds the {pool.numel()} samples in {where}; use k <= {pool.numel()}")
            q = x.reshape(x.shape[0], -1)[rows]
            k_search = min(pool.numel(), k + k // 4 + 8)  # spare candidates for the re-ranking
            cand = self._candidates(q, k_search, label, approximate, nprobe)
            out_dist[rows], out_idx[rows] = self._rerank(q, cand, k)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return out_dist.to(device=x.device, dtype=dtype), out_idx.to(x.device)

    def build_ivf(self, nlist: int | None = None, nprobe: int | None = None, *,
                  pca_dim: int | None = None, train_size: int | None = None, seed: int = 0) -> None:
        """Build (or rebuild) the approximate index that ``approximate=True`` searches.

        A FAISS ``IndexIVFFlat`` over a PCA projection of the latents (``steersample.reference._approximate``).
        Defaults: ``pca_dim = min(D, 128)``, ``nlist = round(sqrt(N))``, ``nprobe =
        max(1, nlist // 8)``, projection and lists trained on ``min(N, max(64 * nlist, 20000))``
        samples drawn with ``seed``. Memory: about N * pca_dim * 4 bytes.
        """
        from steersample.reference._approximate import ApproximateIndex, default_nlist

        n = len(self)
        nlist = min(n, check_positive_int(nlist, "nlist")) if nlist is not None else default_nlist(n)
        nprobe = check_positive_int(nprobe, "nprobe") if nprobe is not None else max(1, nlist // 8)
        pca_dim = check_positive_int(pca_dim, "pca_dim") if pca_dim is not None else 128
        train_size = min(n, check_positive_int(train_size, "train_size") if train_size is not None
                         else max(64 * nlist, 20000))
        self._cache["ivf"] = ApproximateIndex.build(
            self.flat, pca_dim=min(pca_dim, self.dim), nlist=nlist, nprobe=nprobe,
            train_size=train_size, seed=seed)

    @property
    def approximate_index(self):
        """The approximate index (built on first use), an ``ApproximateIndex``."""
        if "ivf" not in self._cache:
            self.build_ivf()
        return self._cache["ivf"]

    # ----------------------------------------------------------------------------- internals
    def _check_queries(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        x = check_floating(check_tensor(x, name), name)
        check_sample_shape(x, self.sample_shape, name)
        return check_finite(x, name)

    def _faiss_matrix(self, rows: torch.Tensor) -> np.ndarray:
        """float32 C-contiguous (n, D) NumPy array of the given rows (a view when possible)."""
        flat = self.flat
        sub = flat if rows.numel() == len(self) else flat[rows.to(flat.device)]
        return np.ascontiguousarray(sub.detach().to("cpu", torch.float32).numpy())

    def _search_flat(self, q: torch.Tensor, k: int, label: int | None,
                     pool: torch.Tensor) -> torch.Tensor:
        import faiss

        xq = np.ascontiguousarray(q.detach().to("cpu", torch.float32).numpy())
        _, idx = faiss.knn(xq, self._faiss_matrix(pool), k)
        return pool[torch.from_numpy(idx)]

    def _search_ivf(self, q: torch.Tensor, k: int, label: int | None,
                    nprobe: int | None) -> torch.Tensor:
        index = self.approximate_index
        ids = None if label is None else self.indices(label).numpy()
        idx = index.search(q, k, ids, check_positive_int(nprobe, "nprobe") if nprobe is not None else None)
        short = (idx < 0).any(1)
        if bool(short.any()):  # probed lists held fewer than k candidates: exact search instead
            idx[short] = self._search_flat(q[short], k, label, self.indices(label))
        return idx

    def _candidates(self, q: torch.Tensor, k: int, label: int | None, approximate: bool | None,
                    nprobe: int | None = None) -> torch.Tensor:
        """``(B, k)`` candidate indices for flat queries ``q`` (B, D), unsorted, not re-ranked
        (``approximate=None``: the index when ``N > AUTO_INDEX_MIN``)."""
        if self._wants_index(approximate):
            return self._search_ivf(q, k, label, nprobe)
        return self._search_flat(q, k, label, self.indices(label))

    def _rerank(self, q: torch.Tensor, cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Recompute candidate distances in float64 from differences; keep the k closest."""
        flat = self.flat
        q64 = q.to("cpu", torch.float64)
        query = torch.arange(cand.shape[0]).repeat_interleave(cand.shape[1])
        pairs = cand.flatten()
        dist = torch.empty(pairs.numel(), dtype=torch.float64)
        step = max(1, _QUERY_BLOCK_ELEMENTS // self.dim)      # (query, candidate) pairs per block
        for i in range(0, pairs.numel(), step):
            rows = torch.index_select(flat, 0, pairs[i:i + step].to(flat.device)).to("cpu", torch.float64)
            dist[i:i + step] = (q64[query[i:i + step]] - rows).square().sum(1).sqrt()
        dist, order = torch.sort(dist.reshape(cand.shape), dim=1, stable=True)
        return dist[:, :k], torch.gather(cand, 1, order)[:, :k]


def _groups(labels: torch.Tensor | None, batch: int):
    """Yield ``(label, row_indices)`` for each distinct label (one group ``None`` without labels)."""
    if labels is None:
        yield None, torch.arange(batch)
        return
    for label in torch.unique(labels):
        yield int(label), (labels == label).nonzero().flatten()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
