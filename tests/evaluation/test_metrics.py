"""Copy tests: the nearest-neighbour ratio and the copy rate (SCIENCE.md §6)."""

import pytest
import torch

import steersample as ss
from steersample.evaluation import metrics


def test_nn_ratio_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(50, 2, 3, generator=g)
    x = torch.randn(7, 2, 3, generator=g)
    ratio = metrics.nn_ratio(x, ss.ReferenceSet(latents))
    d = torch.cdist(x.reshape(7, -1).double(), latents.reshape(50, -1).double())
    d = torch.sort(d, dim=1).values
    assert ratio.shape == (7,) and torch.allclose(ratio, d[:, 0] / d[:, 1], rtol=1e-6)


def test_copy_rate_copies_and_novel_samples():
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(30, 8, generator=g)
    ref = ss.ReferenceSet(latents)
    copies = latents[:10] + 1e-3 * torch.randn(10, 8, generator=g)
    assert metrics.copy_rate(copies, ref) == 1.0
    midpoints = 0.5 * (latents[:10] + latents[10:20])       # equidistant from two samples
    assert metrics.copy_rate(midpoints, ref) == 0.0
    mixed = torch.cat([copies[:3], midpoints[:7]])
    assert metrics.copy_rate(mixed, ref) == pytest.approx(0.3)
    assert metrics.COPY_THRESHOLD == pytest.approx(1 / 3)
    # exact copy of a duplicated reference sample: 0/0 is a copy
    dup = ss.ReferenceSet(torch.cat([latents, latents[:1]]))
    assert float(metrics.nn_ratio(latents[:1], dup)[0]) == 0.0


def test_labels_restrict_the_neighbours():
    latents = torch.tensor([[0.0], [0.1], [10.0], [20.0]])
    ref = ss.ReferenceSet(latents, torch.tensor([0, 1, 1, 0]))
    x = torch.tensor([[0.0]])
    assert float(metrics.nn_ratio(x, ref)) == pytest.approx(0.0)
    assert float(metrics.nn_ratio(x, ref, labels=1)) == pytest.approx(0.01)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.nn_ratio(torch.zeros(1, 2), ss.ReferenceSet(torch.zeros(1, 2)))
    with pytest.raises(TypeError, match="ReferenceSet"):
        metrics.copy_rate(torch.zeros(1, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="shape"):
        metrics.copy_rate(torch.zeros(1, 3), ss.ReferenceSet(torch.zeros(3, 2)))
