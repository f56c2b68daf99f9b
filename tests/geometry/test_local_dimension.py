"""Local dimension: analytic denoisers, the oracle's closed-form Jacobian, exact vs randomised."""

from __future__ import annotations

import pytest
import torch

from steersample import geometry
from steersample.oracle.empirical import EmpiricalOracle
from steersample.reference.reference_set import ReferenceSet
from steersample.testing import tiny_dit_transformer, tiny_flow_pipeline


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plane_reference(D: int = 8, d: int = 2, N: int = 400, seed: int = 0):
    g = _gen(seed)
    basis = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))[0]
    return ReferenceSet(torch.randn(N, d, generator=g, dtype=torch.float64) @ basis.T), g


def test_oracle_adapter_matches_oracle_and_closed_form_jacobian():
    g = _gen(1)
    X = torch.randn(30, 1, 2, 3, generator=g, dtype=torch.float64)
    oracle = EmpiricalOracle(ReferenceSet(X))
    denoise = geometry.as_denoiser(oracle)
    sigma = 0.45
    x = (1 - sigma) * X[4:5] + sigma * torch.randn(1, 1, 2, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(denoise(x, sigma), oracle.denoise(x, sigma), rtol=0, atol=1e-12)
    # brute force: M = ((1 - σ)² / σ²) Cov_γ(x_i)
    a, P, q = 1 - sigma, X.reshape(30, -1), x.reshape(1, -1)
    gamma = torch.softmax(-(q - a * P).square().sum(1) / (2 * sigma ** 2), 0)
    mean = gamma @ P
    cov = ((P - mean).T * gamma) @ (P - mean)
    expected = (a / sigma) ** 2 * cov
    for ad in ("forward", "reverse"):
        M = geometry.jacobian_matrix(denoise, x, sigma, ad=ad)
        torch.testing.assert_close(M, expected, rtol=0, atol=1e-12)
    res = geometry.local_dimension(denoise, x, sigma)
    torch.testing.assert_close(res.singular_values, torch.linalg.eigvalsh(expected).flip(0).clamp_min(0),
                               rtol=0, atol=1e-10)
    assert res.method == "exact" and res.complete and res.num_products == 6


def test_oracle_dimension_collapses_to_zero_as_sigma_goes_to_zero():
    ref, g = _plane_reference()
    denoise = geometry.as_denoiser(ref)
    X = ref.flat
    dims, tops = {}, {}
    for sigma in (0.3, 0.05, 0.01, 0.003):
        x = (1 - sigma) * X[:1] + sigma * torch.randn(1, 8, generator=g, dtype=torch.float64)
        res = geometry.local_dimension(denoise, x, sigma)
        dims[sigma], tops[sigma] = res.dimension, float(res.singular_values[0])
    assert dims[0.3] == 2                    # dense enough: the plane is still there
    assert dims[0.01] == 0 and dims[0.003] == 0   # collapsed onto one training point
    assert tops[0.003] < 1e-6


def test_local_dimension_loses_directions_gradually_on_average():
    ref, g = _plane_reference(seed=3)
    denoise = geometry.as_denoiser(ref)
    X = ref.flat
    mean_dim = []
    for sigma in (0.3, 0.04, 0.003):
        dims = [geometry.local_dimension(
            denoise, (1 - sigma) * X[i:i + 1] + sigma * torch.randn(1, 8, generator=g, dtype=torch.float64),
            sigma).dimension for i in range(8)]
        mean_dim.append(sum(dims) / len(dims))
    assert mean_dim[0] > mean_dim[1] > mean_dim[2] == 0


@pytest.mark.parametrize("d", [1, 3, 5])
def test_projector_denoiser_on_a_random_subspace_gives_d(d):
    D = 12
    basis = torch.linalg.qr(torch.randn(D, d, generator=_gen(d), dtype=torch.float64))[0]
    projector = basis @ basis.T

    def denoise(x, sigma):     # E[x0 | x_σ] for data spread uniformly over the subspace
        return (x.reshape(1, -1) @ projector / (1 - sigma)).reshape(x.shape)

    x = torch.randn(1, 3, 4, generator=_gen(10 + d), dtype=torch.float64)
    for sigma in (0.01, 0.2, 0.7):
        res = geometry.local_dimension(denoise, x, sigma)
        assert res.dimension == d
        torch.testing.assert_close(res.singular_values[:d], torch.ones(d, dtype=torch.float64))
        assert float(res.singular_values[d:].abs().max()) < 1e-12


def test_gaussian_subspace_denoiser_spectrum_matches_formula():
    D, d, scale = 10, 3, 0.5          # data N(0, scale² U Uᵀ): M = a² s² / (a² s² + σ²) on the subspace
    basis = torch.linalg.qr(torch.randn(D, d, generator=_gen(7), dtype=torch.float64))[0]

    def denoise(x, sigma):
        a = 1 - sigma
        shrink = a * scale ** 2 / (a ** 2 * scale ** 2 + sigma ** 2)
        return (shrink * (x.reshape(1, -1) @ basis) @ basis.T).reshape(x.shape)

    x = torch.zeros(1, D, dtype=torch.float64)
    for sigma in (0.05, 0.3, 0.6):
        a = 1 - sigma
        value = a * a * scale ** 2 / (a * a * scale ** 2 + sigma ** 2)
        res = geometry.local_dimension(denoise, x, sigma)
        torch.testing.assert_close(res.singular_values[:d], torch.full((d,), value, dtype=torch.float64))
        assert res.dimension == (d if value > 0.5 else 0)


def test_exact_and_randomized_agree_on_a_decaying_spectrum():
    D = 48
    g = _gen(5)
    u = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    s = 3.0 * 0.7 ** torch.arange(D, dtype=torch.float64)
    A = u @ torch.diag(s) @ v.T

    def denoise(x, sigma):
        return (x.reshape(1, -1) @ A.T / (1 - sigma)).reshape(x.shape)

    x = torch.randn(1, D, generator=g, dtype=torch.float64)
    exact = geometry.local_dimension(denoise, x, 0.3, method="exact")
    approx = geometry.local_dimension(denoise, x, 0.3, method="randomized", rank=10, power_iters=3,
                                      generator=_gen(0))
    assert approx.method == "randomized" and approx.singular_values.shape == (10,)
    assert float((approx.singular_values - exact.singular_values[:10]).abs().max()) < 1e-3
    assert approx.dimension == exact.dimension == int((s > 0.5).sum())
    assert approx.num_products == (10 + 8) * (2 + 2 * 3)


def test_adaptive_rank_stops_below_threshold_and_falls_back_to_exact_on_flat_spectra():
    D = 300
    g = _gen(8)
    u = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    s = 3.0 * 0.8 ** torch.arange(D, dtype=torch.float64)
    A = u @ torch.diag(s) @ u.T

    def decaying(x, sigma):
        return (x.reshape(1, -1) @ A / (1 - sigma)).reshape(x.shape)

    x = torch.randn(1, D, generator=g, dtype=torch.float64)
    res = geometry.local_dimension(decaying, x, 0.2, method="randomized", generator=_gen(0))
    assert res.method == "randomized" and res.complete and res.singular_values.numel() == 32
    assert res.dimension == int((s > 0.5).sum()) and res.num_products == 40 * 6
    torch.testing.assert_close(res.singular_values[:res.dimension], s[:res.dimension])

    def flat(x, sigma):                     # M = I: every direction is tangent
        return x / (1 - sigma)

    res = geometry.local_dimension(flat, x, 0.2, method="randomized", generator=_gen(0))
    assert res.method == "exact" and res.dimension == D and res.complete
    assert res.num_products == 40 * 6 + D   # one sketch at rank 32, then the exact spectrum


def test_exact_and_randomized_agree_on_the_oracle_and_a_tiny_dit():
    g = _gen(2)
    X = torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64)
    denoise = geometry.as_denoiser(ReferenceSet(X))
    x = 0.2 * X[:1] + 0.8 * torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64)
    exact = geometry.local_dimension(denoise, x, 0.8)
    approx = geometry.local_dimension(denoise, x, 0.8, method="randomized", rank=12, generator=g)
    assert float((approx.singular_values - exact.singular_values[:12]).abs().max()) < 1e-3

    model = tiny_dit_transformer()
    denoise = geometry.as_denoiser(model, labels=3)
    x = torch.randn(1, 1, 8, 8, generator=g)
    exact = geometry.local_dimension(denoise, x, 0.3)
    reverse = geometry.local_dimension(denoise, x, 0.3, ad="reverse")
    approx = geometry.local_dimension(denoise, x, 0.3, method="randomized", rank=56, oversample=8,
                                      power_iters=0, generator=g)   # full-width sketch
    assert float((reverse.singular_values - exact.singular_values).abs().max()) < 1e-5
    assert float((approx.singular_values - exact.singular_values[:56]).abs().max()) < 1e-3


def test_pipeline_and_transformer_adapters_agree():
    pipe = tiny_flow_pipeline()
    x = torch.randn(1, *_sample_shape(pipe), generator=_gen(4))
    via_pipe = geometry.as_denoiser(pipe, labels=2)
    via_model = geometry.as_denoiser(pipe.transformer, labels=2)
    torch.testing.assert_close(via_pipe(x, 0.4), via_model(x, 0.4))
    v = pipe.transformer(hidden_states=x, timestep=torch.tensor([400.0]),
                         class_labels=torch.tensor([2])).sample[:, :x.shape[1]]
    torch.testing.assert_close(via_model(x, 0.4), x - 0.4 * v)
    # one-row conditioning is repeated over a batch
    xb = torch.cat([x, x])
    torch.testing.assert_close(via_model(xb, 0.4), torch.cat([via_model(x, 0.4)] * 2))
    a = geometry.local_dimension(via_pipe, x, 0.4)
    b = geometry.local_dimension(via_model, x, 0.4)
    torch.testing.assert_close(a.singular_values, b.singular_values)


def _sample_shape(pipe):
    cfg = pipe.transformer.config
    return (cfg.in_channels, cfg.sample_size, cfg.sample_size)


def test_bad_inputs_raise_errors_that_teach():
    denoise = geometry.as_denoiser(ReferenceSet(torch.randn(5, 4)))
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="one point"):
        geometry.local_dimension(denoise, torch.randn(2, 4), 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        geometry.local_dimension(denoise, x, 0.0)
    with pytest.raises(ValueError, match="method must be one of"):
        geometry.local_dimension(denoise, x, 0.5, method="lanczos")
    with pytest.raises(ValueError, match="rank=9 exceeds"):
        geometry.local_dimension(denoise, x, 0.5, method="randomized", rank=9)
    with pytest.raises(ValueError, match="input's shape"):
        geometry.local_dimension(lambda z, s: z.sum(), x, 0.5)
    with pytest.raises(TypeError, match="as_denoiser"):
        geometry.local_dimension("oracle", x, 0.5)
    with pytest.raises(TypeError, match="cannot wrap str"):
        geometry.as_denoiser("model")
    with pytest.raises(ValueError, match="unknown label 7"):
        geometry.as_denoiser(ReferenceSet(torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), labels=7)
