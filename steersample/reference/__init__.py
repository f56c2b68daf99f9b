"""Reference sets: the training data that steering reads and that copies are measured against.

``ReferenceSet`` (in memory, kNN, safetensors I/O), ``ShardedReferenceSet`` over a memory-mapped
store folder (``store``), FAISS indexes (``index``, ``_approximate``) and the VAE encoder that
turns an image folder into a store (``encode``). Imports nothing else from steersample but
``_checks``.
"""

from __future__ import annotations

from steersample._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "IMAGE_SUFFIXES": "steersample.reference.encode",
    "ImageScan": "steersample.reference.encode",
    "scan_images": "steersample.reference.encode",
    "encode_folder": "steersample.reference.encode",
    "encode_pixels": "steersample.reference.encode",
    "vae_fingerprint": "steersample.reference.encode",
    "vae_latent_shape": "steersample.reference.encode",
    "check_vae_matches": "steersample.reference.encode",
    "SearchKey": "steersample.reference.index",
    "IndexSpec": "steersample.reference.index",
    "choose_index": "steersample.reference.index",
    "ReferenceIndex": "steersample.reference.index",
    "exact_knn": "steersample.reference.index",
    "calibration_queries": "steersample.reference.index",
    "file_sha256": "steersample.reference.index",
    "write_json_atomic": "steersample.reference.index",
    "FLAT_MAX": "steersample.reference.index",
    "HNSW_MAX": "steersample.reference.index",
    "IVF_FLAT_MAX": "steersample.reference.index",
    "COPY_THRESHOLD": "steersample.reference.ratio",
    "ratio_from_distances": "steersample.reference.ratio",
    "ReferenceSet": "steersample.reference.reference_set",
    "AUTO_INDEX_MIN": "steersample.reference.reference_set",
    "ShardedReferenceSet": "steersample.reference.sharded",
    "StoreManifest": "steersample.reference.store",
    "ShardInfo": "steersample.reference.store",
    "StoreWriter": "steersample.reference.store",
    "write_store": "steersample.reference.store",
    "read_manifest": "steersample.reference.store",
    "mmap_safetensors": "steersample.reference.store",
    "check_free_disk": "steersample.reference.store",
    "shard_name": "steersample.reference.store",
    "MANIFEST": "steersample.reference.store",
    "BUILD_PLAN": "steersample.reference.store",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
