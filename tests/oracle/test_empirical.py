"""EmpiricalOracle against an independent float64 brute force (SCIENCE.md §1)."""

import math

import pytest
import torch

import steersample as ss
from steersample.evaluation import metrics

SIGMAS = (0.95, 0.5, 0.1, 0.01)


def brute_force(latents, x, sigma, ref_labels=None, labels=None):
    """Direct float64 posterior: softmax(-||x - (1-s) x_i||^2 / (2 s^2)), x0 = Σ γ x_i, v."""
    R = latents.reshape(latents.shape[0], -1).double()
    q = x.reshape(x.shape[0], -1).double()
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(q.shape[0], 1)
    d2 = ((q[:, None, :] - (1 - s)[:, :, None] * R[None]) ** 2).sum(-1)
    logits = -d2 / (2 * s * s)
    if labels is not None:
        labels = torch.as_tensor(labels).expand(q.shape[0])
        logits = logits.masked_fill(ref_labels[None, :] != labels[:, None], -math.inf)
    w = torch.softmax(logits, dim=1)
    x0 = w @ R
    return w, x0, (q - x0) / s


def clustered(sigma, dim=1024, clusters=4, members=64, seed=0):
    """Reference with large-norm cluster centres and within-cluster spread ~ sigma/(1-sigma),
    so the posterior at this sigma spreads over several samples (non-trivial weights), and
    forward-noised queries from it."""
    g = torch.Generator().manual_seed(seed)
    a = 1 - sigma
    centres = 3.0 * torch.randn(clusters, dim, generator=g)
    spread = 1.5 * sigma / a
    z = torch.randn(clusters, members, dim, generator=g) / math.sqrt(dim)
    latents = (centres[:, None, :] + spread * z).reshape(-1, dim)
    labels = torch.arange(clusters).repeat_interleave(members)
    k = torch.randint(0, latents.shape[0], (6,), generator=g)
    x = a * latents[k] + sigma * torch.randn(6, dim, generator=g)
    return latents, labels, x


def rel(a, b):
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def entropy(w):
    return -(w * torch.log(w.clamp_min(1e-300))).sum(1)


@pytest.fixture(params=["float64-copy", "float32-selection"])
def selection(request, monkeypatch):
    """Run with the small-set float64 copy, and with it disabled (the float32 selection pass
    that large reference sets take, switching to float64 after the first dense chunk)."""
    if request.param == "float32-selection":
        monkeypatch.setattr("steersample.oracle.empirical._FLOAT64_COPY_ELEMENTS", 0)
    return request.param


@pytest.mark.parametrize("sigma", SIGMAS)
def test_matches_float64_brute_force(sigma, selection):
    latents, _, x = clustered(sigma)
    w, x0, v = brute_force(latents, x, sigma)
    assert float(w.max(1).values.max()) < 0.99  # the weights are not trivial
    oracle = ss.EmpiricalOracle(ss.ReferenceSet(latents), chunk_size=50)
    out = oracle.evaluate(x, sigma)
    post = oracle.posterior(x, sigma)
    top1 = w.max(1).values
    assert torch.allclose(post.top1.double(), top1, rtol=1e-6, atol=0)
    assert torch.equal(post.index, w.argmax(1))
    assert torch.allclose(post.entropy.double(), entropy(w), rtol=1e-6, atol=1e-9)
    assert torch.allclose(post.effective_count.double(), 1 / (w ** 2).sum(1), rtol=1e-6, atol=0)
    assert float(post.dropped_mass.max()) <= 1e-12
    assert rel(out.denoised, x0) < 1e-6 and rel(oracle.denoise(x, sigma), x0) < 1e-6
    assert rel(out.velocity, v) < 1e-6 and rel(oracle.velocity(x, sigma), v) < 1e-6
    # float64 queries give float64 answers, float32 queries float32
    assert out.denoised.dtype == torch.float32 and out.denoised.shape == x.shape
    assert oracle.denoise(x.double(), sigma).dtype == torch.float64
    assert rel(oracle.denoise(x.double(), sigma), x0) < 1e-9


def test_naive_float32_expansion_would_fail_at_small_sigma():
    sigma = 0.01
    latents, _, x = clustered(sigma)
    w, x0, _ = brute_force(latents, x, sigma)
    a = 1 - sigma
    naive = (a * (x @ latents.T) - 0.5 * a * a * (latents ** 2).sum(1)) / sigma ** 2   # float32
    w_naive = torch.softmax(naive.double(), dim=1)
    assert rel(w_naive @ latents.double(), x0) > 1e-4      # the cancellation is real
    out = ss.EmpiricalOracle(ss.ReferenceSet(latents)).denoise(x, sigma)
    assert rel(out, x0) < 1e-6


def test_per_sample_sigma_tensor(selection):
    latents, _, x = clustered(0.3)
    sigma = torch.tensor([0.95, 0.5, 0.3, 0.1, 0.01, 1.0])
    _, x0, v = brute_force(latents, x, sigma)
    out = ss.EmpiricalOracle(ss.ReferenceSet(latents)).evaluate(x, sigma)
    assert rel(out.denoised, x0) < 1e-6 and rel(out.velocity, v) < 1e-6


def test_sigma_one_is_uniform():
    latents, _, x = clustered(0.5, dim=32, members=10)
    post = ss.EmpiricalOracle(ss.ReferenceSet(latents)).posterior(x, 1.0)
    n = latents.shape[0]
    assert torch.allclose(post.top1.double(), torch.full((6,), 1 / n, dtype=torch.float64))
    assert torch.allclose(post.entropy.double(), torch.full((6,), math.log(n), dtype=torch.float64))
    assert torch.allclose(post.effective_count.double(), torch.full((6,), float(n), dtype=torch.float64))
    x0 = ss.EmpiricalOracle(ss.ReferenceSet(latents)).denoise(x.double(), 1.0)
    assert torch.allclose(x0, latents.double().mean(0).expand_as(x0), atol=1e-12)


@pytest.mark.parametrize("sigma", [0.9, 0.2, 0.02])
def test_chunked_equals_unchunked(sigma, selection):
    latents, _, x = clustered(sigma, dim=256, members=40)
    ref = ss.ReferenceSet(latents)
    whole = ss.EmpiricalOracle(ref, chunk_size=len(ref)).evaluate(x.double(), sigma)
    for chunk in (1, 7, 64):
        part = ss.EmpiricalOracle(ref, chunk_size=chunk).evaluate(x.double(), sigma)
        assert torch.equal(part.posterior.index, whole.posterior.index)
        assert torch.allclose(part.posterior.top1, whole.posterior.top1, rtol=1e-12, atol=0)
        assert torch.allclose(part.posterior.entropy, whole.posterior.entropy, rtol=1e-10, atol=1e-12)
        assert torch.allclose(part.denoised, whole.denoised, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.95, 0.3, 0.05])
def test_class_conditional_only_weights_its_class(sigma, selection):
    latents, labels, x = clustered(sigma, dim=128, members=30)
    ref = ss.ReferenceSet(latents, labels)
    oracle = ss.EmpiricalOracle(ref, chunk_size=17)
    query_labels = torch.tensor([0, 1, 2, 3, 3, 0])
    out = oracle.evaluate(x.double(), sigma, labels=query_labels)
    w, x0, v = brute_force(latents, x, sigma, labels, query_labels)
    assert float(w[labels[None, :] != query_labels[:, None]].abs().max()) == 0.0
    assert torch.equal(labels[out.posterior.index], query_labels)
    assert rel(out.denoised, x0) < 1e-9 and rel(out.velocity, v) < 1e-9
    # same as an unlabelled oracle over that class alone
    for c in range(4):
        only = ss.EmpiricalOracle(ss.ReferenceSet(latents[labels == c]))
        rows = query_labels == c
        assert torch.allclose(only.denoise(x[rows].double(), sigma), out.denoised[rows], atol=1e-10)
    # an int label applies to every query
    x0_int = oracle.denoise(x.double(), sigma, labels=2)
    _, x0_2, _ = brute_force(latents, x, sigma, labels, 2)
    assert rel(x0_int, x0_2) < 1e-9


@pytest.mark.parametrize("sigma", [0.6, 0.2, 0.02])
def test_top_k_mode_exact_weights_and_bound(sigma):
    latents, _, x = clustered(sigma, dim=64, members=50)
    ref = ss.ReferenceSet(latents)
    w, x0, _ = brute_force(latents, x, sigma)
    full = ss.EmpiricalOracle(ref, top_k=len(ref)).evaluate(x.double(), sigma)
    assert rel(full.denoised, x0) < 1e-9 and float(full.posterior.dropped_mass.max()) == 0.0
    out = ss.EmpiricalOracle(ref, top_k=20, max_dropped=None).evaluate(x.double(), sigma)
    top = torch.topk(w, 20, dim=1)
    kept = top.values.sum(1)
    true_dropped = (1 - kept) / kept            # dropped mass relative to the computed mass
    assert torch.all(true_dropped <= out.posterior.dropped_mass * (1 + 1e-9) + 1e-15)
    # on the candidates the weights are exact: the renormalised top-k mean
    x0_k = torch.einsum("bk,bkd->bd", top.values / kept[:, None], latents.double()[top.indices])
    assert rel(out.denoised, x0_k) < 1e-9
    assert torch.allclose(out.posterior.top1, top.values[:, 0] / kept, rtol=1e-9)


@pytest.mark.parametrize("sigma", [0.6, 0.3, 0.1])   # all exact fallback, mixed, all top-k
def test_top_k_adaptive_meets_max_dropped(sigma):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2000, 8, generator=g)
    x = (1 - sigma) * latents[:12] + sigma * torch.randn(12, 8, generator=g)
    _, x0, v = brute_force(latents, x, sigma)
    oracle = ss.EmpiricalOracle(ss.ReferenceSet(latents), top_k=4, max_dropped=1e-6)
    out = oracle.evaluate(x.double(), sigma)
    assert float(out.posterior.dropped_mass.max()) <= 1e-6
    assert rel(out.denoised, x0) < 1e-5 and rel(out.velocity, v) < 1e-5


def test_top_k_approximate_index_runs_and_is_close_at_small_sigma():
    latents, _, x = clustered(0.05, dim=64, members=50)
    ref = ss.ReferenceSet(latents)
    _, x0, _ = brute_force(latents, x, 0.05)
    out = ss.EmpiricalOracle(ref, top_k=16, approximate=True, nprobe=4).denoise(x.double(), 0.05)
    assert rel(out, x0) < 1e-3


def test_euler_from_noise_ends_on_reference_samples():
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(40, 1, 4, 4, generator=g)
    ref = ss.ReferenceSet(latents)
    oracle = ss.EmpiricalOracle(ref)
    x = torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64)
    sigmas = torch.linspace(1.0, 0.0, 101, dtype=torch.float64)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * oracle.velocity(x, float(sigma))
    dist, _ = ref.nearest(x, k=1)
    assert float(dist.max()) < 1e-3
    assert metrics.copy_rate(x, ref) == 1.0


@pytest.mark.parametrize("sigma, match", [
    (0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), (-0.1, r"\(0, 1\]"), (float("nan"), r"\(0, 1\]"),
    (torch.tensor([0.5, 0.5]), "shape"),
])
def test_bad_sigma(sigma, match):
    ref = ss.ReferenceSet(torch.randn(10, 4))
    with pytest.raises(ValueError, match=match):
        ss.EmpiricalOracle(ref).posterior(torch.randn(3, 4), sigma)


def test_bad_inputs():
    ref = ss.ReferenceSet(torch.randn(10, 2, 3), torch.arange(10) % 2)
    oracle = ss.EmpiricalOracle(ref)
    with pytest.raises(ValueError, match=r"shape \(4, 6\).*\(B, 2, 3\)"):
        oracle.denoise(torch.randn(4, 6), 0.5)
    bad = torch.randn(4, 2, 3)
    bad[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        oracle.velocity(bad, 0.5)
    bad[1, 0, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        oracle.posterior(bad, 0.5)
    with pytest.raises(ValueError, match="unknown label 7"):
        oracle.posterior(torch.randn(4, 2, 3), 0.5, labels=7)
    with pytest.raises(ValueError, match="no labels"):
        ss.EmpiricalOracle(ss.ReferenceSet(torch.randn(5, 3))).posterior(torch.randn(2, 3), 0.5, labels=0)
    with pytest.raises(TypeError, match="sigma"):
        oracle.posterior(torch.randn(4, 2, 3), "0.5")
    with pytest.raises(TypeError, match="ReferenceSet"):
        ss.EmpiricalOracle(torch.randn(5, 3))
    with pytest.raises(ValueError, match="top_k"):
        ss.EmpiricalOracle(ref, approximate=True)


def test_top_k_with_labels_matches_the_class_oracle():
    latents, labels, x = clustered(0.3, dim=32, members=25)
    ref = ss.ReferenceSet(latents, labels)
    query_labels = torch.tensor([0, 1, 2, 3, 1, 2])
    out = ss.EmpiricalOracle(ref, top_k=25, max_dropped=None).evaluate(x.double(), 0.3, labels=query_labels)
    approx = ss.EmpiricalOracle(ref, top_k=25, max_dropped=None, approximate=True, nprobe=10)
    _, x0, _ = brute_force(latents, x, 0.3, labels, query_labels)
    assert rel(out.denoised, x0) < 1e-9 and float(out.posterior.dropped_mass.max()) == 0.0
    assert rel(approx.denoise(x.double(), 0.3, labels=query_labels), x0) < 1e-9
    assert torch.equal(labels[out.posterior.index], query_labels)


def test_posterior_is_a_frozen_dataclass_and_evaluate_agrees():
    import dataclasses

    latents, _, x = clustered(0.5, dim=16, members=10)
    oracle = ss.EmpiricalOracle(ss.ReferenceSet(latents))
    post = oracle.posterior(x, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        post.top1 = None
    assert [f.name for f in dataclasses.fields(post)][:4] == ["top1", "index", "entropy", "effective_count"]
    assert all(getattr(post, f).shape == (6,) for f in ("top1", "index", "entropy", "effective_count"))
    out = oracle.evaluate(x, 0.5)
    assert torch.equal(out.posterior.index, post.index) and torch.equal(out.posterior.top1, post.top1)
    assert torch.equal(out.denoised, oracle.denoise(x, 0.5)) and torch.equal(out.velocity, oracle.velocity(x, 0.5))


@pytest.mark.parametrize("want_mean", [True, False])
def test_best_candidates_batched_equals_per_query_brute_force(monkeypatch, want_mean):
    """The batched candidate kernel (one gather for a block of queries) against a per-query
    float64 brute force, and against its own single-query blocked path (large K)."""
    from steersample.oracle import _math as om

    g = torch.Generator().manual_seed(3)
    flat = torch.randn(50, 6, generator=g)
    ref = ss.ReferenceSet(flat)
    q = torch.randn(7, 6, generator=g, dtype=torch.float64)
    a = torch.rand(7, generator=g, dtype=torch.float64) * 0.5 + 0.3
    s2 = (1 - a).square()
    cand = torch.stack([torch.randperm(50, generator=g)[:10] for _ in range(7)])
    k = 6
    got = om._best_candidates(ref, q, a, s2, cand, k, 50, want_mean)
    for j in range(7):
        rows = flat[cand[j]].double()
        logits = -((q[j] - a[j] * rows).square().sum(1)) / (2 * s2[j])
        top, order = torch.sort(logits, descending=True)
        top, order = top[:k], order[:k]
        p = torch.exp(top - top[0])
        torch.testing.assert_close(got.S[j], p.sum(), rtol=1e-12, atol=0)
        torch.testing.assert_close(got.m[j], top[0], rtol=1e-12, atol=1e-12)
        assert int(got.best[j]) == int(cand[j, order[0]])
        torch.testing.assert_close(got.bound[j], (50 - k) * p[-1] / p.sum(), rtol=1e-12, atol=0)
        if want_mean:
            torch.testing.assert_close(got.A[j], p @ rows[order], rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(om, "_GATHER_ELEMENTS", 4)            # K'·D > 4·4: the blocked path
    blocked = om._best_candidates(ref, q, a, s2, cand, k, 50, want_mean)
    for name in ("m", "S", "Q", "H", "bound", "drop_max"):
        torch.testing.assert_close(getattr(blocked, name), getattr(got, name), rtol=1e-12, atol=1e-12)
    assert torch.equal(blocked.best, got.best)
    if want_mean:
        torch.testing.assert_close(blocked.A, got.A, rtol=1e-12, atol=1e-12)
