"""Reference sets on disk: safetensors shards plus a JSON manifest, memory-mapped on load.

A *store* is a folder:

    manifest.json               written last: shape, dtype, key, shard list with SHA-256s
    shard-00000.safetensors     "latents" (n, *shape), "labels" (n,) int64 when labelled,
    shard-00001.safetensors     "keys" (n, Dk) float32 when the search key is pooled
    ...
    index.faiss, index.json     optional FAISS index over the keys (steersample.reference.index)

Shards are written to a temporary name, fsynced and renamed, so a shard file that exists is
complete; :class:`StoreWriter` skips finished shards, which makes a build resumable.
:class:`~steersample.reference.sharded.ShardedReferenceSet` (a :class:`~steersample.reference.reference_set.ReferenceSet`)
maps each shard's tensors with ``numpy.memmap`` (copy-on-write: nothing is ever written back),
so opening a store reads only headers, and a query touches only the rows it needs:

    ref = ShardedReferenceSet.open("refstore")       # memory-mapped, index loaded and validated
    dist, idx = ref.nearest(x, k=10)                  # index on the keys, exact re-ranking
    oracle = EmpiricalOracle(ref, top_k=64)           # works as with any ReferenceSet
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from steersample.reference.index import SearchKey, file_sha256, write_json_atomic

__all__ = ["StoreManifest", "ShardInfo", "StoreWriter", "write_store", "read_manifest", "mmap_safetensors",
           "check_free_disk", "shard_name", "MANIFEST", "BUILD_PLAN"]

_FORMAT = "steersample.ReferenceStore"
_VERSION = "1"
MANIFEST = "manifest.json"
BUILD_PLAN = "build.json"
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its file name, first global row, row count and file SHA-256."""

    file: str
    start: int
    count: int
    sha256: str


@dataclass(frozen=True)
class StoreManifest:
    """What ``manifest.json`` records about a store."""

    count: int
    sample_shape: tuple[int, ...]
    dtype: str
    key: SearchKey
    labelled: bool
    shards: tuple[ShardInfo, ...]
    metadata: dict

    @property
    def key_dim(self) -> int:
        return self.key.dim(self.sample_shape)

    @property
    def store_id(self) -> str:
        """A short hash naming exactly these shards (the index records it)."""
        import hashlib

        text = json.dumps([[s.file, s.start, s.count, s.sha256] for s in self.shards])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "count": self.count,
                "sample_shape": list(self.sample_shape), "dtype": self.dtype,
                "key": self.key.to_dict(), "key_dim": self.key_dim, "labelled": self.labelled,
                "store_id": self.store_id, "metadata": self.metadata,
                "shards": [vars(s) for s in self.shards]}


def read_manifest(folder: str | os.PathLike) -> StoreManifest:
    """Parse and check ``folder/manifest.json`` (format, shard order and counts)."""
    path = Path(folder) / MANIFEST
    fix = "rebuild the store with `steersample index build`"
    if not path.is_file():
        hint = (" (a build was started here but has not finished: re-run the same "
                "`steersample index build` command to resume it)") if (Path(folder) / BUILD_PLAN).is_file() else ""
        raise FileNotFoundError(f"no reference store at {folder}: {path} is missing{hint}")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != _FORMAT or raw.get("version") != _VERSION:
            raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}")
        shards = tuple(ShardInfo(str(s["file"]), int(s["start"]), int(s["count"]), str(s["sha256"]))
                       for s in raw["shards"])
        manifest = StoreManifest(int(raw["count"]), tuple(int(d) for d in raw["sample_shape"]),
                                 str(raw["dtype"]), SearchKey.from_dict(raw["key"]),
                                 bool(raw["labelled"]), shards, dict(raw.get("metadata", {})))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid store manifest ({err}); {fix}") from None
    start = 0
    for s in shards:
        if s.start != start or s.count < 1 or Path(s.file).name != s.file:
            raise ValueError(f"{path}: shard {s.file!r} is out of order or empty; {fix}")
        start += s.count
    if start != manifest.count or manifest.dtype not in _TORCH_DTYPES:
        raise ValueError(f"{path}: shards hold {start} rows of dtype {manifest.dtype}, the "
                         f"manifest says {manifest.count}; {fix}")
    return manifest


def mmap_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map every tensor of a safetensors file (copy-on-write ``numpy.memmap``).

    Parses the header (8-byte little-endian length, JSON) and checks that the data sections
    tile the file exactly; returns ``(arrays, metadata)``. Raises ``ValueError`` for a
    truncated or malformed file.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length is out of range")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        arrays, end = {}, 0
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, stop = (int(v) for v in info["data_offsets"])
            dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(int(d) for d in info["shape"])
            if begin != end or stop - begin != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"tensor {name!r} has inconsistent offsets")
            end = stop
            arrays[name] = np.memmap(path, dtype=dtype, mode="c", offset=8 + n + begin, shape=shape) \
                if stop > begin else np.zeros(shape, dtype)
        if 8 + n + end != size:
            raise ValueError(f"data end at byte {8 + n + end} but the file has {size} bytes")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a valid safetensors shard ({err}); it may be truncated "
                         f"or corrupt: delete it and re-run the build to rewrite it") from None
    return arrays, {str(k): str(v) for k, v in meta.items()}


def check_free_disk(folder: str | os.PathLike, needed: int, what: str = "the shards") -> None:
    """Raise ``OSError`` before writing when ``folder``'s file system has less than ``needed``
    bytes free (plus 1 % and 64 MiB of headroom)."""
    free = shutil.disk_usage(folder).free
    want = int(needed * 1.01) + (64 << 20)
    if free < want:
        raise OSError(f"not enough disk space in {folder} for {what}: need {want / 2**30:.2f} GiB, "
                      f"{free / 2**30:.2f} GiB free; free some space or write to another folder")


class StoreWriter:
    """Writes a store shard by shard; finished shards survive interruptions and are reused.

    ``plan`` is a JSON-able description of the inputs (file list digest, VAE fingerprint, shard
    size, ...). It is saved as ``build.json`` on the first run; a later run into the same folder
    must present the same plan (otherwise the shards would mix two builds).
    """

    def __init__(self, folder: str | os.PathLike, *, sample_shape: tuple[int, ...], dtype: str,
                 key: SearchKey, labelled: bool, shard_sizes: list[int], plan: dict) -> None:
        self.folder = Path(folder)
        self.sample_shape, self.dtype, self.key, self.labelled = tuple(sample_shape), dtype, key, labelled
        self.shard_sizes = list(shard_sizes)
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_TORCH_DTYPES)}, got {dtype!r}")
        self.key_dim = key.dim(self.sample_shape)
        self.folder.mkdir(parents=True, exist_ok=True)
        full = {**plan, "sample_shape": list(self.sample_shape), "dtype": dtype,
                "key": key.to_dict(), "labelled": labelled, "shard_sizes": self.shard_sizes}
        plan_path = self.folder / BUILD_PLAN
        if plan_path.is_file():
            old = json.loads(plan_path.read_text())
            if old != json.loads(json.dumps(full, sort_keys=True)):
                diff = sorted(k for k in set(old) | set(full) if old.get(k) != full.get(k))
                raise ValueError(
                    f"{self.folder} holds a build of different inputs (differs in {', '.join(diff)}); "
                    f"re-run with the original inputs to resume, or choose a new output folder")
        elif (self.folder / MANIFEST).is_file() or any(self.folder.glob("shard-*.safetensors")):
            raise ValueError(f"{self.folder} already holds a store without a build plan; "
                             f"choose a new output folder")
        else:
            write_json_atomic(plan_path, full)
        self.starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(int).tolist()

    def bytes_needed(self) -> int:
        """Disk bytes the unfinished shards will take (tensor data only)."""
        per_row = int(np.prod(self.sample_shape)) * torch.empty(0, dtype=_TORCH_DTYPES[self.dtype]).element_size()
        per_row += 8 * self.labelled + 4 * self.key_dim * (self.key.pool > 1)
        todo = sum(n for i, n in enumerate(self.shard_sizes) if not self.done(i))
        return todo * per_row

    def done(self, i: int) -> bool:
        """True when shard ``i`` exists (complete by construction) with the planned row count."""
        path = self.folder / shard_name(i)
        if not path.is_file():
            return False
        arrays, _ = mmap_safetensors(path)
        if arrays["latents"].shape != (self.shard_sizes[i], *self.sample_shape):
            raise ValueError(f"{path} holds {arrays['latents'].shape} rows, the plan expects "
                             f"{(self.shard_sizes[i], *self.sample_shape)}; delete it and re-run")
        return True

    def write(self, i: int, latents: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Write shard ``i`` (``latents`` ``(n_i, *shape)``) atomically."""
        from safetensors.torch import save_file

        expect = (self.shard_sizes[i], *self.sample_shape)
        if tuple(latents.shape) != expect:
            raise ValueError(f"shard {i} latents have shape {tuple(latents.shape)}, expected {expect}")
        if (labels is None) == self.labelled:
            raise ValueError(f"shard {i}: labels {'missing' if self.labelled else 'given'} for a "
                             f"{'labelled' if self.labelled else 'unlabelled'} store")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError(f"shard {i} contains NaN/Inf latents; check the encoder and inputs")
        tensors = {"latents": latents.detach().to("cpu", _TORCH_DTYPES[self.dtype]).contiguous()}
        if labels is not None:
            tensors["labels"] = labels.detach().to("cpu", torch.int64).contiguous()
        if self.key.pool > 1:
            tensors["keys"] = self.key(tensors["latents"])
        path = self.folder / shard_name(i)
        tmp = path.with_name(f".{path.name}.tmp")
        # one metadata key: safetensors writes a map's keys in hash order (bytes would vary)
        save_file(tensors, str(tmp), metadata={"format": _FORMAT + ".shard"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def finish(self, metadata: dict | None = None) -> StoreManifest:
        """Check every shard, hash it, and write ``manifest.json`` (the store is then complete)."""
        missing = [shard_name(i) for i in range(len(self.shard_sizes)) if not self.done(i)]
        if missing:
            raise ValueError(f"cannot finish {self.folder}: shards {missing[:5]} are not written yet")
        shards = tuple(ShardInfo(shard_name(i), self.starts[i], n, file_sha256(self.folder / shard_name(i)))
                       for i, n in enumerate(self.shard_sizes))
        manifest = StoreManifest(self.starts[-1], self.sample_shape, self.dtype, self.key,
                                 self.labelled, shards, dict(metadata or {}))
        write_json_atomic(self.folder / MANIFEST, manifest.to_json())
        return manifest


def write_store(folder: str | os.PathLike, latents: torch.Tensor, labels: torch.Tensor | None = None,
                *, shard_size: int = 65_536, key: SearchKey = SearchKey(), dtype: str | None = None,
                metadata: dict | None = None) -> StoreManifest:
    """Write in-memory latents ``(N, *shape)`` (and labels ``(N,)``) as a store (resumable)."""
    if latents.dim() < 2 or latents.shape[0] < 1:
        raise ValueError(f"latents must have shape (N, *sample_shape) with N >= 1, got {tuple(latents.shape)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size}")
    n = int(latents.shape[0])
    dtype = dtype or str(latents.dtype).split(".")[-1]
    sizes = [min(shard_size, n - i) for i in range(0, n, shard_size)]
    writer = StoreWriter(folder, sample_shape=tuple(latents.shape[1:]), dtype=dtype, key=key,
                         labelled=labels is not None, shard_sizes=sizes,
                         plan={"source": "tensor", **(metadata or {})})
    check_free_disk(writer.folder, writer.bytes_needed())
    for i, start in enumerate(writer.starts[:-1]):
        if not writer.done(i):
            stop = start + sizes[i]
            writer.write(i, latents[start:stop], None if labels is None else labels[start:stop])
    return writer.finish(metadata)
