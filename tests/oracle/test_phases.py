"""PhaseProfile: the navigation -> refinement boundary on forward-noised reference queries."""

import math

import pytest
import torch

import steersample as ss
from steersample.oracle.phases import crossing_sigma, default_sigma_grid

GRID = torch.linspace(1.0, 0.02, 50, dtype=torch.float64)


def gaussian(n, d, seed=0):
    return ss.ReferenceSet(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


def boundary(n, d):
    return ss.PhaseProfile.estimate(gaussian(n, d), torch.Generator().manual_seed(1),
                                    sigmas=GRID, num_queries=48).boundary_sigma


def test_boundary_moves_towards_noise_with_dimension_and_towards_data_with_n():
    by_dim = [boundary(200, d) for d in (4, 16, 64)]
    assert by_dim[0] < by_dim[1] < by_dim[2]
    by_n = [boundary(n, 8) for n in (20, 200, 2000)]
    assert by_n[0] > by_n[1] > by_n[2]


def test_profile_shape_and_limits():
    ref = gaussian(100, 8)
    p = ss.PhaseProfile.estimate(ref, torch.Generator().manual_seed(0), num_queries=32)
    assert torch.equal(p.sigmas, default_sigma_grid())
    assert bool((p.sigmas[1:] < p.sigmas[:-1]).all())
    assert p.top1.shape == p.sigmas.shape == p.top1_std.shape
    assert float(p.top1[0]) == pytest.approx(1 / 100)           # sigma = 1: uniform posterior
    assert float(p.top1[-1]) > 0.99
    assert 0 < p.refinement_sigma < p.boundary_sigma < 1
    assert p.sigma_at(0.5) == p.boundary_sigma and p.sigma_at(0.9) == p.refinement_sigma
    assert (p.num_reference, p.dim, p.num_queries, p.label) == (100, 8, 32, None)


def test_generator_makes_it_reproducible():
    ref = gaussian(60, 8)
    a = ss.PhaseProfile.estimate(ref, torch.Generator().manual_seed(5), num_queries=16, sigmas=GRID)
    b = ss.PhaseProfile.estimate(ref, torch.Generator().manual_seed(5), num_queries=16, sigmas=GRID)
    assert torch.equal(a.top1, b.top1)


def test_crossing_sigma_interpolates():
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    assert crossing_sigma(sigmas, torch.tensor([0.0, 0.4, 0.8]), 0.5) == pytest.approx(0.375)
    assert crossing_sigma(sigmas, torch.tensor([0.6, 0.7, 0.8]), 0.5) == 1.0
    assert math.isnan(crossing_sigma(sigmas, torch.tensor([0.1, 0.2, 0.3]), 0.5))


def test_per_class():
    g = torch.Generator().manual_seed(0)
    latents = torch.cat([torch.randn(20, 8, generator=g), torch.randn(200, 8, generator=g)])
    labels = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    ref = ss.ReferenceSet(latents, labels)
    per = ss.PhaseProfile.estimate_per_class(ref, torch.Generator().manual_seed(0), sigmas=GRID,
                                             num_queries=32)
    assert sorted(per) == [0, 1] and per[0].label == 0 and per[0].num_reference == 20
    assert per[0].boundary_sigma > per[1].boundary_sigma     # fewer samples: collapse earlier
    one = ss.PhaseProfile.estimate(ref, torch.Generator().manual_seed(0), sigmas=GRID,
                                   num_queries=32, label=1)
    assert one.num_reference == 200


def test_bad_inputs():
    ref = gaussian(10, 4)
    with pytest.raises(ValueError, match="labelled"):
        ss.PhaseProfile.estimate_per_class(ref)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ss.PhaseProfile.estimate(ref, sigmas=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="unknown label|no labels"):
        ss.PhaseProfile.estimate(ref, label=3)
    with pytest.raises(TypeError, match="ReferenceSet"):
        ss.PhaseProfile.estimate(torch.randn(10, 4))


def test_acceleration_is_the_oracle_odes_second_derivative():
    """a(σ) = E‖dx̂₀/dσ‖/σ along the oracle ODE equals E‖d²x/dσ²‖ (v = (x − x̂₀)/σ), same queries."""
    ref = gaussian(40, 6)
    grid = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.05], dtype=torch.float64)
    p = ss.PhaseProfile.estimate(ref, torch.Generator().manual_seed(3), sigmas=grid, num_queries=16)
    # the estimate's queries, rebuilt from the same generator draws
    g = torch.Generator().manual_seed(3)
    x0 = ref.latents[torch.randperm(40, generator=g)[:16]].double()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    oracle = ss.EmpiricalOracle(ref)
    for s, a in zip(grid.tolist(), p.acceleration.tolist()):
        x = (1 - s) * x0 + s * eps
        d = 1e-6                                        # a much smaller step than the estimate's
        v = oracle.velocity(x, torch.full((16,), s, dtype=torch.float64))
        v_next = oracle.velocity(x - d * v, torch.full((16,), s - d, dtype=torch.float64))
        brute = float(((v_next - v).norm(dim=1) / d).mean())
        assert a == pytest.approx(brute, rel=0.02, abs=1e-8)


def test_acceleration_curve_shape_and_opt_out():
    ref = gaussian(100, 8)
    p = ss.PhaseProfile.estimate(ref, torch.Generator().manual_seed(0), num_queries=32)
    assert p.acceleration.shape == p.sigmas.shape and bool((p.acceleration >= 0).all())
    peak = float(p.sigmas[int(p.acceleration.argmax())])
    assert p.refinement_sigma < peak < 1.0              # the posterior mean moves before it settles
    assert float(p.acceleration[-1]) < 1e-6 * float(p.acceleration.max())   # memorised: x̂₀ stops moving
    q = ss.PhaseProfile.estimate(ref, torch.Generator().manual_seed(0), num_queries=32, acceleration=False)
    assert q.acceleration is None and torch.equal(q.top1, p.top1)
    # built without the field (as before it existed): still a valid profile
    old = ss.PhaseProfile(p.sigmas, p.top1, p.top1_std, p.boundary_sigma, p.refinement_sigma, None, 100, 8, 32)
    assert old.acceleration is None
