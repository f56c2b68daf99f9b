"""Image folder -> VAE latents -> a reference store (``steersample.reference.store``), resumably.

    manifest = encode_folder("portfolio/", vae, "refstore/", shard_size=4096, batch_size=32)

Steps:
1. **scan**: every image under the folder (sorted relative paths; ``.png .jpg .jpeg .webp .bmp``)
   is decoded once. Unreadable files and files whose size differs from the expected one (the
   most common size, or ``image_size``) are listed with their names; the build stops unless
   ``skip_bad=True``, in which case they are left out and recorded in the manifest.
2. **plan**: shards of ``shard_size`` images in that order; the plan (file list digest, VAE
   fingerprint, sizes) is saved as ``build.json``. A re-run with the same inputs resumes; a
   re-run with other inputs (another VAE, changed files) is refused.
3. **disk**: the bytes of the unfinished shards are checked against the free space first.
4. **encode**: batches through ``vae.encode(pixels).latent_dist.mode()`` (deterministic), then
   the diffusers latent normalisation ``(z - shift_factor) * scaling_factor``; a tqdm bar counts
   images. Each shard is written atomically as soon as it is full, so an interruption loses at
   most the shard in progress and a finished shard is never recomputed.

Labels: with ``labels_from_folders=True`` the first path component is the class (ImageFolder
convention: sorted folder names -> 0, 1, ...), recorded in the manifest as ``class_names``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from steersample.reference.index import SearchKey
from steersample.reference.store import StoreManifest, StoreWriter, check_free_disk

__all__ = ["IMAGE_SUFFIXES", "ImageScan", "scan_images", "encode_folder", "encode_pixels",
           "vae_fingerprint", "vae_latent_shape", "check_vae_matches"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_SHOW = 20  # bad files named in an error message


@dataclass(frozen=True)
class ImageScan:
    """Result of :func:`scan_images`.

    Attributes:
        files: usable images, relative paths in sorted order.
        size: the common ``(width, height)``.
        unreadable: ``(path, reason)`` for files that could not be decoded.
        mismatched: ``(path, (width, height))`` for files of another size.
    """

    root: Path
    files: tuple[str, ...]
    size: tuple[int, int]
    unreadable: tuple[tuple[str, str], ...]
    mismatched: tuple[tuple[str, tuple[int, int]], ...]

    @property
    def bad(self) -> list[str]:
        return [p for p, _ in self.unreadable] + [p for p, _ in self.mismatched]

    def describe_bad(self) -> str:
        lines = [f"  {p}: unreadable ({why})" for p, why in self.unreadable]
        lines += [f"  {p}: size {w}x{h}, expected {self.size[0]}x{self.size[1]}" for p, (w, h) in self.mismatched]
        more = f"\n  ... and {len(lines) - _SHOW} more" if len(lines) > _SHOW else ""
        return "\n".join(lines[:_SHOW]) + more


def scan_images(folder: str | os.PathLike, image_size: tuple[int, int] | None = None,
                progress: bool = True) -> ImageScan:
    """Find and decode every image under ``folder`` (see the module docstring, step 1)."""
    from PIL import Image
    from tqdm.auto import tqdm

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist; pass a folder of images")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    sizes, unreadable = {}, []
    for rel in tqdm(paths, desc="scan", unit="img", disable=not progress):
        try:
            with Image.open(root / rel) as im:
                im.load()
                sizes[rel] = tuple(im.size)
        except Exception as err:  # PIL raises many types for broken files
            unreadable.append((rel, f"{type(err).__name__}: {err}"))
    if image_size is None:
        if not sizes:
            raise ValueError(f"none of the {len(paths)} images under {root} could be read")
        image_size = Counter(sizes.values()).most_common(1)[0][0]
    size = (int(image_size[0]), int(image_size[1]))
    mismatched = tuple((p, s) for p, s in sizes.items() if s != size)
    files = tuple(p for p in paths if sizes.get(p) == size)
    return ImageScan(root, files, size, tuple(unreadable), mismatched)


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """SHA-256 of the VAE's class, config and every parameter and buffer (names and bytes)."""
    h = hashlib.sha256(type(vae).__name__.encode())
    config = getattr(vae, "config", None)
    if config is not None:
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _channels(vae) -> int:
    return int(getattr(getattr(vae, "config", None), "in_channels", 3))


def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Latents of ``pixels`` ``(B, C, H, W)`` in [-1, 1]: ``(mode - shift) * scale``, float32 CPU."""
    param = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        z = dist.mode().to(torch.float32)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    return ((z - shift) * scale).cpu()


def vae_latent_shape(vae, image_size: tuple[int, int]) -> tuple[int, ...]:
    """Latent shape the VAE gives for images of ``(width, height)`` (one zero image encoded)."""
    w, h = image_size
    return tuple(encode_pixels(vae, torch.zeros(1, _channels(vae), h, w)).shape[1:])


def check_vae_matches(sample_shape: tuple[int, ...], vae, image_size: tuple[int, int]) -> None:
    """Raise ``ValueError`` when the VAE's latents for ``image_size`` differ from the store's."""
    got = vae_latent_shape(vae, image_size)
    if tuple(got) != tuple(sample_shape):
        raise ValueError(f"the VAE encodes {image_size[0]}x{image_size[1]} images to latents of "
                         f"shape {got}, but the reference store holds latents of shape "
                         f"{tuple(sample_shape)}; use the VAE (and image size) the store was built with")


def _load_pixels(root: Path, rels: list[str], channels: int) -> torch.Tensor:
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for rel in rels:
        with Image.open(root / rel) as im:
            arrays.append(np.asarray(im.convert(mode), dtype=np.float32).reshape(im.size[1], im.size[0], -1))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def _file_digest(root: Path, files: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for rel in files:
        h.update(f"{rel}\0{(root / rel).stat().st_size}\n".encode())
    return h.hexdigest()


def encode_folder(folder: str | os.PathLike, vae, out: str | os.PathLike, *,
                  shard_size: int = 4096, batch_size: int = 16, key: SearchKey = SearchKey(),
                  image_size: tuple[int, int] | None = None, skip_bad: bool = False,
                  labels_from_folders: bool = False, dtype: str = "float32",
                  progress: bool = True) -> StoreManifest:
    """Encode every image under ``folder`` with ``vae`` into a store at ``out``.

    Returns the store's manifest; raises ``ValueError`` listing bad images unless ``skip_bad``,
    and ``OSError`` when the disk cannot hold the shards (checked before writing).
    """
    from tqdm.auto import tqdm

    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    scan = scan_images(folder, image_size, progress)
    if scan.bad and not skip_bad:
        raise ValueError(f"{len(scan.bad)} of {len(scan.files) + len(scan.bad)} images under "
                         f"{scan.root} cannot be used:\n{scan.describe_bad()}\nfix or remove them, "
                         f"or pass skip_bad=True (--skip-bad) to leave them out")
    if not scan.files:
        raise ValueError(f"no usable images under {scan.root}")
    class_names, labels = None, None
    if labels_from_folders:
        tops = [rel.split("/", 1) for rel in scan.files]
        if any(len(t) < 2 for t in tops):
            raise ValueError("labels_from_folders needs every image inside a class folder "
                             "(folder/<class>/<image>); found images directly under the root")
        class_names = sorted({t[0] for t in tops})
        labels = torch.tensor([class_names.index(t[0]) for t in tops], dtype=torch.int64)
    channels = _channels(vae)
    sample_shape = vae_latent_shape(vae, scan.size)
    n = len(scan.files)
    sizes = [min(shard_size, n - i) for i in range(0, n, shard_size)]
    plan = {"source": "images", "root": str(scan.root.resolve()), "image_size": list(scan.size),
            "files_sha256": _file_digest(scan.root, scan.files), "count": n,
            "vae_sha256": vae_fingerprint(vae), "skipped": sorted(scan.bad),
            "class_names": class_names}
    writer = StoreWriter(out, sample_shape=sample_shape, dtype=dtype, key=key,
                         labelled=labels is not None, shard_sizes=sizes, plan=plan)
    check_free_disk(writer.folder, writer.bytes_needed())
    done = [writer.done(i) for i in range(len(sizes))]
    with tqdm(total=n, initial=sum(s for s, d in zip(sizes, done) if d), desc="encode",
              unit="img", disable=not progress) as bar:
        for i, start in enumerate(writer.starts[:-1]):
            if done[i]:
                continue
            latents = []
            for b in range(start, start + sizes[i], batch_size):
                rels = list(scan.files[b:min(b + batch_size, start + sizes[i])])
                latents.append(encode_pixels(vae, _load_pixels(scan.root, rels, channels)))
                bar.update(len(rels))
            writer.write(i, torch.cat(latents), None if labels is None else labels[start:start + sizes[i]])
    meta = {**{k: v for k, v in plan.items() if k != "skipped"},
            "skipped": [{"file": p, "reason": r} for p, r in scan.unreadable]
            + [{"file": p, "reason": f"size {s[0]}x{s[1]}"} for p, s in scan.mismatched]}
    return writer.finish(meta)
