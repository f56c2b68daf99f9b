"""Print the navigation -> refinement phase profile of a reference set and plot it.

For forward-noised reference samples x_sigma = (1 - sigma) x_k + sigma eps, the mean top-1
weight of the exact empirical oracle is tabulated against sigma; sigma* (boundary_sigma) is
where it crosses 0.5 and the refinement sigma where it reaches 0.9 (SCIENCE.md section 1).
Without --reference the bundled scikit-learn digits (1797 images, 1x8x8, in [-1, 1]) are used.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

__all__ = ["NAME", "HELP", "add_arguments", "run"]

NAME = "phase"
HELP = "phase profile (top-1 oracle weight vs sigma, boundary sigma*) of the digits or a reference file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", type=Path, default=None, metavar="FILE.safetensors",
                        help="a ReferenceSet file (default: the bundled digits)")
    parser.add_argument("--out", type=Path, default=Path("phase.png"), metavar="PNG",
                        help="where to write the plot")
    parser.add_argument("--per-class", action="store_true",
                        help="also estimate one class-conditional profile per label")
    parser.add_argument("--num-queries", type=int, default=256,
                        help="forward-noised queries averaged per sigma")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query generator")
    parser.add_argument("--rows", type=int, default=12, help="table rows to print (0: every grid point)")


def run(args: argparse.Namespace) -> int:
    from steersample.data import load_digits
    from steersample.oracle.phases import PhaseProfile
    from steersample.reference.reference_set import ReferenceSet

    if args.num_queries < 1:
        raise ValueError(f"--num-queries must be >= 1, got {args.num_queries}")
    if args.rows < 0:
        raise ValueError(f"--rows must be >= 0, got {args.rows}")
    if args.reference is None:
        images, labels = load_digits()
        ref, source = ReferenceSet(images, labels), "bundled digits (scikit-learn)"
    else:
        ref, source = ReferenceSet.load(args.reference), str(args.reference)
    if args.per_class and ref.classes is None:
        raise ValueError(f"--per-class needs a labelled reference set; {source} has no labels")
    gen = torch.Generator().manual_seed(args.seed)
    profile = PhaseProfile.estimate(ref, gen, num_queries=args.num_queries)
    per_class = (PhaseProfile.estimate_per_class(ref, gen, num_queries=args.num_queries)
                 if args.per_class else {})

    print(f"phase profile of {source}: N={len(ref)}, sample shape {ref.sample_shape}, "
          f"D={ref.dim}, {args.num_queries} queries per sigma")
    print(_table(profile, args.rows))
    print(f"boundary sigma* (top-1 = 0.5): {_fmt(profile.boundary_sigma)}")
    print(f"refinement sigma (top-1 = 0.9): {_fmt(profile.refinement_sigma)}")
    if per_class:
        print("\nper class (class-conditional oracle):")
        print(f"{'class':>6} {'N':>6} {'sigma*':>8} {'sigma@0.9':>10}")
        for label, p in per_class.items():
            print(f"{label:>6} {p.num_reference:>6} {_fmt(p.boundary_sigma):>8} "
                  f"{_fmt(p.refinement_sigma):>10}")
    _plot(profile, per_class, args.out, source)
    print(f"\nwrote {args.out}")
    return 0


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _table(profile, rows: int) -> str:
    n = profile.sigmas.numel()
    picks = range(n) if rows == 0 or rows >= n else sorted(
        {round(i * (n - 1) / (rows - 1)) for i in range(rows)} if rows > 1 else {0})
    lines = [f"{'sigma':>8} {'top1':>8} {'std':>8}"]
    for i in picks:
        lines.append(f"{profile.sigmas[i]:8.3f} {profile.top1[i]:8.4f} {profile.top1_std[i]:8.4f}")
    return "\n".join(lines)


def _plot(profile, per_class: dict, out: Path, source: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, p in per_class.items():
        ax.plot(p.sigmas, p.top1, lw=0.8, alpha=0.5, label=f"class {label}")
    ax.plot(profile.sigmas, profile.top1, color="black", lw=2.0, label="all samples")
    if not math.isnan(profile.boundary_sigma):
        ax.axvline(profile.boundary_sigma, color="tab:red", ls="--",
                   label=f"sigma* = {profile.boundary_sigma:.3f}")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xlabel("sigma (1 = noise)")
    ax.set_ylabel("mean top-1 oracle weight")
    ax.set_xlim(1.0, 0.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_title(f"navigation -> refinement: {Path(source).name if source.endswith('.safetensors') else source}",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2 if per_class else 1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
