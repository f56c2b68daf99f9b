"""``EmpiricalOracle``: the closed-form flow-matching optimum over a reference set (SCIENCE.md §1).

For reference samples x_i (i = 1..N) and a query x at noise level s in (0, 1] (Liu et al. 2025,
arXiv 2512.02826; diffusers convention, s = 1 is noise):

    l_i   = -||x - (1 - s) x_i||^2 / (2 s^2)          log-weights
    γ_i   = softmax_i(l_i)                             posterior over reference samples
    x̂₀*   = Σ_i γ_i x_i                                denoise
    v*    = (x - x̂₀*) / s                              velocity

With ``labels`` the sums run over the samples of the query's class only (class-conditional
oracle). At s = 1 every l_i is equal: the posterior is uniform and x̂₀* is the (class) mean.

Numerics (the policy for this module, stated once)
--------------------------------------------------
*Selection scores.* The reference is streamed in chunks of ``chunk_size`` rows. One matmul per
chunk (float32 for a float32 reference) gives x·x_i, and in float64

    ŝ_i = ((1 - s) x·x_i - (1 - s)^2 ||x_i||^2 / 2) / s^2          (||x_i||^2 cached in float64)

equals l_i + ||x||^2/(2 s^2), a constant per query, so it ranks the softmax correctly. The
expansion cancels: the dot product errs by at most γ_{D+3}·||x||·||x_i||, γ_n = n·u/(1 - n·u)
(u the unit roundoff; Higham §3.1), and the error is multiplied by (1 - s)/s^2. Each query gets
a rigorous bound E (``_oracle_math._error_bounds``), and ŝ only *selects*: sample i is kept for
query x when ŝ_i >= max_j ŝ_j - T, with

    T = 2E + ln(N / δ),   δ = ``drop_tolerance`` (default 1e-12),

so all samples left out carry less than δ of the posterior mass together. The running maximum
only grows, so a sample left out early stays negligible.

*Exact log-weights.* Kept samples are re-scored in float64: by the float64 expansion when its
own rigorous bound is below 1e-9 nats, otherwise from the differences x - (1 - s) x_i (no
cancellation); one method per query for the whole pass. A query keeping more than 1/8 of a chunk
is scored on the whole chunk (dense, matmuls), otherwise on its kept (query, sample) pairs only
(sparse, gathers). When every query in the batch may use the float64 expansion (high σ), the
float64 scores are exact themselves and the float32 selection matmul is skipped: from the start
for float64 or small (≤ 2^20 values, cached float64 copy) references, else from the first dense
chunk on. The exact log-weights feed a streaming log-sum-exp: running max m, S = Σ e^{l - m},
Q = Σ e^{2(l - m)}, H = Σ e^{l - m}(l - m), A = Σ e^{l - m} x_i (float64), rescaled whenever m
grows; then top1 = 1/S, entropy = ln S - H/S, effective_count = S^2/Q, x̂₀* = A/S. Memory is
O(B × chunk_size) plus one chunk of the reference in float64, whatever N is. Each query reports
``dropped_mass``, a rigorous upper bound on the posterior mass it did not compute (≤ δ here).

*Top-k mode* (``top_k=K``). Since ||x - (1 - s) x_i|| = (1 - s)·||x/(1 - s) - x_i||, the K
nearest neighbours of x/(1 - s) are the K heaviest samples. FAISS finds them (exactly, or
through an approximate index: with ``approximate=True``, and by default for sets larger than
``AUTO_INDEX_MIN`` rows: the IVF index over a PCA projection of ``ReferenceSet.build_ivf``, or a
store's ``index.faiss``); their weights are exact (float64 differences on rows gathered with
``ReferenceSet.rows``, which a sharded store serves from its memory maps). Every other sample is at least as far as the K-th
candidate d_K, so the dropped mass relative to the computed mass is at most

    (N - K)·exp(-(1 - s)^2 (d_K^2 - d_1^2) / (2 s^2)) / S                 (``dropped_mass``)

With ``max_dropped`` (default 1e-4) K grows 4x for the queries whose bound exceeds it; queries
that would need K > N/8 take the exact pass, as do queries at s = 1 (uniform weights). The bound
holds when FAISS returns the true K nearest (exact search); through an index it is an
estimate, and near σ*, where the posterior is spread and the query is mostly noise, the
approximate search can miss heavy samples (see ``benchmarks/oracle.py``).

*Tail estimate* (``tail=True``). Near σ* the posterior spreads over thousands of samples and no
small K holds it. Queries whose bound exceeds ``max_dropped`` then get exact weights on their
8 K best samples by a projected score and a log-normal estimate of the sum over all the others,
from a rank-128 principal projection of the set plus each sample's residual norm
(``steersample.oracle._tail``). It is an estimate: ``dropped_mass`` reports the estimated share of the
tail. At N = 1e5, D = 4096 it is 12x faster than the exact pass at σ* with relative velocity
error 7.7e-4, where fixed K = 64 errs by 7e-2 (``benchmarks/oracle.py --top-k-only``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from steersample._checks import check_labels, check_positive_int, check_sigma
from steersample.oracle._math import (_GATHER_ELEMENTS, _Acc, _best_candidates, _error_bounds,
                                      _exact_logits, _pair_logits, _update, _update_pairs)
from steersample.oracle._tail import tail_pass
from steersample.reference.reference_set import ReferenceSet, _groups

__all__ = ["EmpiricalOracle", "Posterior", "OracleOutput"]

_CHUNK_ELEMENTS = 1 << 20       # default chunk: about 4 MB of float32 reference rows
_SCORE_ELEMENTS = 1 << 21       # queries x chunk scores per block (float64: 16 MB)
_FLOAT64_COPY_ELEMENTS = 1 << 20  # references up to this size keep a cached float64 copy (8 MB)
TAIL_CANDIDATES = 8             # tail pass: exact weights on 8 K samples per query


@dataclass(frozen=True)
class Posterior:
    """Summary of the oracle posterior γ for each query; every field has shape ``(B,)``.

    Attributes:
        top1: max_i γ_i.
        index: argmax_i γ_i (int64 index into the reference set).
        entropy: -Σ_i γ_i ln γ_i (nats); 0 when one sample holds all the mass.
        effective_count: 1 / Σ_i γ_i^2 (1 = one sample, N = uniform).
        dropped_mass: upper bound on the posterior mass not computed (see module docstring).
    """

    top1: torch.Tensor
    index: torch.Tensor
    entropy: torch.Tensor
    effective_count: torch.Tensor
    dropped_mass: torch.Tensor


@dataclass(frozen=True)
class OracleOutput:
    """Everything one oracle pass yields: the posterior, x̂₀* and v*, shapes as the query."""

    posterior: Posterior
    denoised: torch.Tensor
    velocity: torch.Tensor


class EmpiricalOracle:
    """The exact empirical posterior, denoiser and velocity over a :class:`ReferenceSet`.

    Args:
        reference: the reference set (what the oracle memorises).
        chunk_size: reference rows per streamed chunk (default: 1/64 of the set, between
            2^18 and 2^20 values, i.e. 1 to 4 MB of float32 rows).
        top_k: ``None`` for the exact oracle; an int K for FAISS top-K candidates with exact
            weights on them (see the module docstring for the bound on the dropped mass).
        max_dropped: in top-k mode, the largest dropped-mass bound accepted per query: K grows
            4x until the bound is met, and queries that would need K > N/8 use the exact pass.
            ``None`` keeps K fixed whatever the bound.
        approximate: in top-k mode, how candidates are searched: ``True`` the approximate index
            (``ReferenceSet.build_ivf``, or a store's ``index.faiss``), ``False`` exactly,
            ``None`` (default) by size: the index for sets with more than
            ``steersample.reference.reference_set.AUTO_INDEX_MIN`` rows (a store: when it has an index).
        nprobe: IVF lists visited per query in approximate top-k mode.
        drop_tolerance: δ, the posterior mass the exact mode may leave out (default 1e-12).
        tail: in top-k mode, queries whose dropped-mass bound exceeds ``max_dropped`` get exact
            weights on their ``8 K`` best samples by a rank-128 projected score and a
            log-normal *estimate* of all the others (``steersample.oracle._tail``; the projection is
            computed once per reference set), instead of larger K or the exact pass. Their
            ``dropped_mass`` is then the estimated share of that tail, not a bound.
    """

    def __init__(self, reference: ReferenceSet, *, chunk_size: int | None = None,
                 top_k: int | None = None, max_dropped: float | None = 1e-4,
                 approximate: bool | None = None, nprobe: int | None = None,
                 drop_tolerance: float = 1e-12, tail: bool = False) -> None:
        if not isinstance(reference, ReferenceSet):
            raise TypeError(
                f"reference must be a steersample.ReferenceSet, got {type(reference).__name__}; "
                f"wrap your latents: ReferenceSet(latents, labels)"
            )
        self.reference = reference
        # default: 1/64 of the reference per chunk, between 2^18 and 2^20 elements
        elements = min(_CHUNK_ELEMENTS, max(_CHUNK_ELEMENTS // 4, len(reference) * reference.dim // 64))
        self.chunk_size = (check_positive_int(chunk_size, "chunk_size") if chunk_size is not None
                           else max(1, elements // reference.dim))
        self.top_k = None if top_k is None else check_positive_int(top_k, "top_k")
        if approximate is True and self.top_k is None:
            raise ValueError("approximate=True needs top-k mode; pass top_k=K as well")
        if max_dropped is not None and not (0.0 < float(max_dropped) < 1.0):
            raise ValueError(f"max_dropped must lie in (0, 1) or be None, got {max_dropped}")
        self.max_dropped = None if max_dropped is None else float(max_dropped)
        self.approximate = None if approximate is None else bool(approximate)
        self.nprobe = None if nprobe is None else check_positive_int(nprobe, "nprobe")
        if not (0.0 < float(drop_tolerance) < 1.0):
            raise ValueError(f"drop_tolerance must lie in (0, 1), got {drop_tolerance}")
        self.drop_tolerance = float(drop_tolerance)
        if not isinstance(tail, bool):
            raise TypeError(f"tail must be True or False, got {tail!r}")
        if tail and (self.top_k is None or self.max_dropped is None):
            raise ValueError("tail=True estimates what top-k mode drops: pass top_k=K and keep "
                             "max_dropped set (e.g. max_dropped=1e-4)")
        self.tail = tail

    def __repr__(self) -> str:
        mode = "exact" if self.top_k is None else f"top_k={self.top_k}"
        return f"EmpiricalOracle({self.reference!r}, {mode}, chunk_size={self.chunk_size})"

    # ----------------------------------------------------------------------------- public
    def posterior(self, x: torch.Tensor, sigma: float | torch.Tensor,
                  labels: int | torch.Tensor | None = None) -> Posterior:
        """Posterior summary for queries ``x`` ``(B, *shape)`` at noise level(s) ``sigma``."""
        post, _ = self._run(x, sigma, labels, want_mean=False)
        return post

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor,
                labels: int | torch.Tensor | None = None) -> torch.Tensor:
        """x̂₀* = Σ_i γ_i x_i, same shape, dtype and device as ``x``."""
        return self.evaluate(x, sigma, labels).denoised

    def velocity(self, x: torch.Tensor, sigma: float | torch.Tensor,
                 labels: int | torch.Tensor | None = None) -> torch.Tensor:
        """v* = (x - x̂₀*) / sigma, same shape, dtype and device as ``x``."""
        return self.evaluate(x, sigma, labels).velocity

    def evaluate(self, x: torch.Tensor, sigma: float | torch.Tensor,
                 labels: int | torch.Tensor | None = None) -> OracleOutput:
        """Posterior, x̂₀* and v* from a single pass over the reference set."""
        post, x0 = self._run(x, sigma, labels, want_mean=True)
        s = check_sigma(sigma, x.shape[0]).reshape(-1, *([1] * (x.dim() - 1)))
        x0_64 = x0.reshape(x.shape)
        v = (x.to(torch.float64).cpu() - x0_64) / s
        return OracleOutput(post, x0_64.to(device=x.device, dtype=x.dtype),
                            v.to(device=x.device, dtype=x.dtype))

    # ----------------------------------------------------------------------------- core
    def _run(self, x: torch.Tensor, sigma: float | torch.Tensor,
             labels: int | torch.Tensor | None, want_mean: bool) -> tuple[Posterior, torch.Tensor | None]:
        ref = self.reference
        x = ref._check_queries(x)
        batch = x.shape[0]
        s = check_sigma(sigma, batch)
        lab = check_labels(labels, batch, ref.classes)
        q = x.detach().reshape(batch, -1).to("cpu", torch.float64)
        fields = {name: torch.empty(batch, dtype=torch.float64) for name in
                  ("top1", "entropy", "effective_count", "dropped_mass")}
        index = torch.empty(batch, dtype=torch.int64)
        x0 = torch.empty(batch, ref.dim, dtype=torch.float64) if want_mean else None
        pool_size = len(ref)
        for label, group in _groups(lab, batch):
            if label is not None:
                pool_size = ref.indices(label).numel()
            # query blocks keep the (block, chunk) score matrices at O(_SCORE_ELEMENTS)
            block = max(1, _SCORE_ELEMENTS // min(self.chunk_size, pool_size))
            for rows in torch.split(group, block):
                self._fill(q, s, rows, label, want_mean, fields, index, x0)
        dev = x.device
        post = Posterior(index=index.to(dev), **{k: v.to(dev) for k, v in fields.items()})
        return post, x0

    def _fill(self, q: torch.Tensor, s: torch.Tensor, rows: torch.Tensor, label: int | None,
              want_mean: bool, fields: dict[str, torch.Tensor], index: torch.Tensor,
              x0: torch.Tensor | None) -> None:
        """Run one block of queries and write its results into the output buffers."""
        if self.top_k is None:
            acc = self._exact(q[rows], s[rows], label, want_mean)
        else:
            acc = self._top_k(q[rows], s[rows], label, want_mean)
        fields["top1"][rows] = 1.0 / acc.S
        fields["entropy"][rows] = (torch.log(acc.S) - acc.H / acc.S).clamp_min(0.0)
        fields["effective_count"][rows] = acc.S.square() / acc.Q
        fields["dropped_mass"][rows] = acc.n_drop * torch.exp(acc.drop_max - acc.m) / acc.S
        index[rows] = acc.best
        if want_mean:
            x0[rows] = acc.A / acc.S[:, None]

    def _exact(self, q: torch.Tensor, s: torch.Tensor, label: int | None,
               want_mean: bool) -> _Acc:
        """Two-level streaming pass (fast selection, exact float64 weights); see module docs."""
        ref = self.reference
        flat, sqn = ref.flat, ref.squared_norms().cpu()
        pool = None if label is None else ref.indices(label)
        n = len(ref) if pool is None else pool.numel()
        b, dim = q.shape
        a = 1.0 - s
        inv_s2 = 1.0 / s.square()
        max_norm = math.sqrt(float(sqn.max() if pool is None else sqn[pool].max()))
        x_norm = q.norm(dim=1)
        err32, err64, use_expansion = _error_bounds(a, inv_s2, x_norm, max_norm, dim)
        # the per-query constant separating exact scores by expansion (l + ||x||^2/(2 s^2))
        # from those by differences (l)
        offset = torch.where(use_expansion, 0.0, 0.5 * x_norm.square() * inv_s2)
        threshold = 2 * torch.maximum(err32, err64) + math.log(n / self.drop_tolerance)
        # When every query may use the float64 expansion, float64 scores are exact and the
        # float32 selection pass is skipped: from the start for float64 or small references
        # (small ones keep a cached float64 copy), else from the first dense chunk on.
        all_expansion = bool(use_expansion.all())
        small = flat.numel() <= _FLOAT64_COPY_ELEMENTS
        source = ref._float64_flat() if all_expansion and small else flat
        in_float64 = all_expansion and (small or flat.dtype == torch.float64)
        q32 = q.to(torch.float32)
        c1, c2 = (a * inv_s2)[:, None], (0.5 * a.square() * inv_s2)[:, None]

        acc = _Acc(m=torch.full((b,), -math.inf, dtype=torch.float64),
                   S=torch.zeros(b, dtype=torch.float64), Q=torch.zeros(b, dtype=torch.float64),
                   H=torch.zeros(b, dtype=torch.float64),
                   A=torch.zeros(b, dim, dtype=torch.float64) if want_mean else None,
                   best=torch.zeros(b, dtype=torch.int64), n_drop=torch.zeros(b, dtype=torch.float64),
                   drop_max=torch.full((b,), -math.inf, dtype=torch.float64))
        fast_max = torch.full((b,), -math.inf, dtype=torch.float64)
        for start in range(0, n, self.chunk_size):
            stop = min(n, start + self.chunk_size)
            idx = torch.arange(start, stop) if pool is None else pool[start:stop]
            chunk = source[start:stop] if pool is None else source[idx.to(source.device)]
            chunk, rows = chunk.to("cpu"), None
            # selection scores ŝ = ((1-s) x.x_i - (1-s)^2 ||x_i||^2 / 2) / s^2, error <= err
            if in_float64:
                rows = chunk.to(torch.float64)
                s_hat, err = c1 * (q @ rows.T) - c2 * sqn[idx][None, :], err64
            else:
                dots = q32 @ chunk.to(torch.float32).T
                s_hat, err = c1 * dots.to(torch.float64) - c2 * sqn[idx][None, :], err32
            exact_scores = in_float64  # ŝ itself is exact (expansion scale) for every query
            fast_max = torch.maximum(fast_max, s_hat.max(1).values)
            keep = s_hat >= (fast_max - threshold)[:, None]
            # per query: dense (exact scores on the whole chunk) or sparse (kept pairs only)
            kept = keep.sum(1)
            dense = (8 * kept > keep.shape[1]).nonzero().flatten()
            sparse = (8 * kept <= keep.shape[1]).nonzero().flatten()
            if sparse.numel():  # dropped-mass bookkeeping: true l_i + ||x||^2/(2 s^2) <= ŝ_i + E
                keep_s = keep[sparse]
                acc.n_drop[sparse] += (~keep_s).sum(1)
                dropped_max = s_hat[sparse].masked_fill(keep_s, -math.inf).max(1).values
                acc.drop_max[sparse] = torch.maximum(
                    acc.drop_max[sparse], dropped_max + err[sparse] - offset[sparse])
            if dense.numel():
                rows = chunk.to(torch.float64) if rows is None else rows
                logits = s_hat[dense] if exact_scores else _exact_logits(
                    q[dense], a[dense], inv_s2[dense], rows, sqn[idx], use_expansion[dense])
                _update(acc, dense, logits, idx, rows)
                in_float64 = in_float64 or all_expansion
            if sparse.numel() and bool(keep_s.any()):
                qi, ci = keep_s.nonzero().unbind(1)
                qi = sparse[qi]
                for part in torch.split(torch.arange(qi.numel()), max(1, _GATHER_ELEMENTS // dim)):
                    qp, cp = qi[part], ci[part]
                    pair_rows = (rows if rows is not None else chunk)[cp].to(torch.float64)
                    logits = s_hat[qp, cp] if exact_scores else _pair_logits(
                        q, a, inv_s2, qp, pair_rows, sqn[idx[cp]], use_expansion)
                    _update_pairs(acc, qp, logits, idx[cp], pair_rows)
        return acc

    def _top_k(self, q: torch.Tensor, s: torch.Tensor, label: int | None,
               want_mean: bool) -> _Acc:
        """Top-K candidates by FAISS, exact weights on them (module docstring). With
        ``max_dropped`` set, K is multiplied by 4 for the queries whose dropped-mass bound
        exceeds it; queries that would need K > N/8 (and those at σ = 1) take the exact pass.
        With ``tail=True`` the queries over the bound take the tail pass instead."""
        ref = self.reference
        n = len(ref) if label is None else ref.indices(label).numel()
        b, dim = q.shape
        acc = _Acc(m=torch.zeros(b, dtype=torch.float64), S=torch.ones(b, dtype=torch.float64),
                   Q=torch.ones(b, dtype=torch.float64), H=torch.zeros(b, dtype=torch.float64),
                   A=torch.zeros(b, dim, dtype=torch.float64) if want_mean else None,
                   best=torch.zeros(b, dtype=torch.int64), n_drop=torch.zeros(b, dtype=torch.float64),
                   drop_max=torch.full((b,), -math.inf, dtype=torch.float64))
        pending = (s < 1.0).nonzero().flatten()    # σ = 1: uniform weights, top-k cannot hold them
        exact = (s >= 1.0).nonzero().flatten()
        k = min(self.top_k, n)
        use_index = ref._wants_index(self.approximate)
        while pending.numel():
            a, s2 = 1.0 - s[pending], s[pending].square()
            # ||x - (1-s) x_i|| = (1-s) ||x/(1-s) - x_i||: the K nearest of x/(1-s) weigh most
            k_search = k if use_index else min(n, k + 8)   # spares for float32 ties
            cand = ref._candidates(q[pending] / a[:, None], k_search, label, use_index, self.nprobe)
            best = _best_candidates(ref, q[pending], a, s2, cand, k, n, want_mean)
            done = (best.bound <= self.max_dropped if self.max_dropped is not None
                    else torch.ones(best.bound.shape, dtype=torch.bool))
            rows = pending[done]
            acc.m[rows], acc.S[rows], acc.Q[rows] = best.m[done], best.S[done], best.Q[done]
            acc.H[rows], acc.best[rows] = best.H[done], best.best[done]
            acc.n_drop[rows] = float(n - k)
            acc.drop_max[rows] = best.drop_max[done]
            if want_mean:
                acc.A[rows] = best.A[done]
            pending = pending[~done]
            if pending.numel() and self.tail and TAIL_CANDIDATES * self.top_k < n:
                pool = None if label is None else ref.indices(label)
                _put(acc, pending, tail_pass(ref, q[pending], s[pending], pool,
                                             TAIL_CANDIDATES * self.top_k, want_mean), want_mean)
                break
            k = min(4 * k, n)
            if pending.numel() and 8 * k > n:  # too spread for top-k: exact pass
                exact = torch.cat([exact, pending])
                break
        if exact.numel():
            _put(acc, exact, self._exact(q[exact], s[exact], label, want_mean), want_mean)
        return acc


def _put(acc: _Acc, rows: torch.Tensor, sub: _Acc, want_mean: bool) -> None:
    """Write the accumulators of a sub-batch into rows ``rows`` of ``acc``."""
    for name in ("m", "S", "Q", "H", "best", "n_drop", "drop_max"):
        getattr(acc, name)[rows] = getattr(sub, name)
    if want_mean:
        acc.A[rows] = sub.A
