"""Tail estimate for the top-k oracle (``EmpiricalOracle(top_k=K, tail=True)``).

Near σ* the posterior is spread over thousands of reference samples, so exact weights on a few
candidates drop a visible share of the mass (about 7 % of the velocity at N = 1e5, D = 4096 with
K = 64). The tail pass computes exact weights on the M highest-scoring samples and *estimates*
the rest from a rank-r principal projection of the reference, computed once per set:

    y_j = μ + V p_j + r_j,        V (D, r) orthonormal, p_j = Vᵀ(y_j − μ), r_j ⊥ V

so x·y_j = x·μ + (Vᵀx)·p_j + x_⊥·r_j, with x_⊥ = x − V Vᵀ x. The first two terms are known for
every sample from a (B, r+2) x (r+2, N) matmul; the last is not. Treating r_j as isotropic in
the D − r residual dimensions, with variance ρ_j = ‖r_j‖² / (D − r) per dimension (‖r_j‖² is
stored), the log-weight l_j = (2a x·y_j − a²‖y_j‖²) / (2s²) − ‖x‖²/(2s²) (a = 1 − s) has mean
l̃_j and variance τ_j² = c² ‖x_⊥‖² ρ_j, c = a / s², and the log-normal moments give

    E[e^{l_j}]      = e^{l̃_j + τ_j²/2}
    E[e^{l_j} y_j]  = e^{l̃_j + τ_j²/2} (μ + V p_j + c ρ_j x_⊥).

The M candidates are the samples with the largest l̃_j + τ_j²/2; their weights are exact; the sums
over all other samples use these expectations. This is an estimate, not a bound: its error comes
from how far the residuals are from isotropic and from the spread of the realised x_⊥·r_j over
the tail. ``benchmarks/oracle.py`` measures it against the exact oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from steersample.reference._approximate import _principal_directions
from steersample.oracle._math import _Acc, _best_candidates

__all__: list[str] = []

TAIL_RANK = 128                 # principal directions of the projection
_TRAIN_ROWS = 20_000            # rows the directions are fitted on
_BLOCK_ELEMENTS = 1 << 23       # float32 elements per block when projecting the set
_FLOAT32_NATS = 1e-2            # candidate log-weights from float32 dot products up to this error


@dataclass(frozen=True)
class TailModel:
    """The projection of a reference set: ``mean`` (D,), ``basis`` (D, r) float64 and ``table``
    (N, r + 2) float32 = [p_j, ‖y_j‖², ‖r_j‖²]."""

    mean: torch.Tensor
    basis: torch.Tensor
    table: torch.Tensor

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def residual_dim(self) -> int:
        return max(1, self.basis.shape[0] - self.rank)


def tail_model(ref: Any, seed: int = 0) -> TailModel:
    """The reference set's :class:`TailModel`, built on first use and cached on the set."""
    found = ref._cache.get("tail")
    if found is not None:
        return found
    n, dim = len(ref), ref.dim
    g = torch.Generator().manual_seed(seed)
    pick = torch.sort(torch.randperm(n, generator=g)[:min(n, _TRAIN_ROWS)]).values
    sample = ref.rows(pick).to("cpu", torch.float32)
    mean = sample.mean(0)
    rank = min(TAIL_RANK, dim, sample.shape[0])
    basis = _principal_directions(sample - mean, rank, g) if rank > 0 else torch.zeros(dim, 0)
    table = torch.empty(n, rank + 2, dtype=torch.float32)
    step = max(1, _BLOCK_ELEMENTS // dim)
    for start in range(0, n, step):
        block = ref.rows(torch.arange(start, min(n, start + step))).to("cpu", torch.float32)
        centred = block - mean
        proj = centred @ basis
        table[start:start + block.shape[0], :rank] = proj
        table[start:start + block.shape[0], rank] = block.double().square().sum(1).float()
        resid = centred.double().square().sum(1) - proj.double().square().sum(1)
        table[start:start + block.shape[0], rank + 1] = resid.clamp_min(0.0).float()
    model = TailModel(mean.double(), basis.double(), table)
    ref._cache["tail"] = model
    return model


def tail_pass(ref: Any, q: torch.Tensor, s: torch.Tensor, pool: torch.Tensor | None,
              candidates: int, want_mean: bool) -> _Acc:
    """Exact weights on the ``candidates`` best-scoring samples of each query ``q`` (b, D)
    float64 at noise levels ``s`` (b,), plus the log-normal estimate of the rest (module
    docstring). ``pool``: the rows of the query's class (None: the whole set). The returned
    ``n_drop`` / ``drop_max`` encode the estimated tail share: dropped_mass = T / S."""
    model = tail_model(ref)
    table = model.table if pool is None else model.table[pool]
    n, r = table.shape[0], model.rank
    b = q.shape[0]
    a, s2 = 1.0 - s, s.square()
    c = a / s2
    xv = q @ model.basis                                                          # (b, r)
    x_perp = q - xv @ model.basis.T
    perp2 = x_perp.square().sum(1)
    left = torch.cat([c[:, None] * xv, (-0.5 * a.square() / s2)[:, None],
                      (0.5 * c.square() * perp2 / model.residual_dim)[:, None]], 1)
    # score_j + ‖x‖²/(2s²): mean log-weight plus half its variance (float32, tens of nats)
    score = left.float() @ table.T + (c * (q @ model.mean))[:, None].float()     # (b, n)
    m_cand = min(candidates, n)
    local = torch.topk(score, m_cand, dim=1).indices
    cand = local if pool is None else pool[local]
    best = _candidate_weights(ref, q, a, s2, cand, table[local, r].double(), want_mean)
    shift = best.m + 0.5 * q.square().sum(1) / s2                                # float64
    logw = score - shift[:, None].float()
    w = torch.exp(logw).scatter_(1, local, 0.0)                                  # tail only
    tail = w.double().sum(1)
    acc = _Acc(m=best.m, S=best.S + tail, Q=best.Q + w.double().square().sum(1),
               H=best.H + (w * logw).double().sum(1), A=None, best=best.best,
               n_drop=torch.ones(b, dtype=torch.float64),
               drop_max=best.m + torch.log(tail))
    if want_mean:
        moments = (w @ table).double()                                           # (b, r + 2)
        acc.A = (best.A + tail[:, None] * model.mean + moments[:, :r] @ model.basis.T
                 + (c * moments[:, r + 1] / model.residual_dim)[:, None] * x_perp)
    if not bool(torch.isfinite(acc.S).all()):
        raise FloatingPointError("tail estimate overflowed; use the exact oracle (top_k=None)")
    return acc


def _candidate_weights(ref: Any, q: torch.Tensor, a: torch.Tensor, s2: torch.Tensor,
                       cand: torch.Tensor, sq: torch.Tensor, want_mean: bool) -> Any:
    """Weights of the candidates ``cand`` (b, M): ``_best_candidates`` (float64 differences), or,
    where the float32 dot products x·y_j err by less than ``_FLOAT32_NATS`` in the log-weights
    (a typical rounding of √D·u·‖x‖·‖y‖, times 1/s²; the high-σ queries the tail pass is for),
    the expansion l_j = (2a x·y_j − a²‖y_j‖² − ‖x‖²)/(2s²) from one float32 gather per query
    (a quarter of the memory traffic of float64 differences). ``sq`` (b, M): ‖y_j‖²."""
    b, m = cand.shape
    dim = q.shape[1]
    err = (a / s2) * math.sqrt(dim) * 2.0 ** -24 * q.norm(dim=1) * sq.max(1).values.sqrt()
    if bool((err > _FLOAT32_NATS).any()):
        return _best_candidates(ref, q, a, s2, cand, m, m, want_mean)
    # one query at a time: its (M, D) float32 block is cache-sized and the buffer is reused
    q32 = q.float()
    const = a.square()[:, None] * sq + q.square().sum(1, keepdim=True)
    logits = torch.empty(b, m, dtype=torch.float64)
    A = torch.empty(b, dim, dtype=torch.float64) if want_mean else None
    for i in range(b):
        block = ref.rows(cand[i]).to("cpu", torch.float32)
        logits[i] = (2.0 * a[i] * (block @ q32[i]).double() - const[i]) / (2.0 * s2[i])
        if want_mean:
            A[i] = (torch.exp(logits[i] - logits[i].max()).float() @ block).double()
    top = logits.max(1, keepdim=True)
    centred = logits - top.values
    p = torch.exp(centred)
    out = _Acc(m=top.values[:, 0], S=p.sum(1), Q=p.square().sum(1), H=(p * centred).sum(1), A=A,
               best=torch.gather(cand, 1, top.indices)[:, 0], n_drop=torch.zeros(b, dtype=torch.float64),
               drop_max=torch.full((b,), -math.inf, dtype=torch.float64))
    return out
