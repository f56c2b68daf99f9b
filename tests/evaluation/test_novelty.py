"""Data-copying test, distance ratio and precision/recall (steersample.evaluation.novelty)."""

from __future__ import annotations

import math

import pytest
import torch

import steersample as ss
from steersample.evaluation.novelty import z_u


def _gauss(n, seed, dim=6, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, dim, generator=g) + shift


def _ref(n=200, seed=0):
    return ss.ReferenceSet(_gauss(n, seed))


def test_z_u_matches_brute_force_pair_count():
    a, b = torch.rand(37, dtype=torch.float64), torch.rand(23, dtype=torch.float64)
    b[:3] = a[:3]  # ties count 1/2
    u = sum(float(x > y) + 0.5 * float(x == y) for x in a for y in b)
    m, n = len(a), len(b)
    assert z_u(a, b) == pytest.approx((u - m * n / 2) / math.sqrt(m * n * (m + n + 1) / 12), abs=1e-12)
    assert math.isnan(z_u(a[:0], b))


def test_heldout_like_samples_score_near_zero_over_seeds():
    ref = _ref()
    scores = [ss.metrics.data_copying(_gauss(150, 100 + s), ref, _gauss(150, 200 + s), labels=0,
                                      heldout_labels=torch.zeros(150)).z_u[0] for s in range(12)]
    assert abs(sum(scores) / len(scores)) < 1.0
    assert max(abs(s) for s in scores) < 3.5


def test_training_copies_score_far_below_zero_and_noise_above():
    ref = _ref()
    heldout = _gauss(150, 7)
    copies = ref.latents[:100] + 1e-3 * _gauss(100, 8)
    result = ss.metrics.data_copying(copies, ref, heldout, num_cells=2)
    assert result.c_t < -8 and result.distance_ratio < 0.01
    far = _gauss(100, 9) * 4.0
    assert ss.metrics.data_copying(far, ref, heldout, num_cells=2).c_t > 5


def test_cells_distance_ratio_and_c_t_against_brute_force():
    ref = ss.ReferenceSet(_gauss(120, 1), labels=torch.arange(120) % 3)
    x, h = _gauss(60, 2), _gauss(90, 3)
    lx, lh = torch.arange(60) % 3, torch.arange(90) % 3
    lx[:30] = 0  # cell 0 holds more samples
    res = ss.metrics.data_copying(x, ref, ss.ReferenceSet(h, labels=lh), labels=lx)
    flat = ref.latents.reshape(120, -1).double()
    d_x = torch.cdist(x.reshape(60, -1).double(), flat).min(1).values
    d_h = torch.cdist(h.reshape(90, -1).double(), flat).min(1).values
    assert torch.allclose(res.sample_distances, d_x, atol=1e-5)
    assert res.distance_ratio == pytest.approx(float(d_x.median() / d_h.median()), rel=1e-5)
    for c in range(3):
        assert res.z_u[c] == pytest.approx(z_u(d_x[lx == c], d_h[lh == c]), abs=1e-4)
        assert res.cell_distance_ratio[c] == pytest.approx(
            float(d_x[lx == c].median() / d_h[lh == c].median()), rel=1e-5)
    weights = [float((lh == c).sum()) for c in range(3)]
    expect = sum(weights[c] * res.z_u[c] for c in range(3)) / sum(weights)
    assert res.c_t == pytest.approx(float(expect), abs=1e-9)
    assert res.cells_from == "labels"


def test_kmeans_cells_without_labels():
    ref = _ref()
    res = ss.metrics.data_copying(_gauss(80, 4), ref, _gauss(80, 5), num_cells=4)
    assert res.cells_from == "kmeans"
    assert set(res.z_u) <= set(range(4)) and sum(res.sample_counts.values()) == 80


def test_relative_distance_is_over_the_heldout_median():
    ref = _ref()
    x, h = _gauss(10, 11), _gauss(50, 12)
    rel = ss.metrics.relative_distance(x, ref, h)
    d = ss.metrics.nearest_training_distance
    assert torch.allclose(rel, d(x, ref) / d(h, ref).median())


def test_precision_recall_brute_force_and_known_cases():
    h, x = _gauss(40, 20), _gauss(30, 21)
    res = ss.metrics.precision_recall(x, h, k=3)
    hh = h.reshape(40, -1).double()
    xx = x.reshape(30, -1).double()
    d_hh = torch.cdist(hh, hh) + torch.diag(torch.full((40,), math.inf, dtype=torch.float64))
    radius = d_hh.sort(dim=1).values[:, 2]
    precise = [(torch.cdist(xx[i:i + 1], hh)[0] <= radius).any().item() for i in range(30)]
    assert res.precise.tolist() == precise
    assert ss.metrics.precision_recall(h, h).precision == 1.0
    noise = _gauss(50, 22) * 0 + 25.0
    assert ss.metrics.precision_recall(noise, h).precision == 0.0


@pytest.mark.parametrize("call, match", [
    (lambda r: ss.metrics.data_copying(torch.zeros(4, 1, 5), r, _gauss(9, 1)), "reference set's layout"),
    (lambda r: ss.metrics.data_copying(torch.full((4, 1, 6), math.nan), r, _gauss(9, 1)), "NaN"),
    (lambda r: ss.metrics.data_copying(_gauss(4, 1), r, _gauss(9, 1), labels=2), "heldout_labels"),
    (lambda r: ss.metrics.data_copying(_gauss(4, 1), r, _gauss(9, 1), labels=[1, 2], heldout_labels=torch.zeros(9)), "one label per row"),
    (lambda r: ss.metrics.precision_recall(_gauss(4, 1), _gauss(3, 1)), "more than k=3"),
    (lambda r: ss.metrics.precision_recall(_gauss(4, 1), _gauss(9, 1), k=0), "positive int"),
    (lambda r: ss.metrics.data_copying(_gauss(4, 1), "train", _gauss(9, 1)), "ReferenceSet"),
])
def test_bad_input_is_refused_with_the_fix(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(_ref())


def test_novelty_by_class_groups_and_json_ready_values():
    from steersample.evaluation.novelty import novelty_by_class

    ref = ss.ReferenceSet(_gauss(90, 1), labels=torch.arange(90) % 3)
    x, lx = _gauss(12, 2), torch.tensor([0] * 6 + [1] * 3 + [2] * 3)
    h, lh = _gauss(60, 3), torch.arange(60) % 3
    out = novelty_by_class(x, lx, ref, h, lh, {"a": [0, 1], "b": [2]})
    for c in range(3):
        res = ss.metrics.data_copying(x[lx == c], ref, h[lh == c])
        assert out["per_class"][c]["precision"] == ss.metrics.precision_recall(x[lx == c], h[lh == c]).precision
        assert out["per_class"][c]["distance_ratio"] == pytest.approx(res.distance_ratio)
    assert out["per_class"][1]["recall"] is None          # 3 samples: no k=3 ball of their own
    group = out["groups"]["a"]
    assert group["z_u_min"] == min(out["per_class"][c]["z_u"] for c in (0, 1))
    assert group["precision"] == pytest.approx((out["per_class"][0]["precision"] + out["per_class"][1]["precision"]) / 2)
    assert group["recall"] == out["per_class"][0]["recall"]
