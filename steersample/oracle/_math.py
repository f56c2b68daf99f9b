"""Numerical kernels of the empirical oracle (``steersample.oracle.empirical`` states the policy).

Streaming log-sum-exp accumulators, their dense and sparse updates, the rigorous error bounds of
the selection scores, and the exact float64 log-weights of candidate sets. Private: the public
names live in ``steersample.oracle.empirical``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__: list[str] = []

_EXPANSION_TOL = 1e-9           # nats: float64 expansion accepted below this error bound
_GATHER_ELEMENTS = 1 << 20      # float64 elements per block of gathered rows (8 MB)


@dataclass
class _Acc:
    """Streaming log-sum-exp accumulators for b queries (float64)."""

    m: torch.Tensor          # running max of exact l
    S: torch.Tensor          # Σ e^{l - m}
    Q: torch.Tensor          # Σ e^{2(l - m)}
    H: torch.Tensor          # Σ e^{l - m} (l - m)
    A: torch.Tensor | None   # Σ e^{l - m} x_i, (b, D)
    best: torch.Tensor       # argmax index
    n_drop: torch.Tensor     # samples never computed
    drop_max: torch.Tensor   # max fast score ŝ among them


@dataclass
class _TopK:
    """Exact statistics of the K heaviest candidates per query (fields as in ``_Acc``)."""

    m: torch.Tensor
    S: torch.Tensor
    Q: torch.Tensor
    H: torch.Tensor
    A: torch.Tensor | None
    best: torch.Tensor
    drop_max: torch.Tensor
    bound: torch.Tensor      # dropped-mass bound (n - k) e^{l_K - l_1} / S


def _best_candidates(ref: Any, q: torch.Tensor, a: torch.Tensor, s2: torch.Tensor,
                     cand: torch.Tensor, k: int, n: int, want_mean: bool) -> _TopK:
    """Exact float64 weights on each query's candidates ``cand`` (B, K'), keeping the best k.

    l_j = -||x - a x_j||^2 / (2 s^2) from differences (distance of x/a and x_j, times a). The
    candidate rows are gathered once for a block of queries, ``(b, K', D)`` with b·K'·D up to
    ``_GATHER_ELEMENTS``, and reused for the weighted sum; a single query whose K'·D exceeds
    that is handled alone in row blocks with two gathers.
    """
    b, dim = q.shape
    out = _TopK(*(torch.empty(b, dtype=torch.float64) for _ in range(4)),
                A=torch.empty(b, dim, dtype=torch.float64) if want_mean else None,
                best=torch.empty(b, dtype=torch.int64),
                drop_max=torch.empty(b, dtype=torch.float64), bound=torch.empty(b, dtype=torch.float64))
    per_query = cand.shape[1] * dim
    block = max(1, _GATHER_ELEMENTS // max(1, per_query))
    for j0 in range(0, b, block):
        sl = slice(j0, min(b, j0 + block))
        if per_query > 4 * _GATHER_ELEMENTS:   # one large-K query: blocked, two gathers
            logits = torch.cat([_logits_rows(ref, q[j0], a[j0], s2[j0], part)
                                for part in torch.split(cand[j0], max(1, _GATHER_ELEMENTS // dim))])[None]
            rows = None
        else:
            idx = cand[sl]
            rows = _gather(ref, idx.reshape(-1)).reshape(*idx.shape, dim)
            dist = torch.cdist((q[sl] / a[sl, None])[:, None, :], rows,
                               compute_mode="donot_use_mm_for_euclid_dist")[:, 0, :]    # (b', K')
            logits = -0.5 * (a[sl, None] * dist).square() / s2[sl, None]
        logits, order = torch.sort(logits, dim=1, descending=True)
        logits, order = logits[:, :k], order[:, :k]
        centred = logits - logits[:, :1]
        p = torch.exp(centred)
        S = p.sum(1)
        out.m[sl], out.S[sl], out.Q[sl] = logits[:, 0], S, p.square().sum(1)
        out.H[sl] = (p * centred).sum(1)
        out.best[sl] = torch.gather(cand[sl], 1, order[:, :1])[:, 0]
        if k < n:
            out.drop_max[sl] = logits[:, -1]
            out.bound[sl] = (n - k) * torch.exp(centred[:, -1]) / S
        else:
            out.drop_max[sl], out.bound[sl] = -math.inf, 0.0
        if want_mean:
            if rows is not None:
                weights = torch.zeros(rows.shape[:2], dtype=torch.float64).scatter_(1, order, p)
                out.A[sl] = torch.bmm(weights[:, None, :], rows)[:, 0, :]            # (b', D)
            else:
                out.A[sl] = _weighted_rows(ref, torch.gather(cand[sl], 1, order), p)
    return out


def _gather(ref: Any, idx: torch.Tensor) -> torch.Tensor:
    """Reference rows ``idx`` as float64 ``(len(idx), D)`` on the CPU, through
    ``ReferenceSet.rows`` (``index_select``; a sharded store reads its memory maps)."""
    return ref.rows(idx).to("cpu", torch.float64)


def _logits_rows(ref: Any, x: torch.Tensor, a: torch.Tensor, s2: torch.Tensor,
                 idx: torch.Tensor) -> torch.Tensor:
    rows = _gather(ref, idx)
    dist = torch.cdist(x[None] / a, rows, compute_mode="donot_use_mm_for_euclid_dist")[0]
    return -0.5 * (a * dist).square() / s2


def _weighted_rows(ref: Any, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[b, j] · x[idx[b, j]] in float64, (B, D), gathering O(_GATHER_ELEMENTS) at a time."""
    out = torch.zeros(idx.shape[0], ref.dim, dtype=torch.float64)
    step = max(1, _GATHER_ELEMENTS // ref.dim)
    for b in range(idx.shape[0]):
        for j in range(0, idx.shape[1], step):
            rows = _gather(ref, idx[b, j:j + step])
            out[b] += weights[b, j:j + step] @ rows
    return out


def _error_bounds(a: torch.Tensor, inv_s2: torch.Tensor, x_norm: torch.Tensor, max_norm: float,
                  dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rigorous per-query bounds on the selection scores ŝ and the float64 expansion.

    A dot product of length D in precision u errs by at most γ_{D+3}·||x||·||x_i||, with
    γ_n = n·u / (1 - n·u) (Higham, Accuracy and Stability of Numerical Algorithms, §3.1), and
    the float64 ||x_i||^2 (from float32 values: exact squares) by γ_{D+3}·||x_i||^2. Returns
    ``(err32, err64, use_expansion)``: the bound on ŝ from a float32 matmul, the bound from a
    float64 matmul, and whether the latter is below ``_EXPANSION_TOL`` nats.
    """
    u32, u64 = torch.finfo(torch.float32).eps / 2, torch.finfo(torch.float64).eps / 2
    g32 = (dim + 3) * u32 / (1 - (dim + 3) * u32)
    g64 = (dim + 3) * u64 / (1 - (dim + 3) * u64)
    cross = a * x_norm * max_norm * inv_s2            # |(1-s) x.x_i / s^2| <= cross
    square = 0.5 * a.square() * max_norm ** 2 * inv_s2
    err64 = 1.01 * ((g64 + 2 * u64) * (cross + square))
    err32 = 1.01 * ((g32 + u32) * cross) + err64      # + rounding the query to float32
    return err32, err64, err64 < _EXPANSION_TOL


def _exact_logits(q: torch.Tensor, a: torch.Tensor, inv_s2: torch.Tensor, sub: torch.Tensor,
                  sub_sqn: torch.Tensor, use_expansion: torch.Tensor) -> torch.Tensor:
    """Exact float64 log-weights: l_i + ||x||^2/(2 s^2) by expansion where ``use_expansion``,
    else l_i = -||x - a x_i||^2 / (2 s^2) from the differences (no cancellation)."""
    logits = torch.empty(q.shape[0], sub.shape[0], dtype=torch.float64)
    exp_rows = use_expansion.nonzero().flatten()
    if exp_rows.numel():
        ae = a[exp_rows, None]
        logits[exp_rows] = (ae * (q[exp_rows] @ sub.T) - 0.5 * ae.square() * sub_sqn[None, :]) \
            * inv_s2[exp_rows, None]
    dir_rows = (~use_expansion).nonzero().flatten()
    if dir_rows.numel():  # ||x - a x_i|| = a ||x/a - x_i||; cdist sums differences (a > 0 here)
        ad = a[dir_rows, None]
        dist = torch.cdist(q[dir_rows] / ad, sub, compute_mode="donot_use_mm_for_euclid_dist")
        logits[dir_rows] = -0.5 * (ad * dist).square() * inv_s2[dir_rows, None]
    return logits


def _pair_logits(q: torch.Tensor, a: torch.Tensor, inv_s2: torch.Tensor, query: torch.Tensor,
                 rows: torch.Tensor, rows_sqn: torch.Tensor, use_expansion: torch.Tensor) -> torch.Tensor:
    """Exact float64 log-weights of (query[j], rows[j]) pairs, on each query's own scale."""
    xq, aq = q[query], a[query]
    expanded = (aq * (xq * rows).sum(1) - 0.5 * aq.square() * rows_sqn) * inv_s2[query]
    direct = -0.5 * (xq - aq[:, None] * rows).square().sum(1) * inv_s2[query]
    return torch.where(use_expansion[query], expanded, direct)


def _update(acc: _Acc, sel: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor,
            rows: torch.Tensor) -> None:
    """Fold exact log-weights ``logits`` (len(sel), c) of reference ``rows`` (c, D), samples
    ``idx`` (c,), into the accumulators of the queries ``sel``."""
    chunk_max, chunk_arg = logits.max(1)
    old_m = acc.m[sel]
    new_m = torch.maximum(old_m, chunk_max)
    rescale = _rescale(acc, sel, new_m)
    centred = logits - new_m[:, None]
    p = torch.exp(centred)
    acc.S[sel] = rescale * acc.S[sel] + p.sum(1)
    acc.Q[sel] = rescale.square() * acc.Q[sel] + torch.einsum("bc,bc->b", p, p)
    acc.H[sel] += torch.einsum("bc,bc->b", p, centred)
    if acc.A is not None:
        acc.A[sel] = rescale[:, None] * acc.A[sel] + p @ rows
    acc.best[sel] = torch.where(chunk_max > old_m, idx[chunk_arg], acc.best[sel])
    acc.m[sel] = new_m


def _update_pairs(acc: _Acc, query: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor,
                  rows: torch.Tensor) -> None:
    """Fold sparse exact log-weights ``logits`` (P,) of (``query``[j], reference ``idx``[j]),
    with rows ``rows`` (P, D), into the accumulators."""
    b = acc.m.shape[0]
    chunk_max = torch.full((b,), -math.inf, dtype=torch.float64).scatter_reduce(
        0, query, logits, "amax")
    everyone = torch.arange(b)
    new_m = torch.maximum(acc.m, chunk_max)
    rescale = _rescale(acc, everyone, new_m)
    centred = logits - new_m[query]
    p = torch.exp(centred)
    acc.S = rescale * acc.S + torch.zeros(b, dtype=torch.float64).index_add_(0, query, p)
    acc.Q = rescale.square() * acc.Q + torch.zeros(b, dtype=torch.float64).index_add_(0, query, p * p)
    acc.H += torch.zeros(b, dtype=torch.float64).index_add_(0, query, p * centred)
    if acc.A is not None:
        acc.A *= rescale[:, None]
        acc.A.index_add_(0, query, p[:, None] * rows)
    # first pair attaining each query's chunk maximum
    position = torch.arange(logits.numel())
    at_max = torch.where(logits == chunk_max[query], position, logits.numel())
    first = torch.full((b,), logits.numel(), dtype=torch.int64).scatter_reduce(0, query, at_max, "amin")
    better = (chunk_max > acc.m) & (first < logits.numel())
    acc.best = torch.where(better, idx[first.clamp_max(logits.numel() - 1)], acc.best)
    acc.m = new_m


def _rescale(acc: _Acc, sel: torch.Tensor, new_m: torch.Tensor) -> torch.Tensor:
    """Move H of the queries ``sel`` from the running max ``acc.m[sel]`` to ``new_m``.

    Returns the factor e^{m_old - m_new} for S, Q and A (applied by the caller); queries
    without mass yet (m = -inf, S = 0) get factor 0 and stay empty.
    """
    has_mass = acc.S[sel] > 0
    shift = acc.m[sel] - new_m                 # <= 0; -inf or nan only where there is no mass
    rescale = torch.where(has_mass, torch.exp(shift), 0.0)
    acc.H[sel] = torch.where(has_mass, rescale * (acc.H[sel] + shift * acc.S[sel]), 0.0)
    return rescale
