"""The independent judge: classifier, copy test, Frechet distance, diversity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steersample.evaluation import judge as J
from steersample.data import load_digits, split_indices
from steersample.evaluation.metrics import nn_ratio
from steersample.reference.reference_set import ReferenceSet


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits()
    train, held = split_indices(labels, 60, seed=3)
    return images, labels, train, held


def test_classifier_reads_held_out_real_digits(digits):
    images, labels, _, held = digits
    assert J.class_accuracy(images[held], labels[held]) >= 0.95


def test_classifier_cross_validated_accuracy_is_honest():
    """The judge's recipe, refitted on 4/5 of the digits, reads the remaining fifth correctly."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    images, labels = load_digits()
    x, y = images.reshape(len(images), -1).double().numpy(), labels.numpy()
    scores = cross_val_score(clone(J.judge_classifier()), x, y,
                             cv=StratifiedKFold(5, shuffle=True, random_state=0))
    assert scores.mean() >= 0.95


def test_classify_shapes_and_layouts(digits):
    images, labels, _, _ = digits
    a = J.classify(images[:7])
    b = J.classify(images[:7].reshape(7, 64).numpy())
    assert a.dtype == torch.int64 and a.shape == (7,)
    assert torch.equal(a, b)


def test_copy_test_flags_training_images_and_not_held_out(digits):
    images, labels, train, held = digits
    ref = ReferenceSet(images[train], labels[train])
    ratio = nn_ratio(images[train], ref)
    assert torch.all(ratio == 0)  # a training image is its own nearest neighbour
    assert J.copy_flags(images[train], ref).all()
    assert not J.copy_flags(images[held], ref).any()


def test_copy_test_catches_a_slightly_perturbed_copy(digits):
    images, labels, train, _ = digits
    ref = ReferenceSet(images[train], labels[train])
    noisy = images[train[:20]] + 0.05 * torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert J.copy_flags(noisy, ref).all()


def test_copy_flags_match_brute_force_ratio_test(digits):
    images, labels, train, held = digits
    ref = ReferenceSet(images[train], labels[train])
    g = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.0, 1.5, 60).view(-1, 1, 1, 1)  # from exact copies to far away
    q = images[train[:60]] + scale * torch.randn(60, 1, 8, 8, generator=g)
    d = torch.cdist(q.reshape(60, -1).double(), images[train].reshape(len(train), -1).double())
    two = d.topk(2, largest=False).values
    want = two[:, 0] / two[:, 1] < 1 / 3
    assert 0 < int(want.sum()) < 60
    assert torch.equal(J.copy_flags(q, ref), want)


def test_frechet_distance_matches_scipy_formula(digits):
    from scipy import linalg

    images, _, train, held = digits
    a, b = images[train[:200]], images[held[:300]]
    fa, fb = J.digit_features(a), J.digit_features(b)
    assert fa.shape == (200, J.FEATURE_DIM)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    want = ((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert J.frechet_distance(a, b) == pytest.approx(want, rel=1e-6, abs=1e-8)
    assert J.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_ranks_real_digits_above_noise(digits):
    images, _, train, held = digits
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert J.frechet_distance(images[train], images[held]) < 0.1 * J.frechet_distance(noise, images[held])


def test_diversity_matches_brute_force(digits):
    images = digits[0][:30]
    d = torch.cdist(images.reshape(30, -1).double(), images.reshape(30, -1).double())
    want = d[torch.triu(torch.ones(30, 30, dtype=torch.bool), diagonal=1)].mean().item()
    assert J.diversity(images) == pytest.approx(want, rel=1e-9)
    assert J.diversity(images[:1].repeat(5, 1, 1, 1)) == pytest.approx(0.0, abs=1e-9)


def test_judge_report_per_class(digits):
    images, labels, train, held = digits
    ref = ReferenceSet(images[train], labels[train])
    # half copies of training images of class 3, half held-out class-3 digits
    x = torch.cat([images[train][labels[train] == 3][:10], images[held][labels[held] == 3][:10]])
    y = torch.full((20,), 3)
    rep = J.judge(x, y, ref, images[held], labels[held])
    (row,) = rep.per_class
    assert row.label == 3 and row.count == 20
    assert row.copy_rate == pytest.approx(0.5) and rep.copy_rate == pytest.approx(0.5)
    assert row.accuracy == 1.0 and row.fd is not None and row.diversity > 0
    assert rep.copy.tolist() == [True] * 10 + [False] * 10
    assert rep.for_classes([3])["copy_rate"] == pytest.approx(0.5)


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="8x8 digits"):
        J.classify(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        J.diversity(torch.full((3, 1, 8, 8), float("nan")))
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        J.classify([[0.0] * 64])
    with pytest.raises(ValueError, match="at least 2"):
        J.frechet_distance(torch.zeros(1, 1, 8, 8), torch.zeros(5, 1, 8, 8))
    with pytest.raises(ValueError, match="one label per sample"):
        J.class_accuracy(torch.zeros(3, 1, 8, 8), torch.zeros(2))


# ----------------------------------------------------------------------------- per testbed
def test_digits_judge_numbers_are_pinned(digits):
    """The digits path gives the numbers it gave before judges became per testbed."""
    images, labels, _, _ = digits
    noisy = (images[:200] + 0.6 * torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
             ).clamp(-1, 1)
    assert J.class_accuracy(noisy, labels[:200]) == pytest.approx(0.96, abs=1e-12)
    assert J.frechet_distance(images[labels == 3], images[labels == 8]) == pytest.approx(
        12.010110156290448, rel=1e-9)
    assert J.frechet_distance(noisy, images[200:400]) == pytest.approx(1.699767512520225, rel=1e-9)
    d = J.judge_for(None)
    assert d is J.digits_judge() is J.judge_for("digits")
    assert d.classifier is J.judge_classifier()
    assert d.frechet_distance(images[labels == 3], images[labels == 8]) == J.frechet_distance(
        images[labels == 3], images[labels == 8])


def test_letters_judge_reads_its_renders_and_the_held_out_fonts():
    from steersample.default import held_out, load_default_info
    from steersample.letters import LETTERS

    info = load_default_info("letters")
    assert info.testbed == "letters" and info.class_names == LETTERS
    assert load_default_info().testbed == "digits"
    L = J.judge_for(info)
    assert L is J.letters_judge() and L.name == "letters" and L.side == (16, 16)
    assert L.images.shape == (len(LETTERS) * 22 * 8, 256)
    x, y = torch.as_tensor(L.images).float(), torch.as_tensor(L.labels)
    assert L.class_accuracy(x, y) >= 0.99
    hx, hy = held_out("letters")
    assert L.class_accuracy(hx, hy) >= 0.99
    assert L.features(hx[:5]).shape == (5, J.FEATURE_DIM)
    same = L.frechet_distance(hx[hy == 1][0::2], hx[hy == 1][1::2])
    assert same < L.frechet_distance(hx[hy == 1], hx[hy == 2])
    with pytest.raises(ValueError, match="16x16 letters"):
        L.classify(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="8x8 digits"):
        J.classify(hx[:2])
    with pytest.raises(ValueError, match="no judge for testbed"):
        J.judge_for("faces")
