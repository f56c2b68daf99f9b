"""The embedded default model: offline loading, outputs, its split and metadata, bad folders."""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
import torch

import steersample as ss
from steersample.data import load_digits
from steersample.default import DEFAULT_MODEL_DIR, held_out_digits, load_default, load_default_info


@pytest.fixture(scope="module")
def default():
    return load_default()


def test_load_default_works_with_the_network_off(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted during load_default()")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe, ref = ss.load_default()
    out = pipe(class_labels=[1], num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 1, 8, 8)
    assert isinstance(ref, ss.ReferenceSet)


def test_output_shapes_and_value_ranges(default):
    pipe, _ = default
    kw = dict(class_labels=[0, 3, 9], num_inference_steps=6)
    lat = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert lat.shape == (3, 1, 8, 8) and lat.dtype == torch.float32
    assert torch.isfinite(lat).all() and lat.abs().max() < 1.5  # pixels live in [-1, 1]
    pt = pipe(**kw, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert pt.shape == (3, 1, 8, 8) and pt.min() >= 0 and pt.max() <= 1
    torch.testing.assert_close(pt, ((lat + 1) / 2).clamp(0, 1))
    arr = pipe(**kw, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert isinstance(arr, np.ndarray) and arr.shape == (3, 8, 8, 1)
    assert arr.min() >= 0 and arr.max() <= 1


def test_same_seed_same_sample(default):
    pipe, _ = default
    a = pipe(class_labels=[4], num_inference_steps=5, output_type="latent",
             generator=torch.Generator().manual_seed(7)).images
    b = pipe(class_labels=[4], num_inference_steps=5, output_type="latent",
             generator=torch.Generator().manual_seed(7)).images
    assert torch.equal(a, b)


def test_reference_is_the_training_split(default):
    _, ref = default
    info = load_default_info()
    images, labels = load_digits()
    idx = torch.tensor(info.train_indices)
    assert torch.equal(ref.latents, images[idx]) and torch.equal(ref.labels, labels[idx])
    held_x, held_y = held_out_digits(info)
    assert len(ref) + len(held_y) == 1797
    assert not set(info.train_indices) & set(info.held_out_indices)
    counts = torch.bincount(ref.labels, minlength=10)
    assert all(counts[c] <= 10 for c in info.rare_classes) and info.rare_classes
    assert all(counts[c] >= 100 for c in info.frequent_classes)
    assert sorted(info.rare_classes + info.frequent_classes) == list(range(10))


def test_metadata_and_size():
    info = load_default_info()
    assert len(info.git_commit) == 40 and int(info.git_commit, 16) >= 0
    assert info.null_class == 10 and "seed" in info.training_config
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    assert not list(DEFAULT_MODEL_DIR.rglob("*.bin")) and not list(DEFAULT_MODEL_DIR.rglob("*.pt"))


def test_missing_folder_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_default(tmp_path / "nope")


def test_incomplete_folder_is_explained(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match="incomplete: missing .*transformer/config.json"):
        load_default(tmp_path / "m")


def test_corrupt_weights_are_explained(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a tensor")
    with pytest.raises(ValueError, match="could not be loaded.*train_default.py"):
        load_default(folder)


def test_corrupt_metadata_is_explained(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    (folder / "metadata.json").write_text(json.dumps({"rare_classes": [0]}))
    with pytest.raises(ValueError, match="unreadable metadata.json"):
        load_default_info(folder)
