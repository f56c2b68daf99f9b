#!/usr/bin/env python
"""Train steersample's ``letters`` default: a flow-matching DiT on 16x16 letters from matplotlib's fonts.

The second testbed (issue #15, part 4): the same model family, loss, batches, label dropout, EMA
and evaluation as ``scripts/train_default.py`` (whose ``fit`` this script calls), on different
data with a split keyed on *fonts* rather than images.

Data (``steersample.letters``)
    Ten letters ``A B E G K M R S W X`` rendered with matplotlib's FreeType wrapper from the 22
    TTF fonts it ships with latin letters (DejaVu Sans / Sans Mono / Serif and their bold and
    oblique variants, STIXGeneral x 4, cmr10, cmb10, cmss10, cmti10, cmtt10, cmmi10), antialiased,
    centred and scaled to fit 16x16, ``--variants`` (8) per font: variant 0 plain, the others with
    seeded jitter of stroke weight, scale, rotation and sub-pixel shift. Pixels in [-1, 1].

The imbalanced split (``steersample.letters.font_split``)
    A *rare* letter (``--rare-letters``, default A G M: the letters furthest from all other
    letters) is trained on ``--rare-fonts`` (3) fonts from three different families (DejaVu
    Sans incl. Mono, DejaVu Serif, STIX, Computer Modern), ``--rare-variants`` (3) variants of
    each: 9 images. A *frequent* letter is trained on
    ``--frequent-fonts`` (16) fonts, all variants: 128 images. A letter's held-out images are all
    variants of the fonts it was not trained on (19 fonts for a rare letter, 6 for a frequent
    one), so evaluation measures generalisation to unseen fonts. Batches weight a rare letter
    ``--rare-weight`` (3) times a frequent one (the digits use 6 with 10 images per rare class;
    here 16,000 steps instead of 10,000 give each rare image ~85,000 draws, each frequent letter
    2.5x the digits' share). A first run (rare weight 6, 10,000 steps, Sans Mono a family of its
    own) copied A only 52 % of the time (two of its fonts were Sans and Sans Mono, the same A)
    and drew speckled frequent letters.

Model
    ``DiTTransformer2DModel``, 16x16, patch 4 (16 tokens, the digits model's token count and
    cost per step; patch 2 is 4x slower), 2 blocks of width 64, 10 classes plus the null class 10.

Output (``--out``, default ``steersample/assets/letters``)
    The default-model folder format (``transformer/``, ``scheduler/``, ``reference.safetensors``
    with the training images, ``metadata.json`` with the split as indices into
    ``render_letters(seed=--render-seed, variants=--variants)``) plus ``heldout.safetensors``
    (``images``, ``labels``, ``font_ids`` of the held-out set). Deterministic for a seed, torch
    version and thread count. Load with ``steersample.load_default("letters")``.

Example (the shipped model; 16,000 steps took 907 s of CPU, 1,828 s wall on a shared 2-core
machine, 1 thread)::

    python scripts/train_letters.py --out steersample/assets/letters

Result (``scripts/eval_letters.py``: CFG 4, 30 steps, 64 samples per letter): the rare letters
A / G / M copy (ratio-test copy rate 0.86 / 0.86 / 0.89, Meehan Z_U -11.3 / -11.6 / -11.5);
the frequent letters do not (copy rate 0.00, Z_U +1.4 to +7.9: at CFG 4 further from the
training set than unseen fonts are, as for the digits); the judge reads every sample (1.00).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_default as td  # noqa: E402  (the shared training loop: fit, quick_eval, git_state)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "steersample" / "assets" / "letters"


def make_data(args: argparse.Namespace):
    """Render, split: ``(all_x, all_y, all_f, train_idx, held_idx, train_fonts, rare)``."""
    from steersample.letters import LETTERS, font_split, render_letters

    all_x, all_y, all_f = render_letters(seed=args.render_seed, variants=args.variants)
    rare = tuple(sorted(LETTERS.index(c) for c in args.rare_letters))
    train_idx, held_idx, train_fonts = font_split(
        all_f, all_y, rare, rare_fonts=args.rare_fonts, rare_variants=args.rare_variants,
        frequent_fonts=args.frequent_fonts, seed=args.seed)
    return all_x, all_y, all_f, train_idx, held_idx, train_fonts, rare


def train(args: argparse.Namespace) -> dict:
    state = td.git_state()
    try:
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "scripts/train_letters.py", "steersample/letters.py"],
                               capture_output=True, text=True, check=True).stdout.strip()
        state["letters_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        state["letters_dirty"] = None
    all_x, all_y, all_f, train_idx, held_idx, train_fonts, rare = make_data(args)
    train_x, train_y = all_x[train_idx], all_y[train_idx]
    print(f"train {len(train_idx)} images, held out {len(held_idx)}; per letter "
          f"{torch.bincount(train_y, minlength=10).tolist()}", flush=True)
    model, result = td.fit(args, train_x, train_y, all_x, all_y, rare)
    if args.out is not None:
        save(model, args, train_idx, held_idx, train_fonts, all_x, all_y, all_f, rare, result,
             state)
    return result


def save(model, args, train_idx, held_idx, train_fonts, all_x, all_y, all_f, rare, result,
         state) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    from steersample.letters import FONTS, LETTERS
    from steersample.reference.reference_set import ReferenceSet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "transformer", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler().save_pretrained(out / "scheduler")
    ReferenceSet(all_x[train_idx], all_y[train_idx]).save(
        out / "reference.safetensors",
        metadata={"description": "training set of the steersample letters model"})
    save_file({"images": all_x[held_idx].contiguous(), "labels": all_y[held_idx].contiguous(),
               "font_ids": all_f[held_idx].contiguous()}, str(out / "heldout.safetensors"),
              metadata={"description": "held-out letters (fonts unseen for their letter)"})
    config = {k: v for k, v in vars(args).items() if k != "out"}
    train_y = all_y[train_idx]
    meta = {
        "description": "steersample letters default: class-conditional flow-matching DiT on "
                       "16x16 letters rendered from matplotlib's fonts, in [-1, 1], imbalanced "
                       "split keyed on fonts",
        "letters": list(LETTERS),
        "fonts": list(FONTS),
        "rare_classes": list(rare),
        "frequent_classes": [c for c in range(10) if c not in rare],
        "null_class": td.NULL_CLASS,
        "split": {"train_indices": train_idx.tolist(), "held_out_indices": held_idx.tolist(),
                  "train_per_class": [int((train_y == c).sum()) for c in range(10)],
                  "train_fonts": {LETTERS[c]: [FONTS[f] for f in fs]
                                  for c, fs in train_fonts.items()},
                  "indices_into": f"steersample.letters.render_letters(seed={args.render_seed}, "
                                  f"variants={args.variants})"},
        "training_config": config,
        "command": "python scripts/train_letters.py " + " ".join(sys.argv[1:]),
        **state,
        "torch_version": torch.__version__,
        "result": result,
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"saved to {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package asset)")
    a("--no-save", dest="out", action="store_const", const=None, help="train and evaluate only")
    a("--seed", type=int, default=0, help="seed of the split, the model and training (default 0)")
    a("--render-seed", type=int, default=0, help="seed of the rendering augmentations")
    a("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    a("--variants", type=int, default=8, help="rendered variants per font and letter")
    a("--rare-letters", nargs="+", default=["A", "G", "M"], help="rare letters")
    a("--rare-fonts", type=int, default=3, help="training fonts per rare letter")
    a("--rare-variants", type=int, default=3, help="training variants per font of a rare letter")
    a("--frequent-fonts", type=int, default=16, help="training fonts per frequent letter")
    a("--rare-weight", type=float, default=3.0, help="batch weight of a rare letter")
    a("--sigma-sampling", choices=["uniform", "logit-normal"], default="uniform")
    a("--heads", type=int, default=2, help="attention heads")
    a("--head-dim", type=int, default=32, help="channels per head")
    a("--layers", type=int, default=2, help="transformer blocks")
    a("--patch-size", type=int, default=4, help="patch size (must divide 16)")
    a("--steps", type=int, default=16000, help="optimiser steps")
    a("--batch-size", type=int, default=256, help="batch size")
    a("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--warmup", type=int, default=200, help="linear warm-up steps")
    a("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    a("--label-dropout", type=float, default=0.1, help="probability of the null label (CFG)")
    a("--log-every", type=int, default=1000, help="print the loss every N steps")
    a("--eval-samples", type=int, default=20, help="samples per class for the final check")
    a("--eval-every", type=int, default=0, help="also evaluate the EMA weights every N steps")
    a("--eval-steps", type=int, default=30, help="Euler steps for the checks")
    a("--eval-guidance", type=float, default=4.0, help="CFG scale for the checks")
    args = p.parse_args(argv)
    from steersample.letters import LETTER_SIZE, LETTERS

    bad = [c for c in args.rare_letters if c not in LETTERS]
    if bad:
        p.error(f"--rare-letters {bad} not among {LETTERS}")
    if LETTER_SIZE % args.patch_size:
        p.error(f"--patch-size must divide {LETTER_SIZE}, got {args.patch_size}")
    args.sample_size = LETTER_SIZE
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    train(args)
    print(f"wall time {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
