"""Reach, align, slide: a sampler trajectory seen against the ridge of the smoothed training set.

He, Qiu & Tao (arXiv 2602.06021, SCIENCE.md §4): along an Euler trajectory of a model v̂,

* **reach**: early on the sample enters a tube around the time-indexed ridge of p_σ;
* **align**: its distance to the ridge is set by the *normal* part of the model error
  e = v̂ - v* (v* the empirical oracle's velocity, the exact minimiser of the training loss);
* **slide**: late, the *tangential* part moves it along the ridge, between training samples
  (inter-mode, non-memorised samples). With e = 0 the sampler is the oracle and ends on a
  training sample.

:func:`ridge_trace` integrates ``x ← x + (σ' - σ)·v̂`` on a σ grid and records, at every σ,
the distance to the d-dim ridge (:func:`~steersample.geometry.project_to_ridge`), the norms of
the normal and tangential error parts at the ridge point, and the distance to the nearest
mixture centre (1 - σ)·x_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steersample.geometry.ridge import decompose_error, project_to_ridge

__all__ = ["RidgeTrace", "ridge_trace"]


@dataclass(frozen=True)
class RidgeTrace:
    """Per-step record of :func:`ridge_trace`; S grid points, B trajectories (float64, CPU).

    Attributes:
        sigmas: ``(S,)`` descending noise levels where the quantities are measured.
        distance: ``(S, B)`` distance of x_σ to the d-dim ridge of p_σ.
        normal_error: ``(S, B)`` ‖(I - T Tᵀ)(v̂ - v*)‖ at the ridge point.
        tangential_error: ``(S, B)`` ‖T Tᵀ (v̂ - v*)‖.
        centre_distance: ``(S, B)`` distance of x_σ to the nearest centre (1 - σ)·x_i.
        converged: ``(S, B)`` whether the ridge projection converged.
        trajectory: ``(S + 1, B, *shape)`` x at every grid point and the final sample (σ = 0).
        label: the class the trajectories were conditioned on (``None``: unconditional).
        dim: ridge dimension d.
    """

    sigmas: torch.Tensor
    distance: torch.Tensor
    normal_error: torch.Tensor
    tangential_error: torch.Tensor
    centre_distance: torch.Tensor
    converged: torch.Tensor
    trajectory: torch.Tensor
    label: int | None
    dim: int


def ridge_trace(denoise_fn, reference, x: torch.Tensor, sigmas: torch.Tensor | list[float], *,
                label: int | None = None, dim: int = 1, k: int = 32, max_iter: int = 200,
                tol: float = 1e-6, refresh_every: int = 1, progress=None) -> RidgeTrace:
    """Integrate a model from ``x`` on ``sigmas`` and trace its distance to the ridge.

    Args:
        denoise_fn: the model, ``denoise_fn(x, sigma) -> x̂₀`` on a batch (``as_denoiser``);
            its velocity is v̂ = (x - x̂₀)/σ.
        reference: the training ``ReferenceSet`` (or ``EmpiricalOracle``) defining v* and p_σ.
        x: ``(B, *shape)`` starting points at ``sigmas[0]`` (e.g. Gaussian noise at σ ≈ 1).
        sigmas: descending noise levels in (0, 1); after the last one the Euler step goes to 0.
        label: class of the trajectories: v* and the ridge use that class's samples only.
        dim, k, max_iter, tol, refresh_every: passed to :func:`project_to_ridge`.
        progress: optional callable run once per grid point (e.g. a tqdm ``update``).
    """
    from steersample.oracle.empirical import EmpiricalOracle

    oracle = reference if isinstance(reference, EmpiricalOracle) else EmpiricalOracle(reference)
    sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if sig.numel() == 0 or bool((sig <= 0).any() | (sig >= 1).any()) or bool((sig.diff() >= 0).any()):
        raise ValueError(f"sigmas must be strictly descending values in (0, 1), got {sig.tolist()}; "
                         f"e.g. torch.linspace(0.95, 0.02, 20)")
    nxt = torch.cat([sig[1:], sig.new_zeros(1)])
    batch = x.shape[0]
    rows: dict[str, list[torch.Tensor]] = {key: [] for key in
                                           ("distance", "normal", "tangential", "centre", "converged")}
    path = [x.detach().to(torch.float64).cpu()]
    cur = x.detach()
    for sigma, sigma_next in zip(sig.tolist(), nxt.tolist()):
        with torch.no_grad():
            x0_hat = denoise_fn(cur, sigma)
        v_hat = ((cur - x0_hat) / sigma).to(torch.float64).cpu()
        v_star = oracle.velocity(cur.to(torch.float64).cpu(), sigma, label).to(torch.float64)
        ridge = project_to_ridge(oracle.reference, cur.to(torch.float64).cpu(), sigma, dim=dim, k=k,
                                 labels=label, max_iter=max_iter, tol=tol,
                                 refresh_every=refresh_every)
        parts = decompose_error(v_hat - v_star, ridge)
        dist, _ = oracle.reference.nearest(cur.to(torch.float64).cpu() / (1 - sigma), k=1, labels=label)
        rows["distance"].append(ridge.distance.cpu())
        rows["normal"].append(parts.normal_norm.cpu())
        rows["tangential"].append(parts.tangential_norm.cpu())
        rows["centre"].append((1 - sigma) * dist[:, 0].to(torch.float64).cpu())
        rows["converged"].append(ridge.converged.cpu())
        cur = (cur + (sigma_next - sigma) * v_hat.to(device=cur.device, dtype=cur.dtype)).detach()
        path.append(cur.to(torch.float64).cpu())
        if progress is not None:
            progress()
    stack = {key: torch.stack(value) for key, value in rows.items()}
    return RidgeTrace(sigmas=sig, distance=stack["distance"], normal_error=stack["normal"],
                      tangential_error=stack["tangential"], centre_distance=stack["centre"],
                      converged=stack["converged"], trajectory=torch.stack(path), label=label,
                      dim=int(dim))
