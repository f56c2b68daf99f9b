"""Local dimension of a denoiser: the spectrum of M = (1 - σ)·∂x̂₀/∂x_σ (SCIENCE.md §2).

Geometric memorisation (Achilli et al., arXiv 2410.08727): as training data get scarce, a
diffusion model loses tangent directions one by one before it collapses onto points. Near the
data, the denoiser's normalised Jacobian

    M(x, σ) = (1 - σ) · ∂x̂₀/∂x_σ = (1 - σ) · (I - σ ∂v̂/∂x_σ)         (diffusers convention)

has singular values ≈ 1 along directions the model lets vary (tangent) and ≈ 0 along those it
snaps back (normal). The *local dimension* is the number of singular values above
``threshold`` (default 0.5). For the empirical oracle M = ((1 - σ)²/σ²)·Cov_γ(x_i) exactly,
so its dimension goes to 0 as σ → 0 (every point is a training sample).

Two estimators, both matrix-free (only products with M and Mᵀ):

* ``method="exact"`` materialises M from D Jacobian-vector products (``torch.func.jvp``,
  batched with ``torch.func.vmap`` in chunks of ``chunk_size``; or D vector-Jacobian products
  with ``ad="reverse"``) and takes ``torch.linalg.svdvals`` in float64. Cost: D products.
* ``method="randomized"``: randomised SVD with subspace (power) iteration (Halko, Martinsson,
  Tropp 2011, Alg. 4.4). A Gaussian sketch of ``l = rank + oversample`` columns,
  ``power_iters`` round trips M / Mᵀ, then the SVD of the small matrix QᵀM. Cost:
  ``l·(2 + 2·power_iters)`` products. **Accuracy knob**: the estimated singular values are
  lower bounds of the true ones; the error of σ_j falls like (σ_{l+1}/σ_j)^(2·power_iters + 1),
  so raise ``power_iters`` (sharper) or ``oversample``/``rank`` (wider sketch). With
  ``rank=None`` the rank doubles (from 32) until the smallest estimate falls below the
  threshold, so the count above it is complete (``LocalDimension.complete``); once the
  products spent plus the next sketch would reach D it computes the exact spectrum instead
  (flat spectra, e.g. an untrained model, gain nothing from sketching), so the adaptive
  estimate never costs more than about 2·D products.

``method="auto"`` (default) is exact for D ≤ ``exact_max_dim`` (2048) and randomised above.
Forward-mode AD needs attention in the composite "math" kernel, so every product runs inside
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``. vmap evaluates the denoiser on the
single query ``x`` of shape ``(1, *shape)``, so it need not treat batch rows independently.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["LocalDimension", "DenoiseFn", "local_dimension", "jacobian_matrix"]

DenoiseFn = Callable[[torch.Tensor, float], torch.Tensor]
"""``denoise_fn(x, sigma) -> x0_hat``: x ``(B, *shape)``, sigma a float in (0, 1], output the
same shape as x. Build one for an oracle, a transformer or a pipeline with
``steersample.geometry.as_denoiser``. It must be differentiable by ``torch.func``."""

_METHODS = ("auto", "exact", "randomized")
_AD_MODES = ("forward", "reverse")
_START_RANK = 32


@dataclass(frozen=True)
class LocalDimension:
    """Spectrum of M = (1 - σ)·∂x̂₀/∂x at one point.

    Attributes:
        singular_values: ``(k,)`` float64, descending (k = D for the exact method, the sketch
            rank for the randomised one).
        dimension: number of singular values above ``threshold``.
        sigma: the noise level.
        threshold: the cut (0.5 by default: half-way between tangent 1 and normal 0).
        method: ``"exact"`` or ``"randomized"`` (the one actually used).
        ambient_dim: D, the number of entries of one sample.
        num_products: Jacobian-vector plus vector-Jacobian products spent.
        complete: True when every singular value above the threshold is in
            ``singular_values`` (always for ``"exact"``).
    """

    singular_values: torch.Tensor
    dimension: int
    sigma: float
    threshold: float
    method: str
    ambient_dim: int
    num_products: int
    complete: bool


class _Operator:
    """M = (1 - σ)·J with J = ∂x̂₀/∂x at ``x``; rows in, rows out (``(k, D)`` float64)."""

    def __init__(self, denoise_fn: DenoiseFn, x: torch.Tensor, sigma: float, chunk_size: int):
        self.fn = lambda z: denoise_fn(z, sigma)
        self.x = x
        self.scale = 1.0 - sigma
        self.chunk_size = chunk_size
        self.dim = x[0].numel()
        self.count = 0
        self._vjp_fn = None

    def _to_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(device=self.x.device, dtype=self.x.dtype).reshape(-1, *self.x.shape)

    def _from_rows(self, out: torch.Tensor, n: int) -> torch.Tensor:
        return (self.scale * out.detach().reshape(n, self.dim).to(torch.float64))

    def matvec(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows v -> rows M v (forward mode)."""
        from torch.func import jvp, vmap

        n = rows.shape[0]
        tangents = self._to_rows(rows)
        with _math_attention():
            out = vmap(lambda t: jvp(self.fn, (self.x,), (t,))[1],
                       chunk_size=self.chunk_size)(tangents)
        self.count += n
        return self._from_rows(out, n)

    def rmatvec(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows u -> rows Mᵀ u (reverse mode; the forward pass is recorded once)."""
        from torch.func import vjp, vmap

        n = rows.shape[0]
        cotangents = self._to_rows(rows)
        with _math_attention():
            if self._vjp_fn is None:
                _, self._vjp_fn = vjp(self.fn, self.x)
            out = vmap(self._vjp_fn, chunk_size=self.chunk_size)(cotangents)[0]
        self.count += n
        return self._from_rows(out, n)


def jacobian_matrix(denoise_fn: DenoiseFn, x: torch.Tensor, sigma: float, *,
                    ad: str = "forward", chunk_size: int = 64) -> torch.Tensor:
    """The dense M = (1 - σ)·∂x̂₀/∂x at ``x`` ``(1, *shape)``: a ``(D, D)`` float64 matrix.

    ``ad="forward"`` builds it column by column from D JVPs, ``ad="reverse"`` row by row from
    D VJPs (same matrix up to rounding). Meant for small D (it holds D² numbers).
    """
    x, sigma = _check_inputs(denoise_fn, x, sigma)
    op = _Operator(denoise_fn, x, sigma, _check_chunk(chunk_size))
    return _dense(op, _check_choice(ad, _AD_MODES, "ad"))


def local_dimension(denoise_fn: DenoiseFn, x: torch.Tensor, sigma: float, *,
                    threshold: float = 0.5, method: str = "auto", ad: str = "forward",
                    chunk_size: int = 64, rank: int | None = None, oversample: int = 8,
                    power_iters: int = 2, exact_max_dim: int = 2048,
                    generator: torch.Generator | None = None) -> LocalDimension:
    """Singular values of M = (1 - σ)·∂x̂₀/∂x at ``x`` and the count above ``threshold``.

    Args:
        denoise_fn: ``denoise_fn(x, sigma) -> x0_hat`` (see :data:`DenoiseFn`).
        x: the point, ``(1, *shape)``; its dtype and device are the ones the products use.
        sigma: noise level in (0, 1].
        threshold: a singular value above it counts as a tangent direction.
        method: ``"auto"``, ``"exact"`` or ``"randomized"`` (module docstring).
        ad: for ``"exact"``, build M from JVPs (``"forward"``) or VJPs (``"reverse"``; often
            2-5x faster on CPU for transformers, same matrix up to rounding).
        chunk_size: products evaluated per vmap chunk (memory versus speed).
        rank: randomised method: singular values sought; ``None`` grows it from 32 until the
            smallest estimate is below ``threshold`` (or reaches D).
        oversample: randomised method: extra sketch columns beyond ``rank``.
        power_iters: randomised method: M / Mᵀ round trips (accuracy knob, see module doc).
        exact_max_dim: largest D for which ``"auto"`` picks the exact method.
        generator: randomised method: source of the Gaussian sketch (default: seed 0).

    Returns:
        :class:`LocalDimension`.
    """
    x, sigma = _check_inputs(denoise_fn, x, sigma)
    method = _check_choice(method, _METHODS, "method")
    ad = _check_choice(ad, _AD_MODES, "ad")
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number, got {threshold}; the usual cut is 0.5")
    op = _Operator(denoise_fn, x, sigma, _check_chunk(chunk_size))
    dim = op.dim
    if method == "auto":
        method = "exact" if dim <= _check_int(exact_max_dim, "exact_max_dim", 1) else "randomized"
    if method == "exact":
        sv = torch.linalg.svdvals(_dense(op, ad))
        complete = True
    else:
        oversample = _check_int(oversample, "oversample", 0)
        power_iters = _check_int(power_iters, "power_iters", 0)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        if rank is not None:
            k = _check_int(rank, "rank", 1)
            if k > dim:
                raise ValueError(f"rank={k} exceeds the dimension D={dim}; use rank <= {dim}")
            sv = _randomized_svdvals(op, k, oversample, power_iters, gen)
        else:
            k = min(dim, _START_RANK)
            while True:
                if op.count + (2 + 2 * power_iters) * min(dim, k + oversample) >= dim:
                    method, sv, k = "exact", torch.linalg.svdvals(_dense(op, ad)), dim
                    break                       # sketching would cost more than D products
                sv = _randomized_svdvals(op, k, oversample, power_iters, gen)
                if float(sv[-1]) < threshold or k >= dim:
                    break
                k = min(dim, 2 * k)
        complete = bool(float(sv[-1]) < threshold) or k + oversample >= dim
    sv = sv.to(x.device)
    return LocalDimension(singular_values=sv, dimension=int((sv > threshold).sum()),
                          sigma=sigma, threshold=threshold, method=method, ambient_dim=dim,
                          num_products=op.count, complete=complete)


# ----------------------------------------------------------------------------- estimators
def _dense(op: _Operator, ad: str) -> torch.Tensor:
    """M as a (D, D) float64 matrix from D basis products."""
    eye = torch.eye(op.dim, dtype=torch.float64)
    if ad == "forward":
        return op.matvec(eye).T.contiguous()     # row j of the output is M e_j, a column
    return op.rmatvec(eye)                       # row j of the output is Mᵀ e_j = row j of M


def _randomized_svdvals(op: _Operator, rank: int, oversample: int, power_iters: int,
                        generator: torch.Generator) -> torch.Tensor:
    """Top-``rank`` singular values of M by a Gaussian sketch with subspace iteration."""
    width = min(op.dim, rank + oversample)
    omega = torch.randn(width, op.dim, generator=generator, dtype=torch.float64)
    q = _orthonormal_rows(op.matvec(omega))              # rows span range(M Ω)
    for _ in range(power_iters):
        q = _orthonormal_rows(op.rmatvec(q))             # range(Mᵀ Q)
        q = _orthonormal_rows(op.matvec(q))              # range(M Mᵀ Q)
    small = op.rmatvec(q)                                # rows of Qᵀ M, (width, D)
    return torch.linalg.svdvals(small)[:rank]


def _orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(rows.T)
    return q.T.contiguous()


@contextlib.contextmanager
def _math_attention():
    """Scaled-dot-product attention in its composite kernel, which forward-mode AD supports."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - very old torch
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


# ----------------------------------------------------------------------------- checks
def _check_inputs(denoise_fn: DenoiseFn, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, float]:
    if not callable(denoise_fn):
        raise TypeError(
            f"denoise_fn must be callable as denoise_fn(x, sigma) -> x0_hat, got "
            f"{type(denoise_fn).__name__}; wrap a model with steersample.geometry.as_denoiser(model)"
        )
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor of shape (1, *shape), got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    if x.dim() < 2 or x.shape[0] != 1:
        raise ValueError(
            f"x must hold one point with shape (1, *shape), got {tuple(x.shape)}; "
            f"call local_dimension once per point, e.g. on x[i:i + 1]"
        )
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() != 1:
            raise ValueError(f"sigma must be one number, got a tensor of shape {tuple(sigma.shape)}")
        sigma = sigma.item()
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma must be a float in (0, 1], got {type(sigma).__name__}")
    sigma = float(sigma)
    if not 0.0 < sigma <= 1.0:
        raise ValueError(f"sigma must lie in (0, 1] (1 = noise), got {sigma}; e.g. sigma=0.05")
    with torch.no_grad():
        out = denoise_fn(x.detach(), sigma)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"denoise_fn returned {shape} for an input of shape {tuple(x.shape)}; it must return "
            f"x0_hat with the input's shape (a velocity model? wrap it with as_denoiser)"
        )
    return x.detach(), sigma


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_chunk(chunk_size: object) -> int:
    return _check_int(chunk_size, "chunk_size", 1)
