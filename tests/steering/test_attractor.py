"""AttractorRepulsion: capped-simplex and capped-hull projections against brute force, the
per-sample trigger, bit-exact pass-through, bad input, and the steerer on a perfect memoriser
(the empirical oracle of a digits subset) through the shared sampling loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from steersample.steering import hull
from steersample.steering.attractor import SLIDE_RATIO, AttractorRepulsion
from steersample.steering.hull import (
    nearest,
    project_capped_simplex,
    project_to_capped_hull,
    project_to_capped_hull_caps,
    span_basis,
)
from steersample.data import load_digits
from steersample.sampling.guidance import GuidanceSchedule
from steersample.evaluation.metrics import nn_ratio
from steersample.oracle.empirical import EmpiricalOracle
from steersample.pipelines._common import per_run_scheduler
from steersample.reference.reference_set import ReferenceSet
from steersample.sampling.loop import sample
from steersample.sampling.protocol import Conditioning, LatentLayout, StepState
from steersample.steering.registry import STEERERS, make_steerer, resolve_steering


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- projections
@pytest.mark.parametrize("k,cap", [(3, 0.5), (4, 0.3), (5, 1.0), (2, 0.5)])
def test_capped_simplex_projection_matches_brute_force(k, cap):
    z = torch.randn(64, k, generator=gen(k), dtype=torch.float64) * 2
    a = project_capped_simplex(z, cap)
    assert torch.allclose(a.sum(1), torch.ones(64, dtype=torch.float64), atol=1e-12)
    assert bool((a >= 0).all()) and bool((a <= cap + 1e-12).all())
    # brute force: the optimal tau by dense bisection on sum(clip(z - tau, 0, cap)) = 1
    lo, hi = (z.min(1, keepdim=True).values - cap), z.max(1, keepdim=True).values
    for _ in range(200):
        mid = (lo + hi) / 2
        s = (z - mid).clamp(0, cap).sum(1, keepdim=True)
        lo, hi = torch.where(s > 1, mid, lo), torch.where(s > 1, hi, mid)
    assert torch.allclose(a, (z - lo).clamp(0, cap), atol=1e-9)


def test_capped_simplex_rejects_infeasible_cap():
    with pytest.raises(ValueError, match="below 1/K"):
        project_capped_simplex(torch.zeros(2, 3), 0.2)


def test_capped_hull_projection_is_the_constrained_minimum():
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    for trial in range(6):
        k, d, cap = 4, 12, [0.5, 0.7, 1.0][trial % 3]
        verts = rng.normal(size=(k, d)) + 3.0
        y = verts.mean(0) + rng.normal(size=d) * 2.0
        a = project_to_capped_hull(torch.tensor(y)[None], torch.tensor(verts)[None], cap)[0].numpy()
        fun = lambda w: float(np.square(w @ verts - y).sum())  # noqa: E731
        ref = minimize(fun, np.full(k, 1 / k), method="SLSQP", bounds=[(0, cap)] * k,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                       options={"ftol": 1e-14, "maxiter": 500})
        assert abs(a.sum() - 1) < 1e-9 and a.min() >= -1e-12 and a.max() <= cap + 1e-9
        assert fun(a) <= ref.fun + 1e-6 * max(1.0, ref.fun)


def test_capped_hull_several_caps_equal_one_cap_at_a_time():
    g = torch.Generator().manual_seed(3)
    verts = torch.randn(5, 4, 16, generator=g, dtype=torch.float64)
    y = verts[:, 0] * 0.8 + 0.3 * torch.randn(5, 16, generator=g, dtype=torch.float64)
    caps = [0.69, 0.5, 0.25]
    many = project_to_capped_hull_caps(y, verts, caps)
    assert many.shape == (3, 5, 4)
    for i, cap in enumerate(caps):
        torch.testing.assert_close(many[i], project_to_capped_hull(y, verts, cap), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="1/K"):
        project_to_capped_hull_caps(y, verts, [0.2])


def test_hull_projection_keeps_points_inside_the_hull():
    verts = torch.eye(3, dtype=torch.float64)[None]              # the triangle e1, e2, e3
    inside = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    a = project_to_capped_hull(inside, verts, 1.0)
    assert torch.allclose(a, inside, atol=1e-6)
    # capped at 0.4: the vertex e1 itself is pushed to the cap
    a = project_to_capped_hull(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), verts, 0.4)
    assert math.isclose(float(a[0, 0]), 0.4, abs_tol=1e-6)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("labelled", [True, False])
def test_nearest_matches_faiss_search(dense, labelled, monkeypatch):
    monkeypatch.setattr(hull, "DENSE_SEARCH_ELEMENTS", 1 << 30 if dense else 0)
    ref = ReferenceSet(torch.randn(40, 2, 3, generator=gen(1)), torch.arange(40) % 3)
    q = torch.randn(7, 2, 3, generator=gen(2), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0]) if labelled else None
    dist, idx = nearest(ref, q, 3, labels)
    want_dist, want_idx = ref.nearest(q, k=3, labels=labels)
    assert torch.equal(idx, want_idx.cpu())
    assert torch.allclose(dist, want_dist.double(), atol=1e-9)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("strength", [-0.1, float("nan"), float("inf")])
def test_bad_strength(strength):
    with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
        AttractorRepulsion(strength=strength)


def test_bad_arguments():
    with pytest.raises(TypeError, match="strength must be a real number"):
        AttractorRepulsion(strength="high")
    with pytest.raises(ValueError, match=r"trigger must be a number in \(0, 1\]"):
        AttractorRepulsion(trigger=0.0)
    with pytest.raises(ValueError, match=r"trigger must be a number in \(0, 1\]"):
        AttractorRepulsion(trigger=float("nan"))
    with pytest.raises(ValueError, match="neighbours must be an int >= 2"):
        AttractorRepulsion(neighbours=1)


def test_needs_a_reference():
    with pytest.raises(ValueError, match="needs a reference set"):
        resolve_steering([AttractorRepulsion()], reference=None)
    with pytest.raises(ValueError, match="needs a reference set"):
        AttractorRepulsion()(_state(torch.zeros(2, 4), torch.zeros(2, 4), 0.3, None))


def test_registered():
    assert STEERERS["attractor"] is AttractorRepulsion
    steerer = make_steerer("attractor", strength=0.5, trigger=0.4)
    assert (steerer.strength, steerer.trigger) == (0.5, 0.4)
    assert "strength=0.5" in repr(steerer)


# ----------------------------------------------------------------------------- single steps
def _state(x, v, sigma, reference, labels=None):
    return StepState(step=0, num_steps=10, sigma=sigma, sigma_next=max(sigma - 0.1, 0.0),
                     timestep=torch.tensor(1000 * sigma), latents=x, pred=v, pred_cond=v,
                     pred_uncond=None, guidance_scale=1.0,
                     conditioning=Conditioning(cond={}, labels=labels),
                     layout=LatentLayout(tuple(x.shape[1:])), reference=reference)


def test_acts_only_on_samples_falling_into_an_attractor():
    ref = ReferenceSet(torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]]))
    sigma = 0.1
    # sample 0: x̂₀ on the sample (0, 0) and x_σ next to it -> steered
    # sample 1: x̂₀ between (0, 0) and (4, 0) (ratio 1) -> untouched
    x0 = torch.tensor([[0.05, 0.0], [2.0, 0.0]])
    x = (1 - sigma) * x0
    v = (x - x0) / sigma
    out = AttractorRepulsion(strength=1.0)(_state(x, v, sigma, ref))
    assert out.telemetry["active"].tolist() == [1.0, 0.0]
    assert torch.equal(out.prediction[1], v[1])                       # bit for bit
    new_x0 = x - sigma * out.prediction
    assert float(nn_ratio(new_x0[:1], ref)[0]) > 1 / 3                 # no longer a copy
    # strength 0 is the identity, bit for bit
    assert torch.equal(AttractorRepulsion(strength=0.0)(_state(x, v, sigma, ref)).prediction, v)
    # navigation stage (sigma near 1): the posterior is flat, nothing happens
    flat = AttractorRepulsion()(_state(0.05 * x, v, 0.95, ref))
    assert flat.telemetry["active"].tolist() == [0.0, 0.0]


def test_the_slide_stops_just_clear_of_the_copy_threshold():
    ref = ReferenceSet(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    sigma = 0.05
    x0 = torch.tensor([[0.0, 0.0]])
    x = (1 - sigma) * x0
    for strength in (0.5, 1.0, 3.0):  # without an unconditional pass: the slide to SLIDE_RATIO
        out = AttractorRepulsion(strength=strength, neighbours=2)(_state(x, (x - x0) / sigma, sigma, ref))
        new_x0 = x - sigma * out.prediction
        assert math.isclose(float(nn_ratio(new_x0, ref)[0]), SLIDE_RATIO, rel_tol=1e-4)
        assert out.telemetry["slid"].tolist() == [1.0]


def test_flagged_samples_use_the_unconditional_model():
    ref = ReferenceSet(torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]]))
    sigma = 0.1
    x0 = torch.tensor([[0.05, 0.0], [2.0, 0.0]])             # falling into (0, 0); in between
    x = (1 - sigma) * x0
    v_c = (x - x0) / sigma
    x0_u = torch.tensor([[2.0, 2.0], [2.0, 0.5]])            # the unconditional model: elsewhere
    v_u = (x - x0_u) / sigma
    state = StepState(step=5, num_steps=10, sigma=sigma, sigma_next=0.05, timestep=torch.tensor(100.0),
                      latents=x, pred=v_u + 2.0 * (v_c - v_u), pred_cond=v_c, pred_uncond=v_u,
                      guidance_scale=2.0, conditioning=Conditioning(cond={}),
                      layout=LatentLayout((2,)), reference=ref)
    for strength, scale in ((1.0, 0.0), (0.5, 0.5)):
        out = AttractorRepulsion(strength=strength)(state)
        assert out.telemetry["active"].tolist() == [1.0, 0.0]
        assert torch.allclose(out.prediction[0], v_u[0] + scale * (v_c[0] - v_u[0]))
        assert torch.equal(out.prediction[1], state.pred[1])
        assert out.telemetry["slid"].tolist() == [0.0, 0.0]
    # strength 2: opposite guidance lands next to (4, 4), so the ridge slide follows
    out = AttractorRepulsion(strength=2.0)(state)
    assert out.telemetry["slid"].tolist() == [1.0, 0.0]
    assert float(nn_ratio(x[:1] - sigma * out.prediction[:1], ref)[0]) > 1 / 3


def test_flags_last_for_the_run_and_no_longer():
    ref = ReferenceSet(torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]]))
    steerer = AttractorRepulsion()
    sigma = 0.1
    falling, free = torch.tensor([[0.05, 0.0]]), torch.tensor([[2.0, 2.0]])
    def state(x0):
        x = (1 - sigma) * x0
        return _state(x, (x - x0) / sigma, sigma, ref)
    with steerer.bind(None) as run:
        assert run(state(falling)).telemetry["active"].tolist() == [0.0]     # one step: a dip?
        assert run(state(free)).telemetry["active"].tolist() == [0.0]
        assert run(state(falling)).telemetry["active"].tolist() == [0.0]
        assert run(state(falling)).telemetry["active"].tolist() == [1.0]     # two in a row
        assert run(state(free)).telemetry["active"].tolist() == [1.0]        # still flagged
    with steerer.bind(None) as run:                                           # a new run
        assert run(state(free)).telemetry["active"].tolist() == [0.0]
    assert steerer(state(falling)).telemetry["active"].tolist() == [1.0]     # no run: per step
    assert steerer(state(free)).telemetry["active"].tolist() == [0.0]


# ----------------------------------------------------------------------------- on a memoriser
@pytest.fixture(scope="module")
def digits_oracle():
    images, labels = load_digits()
    keep = torch.cat([(labels == c).nonzero().flatten()[:6] for c in (0, 4, 7)])
    return ReferenceSet(images[keep], labels[keep])


def _run(ref, steering, n=8, steps=12, seed=0):
    oracle = EmpiricalOracle(ref)

    def model_fn(x, t, cond, branch):
        return oracle.velocity(x, float(t) / 1000.0, labels=cond["class_labels"])

    labels = torch.tensor([0, 4, 7]).repeat_interleave(n)
    noise = torch.randn(len(labels), 1, 8, 8, generator=gen(seed))
    scheduler, _ = per_run_scheduler(FlowMatchEulerDiscreteScheduler(), steps, "cpu")
    res = sample(model_fn, noise, scheduler, Conditioning(cond={"class_labels": labels}, labels=labels),
                 GuidanceSchedule(), steering=steering, reference=ref, return_telemetry=True)
    return res.latents, labels, res.telemetry


def test_turns_every_copy_of_a_memoriser_into_a_novel_sample(digits_oracle):
    ref = digits_oracle
    plain, labels, _ = _run(ref, [])
    steered, _, tel = _run(ref, [AttractorRepulsion()])
    assert float((nn_ratio(plain, ref) < 1 / 3).double().mean()) == 1.0      # the oracle copies
    ratio = nn_ratio(steered, ref)
    assert float((ratio < 1 / 3).double().mean()) == 0.0
    # on the hull of real samples: pixel values stay inside the reference range (no speckle)
    lo, hi = ref.latents.min(), ref.latents.max()
    assert float(steered.min()) >= float(lo) - 1e-4 and float(steered.max()) <= float(hi) + 1e-4
    # diverse: samples of one attractor do not collapse onto one blend
    pairwise, plain_pairwise = torch.pdist(steered.flatten(1)), torch.pdist(plain.flatten(1))
    assert float((pairwise < 1e-3).double().mean()) < 0.25 * float((plain_pairwise < 1e-3).double().mean())
    assert float(pairwise.mean()) > 0.5 * float(plain_pairwise.mean())
    # it acted in refinement only: never at the first (pure-noise) step
    active = torch.stack([s.scores["attractor.active"] for s in tel.steps])
    assert float(active[0].sum()) == 0.0 and float(active[-1].mean()) == 1.0


def test_span_basis_is_orthonormal_and_drops_duplicates():
    verts = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 2, 0]]], dtype=torch.float64)
    basis = span_basis(verts)[0]
    gram = basis.T @ basis
    kept = gram.diagonal() > 0.5
    assert int(kept.sum()) == 2                                        # a plane, not 3 directions
    assert torch.allclose(gram[kept][:, kept], torch.eye(2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(basis[2], torch.zeros(4, dtype=torch.float64), atol=1e-9)   # no z


# ----------------------------------------------------------------------------- scarce conditions
def _scarce_state(sigma, labels, labelled_reference=True):
    """Class 0 holds 3 reference samples, class 1 holds 40; a guided step with cond != uncond."""
    latents = torch.randn(43, 4, generator=gen(7))
    ref = ReferenceSet(latents, torch.tensor([0] * 3 + [1] * 40) if labelled_reference else None)
    b = len(labels)
    x = torch.randn(b, 4, generator=gen(8))
    v_c, v_u = torch.randn(b, 4, generator=gen(9)), torch.randn(b, 4, generator=gen(10))
    v = v_u + 4.0 * (v_c - v_u)
    state = StepState(step=1, num_steps=10, sigma=sigma, sigma_next=sigma - 0.1,
                      timestep=torch.tensor(1000 * sigma), latents=x, pred=v, pred_cond=v_c,
                      pred_uncond=v_u, guidance_scale=4.0,
                      conditioning=Conditioning(cond={}, labels=torch.tensor(labels)),
                      layout=LatentLayout((4,)), reference=ref)
    return state, v, v_c


def test_scarce_class_skips_cfg_in_navigation_only():
    state, v, v_c = _scarce_state(0.8, [0, 1, 0, 1])
    out = AttractorRepulsion(scarce=32, navigation_sigma=0.5)(state)
    scarce = torch.tensor([True, False, True, False])
    assert torch.equal(out.prediction[scarce], v_c[scarce])          # guidance scale 1
    assert torch.equal(out.prediction[~scarce], v[~scarce])          # untouched, bit for bit
    assert out.telemetry["scarce"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # at or below navigation_sigma: no delay
    state, v, _ = _scarce_state(0.5, [0, 1])
    out = AttractorRepulsion(scarce=32, navigation_sigma=0.5)(state)
    assert out.telemetry["scarce"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("kwargs,labelled", [({"scarce": 0}, True), ({"scarce": 3}, True),
                                             ({"strength": 0.0}, True), ({}, False)])
def test_scarce_delay_off(kwargs, labelled):
    """scarce=0, a class at the threshold (3 samples, scarce=3), strength 0, or an unlabelled
    reference: the prediction passes through bit for bit."""
    state, v, _ = _scarce_state(0.9, [0, 1], labelled_reference=labelled)
    out = AttractorRepulsion(**kwargs)(state)
    assert out.telemetry["scarce"].tolist() == [0.0, 0.0]
    if "strength" in kwargs:
        assert torch.equal(out.prediction, v)


def test_scarce_samples_handles_unknown_labels():
    state, _, _ = _scarce_state(0.9, [0, 1])
    steerer = AttractorRepulsion(scarce=5)
    got = steerer.scarce_samples(state.reference, torch.tensor([0, 1, 7]), 3)
    assert got.tolist() == [True, False, True]      # a label with no reference samples is scarce
    assert steerer.scarce_samples(state.reference, None, 2).tolist() == [False, False]


@pytest.mark.parametrize("kwargs,message", [
    ({"scarce": -1}, "scarce must be an int >= 0"),
    ({"scarce": 2.5}, "scarce must be an int >= 0"),
    ({"scarce": True}, "scarce must be an int >= 0"),
    ({"navigation_sigma": 0.0}, r"navigation_sigma must be a noise level in \(0, 1\)"),
    ({"navigation_sigma": 1.0}, r"navigation_sigma must be a noise level in \(0, 1\)"),
    ({"navigation_sigma": float("nan")}, r"navigation_sigma must be a noise level in \(0, 1\)"),
])
def test_bad_scarce_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttractorRepulsion(**kwargs)
