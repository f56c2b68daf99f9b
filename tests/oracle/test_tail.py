"""The top-k oracle's tail estimate (``EmpiricalOracle(top_k=K, tail=True)``, steersample.oracle._tail)."""

import math

import pytest
import torch

import steersample as ss
from steersample.oracle import _tail
from steersample.oracle._math import _best_candidates


def clustered(n=3000, dim=256, seed=0):
    """Clusters in a rank-16 subspace plus isotropic per-sample noise (like benchmarks/oracle.py)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim, 16, generator=g) / 4.0
    centres = 0.8 * torch.randn(n // 50, 16, generator=g) @ basis.T
    return centres[torch.arange(n) % (n // 50)] + 0.3 * torch.randn(n, dim, generator=g)


def rel_error(v, want):
    return float(((v - want).norm(dim=1) / want.norm(dim=1)).max())


def test_tail_estimate_is_exact_when_the_projection_holds_every_direction():
    """D <= TAIL_RANK: the residuals are zero, the tail's log-weights are the projected ones,
    and the estimate equals the exact oracle whatever the number of candidates."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(600, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g,
                                                                                   dtype=torch.float64)
    ref = ss.ReferenceSet(latents.float())
    x = (0.3 * latents[:5] + 0.7 * torch.randn(5, 12, generator=g, dtype=torch.float64)).float()
    s = torch.full((5,), 0.7, dtype=torch.float64)
    acc = _tail.tail_pass(ref, x.double(), s, None, 8, True)
    out = ss.EmpiricalOracle(ref).evaluate(x, 0.7)
    x0 = acc.A / acc.S[:, None]
    torch.testing.assert_close(x0.float(), out.denoised, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(1.0 / acc.S, out.posterior.top1, rtol=1e-4, atol=1e-5)


def test_tail_mode_recovers_the_mass_fixed_k_drops_near_sigma_star():
    latents = clustered()
    ref = ss.ReferenceSet(latents)
    exact = ss.EmpiricalOracle(ref)
    star = ss.PhaseProfile.estimate(ref, num_queries=32).boundary_sigma
    fixed = ss.EmpiricalOracle(ref, top_k=16, max_dropped=None)
    tail = ss.EmpiricalOracle(ref, top_k=16, tail=True)
    g = torch.Generator().manual_seed(2)
    for factor in (1.0, 0.8):
        s = star * factor
        x = (1 - s) * latents[:16] + s * torch.randn(16, latents.shape[1], generator=g)
        want = exact.velocity(x, s)
        err_fixed, err_tail = rel_error(fixed.velocity(x, s), want), rel_error(tail.velocity(x, s), want)
        assert err_tail <= 2e-3 and err_tail <= err_fixed
        if factor == 1.0:
            assert err_fixed > 1e-2 and err_tail < err_fixed / 10      # the tail matters at σ*
        post = tail.posterior(x, s)
        assert bool((post.dropped_mass >= 0).all()) and bool((post.top1 <= 1).all())


def test_tail_mode_class_conditional_weights_only_the_class():
    latents = clustered(n=2000)
    labels = torch.arange(2000) % 2
    ref = ss.ReferenceSet(latents, labels)
    star = ss.PhaseProfile.estimate(ref, num_queries=32).boundary_sigma
    x = (1 - star) * latents[:6] + star * torch.randn(6, 256, generator=torch.Generator().manual_seed(3))
    lab = torch.tensor([0, 1, 0, 1, 1, 0])
    tail = ss.EmpiricalOracle(ref, top_k=8, tail=True).evaluate(x, star, lab)
    fixed = ss.EmpiricalOracle(ref, top_k=8, max_dropped=None).evaluate(x, star, lab)
    want = ss.EmpiricalOracle(ref).evaluate(x, star, lab)
    assert rel_error(tail.velocity, want.velocity) <= 1e-2
    assert rel_error(tail.velocity, want.velocity) < rel_error(fixed.velocity, want.velocity) / 3
    assert bool((labels[tail.posterior.index] == lab).all())


def test_float32_candidate_weights_match_float64_and_small_sigma_stays_float64(monkeypatch):
    latents = clustered(n=500)
    ref = ss.ReferenceSet(latents)
    g = torch.Generator().manual_seed(4)
    q = (0.2 * latents[:4] + 0.8 * torch.randn(4, 256, generator=g)).double()
    cand = torch.stack([torch.randperm(500, generator=g)[:40] for _ in range(4)])
    sq = latents.double().square().sum(1)[cand]
    for s_value in (0.8, 0.05):
        s = torch.full((4,), s_value, dtype=torch.float64)
        a, s2 = 1 - s, s.square()
        want = _best_candidates(ref, q, a, s2, cand, 40, 40, True)
        calls = []
        monkeypatch.setattr(_tail, "_best_candidates", lambda *args: calls.append(1) or want)
        got = _tail._candidate_weights(ref, q, a, s2, cand, sq, True)
        assert bool(calls) == (s_value == 0.05)          # small σ: float64 differences
        torch.testing.assert_close(got.m, want.m, rtol=1e-7, atol=1e-5)
        torch.testing.assert_close(got.S, want.S, rtol=1e-5, atol=0)
        torch.testing.assert_close(got.A / got.S[:, None], want.A / want.S[:, None], rtol=1e-5, atol=1e-5)
        assert torch.equal(got.best, want.best)


def test_tail_option_errors():
    ref = ss.ReferenceSet(torch.randn(50, 4))
    with pytest.raises(ValueError, match="top_k=K"):
        ss.EmpiricalOracle(ref, tail=True)
    with pytest.raises(ValueError, match="max_dropped"):
        ss.EmpiricalOracle(ref, top_k=4, max_dropped=None, tail=True)
    with pytest.raises(TypeError, match="True or False"):
        ss.EmpiricalOracle(ref, top_k=4, tail=1)
    assert math.isclose(ss.EmpiricalOracle(ref, top_k=4, tail=True).max_dropped, 1e-4)
