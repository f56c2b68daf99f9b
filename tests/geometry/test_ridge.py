"""Ridge projection (SCMS) of the Gaussian-smoothed reference set and the error decomposition."""

from __future__ import annotations

import pytest
import torch

from steersample import geometry
from steersample.oracle.empirical import EmpiricalOracle
from steersample.reference.reference_set import ReferenceSet


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _log_density(x: torch.Tensor, points: torch.Tensor, sigma: float) -> torch.Tensor:
    """log p_σ(x) up to a constant, x (D,): mixture of N((1 - σ) x_i, σ² I)."""
    return torch.logsumexp(-(x - (1 - sigma) * points).square().sum(1) / (2 * sigma ** 2), 0)


def _two_gaussians(D: int = 5) -> ReferenceSet:
    X = torch.zeros(2, D, dtype=torch.float64)
    X[0, 0], X[1, 0] = 1.0, -1.0
    return ReferenceSet(X)


def test_point_on_the_ridge_between_two_gaussians_stays_put():
    ref, sigma = _two_gaussians(), 0.4
    x = torch.zeros(4, 5, dtype=torch.float64)
    x[:, 0] = torch.tensor([0.3, -0.1, 0.0, 0.55]) * (1 - sigma)   # on the segment between centres
    res = geometry.project_to_ridge(ref, x, sigma, dim=1)
    torch.testing.assert_close(res.projection, x, rtol=0, atol=1e-14)
    assert float(res.distance.max()) < 1e-14
    assert bool(res.converged.all()) and bool(res.is_ridge.all())
    torch.testing.assert_close(res.tangent_basis[:, 0, 0].abs(), torch.ones(4, dtype=torch.float64))
    assert float(res.ridge_residual.max()) < 1e-12


def test_point_off_the_two_gaussian_ridge_moves_straight_onto_it():
    ref, sigma = _two_gaussians(), 0.4
    x = torch.zeros(3, 5, dtype=torch.float64)
    x[:, 0] = torch.tensor([0.2, -0.3, 0.05])
    x[:, 1], x[:, 3] = 0.2, -0.1
    res = geometry.project_to_ridge(ref, x, sigma, dim=1)
    expected = x.clone()
    expected[:, 1:] = 0.0
    torch.testing.assert_close(res.projection, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.distance, torch.full((3,), (0.2 ** 2 + 0.1 ** 2) ** 0.5, dtype=torch.float64))


def test_distance_decreases_under_repeated_projection():
    g = _gen(0)
    ref = ReferenceSet(torch.randn(7, 3, generator=g, dtype=torch.float64))
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    distances = []
    for _ in range(4):
        res = geometry.project_to_ridge(ref, x, 0.5, dim=1, max_iter=2)
        distances.append(res.distance)
        x = res.projection
    for before, after in zip(distances, distances[1:]):
        assert bool((after < before).all())
    assert float(distances[-1].max()) < 0.05 * float(distances[0].min())


def test_converged_projection_satisfies_the_ridge_condition_by_brute_force():
    g = _gen(1)
    points = torch.randn(6, 3, generator=g, dtype=torch.float64)
    ref, sigma, d = ReferenceSet(points), 0.45, 1
    res = geometry.project_to_ridge(ref, torch.randn(4, 3, generator=g, dtype=torch.float64), sigma, dim=d)
    assert bool(res.converged.all())
    for b in range(4):
        y = res.projection[b]
        grad = torch.func.grad(_log_density)(y, points, sigma)
        hess = torch.func.hessian(_log_density)(y, points, sigma)
        evals, evecs = torch.linalg.eigh(hess)                   # ascending
        normal = evecs[:, : 3 - d]                               # all but the top d
        assert float((normal.T @ grad).norm()) < 1e-5
        # the frame's spectrum is the brute-force Hessian spectrum (K = N covers all of R^3)
        torch.testing.assert_close(res.hessian_eigenvalues[b, :3], evals.flip(0), rtol=0, atol=1e-8)
        tangent = evecs[:, -d:]
        torch.testing.assert_close((res.tangent_basis[b].reshape(d, 3) @ tangent).abs(),
                                   torch.ones(d, d, dtype=torch.float64), rtol=0, atol=1e-8)


def test_ridge_frame_gradient_is_the_mean_shift():
    g = _gen(2)
    points = torch.randn(9, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, generator=g, dtype=torch.float64)
    sigma = 0.3
    frame = geometry.ridge_frame(x, sigma, points.expand(2, 9, 4), dim=2)
    for b in range(2):
        grad = torch.func.grad(_log_density)(x[b], points, sigma)
        torch.testing.assert_close((frame.mean_shift[b] - x[b]) / sigma ** 2, grad)
    gram = frame.tangent @ frame.tangent.transpose(1, 2)
    torch.testing.assert_close(gram, torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
    cross = frame.tangent @ frame.normal.transpose(1, 2)
    assert float(cross.abs().max()) < 1e-10


def test_normal_and_tangential_parts_sum_to_the_error_and_are_orthogonal():
    g = _gen(3)
    ref = ReferenceSet(torch.randn(12, 1, 2, 3, generator=g))
    x = torch.randn(4, 1, 2, 3, generator=g)
    res = geometry.project_to_ridge(ref, x, 0.3, dim=2)
    error = torch.randn(4, 1, 2, 3, generator=g, dtype=torch.float64)
    parts = geometry.decompose_error(error, res)
    torch.testing.assert_close(parts.normal + parts.tangential, error, rtol=0, atol=1e-14)
    inner = (parts.normal * parts.tangential).flatten(1).sum(1)
    assert float(inner.abs().max()) < 1e-12
    torch.testing.assert_close(parts.normal_norm ** 2 + parts.tangential_norm ** 2,
                               error.flatten(1).square().sum(1))
    # the same split from an explicit basis, and through the projection's helpers
    again = geometry.decompose_error(error, res.tangent_basis)
    torch.testing.assert_close(again.tangential, parts.tangential)
    torch.testing.assert_close(res.tangential(error), parts.tangential)
    torch.testing.assert_close(res.normal(error), parts.normal)
    # a tangent direction is all tangential
    along = geometry.decompose_error(res.tangent_basis[:, 0], res)
    assert float(along.normal_norm.max()) < 1e-12


def test_labels_restrict_the_ridge_to_one_class():
    g = _gen(4)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    labels = torch.arange(20) % 2
    ref = ReferenceSet(X, labels)
    x = torch.randn(3, 3, generator=g, dtype=torch.float64)
    by_label = geometry.project_to_ridge(ref, x, 0.4, labels=1, k=5)
    alone = geometry.project_to_ridge(ReferenceSet(X[labels == 1]), x, 0.4, k=5)
    torch.testing.assert_close(by_label.projection, alone.projection)
    mixed = geometry.project_to_ridge(ref, x, 0.4, labels=torch.tensor([1, 0, 1]), k=5)
    torch.testing.assert_close(mixed.projection[[0, 2]], alone.projection[[0, 2]])
    # an oracle is accepted in place of its reference set
    via_oracle = geometry.project_to_ridge(EmpiricalOracle(ref), x, 0.4, labels=1, k=5)
    torch.testing.assert_close(via_oracle.projection, by_label.projection)


def test_refreshing_neighbours_less_often_gives_the_same_ridge_when_k_covers_the_set():
    g = _gen(5)
    ref = ReferenceSet(torch.randn(8, 3, generator=g, dtype=torch.float64))
    x = torch.randn(3, 3, generator=g, dtype=torch.float64)
    every = geometry.project_to_ridge(ref, x, 0.5, k=8)
    sparse = geometry.project_to_ridge(ref, x, 0.5, k=8, refresh_every=7)
    torch.testing.assert_close(sparse.projection, every.projection, rtol=0, atol=1e-12)
    torch.testing.assert_close(sparse.tangent_basis.abs(), every.tangent_basis.abs())


def test_bad_inputs_raise_errors_that_teach():
    ref = ReferenceSet(torch.randn(3, 4), torch.tensor([0, 0, 1]))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        geometry.project_to_ridge(ref, x, 1.0)
    with pytest.raises(ValueError, match="needs at least 2 neighbours but class 1 offers 1"):
        geometry.project_to_ridge(ref, x, 0.5, labels=1)
    with pytest.raises(ValueError, match="dim must be"):
        geometry.project_to_ridge(ref, x, 0.5, dim=-1)
    with pytest.raises(TypeError, match="ReferenceSet"):
        geometry.project_to_ridge(torch.randn(3, 4), x, 0.5)
    res = geometry.project_to_ridge(ref, x, 0.5, k=3)
    with pytest.raises(ValueError, match="same B points"):
        geometry.decompose_error(torch.randn(3, 4), res)


def test_ridge_trace_of_the_oracle_has_no_error_and_ends_on_a_training_sample():
    g = _gen(6)
    X = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    ref = ReferenceSet(X)
    oracle_fn = geometry.as_denoiser(ref)
    x = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    sigmas = torch.linspace(0.9, 0.02, 12, dtype=torch.float64)
    ticks = []
    trace = geometry.ridge_trace(oracle_fn, ref, x, sigmas, progress=lambda: ticks.append(1))
    assert trace.distance.shape == (12, 3) and trace.trajectory.shape == (13, 3, 1, 2, 2)
    assert len(ticks) == 12
    assert float(trace.normal_error.max()) < 1e-8 and float(trace.tangential_error.max()) < 1e-8
    final = trace.trajectory[-1].reshape(3, -1)
    assert float(torch.cdist(final, X.reshape(6, -1)).min(1).values.max()) < 1e-3
    # a biased model: the error is the bias, split into normal and tangential parts
    bias = 0.1 * torch.ones(1, 1, 2, 2, dtype=torch.float64)
    trace = geometry.ridge_trace(lambda z, s: oracle_fn(z, s) - s * bias, ref, x, sigmas)
    total = (trace.normal_error ** 2 + trace.tangential_error ** 2).sqrt()
    torch.testing.assert_close(total, torch.full_like(total, 0.2))
    with pytest.raises(ValueError, match="strictly descending"):
        geometry.ridge_trace(oracle_fn, ref, x, [0.2, 0.5])
