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
*Fast pass.* The reference is streamed in chunks of ``chunk_size`` rows. For each chunk one
matmul in the reference's precision (float32 for a float32 reference) gives x·x_i, and

    ŝ_i = ((1 - s) x·x_i - (1 - s)^2 ||x_i||^2 / 2) / s^2      (float64; ||x_i||^2 cached in float64)

equals l_i + ||x||^2/(2 s^2), a constant per query, so it ranks the softmax correctly. The
expansion cancels: the rounding error of the dot product, at most γ_{D+2}·||x||·||x_i|| with
γ_n = n·u/(1 - n·u) (u the unit roundoff), is multiplied by (1 - s)/s^2. So each query gets a
rigorous bound E = 1.01 · (1 - s)/s^2 · γ_{D+2} · ||x|| · max_i ||x_i|| (plus float64 terms), and
ŝ is used only to *select* candidates: sample i is a candidate when ŝ_i >= max_j ŝ_j - T with

    T = 2E + ln(N / δ),   δ = ``drop_tolerance`` (default 1e-12).

Every non-candidate has l_i - max_j l_j < -ln(N/δ), so all of them together carry less than δ
of the posterior mass. The running maximum only grows, so a sample dropped early stays droppable.

*Exact pass.* Candidates (the union over the batch, or the whole chunk when more than half of it
qualifies) are re-scored in float64: by the float64 expansion (without the constant ||x||^2)
when its own bound γ_{D+3}·(2(1 - s)||x|| max ||x_i|| + (1 - s)^2 max ||x_i||^2) / (2 s^2) is below
1e-9 nats, otherwise from the differences x - (1 - s) x_i directly (no cancellation). One method
per query for the whole pass, so its log-weights share one constant. These exact log-weights feed a streaming
("online") log-sum-exp: running max m, S = Σ e^{l - m}, Q = Σ e^{2(l - m)}, H = Σ e^{l - m}(l - m)
and A = Σ e^{l - m} x_i (float64), rescaled whenever m grows. Memory is O(B × chunk_size) plus one
chunk of the reference, whatever N is. Each query reports ``dropped_mass``, a rigorous upper
bound on the mass it did not compute (≤ δ in exact mode).

*Top-k mode* (``top_k=K``). Since ||x - (1 - s) x_i|| = (1 - s)·||x/(1 - s) - x_i||, the K nearest
neighbours of x/(1 - s) under FAISS (``ReferenceSet.nearest``) are the K heaviest samples. Their
weights are exact (float64 distances). Every other sample is at least as far as the K-th
candidate d_K, so the dropped mass relative to the computed mass is at most
(N - K)·exp(-(1 - s)^2 (d_K^2 - d_1^2) / (2 s^2)) / S (``dropped_mass``). The bound holds when
FAISS returns the true K nearest (exact index); with ``approximate=True`` it is an estimate. At
s = 1 every weight is equal and top-k would drop (N - K)/N of the mass, so those queries use the
exact pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from steersample._checks import check_labels, check_positive_int, check_sigma
from steersample.reference import ReferenceSet, _groups

__all__ = ["EmpiricalOracle", "Posterior", "OracleOutput"]

_EXPANSION_TOL = 1e-9           # nats: float64 expansion accepted below this error bound
_CHUNK_ELEMENTS = 1 << 20       # default chunk: about 4 MB of float32 reference rows
_GATHER_ELEMENTS = 1 << 22      # float64 elements per block of gathered top-k rows
_SCORE_ELEMENTS = 1 << 21       # queries x chunk scores per block (float64: 16 MB)
_FLOAT64_COPY_ELEMENTS = 1 << 23  # references up to this size keep a cached float64 copy


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


class EmpiricalOracle:
    """The exact empirical posterior, denoiser and velocity over a :class:`ReferenceSet`.

    Args:
        reference: the reference set (what the oracle memorises).
        chunk_size: reference rows per streamed chunk (default: about 4 MB of float32 rows).
        top_k: ``None`` for the exact oracle; an int K for FAISS top-K candidates with exact
            weights on them (see the module docstring for the bound on the dropped mass).
        approximate: in top-k mode, search candidates with the IVF index instead of exactly.
        nprobe: IVF lists visited per query in approximate top-k mode.
        drop_tolerance: δ, the posterior mass the exact mode may leave out (default 1e-12).
    """

    def __init__(self, reference: ReferenceSet, *, chunk_size: int | None = None,
                 top_k: int | None = None, approximate: bool = False, nprobe: int | None = None,
                 drop_tolerance: float = 1e-12) -> None:
        if not isinstance(reference, ReferenceSet):
            raise TypeError(
                f"reference must be a steersample.ReferenceSet, got {type(reference).__name__}; "
                f"wrap your latents: ReferenceSet(latents, labels)"
            )
        self.reference = reference
        self.chunk_size = (check_positive_int(chunk_size, "chunk_size") if chunk_size is not None
                           else max(64, min(65536, _CHUNK_ELEMENTS // reference.dim)))
        self.top_k = None if top_k is None else check_positive_int(top_k, "top_k")
        if approximate and self.top_k is None:
            raise ValueError("approximate=True needs top-k mode; pass top_k=K as well")
        self.approximate = bool(approximate)
        self.nprobe = None if nprobe is None else check_positive_int(nprobe, "nprobe")
        if not (0.0 < float(drop_tolerance) < 1.0):
            raise ValueError(f"drop_tolerance must lie in (0, 1), got {drop_tolerance}")
        self.drop_tolerance = float(drop_tolerance)

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
        # exact scores: float64 expansion without ||x||^2 where its bound is small, else
        # differences; ``offset`` is the per-query constant separating the two scales
        u64 = torch.finfo(torch.float64).eps / 2
        gamma64 = (dim + 3) * u64 / (1 - (dim + 3) * u64)
        bound64 = 1.01 * (gamma64 + 2 * u64) * (2 * a * x_norm * max_norm + a.square() * max_norm ** 2)
        use_expansion = bound64 * inv_s2 / 2 < _EXPANSION_TOL
        offset = torch.where(use_expansion, 0.0, 0.5 * x_norm.square() * inv_s2)
        # fast pass in float64 when the reference is float64, or small enough to hold a float64
        # copy and every query can use the expansion (then the fast scores are the exact ones)
        source, fast_dtype, augmented = flat, torch.float32, False
        if bool(use_expansion.all()) and flat.numel() <= _FLOAT64_COPY_ELEMENTS:
            # rows [x_i, ||x_i||^2]: one matmul with [(1-s)x/s^2, -(1-s)^2/(2s^2)] gives ŝ
            source, fast_dtype, augmented = ref._float64_augmented(), torch.float64, True
        elif flat.dtype == torch.float64:
            fast_dtype = torch.float64
        exact_fast = fast_dtype == torch.float64 and bool(use_expansion.all())
        qf = q.to(fast_dtype)
        if augmented:
            qf = torch.cat([qf * (a * inv_s2)[:, None], (-0.5 * a.square() * inv_s2)[:, None]], 1)
        # rigorous bound E on |ŝ_i - (l_i + ||x||^2/(2 s^2))| for the fast pass
        u = torch.finfo(fast_dtype).eps / 2
        gamma = (dim + 3) * u / (1 - (dim + 3) * u)
        scale = a * x_norm * max_norm + a.square() * max_norm ** 2
        err = 1.01 * inv_s2 * (a * x_norm * max_norm * (gamma + u) + 8 * dim * u64 * scale)
        threshold = 2 * err + math.log(n / self.drop_tolerance)

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
            chunk = chunk.to("cpu")
            # fast pass: one matmul, scores in float64
            if augmented:
                s_hat = qf @ chunk.T
                chunk = chunk[:, :dim]
            else:
                dots = (qf @ chunk.to(fast_dtype).T).to(torch.float64)
                s_hat = (a[:, None] * dots - (0.5 * a.square())[:, None] * sqn[idx][None, :]) \
                    * inv_s2[:, None]
            fast_max = torch.maximum(fast_max, s_hat.max(1).values)
            keep = s_hat >= (fast_max - threshold)[:, None]
            n_keep = int(keep.sum())
            dense = 8 * n_keep > keep.numel() or n_keep * dim > _GATHER_ELEMENTS
            if dense:
                keep.fill_(True)
            else:  # dropped-mass bookkeeping: true l_i + ||x||^2/(2 s^2) <= ŝ_i + E
                acc.n_drop += (~keep).sum(1)
                acc.drop_max = torch.maximum(
                    acc.drop_max, s_hat.masked_fill(keep, -math.inf).max(1).values + err - offset)
                if n_keep == 0:
                    continue
            # exact pass: float64 log-weights on the kept (query, sample) pairs
            if dense:
                rows = chunk.to(torch.float64)
                logits = s_hat if exact_fast else self._exact_logits(
                    q, a, inv_s2, rows, sqn[idx], use_expansion)
                _update(acc, logits, idx, rows)
            else:
                qi, ci = keep.nonzero().unbind(1)
                rows = chunk[ci].to(torch.float64)
                logits = s_hat[qi, ci] if exact_fast else _pair_logits(
                    q, a, inv_s2, qi, rows, sqn[idx[ci]], use_expansion)
                _update_pairs(acc, qi, logits, idx[ci], rows)
        return acc

    @staticmethod
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
        for r in dir_rows.tolist():  # direct differences, one query at a time: O(chunk) memory
            diff = q[r][None, :] - a[r] * sub
            logits[r] = -0.5 * diff.square().sum(1) * inv_s2[r]
        return logits

    def _top_k(self, q: torch.Tensor, s: torch.Tensor, label: int | None,
               want_mean: bool) -> _Acc:
        ref = self.reference
        n = len(ref) if label is None else ref.indices(label).numel()
        k = min(self.top_k, n)
        noise = s >= 1.0
        if bool(noise.any()):  # uniform posterior: top-k cannot represent it, use the exact pass
            acc_noise = self._exact(q[noise], s[noise], label, want_mean)
        a = 1.0 - s
        rest = (~noise).nonzero().flatten()
        b, dim = q.shape
        acc = _Acc(m=torch.zeros(b, dtype=torch.float64), S=torch.ones(b, dtype=torch.float64),
                   Q=torch.ones(b, dtype=torch.float64), H=torch.zeros(b, dtype=torch.float64),
                   A=torch.zeros(b, dim, dtype=torch.float64) if want_mean else None,
                   best=torch.zeros(b, dtype=torch.int64), n_drop=torch.zeros(b, dtype=torch.float64),
                   drop_max=torch.full((b,), -math.inf, dtype=torch.float64))
        if rest.numel():
            y = (q[rest] / a[rest, None]).reshape(-1, *ref.sample_shape)
            dist, idx = ref.nearest(y, k=k, labels=label, approximate=self.approximate,
                                    nprobe=self.nprobe)
            dist, idx = dist.to("cpu", torch.float64), idx.cpu()
            logits = -0.5 * (a[rest, None] * dist).square() / s[rest, None].square()
            m = logits[:, 0]
            p = torch.exp(logits - m[:, None])
            acc.m[rest], acc.S[rest] = m, p.sum(1)
            acc.Q[rest], acc.H[rest] = p.square().sum(1), (p * (logits - m[:, None])).sum(1)
            acc.best[rest] = idx[:, 0]
            acc.n_drop[rest] = float(n - k)
            acc.drop_max[rest] = logits[:, -1] if n > k else -math.inf
            if want_mean:
                flat = ref.flat
                block = max(1, _GATHER_ELEMENTS // (k * dim))
                for i in range(0, rest.numel(), block):
                    rows = flat[idx[i:i + block].flatten().to(flat.device)].to("cpu", torch.float64)
                    acc.A[rest[i:i + block]] = torch.einsum(
                        "bk,bkd->bd", p[i:i + block], rows.reshape(-1, k, dim))
        if bool(noise.any()):
            for name in ("m", "S", "Q", "H", "best", "n_drop", "drop_max"):
                getattr(acc, name)[noise] = getattr(acc_noise, name)
            if want_mean:
                acc.A[noise] = acc_noise.A
        return acc


def _pair_logits(q: torch.Tensor, a: torch.Tensor, inv_s2: torch.Tensor, query: torch.Tensor,
                 rows: torch.Tensor, rows_sqn: torch.Tensor, use_expansion: torch.Tensor) -> torch.Tensor:
    """Exact float64 log-weights of (query[j], rows[j]) pairs, on each query's own scale."""
    xq, aq = q[query], a[query]
    expanded = (aq * (xq * rows).sum(1) - 0.5 * aq.square() * rows_sqn) * inv_s2[query]
    direct = -0.5 * (xq - aq[:, None] * rows).square().sum(1) * inv_s2[query]
    return torch.where(use_expansion[query], expanded, direct)


def _update(acc: _Acc, logits: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """Fold exact log-weights ``logits`` (b, c) of reference ``rows`` (c, D) into ``acc``."""
    chunk_max, chunk_arg = logits.max(1)
    new_m = torch.maximum(acc.m, chunk_max)
    rescale = _rescale(acc, new_m)
    centred = logits - new_m[:, None]
    p = torch.exp(centred)
    acc.S = rescale * acc.S + p.sum(1)
    acc.Q = rescale.square() * acc.Q + torch.einsum("bc,bc->b", p, p)
    acc.H += torch.einsum("bc,bc->b", p, centred)
    if acc.A is not None:
        acc.A = rescale[:, None] * acc.A + p @ rows
    better = chunk_max > acc.m
    acc.best = torch.where(better, idx[chunk_arg], acc.best)
    acc.m = new_m


def _update_pairs(acc: _Acc, query: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor,
                  rows: torch.Tensor) -> None:
    """Fold sparse exact log-weights ``logits`` (P,) of (``query``[j], reference ``idx``[j])."""
    b = acc.m.shape[0]
    chunk_max = torch.full((b,), -math.inf, dtype=torch.float64).scatter_reduce(
        0, query, logits, "amax")
    new_m = torch.maximum(acc.m, chunk_max)
    rescale = _rescale(acc, new_m)
    centred = logits - new_m[query]
    p = torch.exp(centred)
    acc.S = rescale * acc.S + torch.zeros(b, dtype=torch.float64).index_add_(0, query, p)
    acc.Q = rescale.square() * acc.Q + torch.zeros(b, dtype=torch.float64).index_add_(0, query, p * p)
    acc.H += torch.zeros(b, dtype=torch.float64).index_add_(0, query, p * centred)
    if acc.A is not None:
        acc.A = rescale[:, None] * acc.A
        acc.A.index_add_(0, query, p[:, None] * rows)
    # first pair attaining each query's chunk maximum
    position = torch.arange(logits.numel())
    at_max = torch.where(logits == chunk_max[query], position, logits.numel())
    first = torch.full((b,), logits.numel(), dtype=torch.int64).scatter_reduce(0, query, at_max, "amin")
    better = (chunk_max > acc.m) & (first < logits.numel())
    acc.best = torch.where(better, idx[first.clamp_max(logits.numel() - 1)], acc.best)
    acc.m = new_m


def _rescale(acc: _Acc, new_m: torch.Tensor) -> torch.Tensor:
    """Move S, H (Q, A by the caller) from the old running max ``acc.m`` to ``new_m``.

    Returns e^{m_old - m_new}; queries without mass yet (m = -inf) get factor 0 and stay empty.
    """
    shift = acc.m - new_m                      # <= 0; -inf before the first mass, nan if both -inf
    rescale = torch.where(acc.S > 0, torch.exp(shift), 0.0)
    acc.H = torch.where(acc.S > 0, rescale * (acc.H + shift * acc.S), 0.0)
    return rescale
