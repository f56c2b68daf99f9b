"""Log-density ridges of the Gaussian-smoothed reference set (SCIENCE.md §4).

He, Qiu & Tao (arXiv 2602.06021): at noise level σ the reference set {x_i} smoothed by the
forward process has density (diffusers convention x_σ = (1 - σ) x_i + σ ε, a = 1 - σ)

    p_σ(x) = (1/N) Σ_i N(x; a x_i, σ² I),     γ_i(x) = softmax_i(-‖x - a x_i‖² / (2σ²))
    ∇log p_σ(x) = (m(x) - x) / σ²,            m(x) = Σ_i γ_i a x_i  (= a·x̂₀*, the mean shift)
    ∇²log p_σ(x) = -I/σ² + Cov_γ(a x_i)/σ⁴.

Its d-dimensional *ridge* is the set of points where the gradient is orthogonal to the normal
space, spanned by all Hessian eigenvectors except the top d, and the density is concave across
(λ_{d+1} < 0). The Hessian's eigenvectors are those of the γ-weighted covariance of the
neighbours a x_i; every direction outside their span has eigenvalue -1/σ² and is normal. So
with the K nearest reference samples (FAISS, ``ReferenceSet.nearest`` of x / a) the
eigenproblem is a K×K one: W = diag(√γ)(A - 1 m̄ᵀ) (K×D), Gram G = W Wᵀ = U diag(μ) Uᵀ,
covariance eigenvectors Wᵀ U / √μ. Cost O(K²D + K³) per iteration.

Projection by subspace-constrained mean shift (SCMS; Ozertem & Erdogmus 2011):

    x ← x + P_N(x)·(m(x) - x),     P_N = I - T Tᵀ,  T = top-d covariance eigenvectors,

repeated until the normal step is below ``tol·σ``. The result carries the projection, the
distance ‖x - x_ridge‖ and the tangent / normal bases at the ridge point. A model error
e = v̂ - v* splits into its normal part P_N e (sets the distance to the ridge: "align") and its
tangential part T Tᵀ e (moves the sample along it: "slide") with :func:`decompose_error`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = ["RidgeFrame", "RidgeProjection", "ErrorDecomposition", "ridge_frame", "project_to_ridge",
           "decompose_error"]


@dataclass(frozen=True)
class RidgeFrame:
    """Local quantities of the smoothed density at points ``(B, D)`` (float64)."""

    mean_shift: torch.Tensor          # (B, D) m(x)
    tangent: torch.Tensor             # (B, d, D) orthonormal rows
    normal: torch.Tensor              # (B, r, D) in-span normal rows (zero rows pad)
    hessian_eigenvalues: torch.Tensor  # (B, K) descending; -1/σ² beyond the span


@dataclass(frozen=True)
class RidgeProjection:
    """Subspace-constrained mean-shift projection of query points onto the d-dim ridge.

    Shapes: B queries of ``sample_shape``, D = prod(sample_shape). All tensors are float64 on
    the queries' device.

    Attributes:
        point: ``(B, *shape)`` the queries.
        projection: ``(B, *shape)`` the ridge points reached.
        distance: ``(B,)`` ‖point - projection‖.
        tangent_basis: ``(B, d, *shape)`` orthonormal tangent directions at the projection
            (top-d eigenvectors of the log-density Hessian).
        normal_basis: ``(B, r, *shape)`` the normal directions inside the span of the K
            neighbours (orthonormal; zero rows pad classes with fewer neighbours). Everything
            orthogonal to tangent and normal rows is normal too (Hessian eigenvalue -1/σ²).
        hessian_eigenvalues: ``(B, K)`` eigenvalues of ∇²log p_σ at the projection in the
            neighbours' span, descending; entry d (0-based) is the normal curvature λ_{d+1}.
        ridge_residual: ``(B,)`` ‖P_N ∇log p_σ‖ at the projection (0 on the ridge).
        iterations: ``(B,)`` SCMS steps taken.
        converged: ``(B,)`` whether the last normal step was below ``tol·σ``.
        sigma: the noise level.
        dim: d, the ridge dimension.
    """

    point: torch.Tensor
    projection: torch.Tensor
    distance: torch.Tensor
    tangent_basis: torch.Tensor
    normal_basis: torch.Tensor
    hessian_eigenvalues: torch.Tensor
    ridge_residual: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    sigma: float
    dim: int

    @property
    def is_ridge(self) -> torch.Tensor:
        """``(B,)`` True where the density is concave across the ridge (λ_{d+1} < 0)."""
        return self.hessian_eigenvalues[:, self.dim] < 0

    def tangential(self, v: torch.Tensor) -> torch.Tensor:
        """T Tᵀ v for vectors ``v`` ``(B, *shape)``: the part along the ridge."""
        return _tangential(v, self.tangent_basis.flatten(2))

    def normal(self, v: torch.Tensor) -> torch.Tensor:
        """(I - T Tᵀ) v for vectors ``v`` ``(B, *shape)``: the part across the ridge."""
        return v - self.tangential(v).to(v.dtype)


@dataclass(frozen=True)
class ErrorDecomposition:
    """Normal and tangential parts of a model error e = v̂ - v* (``error = normal + tangential``).

    Attributes:
        normal: ``(B, *shape)`` (I - T Tᵀ) e, pushes the sample off / onto the ridge.
        tangential: ``(B, *shape)`` T Tᵀ e, moves it along the ridge.
        normal_norm: ``(B,)`` ‖normal‖.
        tangential_norm: ``(B,)`` ‖tangential‖.
    """

    normal: torch.Tensor
    tangential: torch.Tensor
    normal_norm: torch.Tensor
    tangential_norm: torch.Tensor


def ridge_frame(points: torch.Tensor, sigma: float, neighbours: torch.Tensor, dim: int) -> RidgeFrame:
    """Mean shift, tangent / normal bases and Hessian spectrum from explicit neighbours.

    Args:
        points: ``(B, D)`` float64 query points x.
        sigma: noise level in (0, 1).
        neighbours: ``(B, K, D)`` float64 reference samples x_i (unscaled; the mixture centres
            are (1 - σ) x_i).
        dim: ridge dimension d (needs K ≥ d + 1).
    """
    a, s2 = 1.0 - sigma, sigma * sigma
    centres = a * neighbours                                          # (B, K, D)
    logits = -(points[:, None, :] - centres).square().sum(-1) / (2 * s2)
    gamma = torch.softmax(logits, dim=1)                              # (B, K)
    mean = torch.einsum("bk,bkd->bd", gamma, centres)                 # m(x)
    w = gamma.sqrt()[:, :, None] * (centres - mean[:, None, :])       # (B, K, D)
    gram = w @ w.transpose(1, 2)                                      # (B, K, K)
    mu, u = torch.linalg.eigh(gram)                                   # ascending
    mu, u = mu.flip(-1).clamp_min(0.0), u.flip(-1)
    # covariance eigenvectors W^T u / sqrt(mu) for mu above a relative floor, re-orthonormalised
    # by QR in descending order (keeps the leading directions exact, cleans rounding)
    live = mu > 1e-10 * mu[:, :1].clamp_min(1e-300)
    vecs = (w.transpose(1, 2) @ u) * live[:, None, :]                 # (B, D, K)
    if vecs.shape[1] < vecs.shape[2]:                                 # K > D: at most D directions
        vecs, live, mu = vecs[:, :, : vecs.shape[1]], live[:, : vecs.shape[1]], mu[:, : vecs.shape[1]]
    q, _ = torch.linalg.qr(vecs)
    vecs = (q * live[:, None, :]).transpose(1, 2)                     # (B, K', D) rows
    tangent = vecs[:, :dim]                    # rows whose eigenvalue vanished stay zero
    normal = vecs[:, dim:]
    hess = torch.where(live, -1.0 / s2 + mu / (s2 * s2), torch.full_like(mu, -1.0 / s2))
    return RidgeFrame(mean_shift=mean, tangent=tangent, normal=normal, hessian_eigenvalues=hess)


def project_to_ridge(reference, x: torch.Tensor, sigma: float, *, dim: int = 1, k: int = 32,
                     labels: int | torch.Tensor | None = None, max_iter: int = 200,
                     tol: float = 1e-6, refresh_every: int = 1) -> RidgeProjection:
    """Project ``x`` onto the d-dim log-density ridge of the reference set smoothed at σ.

    Args:
        reference: a ``ReferenceSet`` (or an ``EmpiricalOracle``, whose set is used).
        x: ``(B, *shape)`` points at noise level σ (e.g. a sampler's latents).
        sigma: noise level in (0, 1).
        dim: ridge dimension d (1: curves through the modes; 0: the modes themselves).
        k: neighbours per query (FAISS); capped at the pool size.
        labels: ``None``, an int or ``(B,)`` ints: use the smoothed density of that class only.
        max_iter: SCMS steps at most.
        tol: stop once ‖P_N (m(x) - x)‖ ≤ tol·σ.
        refresh_every: re-query the K neighbours every this many SCMS steps (1: every step;
            larger is faster when K covers the posterior mass). The final frame always uses
            fresh neighbours.

    Returns:
        :class:`RidgeProjection`.
    """
    from steersample._checks import check_labels, check_positive_int
    from steersample.oracle.empirical import EmpiricalOracle
    from steersample.reference.reference_set import ReferenceSet, _groups

    if isinstance(reference, EmpiricalOracle):
        reference = reference.reference
    if not isinstance(reference, ReferenceSet):
        raise TypeError(f"reference must be a ReferenceSet or EmpiricalOracle, got "
                        f"{type(reference).__name__}; wrap latents with ReferenceSet(latents, labels)")
    x = reference._check_queries(x)
    sigma = _check_open_sigma(sigma)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 0:
        raise ValueError(f"dim must be a non-negative int (the ridge dimension), got {dim!r}")
    if dim >= reference.dim:
        raise ValueError(f"dim={dim} must be below the sample dimension D={reference.dim}; a ridge "
                         f"of dimension D is the whole space")
    k = check_positive_int(k, "k")
    max_iter = check_positive_int(max_iter, "max_iter")
    refresh_every = check_positive_int(refresh_every, "refresh_every")
    if not (isinstance(tol, numbers.Real) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    batch, D = x.shape[0], reference.dim
    lab = check_labels(labels, batch, reference.classes)
    pools = {label: reference.indices(label).numel() for label, _ in _groups(lab, batch)}
    k_eff = {label: min(k, n) for label, n in pools.items()}
    small = {label: kk for label, kk in k_eff.items() if kk < dim + 1}
    if small:
        label, kk = next(iter(small.items()))
        where = "the reference set" if label is None else f"class {label}"
        raise ValueError(f"a {dim}-dim ridge needs at least {dim + 1} neighbours but {where} "
                         f"offers {kk}; lower dim or raise k")
    k_max = max(k_eff.values())
    start = x.detach().reshape(batch, D).to("cpu", torch.float64)
    y = start.clone()
    a = 1.0 - sigma
    steps = torch.zeros(batch, dtype=torch.int64)
    done = torch.zeros(batch, dtype=torch.bool)
    nbrs = torch.empty(batch, k_max, D, dtype=torch.float64)
    for it in range(max_iter):
        active = (~done).nonzero().flatten()
        if active.numel() == 0:
            break
        for label, rows in _groups(None if lab is None else lab[active], active.numel()):
            rows, kk = active[rows], k_eff[label]
            if it % refresh_every == 0:
                nbrs[rows, :kk] = _neighbours(reference, y[rows] / a, kk, label)
            frame = ridge_frame(y[rows], sigma, nbrs[rows, :kk], dim)
            drift = frame.mean_shift - y[rows]
            step = drift - _tangential(drift, frame.tangent)           # SCMS: P_N (m(x) - x)
            y[rows] = y[rows] + step
            steps[rows] += 1
            done[rows] = step.norm(dim=1) <= tol * sigma
    # the frame at the final point of every query
    frames = [(rows, ridge_frame(y[rows], sigma, _neighbours(reference, y[rows] / a, k_eff[label], label), dim))
              for label, rows in _groups(lab, batch)]
    tangent = torch.zeros(batch, dim, D, dtype=torch.float64)
    normal = torch.zeros(batch, max(0, k_max - dim), D, dtype=torch.float64)
    hess = torch.full((batch, max(k_max, dim + 1)), -1.0 / sigma ** 2, dtype=torch.float64)
    residual = torch.zeros(batch, dtype=torch.float64)
    for rows, frame in frames:
        tangent[rows] = frame.tangent
        normal[rows, : frame.normal.shape[1]] = frame.normal
        hess[rows, : frame.hessian_eigenvalues.shape[1]] = frame.hessian_eigenvalues
        drift = frame.mean_shift - y[rows]
        residual[rows] = (drift - _tangential(drift, frame.tangent)).norm(dim=1) / sigma ** 2
    dev, shape = x.device, reference.sample_shape
    return RidgeProjection(
        point=start.reshape(batch, *shape).to(dev), projection=y.reshape(batch, *shape).to(dev),
        distance=(y - start).norm(dim=1).to(dev),
        tangent_basis=tangent.reshape(batch, dim, *shape).to(dev),
        normal_basis=normal.reshape(batch, -1, *shape).to(dev),
        hessian_eigenvalues=hess.to(dev), ridge_residual=residual.to(dev),
        iterations=steps.to(dev), converged=done.to(dev), sigma=sigma, dim=int(dim))


def decompose_error(error: torch.Tensor, basis: RidgeProjection | torch.Tensor) -> ErrorDecomposition:
    """Split ``error`` ``(B, *shape)`` (e.g. v̂ - v*) into normal and tangential parts.

    ``basis`` is a :class:`RidgeProjection` (its tangent basis at the ridge point) or a tangent
    basis ``(B, d, *shape)`` with orthonormal rows. tangential = T Tᵀ e and normal = e -
    tangential, so they sum to the error and are orthogonal (up to rounding).
    """
    if not isinstance(error, torch.Tensor) or not error.is_floating_point():
        raise TypeError(f"error must be a floating-point tensor (B, *shape), got {type(error).__name__}")
    tangent = basis.tangent_basis if isinstance(basis, RidgeProjection) else basis
    if not isinstance(tangent, torch.Tensor) or tangent.dim() < 2:
        raise TypeError("basis must be a RidgeProjection or a (B, d, *shape) tensor of tangent rows")
    batch = error.shape[0]
    if tangent.shape[0] != batch or tangent[0, 0].numel() != error[0].numel():
        raise ValueError(
            f"error has shape {tuple(error.shape)} but the tangent basis has shape "
            f"{tuple(tangent.shape)}; project the same B points the error was measured at"
        )
    tangential = _tangential(error, tangent.reshape(batch, tangent.shape[1], -1)).to(error.dtype)
    normal = error - tangential
    return ErrorDecomposition(normal=normal, tangential=tangential,
                              normal_norm=normal.flatten(1).norm(dim=1),
                              tangential_norm=tangential.flatten(1).norm(dim=1))


# ----------------------------------------------------------------------------- helpers
def _tangential(v: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """T Tᵀ v with T rows ``(B, d, D)`` and v ``(B, *shape)``; result float64, v's shape."""
    flat = v.reshape(v.shape[0], -1).to(device=tangent.device, dtype=torch.float64)
    coeff = torch.einsum("bdn,bn->bd", tangent, flat)
    return torch.einsum("bd,bdn->bn", coeff, tangent).reshape(v.shape).to(v.device)


def _neighbours(reference, queries: torch.Tensor, k: int, label: int | None) -> torch.Tensor:
    """The k nearest reference samples of each query (FAISS), ``(B, k, D)`` float64 on CPU."""
    _, idx = reference.nearest(queries.reshape(-1, *reference.sample_shape), k=k, labels=label)
    flat = reference.flat
    rows = flat[idx.flatten().to(flat.device)].to("cpu", torch.float64)
    return rows.reshape(queries.shape[0], k, reference.dim)


def _check_open_sigma(sigma: float) -> float:
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() != 1:
            raise ValueError(f"sigma must be one number, got a tensor of shape {tuple(sigma.shape)}")
        sigma = sigma.item()
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a float in (0, 1), got {type(sigma).__name__}")
    sigma = float(sigma)
    if not (0.0 < sigma < 1.0) or math.isnan(sigma):
        raise ValueError(f"sigma must lie in (0, 1) for a ridge (at 1 every centre is 0), got {sigma}")
    return sigma
