"""FAISS indexes for large reference sets: chosen by size, saved beside the shards, validated on load.

A :class:`ReferenceIndex` searches *keys*, ``(N, Dk)`` float32 vectors derived from the full
latents by a :class:`SearchKey` (the flattened latents, or an average-pooled copy of them). It
only proposes candidates: callers re-rank them with exact float64 distances on the full latents
(``steersample.reference.store.ShardedReferenceSet.nearest`` does).

Kinds (:func:`choose_index`, FAISS ``index_factory`` strings; L2 metric throughout):

    N <= 50,000            "Flat"            exact brute force: N·Dk flops per query is cheap here
    N <= 300,000           "HNSW32,Flat"     graph search, no training, ~N·(4·Dk + 256) bytes
    N <= 20,000,000        "IVF{L},Flat"     L = 2^round(log2(8·sqrt(N))) lists, k-means on 40·L rows
    larger                 "IVF{L},PQ{m}"    L = 2^round(log2(4·sqrt(N))), m = Dk/8 sub-quantisers
                                             of 8 bits: m bytes per vector
    (IVF kinds with L >= 65,536 find their lists through an HNSW graph over the centroids:
     "IVF{L}_HNSW32,...")

(Jégou et al., "Product quantization for nearest neighbor search", TPAMI 2011; Malkov & Yashunin,
arXiv 1603.09320.) The search breadth (``nprobe`` lists for IVF, ``efSearch`` for HNSW) is
calibrated at build time: the smallest power of two whose recall@10 against exact search on
perturbed reference keys reaches ``target_recall``.

On disk, ``index.faiss`` is FAISS's own binary format (``faiss.write_index``; read back with
``faiss.read_index``: it is parsed into C++ structures, never unpickled, never executed) and
``index.json`` records the kind, metric, dimension, count, the SHA-256 of ``index.faiss`` and the
identity of the shards it was built from. :meth:`ReferenceIndex.load` checks the checksum *before*
FAISS parses the file, then dimension, count and metric against the store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["SearchKey", "IndexSpec", "choose_index", "ReferenceIndex", "exact_knn",
           "calibration_queries", "file_sha256", "write_json_atomic", "FLAT_MAX", "HNSW_MAX", "IVF_FLAT_MAX"]

FLAT_MAX = 50_000
HNSW_MAX = 300_000
IVF_FLAT_MAX = 20_000_000
_FORMAT = "steersample.ReferenceIndex"
_VERSION = "1"
_INDEX_FILE, _META_FILE = "index.faiss", "index.json"
_ADD_BATCH = 65_536
_REBUILD = "rebuild it with `steersample index build STORE --reindex` (or store.build_index())"


# ----------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class SearchKey:
    """How a full latent ``(B, *shape)`` becomes a search key ``(B, Dk)`` (float32).

    ``pool = 1``: the flattened latent (``Dk = D``). ``pool = f > 1``: average pooling over
    non-overlapping f x f blocks of the last two dimensions, times f, so that for every pair

        ||key(x) - key(y)|| <= ||x - y||                (Cauchy-Schwarz on each block)

    a key distance never exceeds the full distance (equality for block-constant differences).
    """

    pool: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1:
            raise ValueError(f"SearchKey pool must be an integer >= 1, got {self.pool!r}")

    def key_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one key before flattening; raises when the pool does not divide the sample."""
        if self.pool == 1:
            return tuple(sample_shape)
        if len(sample_shape) < 2 or sample_shape[-1] % self.pool or sample_shape[-2] % self.pool:
            raise ValueError(
                f"pool={self.pool} needs samples whose last two dimensions are multiples of it, "
                f"got sample shape {tuple(sample_shape)}; pick a pool that divides them or pool=1"
            )
        return (*sample_shape[:-2], sample_shape[-2] // self.pool, sample_shape[-1] // self.pool)

    def dim(self, sample_shape: tuple[int, ...]) -> int:
        """Key dimension ``Dk``."""
        return int(math.prod(self.key_shape(sample_shape)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of ``x`` ``(B, *shape)``: ``(B, Dk)`` float32 on ``x``'s device."""
        x = x.detach().to(torch.float32)
        if self.pool > 1:
            self.key_shape(tuple(x.shape[1:]))
            lead, (h, w) = x.shape[:-2], x.shape[-2:]
            pooled = torch.nn.functional.avg_pool2d(x.reshape(-1, 1, h, w), self.pool) * self.pool
            x = pooled.reshape(*lead, h // self.pool, w // self.pool)
        return x.reshape(x.shape[0], -1).contiguous()

    def to_dict(self) -> dict:
        return {"kind": "avg_pool" if self.pool > 1 else "flatten", "pool": self.pool}

    @classmethod
    def from_dict(cls, data: dict) -> "SearchKey":
        return cls(pool=int(data.get("pool", 1)))


# ----------------------------------------------------------------------------- choice
@dataclass(frozen=True)
class IndexSpec:
    """Which FAISS index to build and how widely to search it.

    Attributes:
        kind: ``"flat"``, ``"hnsw"``, ``"ivf"`` or ``"ivfpq"``.
        nlist: IVF lists (ivf, ivfpq).
        pq_m: PQ sub-quantisers, bytes per vector at 8 bits (ivfpq).
        hnsw_m: graph degree (hnsw, and the coarse quantizer when ``coarse="hnsw"``).
        coarse: how IVF kinds find their nearest lists: ``"flat"`` (exact, nlist·Dk flops per
            query) or ``"hnsw"`` (a graph over the centroids, for nlist in the 1e5 range).
        nprobe / ef_search: search breadth; ``None`` = calibrate at build time.
        rerank: candidates per requested neighbour for exact re-ranking: ``k * rerank + 8``
            (the 8 absorb float32 rounding among near-ties). 1 where the index stores the keys
            themselves (its distances are exact but for rounding), more for PQ codes or when
            the key is coarser than the latents.
    """

    kind: str
    nlist: int | None = None
    pq_m: int | None = None
    hnsw_m: int = 32
    coarse: str = "flat"
    nprobe: int | None = None
    ef_search: int | None = None
    rerank: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "hnsw", "ivf", "ivfpq"):
            raise ValueError(f"index kind must be 'flat', 'hnsw', 'ivf' or 'ivfpq', got {self.kind!r}")
        if self.kind in ("ivf", "ivfpq") and not self.nlist:
            raise ValueError(f"kind {self.kind!r} needs nlist (number of IVF lists), got {self.nlist!r}")
        if self.coarse not in ("flat", "hnsw"):
            raise ValueError(f"coarse must be 'flat' or 'hnsw', got {self.coarse!r}")
        if self.kind == "ivfpq" and not self.pq_m:
            raise ValueError("kind 'ivfpq' needs pq_m (PQ sub-quantisers, a divisor of the key dimension)")

    def factory(self, dim: int) -> str:
        """The ``faiss.index_factory`` string."""
        if self.kind == "ivfpq" and dim % self.pq_m:
            raise ValueError(f"pq_m={self.pq_m} must divide the key dimension {dim}; pick a divisor")
        ivf = f"IVF{self.nlist}" + (f"_HNSW{self.hnsw_m}" if self.coarse == "hnsw" else "")
        return {"flat": "Flat", "hnsw": f"HNSW{self.hnsw_m},Flat", "ivf": f"{ivf},Flat",
                "ivfpq": f"{ivf},PQ{self.pq_m}"}[self.kind]


def choose_index(n: int, dim: int, kind: str = "auto") -> IndexSpec:
    """The index for ``n`` keys of dimension ``dim`` (thresholds in the module docstring)."""
    if n < 1 or dim < 1:
        raise ValueError(f"need at least one key of dimension >= 1, got n={n}, dim={dim}")
    if kind == "auto":
        kind = ("flat" if n <= FLAT_MAX else "hnsw" if n <= HNSW_MAX
                else "ivf" if n <= IVF_FLAT_MAX else "ivfpq")
    # lists: 8 sqrt(N) where the lists hold full vectors (a scan reads 4 Dk bytes per row, so
    # finer lists pay), 4 sqrt(N) for PQ codes (cheap to scan; the coarse k-means is the cost)
    nlist = int(2 ** round(math.log2((4 if kind == "ivfpq" else 8) * math.sqrt(n))))
    nlist = max(1, min(nlist, n // 39))   # FAISS wants >= 39 training rows per list
    pq_m = next((m for m in (dim // 8, dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0), dim)
    ivf = kind in ("ivf", "ivfpq")
    return IndexSpec(kind=kind, nlist=nlist if ivf else None, pq_m=pq_m if kind == "ivfpq" else None,
                     coarse="hnsw" if ivf and nlist >= 65_536 else "flat",
                     rerank=8 if kind == "ivfpq" else 1)


# ----------------------------------------------------------------------------- the index
class ReferenceIndex:
    """A FAISS index over ``count`` keys of dimension ``dim``, with its :class:`IndexSpec`.

    Build with :meth:`build`, search with :meth:`search`, persist with :meth:`save` /
    :meth:`load`. ``store_id`` names the shards the keys came from (a hash of their checksums).
    """

    def __init__(self, index, spec: IndexSpec, store_id: str = "") -> None:
        self.index, self.spec, self.store_id = index, spec, store_id
        self._centroids: tuple | None = None   # (C, ||C||^2) torch float32, for coarse search
        self._lock = threading.Lock()

    def _coarse(self, keys: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Nearest ``nprobe`` IVF lists of each key, ``(Dq, Iq)`` (squared L2, ids), computed as
        one torch GEMM + top-k over the centroids, or None where this does not apply (not a
        bare IVF index, or a graph coarse quantizer). FAISS's flat quantizer returns the same
        lists (up to float32 ties), but its small-k heap path costs about twice as much on a
        batch of queries (3.1 vs 1.6 ms for 64 queries over 8,192 centroids, 64-d, one thread):
        at N = 1e6 that is the difference between the top-k oracle step and a model forward."""
        import faiss
        import torch

        if self.spec.coarse != "flat" or not isinstance(self.index, faiss.IndexIVF):
            return None
        if self._centroids is None:
            quantizer = self.index.quantizer
            c = torch.from_numpy(quantizer.reconstruct_n(0, quantizer.ntotal))
            self._centroids = (c.T.contiguous(), c.square().sum(1))   # (dim, nlist): GEMM-ready
        c_t, c_sq = self._centroids
        k = torch.from_numpy(keys)
        # ||k - c||^2 = ||k||^2 + (||c||^2 - 2 k.c): rank on the bracket (one fused GEMM)
        part = torch.addmm(c_sq[None, :], k, c_t, alpha=-2.0)
        dq, iq = torch.topk(part, min(nprobe, c_t.shape[1]), dim=1, largest=False)
        dq = (dq + k.square().sum(1, keepdim=True)).clamp_min(0.0)
        return dq.numpy(), iq.numpy()

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        return (f"ReferenceIndex({self.spec.factory(self.dim)}, count={self.count}, dim={self.dim}, "
                f"nprobe={self.spec.nprobe}, ef_search={self.spec.ef_search})")

    # ----------------------------------------------------------------------------- build
    @classmethod
    def build(cls, keys: np.ndarray | Sequence[np.ndarray], spec: IndexSpec | str = "auto", *,
              train_keys: np.ndarray | None = None, calibration_keys: np.ndarray | None = None,
              target_recall: float = 0.95, store_id: str = "", progress: bool = True,
              seed: int = 0) -> "ReferenceIndex":
        """Build the index over keys given as one array or a sequence of chunks.

        Args:
            keys: ``(N, dim)`` float32, or a sequence of such chunks in order (ids are row
                positions); a sequence is read twice when calibrating.
            spec: an :class:`IndexSpec`, or a kind (``"auto"`` = :func:`choose_index`).
            train_keys: rows for k-means / PQ training (IVF kinds; required for them).
            calibration_keys: a sample of the keys; queries near them calibrate the search
                breadth (:func:`calibration_queries`, :meth:`calibrate`).
            target_recall: candidate recall@10 against exact search that calibration aims for.
        """
        import faiss
        from tqdm.auto import tqdm

        chunks = [keys] if isinstance(keys, np.ndarray) else list(keys)
        count, dim = sum(int(c.shape[0]) for c in chunks), int(chunks[0].shape[1])
        spec = choose_index(count, dim, spec) if isinstance(spec, str) else spec
        index = faiss.index_factory(dim, spec.factory(dim), faiss.METRIC_L2)
        if spec.kind == "hnsw":
            index.hnsw.efConstruction = 80
        if spec.kind == "ivfpq":  # polysemous code ordering is only for Hamming pre-filtering
            index.do_polysemous_training = False
        if not index.is_trained:
            if train_keys is None:
                raise ValueError(f"a {spec.kind!r} index needs train_keys (a sample of the keys)")
            index.train(np.ascontiguousarray(train_keys, dtype=np.float32))
        with tqdm(total=count, desc=f"index {spec.factory(dim)}", unit="key", disable=not progress) as bar:
            for chunk in chunks:
                for i in range(0, chunk.shape[0], _ADD_BATCH):
                    part = np.ascontiguousarray(chunk[i:i + _ADD_BATCH], dtype=np.float32)
                    index.add(part)
                    bar.update(part.shape[0])
        out = cls(index, spec, store_id)
        if calibration_keys is not None and spec.kind != "flat":
            queries = calibration_queries(calibration_keys, chunks, seed=seed)
            _, truth = exact_knn(queries, chunks, min(10, count))
            out.calibrate(queries, truth, target_recall)
        return out

    def calibrate(self, queries: np.ndarray, truth: np.ndarray, target_recall: float = 0.95) -> float:
        """Set nprobe / efSearch to the smallest power of two reaching ``target_recall``.

        Recall is measured on the *candidates* (``k * spec.rerank + 8`` per query) because exact
        re-ranking follows: a true neighbour among the candidates is returned.

        Args:
            queries: ``(Q, dim)`` calibration queries (see :func:`calibration_queries`).
            truth: ``(Q, k)`` their exact nearest ids (:func:`exact_knn`).
        Returns the candidate recall@k reached.
        """
        k = truth.shape[1]
        if self.spec.kind == "flat":
            return 1.0
        limit = self.spec.nlist if self.spec.kind in ("ivf", "ivfpq") else 4096
        breadth = 1
        while True:
            spec = replace(self.spec, **{self._breadth_name(): breadth})
            found = self.search(queries, k, spec=spec)
            recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k
                                    for f, t in zip(found, truth)]))
            if recall >= target_recall or breadth >= limit:
                break
            breadth = min(limit, 2 * breadth)
        self.spec = spec
        return recall

    def _breadth_name(self) -> str:
        return "ef_search" if self.spec.kind == "hnsw" else "nprobe"

    # ----------------------------------------------------------------------------- search
    def search(self, keys: np.ndarray, k: int, *, ids: np.ndarray | None = None,
               spec: IndexSpec | None = None, candidates: bool = True) -> np.ndarray:
        """Candidate ids ``(B, k * spec.rerank + 8)`` (``(B, k)`` with ``candidates=False``) for
        query keys ``(B, dim)``; ``ids`` restricts the search to those rows; ``-1`` pads when
        fewer candidates were reachable."""
        import faiss

        spec = spec or self.spec
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"query keys have shape {keys.shape}, the index expects (B, {self.dim})")
        want = min(self.count, k * spec.rerank + 8 if candidates else k)
        if spec.kind in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF(nprobe=spec.nprobe or max(1, spec.nlist // 16))
        elif spec.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(want, spec.ef_search or 64))
        else:
            params = faiss.SearchParameters()
        if ids is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
            params.sel = selector
            want = min(want, int(np.asarray(ids).size))
        elif spec.kind in ("ivf", "ivfpq"):
            coarse = self._coarse(keys, params.nprobe)
            if coarse is not None:
                with self._lock:   # search_preassigned reads the index's own nprobe
                    self.index.nprobe = coarse[1].shape[1]
                    _, found = self.index.search_preassigned(keys, want, coarse[1], coarse[0])
                return found
        _, found = self.index.search(keys, want, params=params)
        return found

    # ----------------------------------------------------------------------------- disk
    def save(self, folder: str | os.PathLike) -> None:
        """Write ``index.faiss`` and ``index.json`` into ``folder`` (each replaced atomically)."""
        import faiss

        folder = Path(folder)
        tmp = folder / f".{_INDEX_FILE}.tmp"
        faiss.write_index(self.index, str(tmp))
        _fsync(tmp)
        os.replace(tmp, folder / _INDEX_FILE)
        meta = {"format": _FORMAT, "version": _VERSION, "metric": "l2", "dim": self.dim,
                "count": self.count, "factory": self.spec.factory(self.dim), "spec": asdict(self.spec),
                "sha256": file_sha256(folder / _INDEX_FILE), "store_id": self.store_id,
                "faiss_version": faiss.__version__}
        write_json_atomic(folder / _META_FILE, meta)

    @staticmethod
    def exists(folder: str | os.PathLike) -> bool:
        return (Path(folder) / _META_FILE).is_file() or (Path(folder) / _INDEX_FILE).is_file()

    @classmethod
    def load(cls, folder: str | os.PathLike, *, count: int, dim: int,
             store_id: str | None = None) -> "ReferenceIndex":
        """Read and validate the index in ``folder`` against the store it serves.

        Raises ``ValueError`` (with the fix) when a file is missing, the checksum differs, or the
        dimension, count, metric or shard identity do not match.
        """
        import faiss

        folder = Path(folder)
        meta_path, index_path = folder / _META_FILE, folder / _INDEX_FILE
        for path in (meta_path, index_path):
            if not path.is_file():
                raise ValueError(f"{path} is missing, the index in {folder} is incomplete; {_REBUILD}")
        try:
            meta = json.loads(meta_path.read_text())
            spec = IndexSpec(**meta["spec"])
            expected = (meta["format"], meta["version"], meta["metric"], int(meta["dim"]),
                        int(meta["count"]), str(meta["sha256"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{meta_path} is unreadable ({type(err).__name__}: {err}); {_REBUILD}") from None
        fmt, version, metric, meta_dim, meta_count, digest = expected
        if fmt != _FORMAT or version != _VERSION:
            raise ValueError(f"{meta_path} is not a steersample index manifest (format {fmt!r} "
                             f"version {version!r}); {_REBUILD}")
        if metric != "l2":
            raise ValueError(f"{meta_path}: metric {metric!r}, expected 'l2'; {_REBUILD}")
        if meta_dim != dim or meta_count != count:
            raise ValueError(f"the index in {folder} holds {meta_count} keys of dimension {meta_dim} "
                             f"but the store has {count} keys of dimension {dim}: the index does "
                             f"not match its shards; {_REBUILD}")
        if store_id is not None and meta.get("store_id") != store_id:
            raise ValueError(f"the index in {folder} was built from other shards (store id "
                             f"{meta.get('store_id')!r}, the shards are {store_id!r}); {_REBUILD}")
        if file_sha256(index_path) != digest:
            raise ValueError(f"{index_path}: checksum mismatch, the index file is corrupt; {_REBUILD}")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as err:
            raise ValueError(f"{index_path} could not be read by FAISS ({err}); {_REBUILD}") from None
        if index.d != dim or index.ntotal != count or index.metric_type != faiss.METRIC_L2:
            raise ValueError(f"{index_path} holds {index.ntotal} keys of dimension {index.d} "
                             f"(metric {index.metric_type}); expected {count} x {dim}, L2; {_REBUILD}")
        return cls(index, spec, str(meta.get("store_id", "")))


# ----------------------------------------------------------------------------- exact search
def exact_knn(queries: np.ndarray, chunks: Sequence[np.ndarray], k: int,
              ids: Sequence[np.ndarray | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``chunks`` (concatenated in order) by float32 FAISS brute force.

    Streams one chunk at a time (``faiss.knn``, no copy of float32 C-contiguous chunks), keeps
    the running best k per query. ``ids[c]`` optionally restricts chunk c to those local rows.
    Returns ``(squared distances, global ids)``, ``(Q, k)`` each, ascending; ``-1`` pads when
    fewer than k rows exist.
    """
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_d = np.full((q.shape[0], k), np.inf, dtype=np.float32)
    best_i = np.full((q.shape[0], k), -1, dtype=np.int64)
    offset = 0
    for c, chunk in enumerate(chunks):
        local = None if ids is None else ids[c]
        rows = chunk if local is None else chunk[local]
        n = int(rows.shape[0])
        if n:
            d, i = faiss.knn(q, np.ascontiguousarray(rows, dtype=np.float32), min(k, n))
            i = offset + (i if local is None else np.asarray(local, dtype=np.int64)[i])
            all_d, all_i = np.concatenate([best_d, d], 1), np.concatenate([best_i, i], 1)
            order = np.argsort(all_d, axis=1, kind="stable")[:, :k]
            best_d, best_i = np.take_along_axis(all_d, order, 1), np.take_along_axis(all_i, order, 1)
        offset += int(chunk.shape[0])
    return best_d, best_i


def calibration_queries(sample: np.ndarray, chunks: Sequence[np.ndarray], seed: int = 0) -> np.ndarray:
    """Queries near, not on, the data: ``sample`` rows plus isotropic Gaussian noise whose
    expected norm is the median distance from a sample row to its nearest *other* key."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    d2, _ = exact_knn(sample, chunks, 2)
    gap = float(np.median(np.sqrt(np.maximum(d2[:, 1], 0.0)))) if d2.shape[1] > 1 else 0.0
    noise = np.random.default_rng(seed).standard_normal(sample.shape).astype(np.float32)
    return sample + noise * np.float32((gap or 1.0) / math.sqrt(sample.shape[1]))


# ----------------------------------------------------------------------------- helpers
def file_sha256(path: str | os.PathLike, block: int = 1 << 24) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file beside ``path``, fsync, rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)
