"""NoveltySteering and its Gaussian class model: formulas against brute force, the distance
floor, and end to end on the embedded default (frequent samples untouched, batch invariance)."""

from __future__ import annotations

import math

import pytest
import torch

import steersample as ss
from steersample.steering.class_model import GaussianClassModel
from steersample.steering.novelty import leave_one_out_distances, push_along, push_to_distance
from steersample.steering.registry import STEERERS


def _labelled(n=60, dim=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) + 2.0 * labels[:, None].double()
    return ss.ReferenceSet(x.float(), labels=labels)


def test_class_posterior_matches_gaussians_with_noise_added():
    ref = _labelled()
    model = GaussianClassModel.fit(ref)
    sigma = 0.4
    tau2 = (sigma / (1 - sigma)) ** 2
    cov = model.evecs @ torch.diag(model.evals) @ model.evecs.T + tau2 * torch.eye(5, dtype=torch.float64)
    x = torch.randn(7, 5, dtype=torch.float64)
    logp = torch.stack([torch.distributions.MultivariateNormal(m, cov).log_prob(x / (1 - sigma))
                        for m in model.means], dim=1) + model.log_prior
    assert torch.allclose(model.log_posterior(x, sigma), torch.log_softmax(logp, 1), atol=1e-10)


def test_low_rank_class_posterior_matches_gaussians_with_the_isotropic_rest(monkeypatch):
    from steersample.steering import class_model

    monkeypatch.setattr(class_model, "_LOW_RANK", 4)    # force the rank-r + isotropic path
    monkeypatch.setattr(class_model, "_RANK", 3)
    ref = _labelled(dim=9)
    model = GaussianClassModel.fit(ref)
    assert model.evecs.shape == (9, 3) and model.iso > 0
    sigma = 0.25
    tau2 = (sigma / (1 - sigma)) ** 2
    v = model.evecs
    cov = (v @ torch.diag(model.evals) @ v.T + model.iso * (torch.eye(9, dtype=torch.float64) - v @ v.T)
           + tau2 * torch.eye(9, dtype=torch.float64))
    x = torch.randn(6, 9, dtype=torch.float64)
    logp = torch.stack([torch.distributions.MultivariateNormal(m, cov).log_prob(x / (1 - sigma))
                        for m in model.means], dim=1) + model.log_prior
    assert torch.allclose(model.log_posterior(x, sigma), torch.log_softmax(logp, 1), atol=1e-9)


def test_velocity_guidance_is_minus_sigma_over_one_minus_sigma_times_the_gradient():
    model = GaussianClassModel.fit(_labelled())
    sigma, labels = 0.3, torch.tensor([0, 1, 2, 1])
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    logp = model.log_posterior(x, sigma)[torch.arange(4), labels].sum()
    (grad,) = torch.autograd.grad(logp, x)
    expect = -sigma / (1 - sigma) * grad
    assert torch.allclose(model.velocity_guidance(x.detach(), sigma, labels), expect, atol=1e-10)


def test_class_model_needs_labels():
    with pytest.raises(ValueError, match="labelled reference set"):
        GaussianClassModel.fit(ss.ReferenceSet(torch.randn(5, 3)))


def test_leave_one_out_distances_against_brute_force():
    ref = _labelled(n=30)
    flat = ref.latents.double()
    dist = torch.cdist(flat, flat) + torch.diag(torch.full((30,), math.inf, dtype=torch.float64))
    assert torch.allclose(leave_one_out_distances(ref), dist.min(1).values, atol=1e-5)


def test_leave_one_out_distances_agree_between_brute_force_and_the_index(monkeypatch):
    from steersample.steering import novelty

    ref = _labelled(n=40)
    brute = leave_one_out_distances(ref)
    monkeypatch.setattr(novelty, "_BRUTE_FORCE", 0)       # the ReferenceSet.nearest path
    assert torch.allclose(leave_one_out_distances(ref), brute, atol=1e-5)


def test_leave_one_group_out_distances_skip_near_duplicates(monkeypatch):
    """Pairs of near-duplicates: leaving the group out gives the distance to the other pairs,
    by brute force and through the reference index alike; groups must match the rows."""
    from steersample.steering import novelty

    g = torch.Generator().manual_seed(2)
    base = torch.randn(12, 5, generator=g, dtype=torch.float64) * 3
    x = torch.cat([base, base + 0.01 * torch.randn(12, 5, generator=g, dtype=torch.float64)])
    ref = ss.ReferenceSet(x.float(), labels=torch.zeros(24, dtype=torch.long))
    groups = torch.arange(12).repeat(2)
    flat = ref.latents.double()
    dist = torch.cdist(flat, flat).masked_fill(groups[:, None] == groups[None], math.inf)
    expect = dist.min(1).values
    assert torch.allclose(leave_one_out_distances(ref, groups), expect, atol=1e-6)
    assert float(leave_one_out_distances(ref).max()) < 0.1 < float(expect.min())   # siblings
    monkeypatch.setattr(novelty, "_BRUTE_FORCE", 0)
    assert torch.allclose(leave_one_out_distances(ref, groups), expect, atol=1e-5)
    with pytest.raises(ValueError, match="24 integer ids, one per reference sample"):
        leave_one_out_distances(ref, torch.arange(5))
    assert torch.allclose(ss.NoveltySteering(groups=groups).fit(ref).loo, expect, atol=1e-5)
    assert "groups=<24 ids>" in repr(ss.NoveltySteering(groups=groups))


def test_fit_nearest_agrees_between_brute_force_and_the_reference_index(monkeypatch):
    from steersample.steering import novelty

    ref = _labelled(n=50, dim=6)
    x0 = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    brute = ss.NoveltySteering().fit(ref)
    monkeypatch.setattr(novelty, "_BRUTE_FORCE", 0)
    indexed = ss.NoveltySteering().fit(ref)
    assert brute.flat is not None and indexed.flat is None
    idx_b, rows_b = brute.nearest(ref, x0, (6,), 5)
    idx_i, rows_i = indexed.nearest(ref, x0, (6,), 5)
    assert torch.equal(idx_b, idx_i)
    assert torch.allclose(rows_b, rows_i, atol=1e-6)
    assert torch.allclose(rows_b, ref.latents.double()[idx_b], atol=0)


def test_tangent_at_an_anchor_is_the_principal_subspace_of_its_neighbours_and_is_cached():
    ref = _labelled(n=50, dim=6)
    fit = ss.NoveltySteering().fit(ref)
    anchors = torch.tensor([3, 17, 3])
    basis = fit.tangent(ref, anchors, (6,), neighbours=10, directions=2)
    assert basis.shape == (3, 6, 2) and sorted(fit.tangents) == [3, 17]
    flat = ref.latents.double()
    for b, a in zip(basis, anchors.tolist()):
        near = flat[torch.cdist(flat[a:a + 1], flat)[0].argsort()[:10]]
        centred = near - near.mean(0)
        top = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -2:]
        assert torch.allclose(b.T @ b, torch.eye(2, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(b @ b.T, top @ top.T, atol=1e-8)
    fit.tangents[3] = torch.zeros(6, 2, dtype=torch.float64)    # a cached basis is not recomputed
    assert torch.equal(fit.tangent(ref, torch.tensor([3]), (6,), 10, 2)[0], torch.zeros(6, 2, dtype=torch.float64))


def test_push_reaches_the_target_inside_the_tangent_space():
    g = torch.Generator().manual_seed(1)
    x0, anchor = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.zeros(6, 8, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(6, 8, 3, generator=g, dtype=torch.float64)).Q
    start = x0.norm(dim=1)
    target = torch.where(torch.arange(6) < 3, start * 2, start * 0.5)   # last three: already farther
    out = push_to_distance(x0, anchor, basis, target)
    assert torch.allclose(out[:3].norm(dim=1), target[:3], atol=1e-9)
    assert torch.equal(out[3:], x0[3:])
    moved = out[:3] - x0[:3]
    in_span = (basis[:3] @ (basis[:3].transpose(1, 2) @ moved[..., None]))[..., 0]
    assert torch.allclose(moved, in_span, atol=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma_nav": 1.5}, "sigma_nav"), ({"push_sigma": -0.1}, "push_sigma"),
    ({"neighbours": 1}, "neighbours"), ({"strength": 0}, "strength"),
    ({"classifier_scale": float("nan")}, "classifier_scale"), ({"iterations": 0}, "iterations"),
    ({"toward_mean": 1.5}, "toward_mean"), ({"toward_mean": -0.1}, "toward_mean"),
    ({"toward_mean": True}, "toward_mean"), ({"leaning": -1}, "leaning"),
    ({"iterations": 2, "leaning": 3}, "at most iterations"), ({"leaning": 1.0}, "leaning"),
])
def test_bad_arguments_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ss.NoveltySteering(**kwargs)


def test_registered_and_needs_a_reference():
    assert STEERERS["novelty"] is ss.NoveltySteering
    pipe, _ = ss.load_default()
    with pytest.raises(ValueError, match="needs a reference set"):
        pipe(class_labels=[2], num_inference_steps=2, steering=["novelty"])


def _run(pipe, ref, labels, seeds, steering, steps=12):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(class_labels=labels, num_inference_steps=steps, guidance=4.0, generator=gens,
                output_type="latent", steering=steering, reference=ref).images


def test_scarce_samples_move_away_frequent_samples_stay_bit_for_bit():
    pipe, ref = ss.load_default()
    labels, seeds = [2, 4, 8, 3, 5], [11, 12, 13, 14, 15]
    plain = _run(pipe, ref, labels, seeds, None)
    steered = _run(pipe, ref, labels, seeds, [ss.NoveltySteering()])
    assert torch.equal(steered[3:], plain[3:])
    d = ss.metrics.nearest_training_distance
    assert (d(steered[:3], ref) > d(plain[:3], ref)).all()


def test_a_seed_gives_the_same_sample_in_any_batch():
    pipe, ref = ss.load_default()
    alone = _run(pipe, ref, [4], [21], [ss.NoveltySteering()])
    batch = _run(pipe, ref, [2, 4, 6], [20, 21, 22], [ss.NoveltySteering()])
    assert torch.allclose(alone[0], batch[1], atol=1e-5)


def test_without_labels_it_changes_nothing():
    pipe, ref = ss.load_default()
    unlabelled = ss.ReferenceSet(ref.latents)
    plain = _run(pipe, unlabelled, [2], [5], None)
    assert torch.equal(_run(pipe, unlabelled, [2], [5], [ss.NoveltySteering()]), plain)


def test_top_eigenpairs_match_a_full_eigen_solve():
    from steersample.steering.novelty import top_eigenpairs

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 48, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -1, 64, dtype=torch.float64)
    gram = x @ x.transpose(1, 2)
    lam, vec = torch.linalg.eigh(gram)
    approx_lam, approx_vec = top_eigenpairs(gram, 12)
    exact_p = vec[:, :, -12:] @ vec[:, :, -12:].transpose(1, 2)
    approx_p = approx_vec @ approx_vec.transpose(1, 2)
    assert torch.allclose(approx_lam, lam[:, -12:], rtol=2e-2)
    assert (approx_p - exact_p).abs().max() < 0.1
    assert torch.allclose(approx_vec.transpose(1, 2) @ approx_vec, torch.eye(12, dtype=torch.float64).expand(5, 12, 12), atol=1e-10)
    small = gram[:, :10, :10]                      # r + oversample >= K: the exact solve
    exact_small = torch.linalg.eigh(small)
    assert torch.equal(top_eigenpairs(small, 3)[0], exact_small[0][:, -3:])


def test_push_along_reaches_the_target_along_the_given_direction():
    g = torch.Generator().manual_seed(4)
    x0, anchor = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    direction = torch.randn(5, 7, generator=g, dtype=torch.float64)
    start = (x0 - anchor).norm(dim=1)
    target = torch.where(torch.arange(5) < 3, start + 1.5, start - 0.1)   # last two: already farther
    out = push_along(x0, anchor, direction, target)
    assert torch.allclose((out[:3] - anchor[:3]).norm(dim=1), target[:3], atol=1e-9)
    assert torch.equal(out[3:], x0[3:])
    moved = out[:3] - x0[:3]
    scale = (moved * direction[:3]).sum(1) / (direction[:3] * direction[:3]).sum(1)
    assert (scale > 0).all() and torch.allclose(moved, scale[:, None] * direction[:3], atol=1e-9)
    # the smallest step: the other root of |e + a d| = target is negative
    e, d = x0[:3] - anchor[:3], direction[:3]
    a2, a1, a0 = (d * d).sum(1), 2 * (e * d).sum(1), (e * e).sum(1) - target[:3] ** 2
    other = (-a1 - (a1 ** 2 - 4 * a2 * a0).sqrt()) / (2 * a2)
    assert (other < 0).all()


def _push_once(steerer, ref, x0, labels, target):
    fit = steerer.fit(ref)
    return steerer._push(x0.clone(), target, ref, (ref.dim,), fit, labels), fit


def _near_training(rows: list[int], seed: int, distance: float):
    """A labelled 6-d reference set, samples jittered off its ``rows``, their labels, a target
    ``distance`` each, and the class means of those labels."""
    ref = _labelled(n=60, dim=6)
    flat = ref.latents.double()
    g = torch.Generator().manual_seed(seed)
    x0 = flat[rows] + 0.05 * torch.randn(len(rows), 6, generator=g, dtype=torch.float64)
    labels = ref.labels[rows]
    mean = torch.stack([flat[ref.labels == c].mean(0) for c in labels.tolist()])
    return ref, flat, x0, labels, torch.full((len(rows),), distance, dtype=torch.float64), mean


def test_toward_mean_zero_is_the_tangent_push_and_one_leans_on_the_class_mean():
    ref, flat, x0, labels, target, mean = _near_training([0, 4, 8], seed=5, distance=1.2)
    # alpha = 0: the earlier floor, push_to_distance along the tangent at the nearest sample
    tangent_only = ss.NoveltySteering(toward_mean=0.0, iterations=1, neighbours=10, directions=2)
    out, fit = _push_once(tangent_only, ref, x0, labels, target)
    idx, rows = fit.nearest(ref, x0, (6,), 1)
    basis = fit.tangent(ref, idx[:, 0], (6,), 10, 2)
    expect = torch.maximum(torch.minimum(push_to_distance(x0, rows[:, 0], basis, target), fit.hi), fit.lo)
    assert torch.equal(out, expect)
    # alpha = 1: the first push goes straight from the nearest sample T towards its class mean
    inward = ss.NoveltySteering(toward_mean=1.0, iterations=1, leaning=1, neighbours=10, directions=2)
    out, fit = _push_once(inward, ref, x0, labels, target)
    unclipped = push_along(x0, rows[:, 0], mean - rows[:, 0], target)
    assert torch.allclose(out, torch.maximum(torch.minimum(unclipped, fit.hi), fit.lo), atol=1e-12)
    moved = unclipped - x0
    cos = torch.nn.functional.cosine_similarity(moved, mean - rows[:, 0], dim=1)
    assert torch.allclose(cos, torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert "toward_mean=1" in repr(inward) and "leaning=1" in repr(inward)


def test_all_pushes_but_the_last_lean_and_the_last_holds_the_floor_along_the_tangent():
    ref, flat, x0, labels, target, mean = _near_training([3, 6, 9], seed=9, distance=1.1)
    steerer = ss.NoveltySteering(toward_mean=0.6, iterations=3, neighbours=10, directions=2)
    assert steerer.leaning == 2 and ss.NoveltySteering().leaning == ss.NoveltySteering().iterations - 1
    out, fit = _push_once(steerer, ref, x0, labels, target)
    expect = x0.clone()
    for i in range(3):   # brute force: the nearest sample and its tangent basis afresh each push
        idx = torch.cdist(expect, flat).argmin(1)
        anchor = flat[idx]
        basis = fit.tangent(ref, idx, (6,), 10, 2)
        along = (basis @ (basis.transpose(1, 2) @ (expect - anchor)[..., None]))[..., 0]
        if i < 2:
            unit = lambda v: v / v.norm(dim=1, keepdim=True)
            pushed = push_along(expect, anchor, 0.4 * unit(along) + 0.6 * unit(mean - anchor), target)
        else:
            pushed = push_to_distance(expect, anchor, basis, target)
        expect = torch.maximum(torch.minimum(pushed, fit.hi), fit.lo)
    assert torch.allclose(out, expect, atol=1e-12)
    # and the lean changed the result: a tangent-only floor lands elsewhere
    plain_floor, _ = _push_once(ss.NoveltySteering(toward_mean=0.0, iterations=3, neighbours=10, directions=2),
                                ref, x0, labels, target)
    assert (out - plain_floor).norm(dim=1).min() > 1e-3


def test_after_the_inward_push_the_floor_holds_against_the_new_nearest_sample():
    ref = _labelled(n=60, dim=6)
    flat = ref.latents.double()
    x0 = flat[[1, 2, 5, 7]].clone()
    labels = ref.labels[[1, 2, 5, 7]]
    target = torch.full((4,), 1.0, dtype=torch.float64)
    out, fit = _push_once(ss.NoveltySteering(neighbours=10, directions=2, iterations=6), ref, x0, labels, target)
    nearest = torch.cdist(out, flat).min(1).values
    inside = ((out >= fit.lo - 1e-12) & (out <= fit.hi + 1e-12)).all(1)
    assert inside.all()
    assert (nearest > 0.5).all()    # pushed well off every training sample (the clip may cost a little)
