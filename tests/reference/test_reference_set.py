"""ReferenceSet: construction, safetensors round trip and validation, FAISS nearest neighbours."""

import pytest
import torch

import steersample as ss


def brute_nearest(latents, x, k, ref_labels=None, labels=None):
    d = torch.cdist(x.reshape(x.shape[0], -1).double(), latents.reshape(latents.shape[0], -1).double(),
                    compute_mode="donot_use_mm_for_euclid_dist")
    if labels is not None:
        labels = torch.as_tensor(labels).expand(x.shape[0])
        d = d.masked_fill(ref_labels[None, :] != labels[:, None], float("inf"))
    dist, idx = torch.sort(d, dim=1)
    return dist[:, :k], idx[:, :k]


@pytest.fixture
def labelled():
    g = torch.Generator().manual_seed(0)
    return torch.randn(200, 3, 4, 4, generator=g), torch.arange(200) % 5


def test_basics(labelled):
    latents, labels = labelled
    ref = ss.ReferenceSet(latents, labels)
    assert ref.latents is latents or torch.equal(ref.latents, latents)
    assert torch.equal(ref.labels, labels) and len(ref) == 200
    assert ref.sample_shape == (3, 4, 4) and ref.dim == 48
    assert torch.equal(ref.classes, torch.arange(5))
    assert torch.equal(ref.indices(2), torch.arange(2, 200, 5))
    assert ss.ReferenceSet(latents).labels is None
    assert torch.allclose(ref.squared_norms(), latents.reshape(200, -1).double().square().sum(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_labels", [True, False])
def test_save_load_round_trip_is_bit_exact(tmp_path, labelled, dtype, with_labels):
    latents, labels = labelled
    latents = latents.to(dtype)
    ref = ss.ReferenceSet(latents, labels if with_labels else None)
    path = tmp_path / "ref.safetensors"
    ref.save(path, metadata={"source": "test"})
    back = ss.ReferenceSet.load(path)
    assert back.latents.dtype == dtype and torch.equal(back.latents.view(torch.uint8), latents.view(torch.uint8))
    if with_labels:
        assert back.labels.dtype == labels.dtype and torch.equal(back.labels, labels)
    else:
        assert back.labels is None
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["source"] == "test" and f.metadata()["format"] == "steersample.ReferenceSet"


def test_load_rejects_truncated_corrupt_and_wrong_files(tmp_path, labelled):
    latents, labels = labelled
    path = tmp_path / "ref.safetensors"
    ss.ReferenceSet(latents, labels).save(path)
    raw = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors.*truncated or corrupt.*save"):
        ss.ReferenceSet.load(truncated)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        ss.ReferenceSet.load(garbage)

    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(raw)
    data[-5] ^= 0xFF                          # a byte inside the tensor data, header intact
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        ss.ReferenceSet.load(flipped)

    from safetensors.torch import save_file
    wrong = tmp_path / "wrong.safetensors"
    save_file({"images": latents}, str(wrong))
    with pytest.raises(ValueError, match=r"keys \['images'\].*'latents'"):
        ss.ReferenceSet.load(wrong)
    int_latents = tmp_path / "int.safetensors"
    save_file({"latents": torch.zeros(3, 2, dtype=torch.int32)}, str(int_latents))
    with pytest.raises(ValueError, match="dtype"):
        ss.ReferenceSet.load(int_latents)
    bad_labels = tmp_path / "badlabels.safetensors"
    save_file({"latents": torch.zeros(3, 2), "labels": torch.zeros(4, dtype=torch.int64)}, str(bad_labels))
    with pytest.raises(ValueError, match="labels has shape"):
        ss.ReferenceSet.load(bad_labels)
    with pytest.raises(FileNotFoundError):
        ss.ReferenceSet.load(tmp_path / "missing.safetensors")


def test_construction_errors():
    with pytest.raises(ValueError, match="empty"):
        ss.ReferenceSet(torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"\(N, \*sample_shape\)"):
        ss.ReferenceSet(torch.zeros(4))
    bad = torch.zeros(5, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        ss.ReferenceSet(bad)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ss.ReferenceSet([[0.0, 1.0]])
    with pytest.raises(TypeError, match="floating-point"):
        ss.ReferenceSet(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="one integer label per sample"):
        ss.ReferenceSet(torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer dtype"):
        ss.ReferenceSet(torch.zeros(3, 2), torch.zeros(3))


@pytest.mark.parametrize("k", [1, 2, 7])
def test_nearest_equals_brute_force(labelled, k):
    latents, labels = labelled
    ref = ss.ReferenceSet(latents, labels)
    x = torch.randn(9, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x[0] = latents[17]                            # an exact copy: distance exactly 0
    dist, idx = ref.nearest(x, k=k)
    bd, bi = brute_nearest(latents, x, k)
    assert torch.equal(idx, bi) and dist.dtype == torch.float32
    assert torch.allclose(dist.double(), bd, rtol=1e-6, atol=0) and float(dist[0, 0]) == 0.0
    d64, _ = ref.nearest(x.double(), k=k)
    assert d64.dtype == torch.float64 and torch.allclose(d64, bd, rtol=1e-12, atol=1e-12)
    qlab = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    dist, idx = ref.nearest(x, k=k, labels=qlab)
    bd, bi = brute_nearest(latents, x, k, labels, qlab)
    assert torch.equal(idx, bi) and torch.equal(labels[idx], qlab[:, None].expand(-1, k))
    dist, idx = ref.nearest(x, k=k, labels=3)
    assert torch.equal(idx, brute_nearest(latents, x, k, labels, 3)[1])


def test_nearest_approximate_index(labelled):
    latents, labels = labelled
    ref = ss.ReferenceSet(latents, labels)
    x = latents[:20] + 0.01 * torch.randn(20, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    ref.build_ivf(nlist=5, nprobe=5)              # probing every list: exact
    dist, idx = ref.nearest(x, k=3, approximate=True)
    assert torch.equal(idx, brute_nearest(latents, x, 3)[1])
    dist, idx = ref.nearest(x, k=2, labels=1, approximate=True, nprobe=8)
    assert torch.equal(idx, brute_nearest(latents, x, 2, labels, 1)[1])
    _, idx = ref.nearest(x, k=1, approximate=True, nprobe=1)  # few lists: still finds these
    assert float((idx[:, 0] == torch.arange(20)).double().mean()) >= 0.9


def test_nearest_approximate_with_pca_projection():
    g = torch.Generator().manual_seed(4)
    low_rank = torch.randn(300, 6, generator=g) @ torch.randn(6, 40, generator=g)
    latents = low_rank + 0.01 * torch.randn(300, 40, generator=g)
    ref = ss.ReferenceSet(latents)
    ref.build_ivf(nlist=4, nprobe=4, pca_dim=8)   # 8 of 40 directions, every list probed
    assert ref.approximate_index.basis.shape == (40, 8)
    x = latents[:25] + 0.05 * torch.randn(25, 40, generator=g)
    dist, idx = ref.nearest(x, k=3, approximate=True)
    bd, bi = brute_nearest(latents, x, 3)
    assert torch.equal(idx, bi) and torch.allclose(dist.double(), bd, rtol=1e-6)


def test_nearest_bad_inputs(labelled):
    latents, labels = labelled
    ref = ss.ReferenceSet(latents, labels)
    with pytest.raises(ValueError, match="k=201 exceeds the 200 samples"):
        ref.nearest(torch.randn(2, 3, 4, 4), k=201)
    with pytest.raises(ValueError, match="k=41 exceeds the 40 samples in class 2"):
        ref.nearest(torch.randn(2, 3, 4, 4), k=41, labels=2)
    with pytest.raises(ValueError, match=r"shape \(2, 48\).*\(B, 3, 4, 4\)"):
        ref.nearest(torch.randn(2, 48))
    with pytest.raises(ValueError, match=r"add a batch dimension"):
        ref.nearest(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        ref.nearest(torch.full((2, 3, 4, 4), float("inf")))
    with pytest.raises(ValueError, match="unknown label 9"):
        ref.nearest(torch.randn(2, 3, 4, 4), labels=torch.tensor([0, 9]))
    with pytest.raises(TypeError, match="positive int"):
        ref.nearest(torch.randn(2, 3, 4, 4), k=1.5)
    with pytest.raises(ValueError, match=">= 1"):
        ref.nearest(torch.randn(2, 3, 4, 4), k=0)
