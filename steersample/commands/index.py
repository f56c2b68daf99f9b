"""Build and inspect large reference stores: sharded safetensors latents plus a FAISS index.

  steersample index build OUT --images DIR --vae PIPELINE_OR_VAE_FOLDER [--pool 2] [--skip-bad]
  steersample index build OUT --tensor reference.safetensors
  steersample index info OUT [--verify]

`build` encodes every image under DIR with the VAE (batched, with a progress bar) or shards an
existing ReferenceSet file, writes safetensors shards into OUT, then a FAISS index chosen by
size (flat, HNSW, IVF, IVF-PQ) over the search keys (the latents, or --pool F average-pooled
copies). Re-running the same command resumes an interrupted build: finished shards are kept,
never recomputed. Open the result with steersample.reference.sharded.ShardedReferenceSet.open(OUT).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["NAME", "HELP", "add_arguments", "run", "load_vae"]

NAME = "index"
HELP = "build a sharded, memory-mapped reference store with a FAISS index (from images or a tensor file)"


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size {text!r} must look like WIDTHxHEIGHT, e.g. 512x512")
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    build = sub.add_parser("build", help="encode images (or shard a tensor file) and index them",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("out", type=Path, metavar="OUT", help="store folder (created; resumed if it exists)")
    src = build.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, metavar="DIR", help="folder of images (searched recursively)")
    src.add_argument("--tensor", type=Path, metavar="FILE",
                     help="a ReferenceSet safetensors file (ReferenceSet.save) to shard and index")
    build.add_argument("--vae", type=Path, metavar="FOLDER",
                       help="a diffusers pipeline folder (with vae/) or VAE folder; needed with --images")
    build.add_argument("--image-size", type=_size, default=None, metavar="WxH",
                       help="expected image size (default: the most common size in DIR)")
    build.add_argument("--skip-bad", action="store_true",
                       help="leave out unreadable or differently sized images (listed in the manifest)")
    build.add_argument("--labels-from-folders", action="store_true",
                       help="label each image by its top-level sub-folder (DIR/<class>/...)")
    build.add_argument("--shard-size", type=int, default=4096, help="rows per shard")
    build.add_argument("--batch-size", type=int, default=16, help="images per VAE call")
    build.add_argument("--pool", type=int, default=1,
                       help="search key = latents average-pooled over FxF blocks (1 = the latents)")
    build.add_argument("--kind", choices=("auto", "flat", "hnsw", "ivf", "ivfpq", "none"), default="auto",
                       help="FAISS index kind (auto: by size; none: shards only)")
    build.add_argument("--target-recall", type=float, default=0.95,
                       help="candidate recall@10 the search breadth is calibrated for")
    build.add_argument("--reindex", action="store_true", help="rebuild the index even if a valid one exists")
    build.add_argument("--device", default="cpu", help="torch device for the VAE")
    build.add_argument("--no-progress", action="store_true", help="hide progress bars")
    info = sub.add_parser("info", help="validate a store and print what it holds")
    info.add_argument("out", type=Path, metavar="OUT", help="store folder")
    info.add_argument("--verify", action="store_true", help="also check every shard's SHA-256")


def load_vae(path: Path, device: str = "cpu"):
    """A diffusers VAE from a pipeline folder (``vae/`` inside) or a VAE folder, offline."""
    import json

    import diffusers

    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no VAE at {path}: expected {path / 'vae' / 'config.json'} (pipeline "
                                f"folder) or {path / 'config.json'} (VAE folder)")
    name = json.loads(config.read_text()).get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "encode") or not issubclass(cls, diffusers.ModelMixin):
        raise ValueError(f"{config} names class {name!r}, which is not a diffusers autoencoder; "
                         f"pass the folder of an AutoencoderKL (or a pipeline containing vae/)")
    return cls.from_pretrained(folder, local_files_only=True).to(device).eval()


def _build(args: argparse.Namespace) -> int:
    from steersample.reference.index import SearchKey
    from steersample.reference.sharded import ShardedReferenceSet

    for name in ("shard_size", "batch_size", "pool"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not 0.0 < args.target_recall <= 1.0:
        raise ValueError(f"--target-recall must lie in (0, 1], got {args.target_recall}")
    key = SearchKey(args.pool)
    start = time.perf_counter()
    if args.images is not None:
        from steersample.reference.encode import encode_folder

        if args.vae is None:
            raise ValueError("--images needs --vae FOLDER (the pipeline whose latents the store holds)")
        manifest = encode_folder(args.images, load_vae(args.vae, args.device), args.out,
                                 shard_size=args.shard_size, batch_size=args.batch_size, key=key,
                                 image_size=args.image_size, skip_bad=args.skip_bad,
                                 labels_from_folders=args.labels_from_folders,
                                 progress=not args.no_progress)
    else:
        from steersample.reference.reference_set import ReferenceSet
        from steersample.reference.store import write_store

        ref = ReferenceSet.load(args.tensor)
        manifest = write_store(args.out, ref.latents, ref.labels, shard_size=args.shard_size, key=key,
                               metadata={"tensor_file": str(args.tensor.resolve())})
    encoded = time.perf_counter() - start
    ref = ShardedReferenceSet.open(args.out, index=not args.reindex)
    if args.kind != "none" and ref.index is None:
        t0 = time.perf_counter()
        ref.build_index(args.kind, target_recall=args.target_recall, progress=not args.no_progress)
        print(f"indexed {len(ref)} keys in {time.perf_counter() - t0:.1f} s: {ref.index!r}")
    skipped = manifest.metadata.get("skipped") or []
    print(f"{args.out}: {manifest.count} latents of shape {manifest.sample_shape} in "
          f"{len(manifest.shards)} shards ({encoded:.1f} s, {manifest.count / max(encoded, 1e-9):.0f} rows/s)"
          + (f", {len(skipped)} images skipped" if skipped else ""))
    return 0


def _info(args: argparse.Namespace) -> int:
    from steersample.reference.sharded import ShardedReferenceSet

    ref = ShardedReferenceSet.open(args.out, verify=args.verify)
    m = ref.manifest
    print(f"store {args.out} (id {m.store_id}): {m.count} latents {m.sample_shape} {m.dtype}, "
          f"{len(m.shards)} shards, key {m.key.to_dict()} (dim {m.key_dim}), "
          f"{'labelled' if m.labelled else 'unlabelled'}")
    print(f"index: {ref.index!r}" if ref.index is not None else "index: none")
    print("shards verified (SHA-256)" if args.verify else "shards: headers and sizes checked")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _build(args) if args.action == "build" else _info(args)
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as err:  # e.g. not enough disk: the CLI prints ValueErrors as clean errors
        raise ValueError(str(err)) from err
