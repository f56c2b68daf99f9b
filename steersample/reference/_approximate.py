"""Approximate nearest-neighbour candidates for large reference sets.

Image latents have a decaying spectrum, so their neighbours can be found in a low-dimensional
linear projection: the index keeps the top ``pca_dim`` principal directions (randomised range
finder, Halko et al. 2011, seeded) and a FAISS ``IndexIVFFlat`` over the projected samples
(N * pca_dim float32, e.g. 3 % of a D = 4096 reference at pca_dim = 128). A search returns
*candidates*; callers recompute exact float64 distances on them. Projection also damps the
isotropic noise of forward-noised queries (only pca_dim of its D dimensions survive), which is
what makes the coarse search usable at high σ. With ``pca_dim >= D`` there is no projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ApproximateIndex"]

_POWER_ITERATIONS = 2
_OVERSAMPLE = 8


@dataclass(frozen=True)
class ApproximateIndex:
    """FAISS IVF-Flat over a PCA projection of the reference (see module docstring)."""

    mean: torch.Tensor            # (D,) float32
    basis: torch.Tensor | None    # (D, pca_dim) float32, orthonormal columns; None: no projection
    index: object                 # faiss.IndexIVFFlat over the projected samples
    nprobe: int

    @classmethod
    def build(cls, flat: torch.Tensor, *, pca_dim: int, nlist: int, nprobe: int,
              train_size: int, seed: int) -> "ApproximateIndex":
        """Fit the projection and the IVF lists on ``train_size`` rows drawn with ``seed``."""
        import faiss

        n, dim = flat.shape
        g = torch.Generator().manual_seed(seed)
        pick = torch.sort(torch.randperm(n, generator=g)[:train_size]).values
        sample = flat[pick.to(flat.device)].to("cpu", torch.float32)
        mean = sample.mean(0)
        basis = None
        if pca_dim < dim:
            basis = _principal_directions(sample - mean, pca_dim, g)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(pca_dim if basis is not None else dim),
                                   pca_dim if basis is not None else dim, nlist)
        index.cp.seed = seed
        made = cls(mean, basis, index, nprobe)
        index.train(made._project(sample))
        for start in range(0, n, 8192):
            index.add(made._project(flat[start:start + 8192]))
        return made

    def search(self, q: torch.Tensor, k: int, ids: np.ndarray | None = None,
               nprobe: int | None = None) -> torch.Tensor:
        """``(B, k)`` candidate indices (``-1`` where the probed lists held fewer than k)."""
        import faiss

        params = faiss.SearchParametersIVF(nprobe=nprobe or self.nprobe)
        if ids is not None:
            params.sel = faiss.IDSelectorBatch(ids.astype(np.int64))
        _, idx = self.index.search(self._project(q), k, params=params)
        return torch.from_numpy(idx)

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    @property
    def memory_bytes(self) -> int:
        """Approximate size: projected vectors, ids, basis."""
        dim = self.basis.shape[1] if self.basis is not None else self.mean.shape[0]
        basis = 0 if self.basis is None else self.basis.numel() * 4
        return int(self.index.ntotal) * (dim * 4 + 8) + basis

    def _project(self, rows: torch.Tensor) -> np.ndarray:
        rows = rows.detach().to("cpu", torch.float32)
        out = rows if self.basis is None else (rows - self.mean) @ self.basis
        return np.ascontiguousarray(out.numpy())


def _principal_directions(centred: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Top ``rank`` right singular vectors of ``centred`` (m, D): randomised range finder with
    power iterations (Halko, Martinsson, Tropp 2011, Alg. 4.4), returned as (D, rank)."""
    m, dim = centred.shape
    width = min(rank + _OVERSAMPLE, m, dim)
    omega = torch.randn(dim, width, generator=generator)
    y = centred @ omega
    for _ in range(_POWER_ITERATIONS):
        q, _ = torch.linalg.qr(y)
        z, _ = torch.linalg.qr(centred.T @ q)
        y = centred @ z
    q, _ = torch.linalg.qr(y)
    _, _, vh = torch.linalg.svd(q.T @ centred, full_matrices=False)
    basis = vh[:rank].T.contiguous()
    if basis.shape[1] < rank:  # fewer samples than directions: pad with an orthonormal complement
        extra = torch.randn(dim, rank - basis.shape[1], generator=generator)
        full, _ = torch.linalg.qr(torch.cat([basis, extra], 1))
        basis = full[:, :rank].contiguous()
    return basis


def default_nlist(n: int) -> int:
    """round(sqrt(N)) lists, at most N / 39 (FAISS wants ~39 training points per centroid)."""
    return max(1, min(round(math.sqrt(n)), n // 39))
