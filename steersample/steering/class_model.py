"""A Gaussian class model of a labelled reference set, for classifier guidance that cannot memorise.

Linear discriminant analysis on the reference set: class means ``μ_k``, a pooled within-class
covariance ``Σ_w`` (dominated by the frequent classes, so a scarce class borrows their shape)
and priors ``π_k`` from the class counts. For a noisy latent ``x_σ = (1 − σ) x₀ + σ ε`` the
rescaled ``y = x_σ / (1 − σ)`` is, under the model, exactly ``N(μ_k, Σ_w + τ² I)`` given class
k with ``τ = σ / (1 − σ)``, so

    log p(k | x_σ) = −½ (y − μ_k)ᵀ (Σ_w + τ² I)⁻¹ (y − μ_k) + log π_k + const
    ∇_x log p(c | x_σ) = (Σ_w + τ² I)⁻¹ (μ_c − Σ_k p(k | y) μ_k) / (1 − σ)

and in velocity units (the score is ``−ε̂/σ`` and ``v = (x − x̂₀)/σ``) guiding towards class c is
``v ← v − λ σ/(1 − σ) ∇_x log p(c | x_σ)``. The gradient vanishes once a sample is confidently
of class c, so the guidance never saturates onto a single training sample (unlike the model's
own class direction, which points at one).

Large latents (D > 4096) keep ``Σ_w`` as its top 256 principal directions plus an isotropic rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steersample.reference.reference_set import ReferenceSet

__all__ = ["GaussianClassModel"]

_LOW_RANK = 4096   # above this dimension Σ_w is rank-256 + isotropic
_RANK = 256


@dataclass(frozen=True)
class GaussianClassModel:
    """LDA fitted on a labelled reference set (module docstring); float64, on the CPU.

    Attributes:
        classes: ``(K,)`` class ids, ascending.
        means: ``(K, D)`` class means.
        evals, evecs: ``(r,)`` / ``(D, r)`` eigen-pairs of ``Σ_w`` (ridge included).
        iso: variance of the complement of ``evecs`` (0 when r = D).
        log_prior: ``(K,)`` log class frequencies.
    """

    classes: torch.Tensor
    means: torch.Tensor
    evals: torch.Tensor
    evecs: torch.Tensor
    iso: float
    log_prior: torch.Tensor

    @classmethod
    def fit(cls, reference: ReferenceSet, ridge: float = 1e-2) -> "GaussianClassModel":
        """Fit on ``reference`` (labels required); ``ridge · tr(Σ_w)/D`` is added to Σ_w."""
        if reference.labels is None:
            raise ValueError("a class model needs a labelled reference set: "
                             "ReferenceSet(latents, labels)")
        x = reference.latents.reshape(len(reference), -1).detach().to("cpu", torch.float64)
        labels = reference.labels.detach().cpu().long()
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        means = torch.zeros(len(classes), x.shape[1], dtype=x.dtype).index_add_(0, inverse, x)
        means /= counts[:, None].to(x.dtype)
        resid = x - means[inverse]
        dof = max(len(x) - len(classes), 1)
        dim = x.shape[1]
        if dim <= _LOW_RANK:
            cov = resid.T @ resid / dof
            jitter = ridge * float(cov.trace()) / dim
            evals, evecs = torch.linalg.eigh(cov + jitter * torch.eye(dim, dtype=x.dtype))
            iso = 0.0
        else:
            _, sv, vh = torch.linalg.svd(resid, full_matrices=False)
            var = sv ** 2 / dof
            jitter = ridge * float(var.sum()) / dim
            rank = min(_RANK, len(sv))
            evals, evecs = var[:rank] + jitter, vh[:rank].T
            iso = float(var[rank:].sum()) / max(dim - rank, 1) + jitter
        log_prior = torch.log(counts.double() / len(labels))
        return cls(classes, means, evals, evecs, iso, log_prior)

    def _inverse(self, z: torch.Tensor, tau2: float) -> torch.Tensor:
        """``(Σ_w + τ² I)⁻¹ z`` for ``z`` of shape ``(..., D)``."""
        p = z @ self.evecs
        out = (p / (self.evals + tau2)) @ self.evecs.T
        if self.iso > 0:
            out = out + (z - p @ self.evecs.T) / (self.iso + tau2)
        return out

    def log_posterior(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """``(B, K)`` log p(k | x_σ) for flattened ``x`` ``(B, D)`` at noise level ``sigma < 1``.

        The Mahalanobis distances are expanded in the eigenbasis of ``Σ_w``,
        ``Σ_j (p_j(y) − p_j(μ_k))² / (λ_j + τ²)`` plus the isotropic rest, so the cost is one
        ``(B, D) × (D, r)`` product, not a ``(B, K, D)`` tensor through the inverse.
        """
        tau2 = (sigma / (1.0 - sigma)) ** 2
        y = x / (1.0 - sigma)
        py, pm = y @ self.evecs, self.means @ self.evecs
        w = 1.0 / (self.evals + tau2)
        maha = ((py * py * w).sum(1, keepdim=True) - 2.0 * (py * w) @ pm.T
                + (pm * pm * w).sum(1)[None])
        if self.iso > 0:   # ‖z‖² − ‖p(z)‖² of z = y − μ_k, over the isotropic variance
            rest = ((y * y).sum(1, keepdim=True) - 2.0 * y @ self.means.T + (self.means ** 2).sum(1)[None]
                    - (py * py).sum(1, keepdim=True) + 2.0 * py @ pm.T - (pm * pm).sum(1)[None])
            maha = maha + rest.clamp_min(0.0) / (self.iso + tau2)
        return torch.log_softmax(-0.5 * maha + self.log_prior, dim=1)

    def velocity_guidance(self, x: torch.Tensor, sigma: float, labels: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` the velocity change ``−σ/(1 − σ) ∇_x log p(c | x_σ)`` towards ``labels``.

        Args:
            x: ``(B, D)`` flattened noisy latents, float64.
            sigma: noise level in (0, 1).
            labels: ``(B,)`` class ids, each one of :attr:`classes`.
        """
        tau2 = (sigma / (1.0 - sigma)) ** 2
        post = self.log_posterior(x, sigma).exp()
        target = self.means[torch.searchsorted(self.classes, labels)]
        grad = self._inverse(target - post @ self.means, tau2) / (1.0 - sigma)
        return -sigma / (1.0 - sigma) * grad
