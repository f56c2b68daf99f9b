"""Bundled digits and the deterministic train / held-out split."""

import pytest
import torch

from steersample import data


def test_load_digits():
    images, labels = data.load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    assert torch.equal(torch.unique(labels), torch.arange(10))
    from sklearn.datasets import load_digits
    raw = load_digits()
    assert torch.allclose(images[5, 0], torch.as_tensor(raw.images[5], dtype=torch.float32) / 8 - 1)


def test_split_is_deterministic_disjoint_and_complete():
    _, labels = data.load_digits()
    per_class = {c: (5 if c in (0, 1) else 120) for c in range(10)}
    train, held = data.split_indices(labels, per_class, seed=0)
    train2, held2 = data.split_indices(labels, per_class, seed=0)
    assert torch.equal(train, train2) and torch.equal(held, held2)
    assert not torch.equal(train, data.split_indices(labels, per_class, seed=1)[0])
    assert torch.equal(torch.sort(torch.cat([train, held])).values, torch.arange(1797))
    assert torch.equal(train, torch.sort(train).values) and torch.equal(held, torch.sort(held).values)
    counts = torch.bincount(labels[train], minlength=10)
    assert counts.tolist() == [per_class[c] for c in range(10)]
    uniform, _ = data.split_indices(labels, 50, seed=3)
    assert torch.bincount(labels[uniform]).tolist() == [50] * 10
    none, everything = data.split_indices(labels, 0)
    assert none.numel() == 0 and everything.numel() == 1797


def test_split_bad_inputs():
    labels = torch.tensor([0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="only 2 exist"):
        data.split_indices(labels, 3)
    with pytest.raises(ValueError, match=r"no count for class\(es\) \[1\]"):
        data.split_indices(labels, {0: 1})
    with pytest.raises(ValueError, match=r"\[7\] that do not occur"):
        data.split_indices(labels, {0: 1, 1: 1, 7: 1})
    with pytest.raises(ValueError, match="non-negative"):
        data.split_indices(labels, {0: -1, 1: 1})
    with pytest.raises(TypeError, match="per_class"):
        data.split_indices(labels, 1.5)
    with pytest.raises(ValueError, match="1-D integer"):
        data.split_indices(labels.float(), 1)
