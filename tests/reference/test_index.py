"""Reference stores (sharded, memory-mapped) and their FAISS indexes: exactness, round trips, validation."""

import json
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest
import torch

import steersample as ss
from steersample.reference.index import (IndexSpec, ReferenceIndex, SearchKey, choose_index, exact_knn)
from steersample.reference.sharded import ShardedReferenceSet
from steersample.reference.store import StoreWriter, read_manifest, write_store


def brute_nearest(latents, x, k, ref_labels=None, labels=None):
    d = torch.cdist(x.reshape(x.shape[0], -1).double(), latents.reshape(latents.shape[0], -1).double(),
                    compute_mode="donot_use_mm_for_euclid_dist")
    if labels is not None:
        labels = torch.as_tensor(labels).expand(x.shape[0])
        d = d.masked_fill(ref_labels[None, :] != labels[:, None], float("inf"))
    dist, idx = torch.sort(d, dim=1, stable=True)
    return dist[:, :k], idx[:, :k]


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(700, 2, 4, 4, generator=g)
    labels = torch.arange(700) % 4
    queries = latents[:9] + 0.3 * torch.randn(9, 2, 4, 4, generator=g)
    return latents, labels, torch.cat([queries, torch.randn(3, 2, 4, 4, generator=g)])


def exhaustive(spec: IndexSpec, n: int) -> IndexSpec:
    """Search every list / a wide graph and fetch every row: candidates then contain the truth."""
    return replace(spec, nprobe=spec.nlist, ef_search=n, rerank=n)


# ----------------------------------------------------------------------------- keys and choice
def test_pooled_key_never_exceeds_full_distance():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 3, 8, 8, generator=g), torch.randn(50, 3, 8, 8, generator=g)
    key = SearchKey(pool=2)
    assert key.dim((3, 8, 8)) == 48 and key(x).shape == (50, 48)
    assert bool(((key(x) - key(y)).norm(dim=1) <= (x - y).reshape(50, -1).norm(dim=1) + 1e-5).all())
    block_constant = torch.randn(4, 3, 4, 4, generator=g).repeat_interleave(2, -1).repeat_interleave(2, -2)
    other = torch.zeros_like(block_constant)
    assert torch.allclose((key(block_constant) - key(other)).norm(dim=1),
                          block_constant.reshape(4, -1).norm(dim=1), atol=1e-5)
    assert torch.equal(SearchKey()(x), x.reshape(50, -1))
    with pytest.raises(ValueError, match="multiples of it"):
        SearchKey(pool=3)(x)
    with pytest.raises(ValueError, match="integer >= 1"):
        SearchKey(pool=0)


def test_choose_index_by_size():
    assert choose_index(1_000, 64).kind == "flat"
    assert choose_index(100_000, 256).kind == "hnsw"
    spec = choose_index(1_000_000, 256)
    assert spec.kind == "ivf" and spec.nlist == 8192 and spec.factory(256) == "IVF8192,Flat"
    big = choose_index(10**9, 256)
    assert big.kind == "ivfpq" and big.pq_m == 32 and big.factory(256) == "IVF131072_HNSW32,PQ32"
    with pytest.raises(ValueError, match="index kind"):
        IndexSpec(kind="lsh")


def test_exact_knn_streams_chunks_like_one_search(data):
    latents, _, queries = data
    flat = latents.reshape(700, -1).numpy()
    d_one, i_one = exact_knn(queries.reshape(12, -1).numpy(), [flat], 7)
    d_chunks, i_chunks = exact_knn(queries.reshape(12, -1).numpy(), [flat[:250], flat[250:600], flat[600:]], 7)
    assert np.array_equal(i_one, i_chunks) and np.allclose(d_one, d_chunks)


# ----------------------------------------------------------------------------- store round trips
def test_memory_mapped_load_equals_in_memory_load(tmp_path, data):
    latents, labels, queries = data
    write_store(tmp_path / "s", latents, labels, shard_size=256)
    mapped = ShardedReferenceSet.open(tmp_path / "s")
    in_ram = ShardedReferenceSet.open(tmp_path / "s", mmap=False, verify=True)
    plain = ss.ReferenceSet(latents, labels)
    maps = Path("/proc/self/maps")
    if maps.is_file():  # Linux: the shard files are mapped into this process, the in-RAM copy is not
        assert str(tmp_path / "s" / "shard-00002.safetensors") in maps.read_text()
    assert len(mapped) == 700 and mapped.sample_shape == (2, 4, 4) and len(mapped._shards) == 3
    for ref in (mapped, in_ram):
        assert torch.equal(ref.latents, latents) and torch.equal(ref.labels, labels)
        assert torch.equal(ref.rows(torch.tensor([[699, 0], [256, 255]])),
                           latents.reshape(700, -1)[[699, 0, 256, 255]])
        assert torch.equal(ref.squared_norms(), plain.squared_norms())
        for lab in (None, 2, torch.arange(12) % 4):
            got, want = ref.nearest(queries, 5, lab, approximate=False), plain.nearest(queries, 5, lab)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    for top_k in (None, 16):
        o_map, o_ram = ss.EmpiricalOracle(mapped, top_k=top_k), ss.EmpiricalOracle(plain, top_k=top_k)
        for sigma in (0.2, 0.8, 1.0):
            a, b = o_map.evaluate(queries, sigma), o_ram.evaluate(queries, sigma)
            assert torch.equal(a.denoised, b.denoised) and torch.equal(a.posterior.index, b.posterior.index)


def test_interrupted_store_write_resumes_to_the_same_bytes(tmp_path, data):
    latents, labels, _ = data
    write_store(tmp_path / "whole", latents, labels, shard_size=200)
    writer = StoreWriter(tmp_path / "part", sample_shape=(2, 4, 4), dtype="float32", key=SearchKey(),
                         labelled=True, shard_sizes=[200, 200, 200, 100], plan={"source": "tensor"})
    writer.write(1, latents[200:400], labels[200:400])          # then the process "dies"
    (tmp_path / "part" / ".shard-00002.safetensors.tmp").write_bytes(b"half a shard")
    mtime = (tmp_path / "part" / "shard-00001.safetensors").stat().st_mtime_ns
    write_store(tmp_path / "part", latents, labels, shard_size=200)
    assert (tmp_path / "part" / "shard-00001.safetensors").stat().st_mtime_ns == mtime  # not recomputed
    for i in range(4):
        name = f"shard-{i:05d}.safetensors"
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert read_manifest(tmp_path / "part").store_id == read_manifest(tmp_path / "whole").store_id
    with pytest.raises(ValueError, match="different inputs.*shard_sizes"):
        write_store(tmp_path / "part", latents, labels, shard_size=300)


# ----------------------------------------------------------------------------- index search
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
@pytest.mark.parametrize("pool", [1, 2])
def test_reranked_index_results_equal_exact_search(tmp_path, data, kind, pool):
    latents, labels, queries = data
    write_store(tmp_path / "s", latents, labels, shard_size=300, key=SearchKey(pool))
    ref = ShardedReferenceSet.open(tmp_path / "s")
    ref.build_index(kind, progress=False)
    ref.index.spec = exhaustive(ref.index.spec, len(ref))
    for lab in (None, 3, torch.arange(12) % 4):
        got = ref.nearest(queries, 6, lab, approximate=True)
        want = brute_nearest(latents, queries, 6, labels, lab)
        assert torch.equal(got[1], want[1])
        assert torch.allclose(got[0].double(), want[0], rtol=1e-6)
    mem = ss.EmpiricalOracle(ss.ReferenceSet(latents, labels), top_k=12)
    idx = ss.EmpiricalOracle(ref, top_k=12, approximate=True)
    a, b = idx.evaluate(queries, 0.3), mem.evaluate(queries, 0.3)
    assert torch.allclose(a.denoised, b.denoised, atol=1e-6) and torch.equal(a.posterior.index, b.posterior.index)


def test_calibrated_ivf_index_reaches_target_recall_on_clustered_keys():
    rng = np.random.default_rng(0)
    centres = 4 * rng.standard_normal((40, 16)).astype(np.float32)
    keys = (centres[rng.integers(0, 40, 6000)] + rng.standard_normal((6000, 16))).astype(np.float32)
    spec = choose_index(len(keys), 16, "ivf")
    index = ReferenceIndex.build([keys[:3000], keys[3000:]], spec, train_keys=keys[::2],
                                 calibration_keys=keys[::50], progress=False)
    queries = keys[1::97] + 0.1 * rng.standard_normal((len(keys[1::97]), 16)).astype(np.float32)
    _, truth = exact_knn(queries, [keys], 10)
    found = index.search(queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert index.spec.nprobe < spec.nlist and recall >= 0.9


def test_auto_uses_index_only_above_threshold(tmp_path, data, monkeypatch):
    latents, labels, queries = data
    write_store(tmp_path / "s", latents, labels, shard_size=300)
    ref = ShardedReferenceSet.open(tmp_path / "s")
    with pytest.raises(ValueError, match="has no index"):
        ref.nearest(queries, 3, approximate=True)
    ref.build_index("ivf", progress=False)
    ref.index.spec = replace(ref.index.spec, nprobe=1, rerank=1)   # deliberately poor
    exact = ref.nearest(queries, 3)                                 # N below the threshold: exact
    assert torch.equal(exact[1], brute_nearest(latents, queries, 3)[1])
    import steersample.reference.sharded as sharded
    monkeypatch.setattr(sharded, "AUTO_INDEX_MIN", 100)
    assert torch.equal(ref.nearest(queries, 3)[1], ref.nearest(queries, 3, approximate=True)[1])


# ----------------------------------------------------------------------------- validation
def test_corrupt_or_mismatched_index_is_rejected(tmp_path, data):
    latents, labels, _ = data
    write_store(tmp_path / "a", latents, labels, shard_size=300)
    write_store(tmp_path / "b", latents.flip(0), labels, shard_size=300)
    ShardedReferenceSet.open(tmp_path / "a").build_index("ivf", progress=False)
    ShardedReferenceSet.open(tmp_path / "a")   # loads fine
    index_file, meta_file = tmp_path / "a" / "index.faiss", tmp_path / "a" / "index.json"
    good_index, good_meta = index_file.read_bytes(), meta_file.read_text()

    # an index built from other shards (same count and dimension)
    (tmp_path / "b" / "index.faiss").write_bytes(good_index)
    (tmp_path / "b" / "index.json").write_text(good_meta)
    with pytest.raises(ValueError, match="built from other shards"):
        ShardedReferenceSet.open(tmp_path / "b")
    assert ShardedReferenceSet.open(tmp_path / "b", index=False).index is None

    corrupt = bytearray(good_index)
    corrupt[len(corrupt) // 2] ^= 0xFF
    index_file.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="checksum mismatch"):
        ShardedReferenceSet.open(tmp_path / "a")
    index_file.write_bytes(good_index[:100])
    with pytest.raises(ValueError, match="checksum mismatch"):
        ShardedReferenceSet.open(tmp_path / "a")
    index_file.write_bytes(good_index)

    for field, value, message in (("count", 699, "does not match its shards"),
                                  ("dim", 16, "does not match its shards"),
                                  ("metric", "ip", "metric 'ip'"),
                                  ("format", "pickle", "not a steersample index")):
        meta = json.loads(good_meta)
        meta[field] = value
        meta_file.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=message):
            ShardedReferenceSet.open(tmp_path / "a")
    meta_file.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        ShardedReferenceSet.open(tmp_path / "a")
    meta_file.unlink()
    with pytest.raises(ValueError, match="incomplete"):
        ShardedReferenceSet.open(tmp_path / "a")


def test_damaged_shards_and_manifest_are_rejected(tmp_path, data):
    latents, labels, _ = data
    write_store(tmp_path / "s", latents, labels, shard_size=300)
    shard = tmp_path / "s" / "shard-00001.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ShardedReferenceSet.open(tmp_path / "s")
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    ShardedReferenceSet.open(tmp_path / "s")  # sizes still agree: only verify=True reads every byte
    with pytest.raises(ValueError, match="checksum mismatch"):
        ShardedReferenceSet.open(tmp_path / "s", verify=True)
    shard.unlink()
    with pytest.raises(ValueError, match="listed .* but missing"):
        ShardedReferenceSet.open(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["count"] = 701
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="the manifest says 701"):
        ShardedReferenceSet.open(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no reference store"):
        ShardedReferenceSet.open(tmp_path / "nothing")


def test_index_build_command_from_a_tensor_file(tmp_path, data, capsys, monkeypatch):
    import shutil

    from steersample.cli import main

    latents, labels, queries = data
    ss.ReferenceSet(latents, labels).save(tmp_path / "ref.safetensors")
    argv = ["index", "build", str(tmp_path / "store"), "--tensor", str(tmp_path / "ref.safetensors"),
            "--shard-size", "256", "--kind", "ivf", "--no-progress"]
    assert main(argv) == 0
    assert "700 latents of shape (2, 4, 4) in 3 shards" in capsys.readouterr().out
    ref = ShardedReferenceSet.open(tmp_path / "store")
    assert ref.index.spec.kind == "ivf" and torch.equal(ref.latents, latents)
    assert main(["index", "info", str(tmp_path / "store")]) == 0
    assert "IVF" in capsys.readouterr().out

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=0))
    assert main(["index", "build", str(tmp_path / "other"), "--tensor", str(tmp_path / "ref.safetensors")]) == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert not list((tmp_path / "other").glob("shard-*"))


def test_ivf_search_with_torch_coarse_lists_equals_faiss_search():
    """ReferenceIndex.search ranks IVF lists with one GEMM + top-k and scans them with FAISS's
    search_preassigned: the same candidates as FAISS's own search (no ties in random data)."""
    import faiss

    from steersample.reference.index import IndexSpec, ReferenceIndex

    rng = np.random.default_rng(0)
    keys = rng.normal(size=(4000, 16)).astype(np.float32)
    queries = rng.normal(size=(50, 16)).astype(np.float32)
    spec = IndexSpec(kind="ivf", nlist=64, nprobe=4)
    index = ReferenceIndex.build(keys, spec, train_keys=keys, progress=False)
    found = index.search(queries, 10)
    params = faiss.SearchParametersIVF(nprobe=4)
    _, want = index.index.search(queries, found.shape[1], params=params)
    np.testing.assert_array_equal(found, want)
    dq, iq = index._coarse(queries, 4)
    want_d, want_i = index.index.quantizer.search(queries, 4)
    np.testing.assert_array_equal(iq, want_i)
    np.testing.assert_allclose(dq, want_d, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- oracle and steering on a store
def test_rows_gather_equals_flat_indexing(tmp_path, data):
    latents, labels, _ = data
    write_store(tmp_path / "s", latents, labels, shard_size=300)          # three shards
    sharded = ShardedReferenceSet.open(tmp_path / "s")
    memory = ss.ReferenceSet(latents, labels)
    idx = torch.tensor([[699, 0, 300], [299, 301, 0], [5, 5, 650]])      # across shards, repeats
    want = latents.reshape(700, -1)[idx.flatten()]
    for ref in (memory, sharded):
        got = ref.rows(idx)
        assert got.shape == (9, 32) and got.dtype == latents.dtype
        assert torch.equal(got, want)
    assert "latents" not in sharded._cache                               # no concatenation
    for bad in (torch.tensor([0, 700]), torch.tensor([-1, 3])):
        with pytest.raises(IndexError, match=r"\[0, 700\)"):
            sharded.rows(bad)


def _clustered(n=1200, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(n // 50, dim, generator=g)
    return centres[torch.arange(n) % (n // 50)] + 0.3 * torch.randn(n, dim, generator=g)


def test_top_k_oracle_and_attractor_use_the_store_index_above_threshold(tmp_path, monkeypatch):
    """approximate=None: the store's index only above AUTO_INDEX_MIN; rows come from the memory
    maps; at σ ≤ σ* the top-k velocity through the index equals the exact oracle's to 1e-3."""
    import steersample.steering.hull as hull
    import steersample.reference.sharded as sharded_mod
    from steersample.steering.attractor import AttractorRepulsion

    latents = _clustered()
    write_store(tmp_path / "s", latents, None, shard_size=500)
    ref = ShardedReferenceSet.open(tmp_path / "s")
    ref.build_index("ivf", progress=False)
    ref.index.spec = exhaustive(ref.index.spec, len(ref))   # candidates contain the true top-k
    calls = []
    search = ref._search_index
    monkeypatch.setattr(ref, "_search_index", lambda *a: calls.append(1) or search(*a))

    sigma_star = ss.PhaseProfile.estimate(ss.ReferenceSet(latents), num_queries=64).boundary_sigma
    g = torch.Generator().manual_seed(1)
    exact_oracle = ss.EmpiricalOracle(ss.ReferenceSet(latents))
    top_k = ss.EmpiricalOracle(ref, top_k=128, max_dropped=None)
    pick = torch.randperm(len(latents), generator=g)[:8]
    for factor in (1.0, 0.75, 0.5):
        s = sigma_star * factor
        x = (1 - s) * latents[pick] + s * torch.randn(8, 16, generator=g)
        assert not calls
        below = top_k.velocity(x, s)                      # N = 1200 <= AUTO_INDEX_MIN: exact search
        assert not calls
        monkeypatch.setattr(sharded_mod, "AUTO_INDEX_MIN", 100)
        above = top_k.velocity(x, s)                      # now through the index
        assert calls
        calls.clear()
        monkeypatch.setattr(sharded_mod, "AUTO_INDEX_MIN", 50_000)
        want = exact_oracle.velocity(x, s)
        err = ((above - want).norm(dim=1) / want.norm(dim=1)).max()
        assert err <= 1e-3, (factor, err)
        torch.testing.assert_close(above, below, rtol=1e-9, atol=1e-9)
    assert "latents" not in ref._cache        # the top-k oracle gathered rows, never concatenated

    # AttractorRepulsion's neighbour search goes through the same rule
    monkeypatch.setattr(hull, "DENSE_SEARCH_ELEMENTS", 0)
    monkeypatch.setattr(sharded_mod, "AUTO_INDEX_MIN", 100)
    dist, idx = hull.nearest(ref, latents[:3] + 0.01, 4)
    assert calls and torch.equal(idx[:, 0], torch.arange(3))
    assert AttractorRepulsion().needs_reference and "latents" not in ref._cache


def test_in_memory_top_k_oracle_builds_the_ivf_only_above_threshold(monkeypatch):
    import steersample.reference.reference_set as reference_mod

    latents = _clustered()
    x = latents[:4] * 0.6 + 0.4 * torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    ref = ss.ReferenceSet(latents)
    oracle = ss.EmpiricalOracle(ref, top_k=16)
    oracle.velocity(x, 0.4)
    assert "ivf" not in ref._cache
    monkeypatch.setattr(reference_mod, "AUTO_INDEX_MIN", 100)
    oracle.velocity(x, 0.4)
    assert "ivf" in ref._cache
    exact = ss.EmpiricalOracle(ref, top_k=16, approximate=False)
    monkeypatch.setattr(ref, "_search_ivf", lambda *a: pytest.fail("approximate=False searched the index"))
    exact.velocity(x, 0.4)
