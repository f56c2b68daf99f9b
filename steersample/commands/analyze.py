"""Geometry diagnostics of a class-conditional flow model: local dimension and ridge traces.

Writes plots (PNG) and a Markdown table (``analyze.md``, numbers also in ``analyze.json``) to
``--out``:

1. local dimension (singular values of M = (1 - σ)·∂x̂₀/∂x_σ above 0.5, SCIENCE.md §2) against σ
   for the class-conditional empirical oracle and the model, on forward-noised held-out digits
   (``--at train``: training digits) x_σ = (1 - σ)·x + σ·ε of the rare and of the frequent
   classes (``local_dimension.png``);
2. the oracle's local dimension against training-set size at several σ, on nested subsets of
   the frequent classes (it grows with N, and is 0 for every N once σ is small: the oracle
   memorises), with the model's small-σ dimension at the rare and frequent training sizes
   marked (``dimension_vs_n.png``);
3. reach / align / slide (SCIENCE.md §4): Euler trajectories of the model, their distance to
   the 1-dim log-density ridge of the class's smoothed training set and the normal and
   tangential parts of the model error v̂ - v* against σ (``ridge_trace.png``).
``geometry.png`` puts the three panels side by side. Without ``--model`` the embedded default
model (``steersample.load_default``) is analysed; its metadata names the rare and frequent classes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

__all__ = ["NAME", "HELP", "add_arguments", "run"]

NAME = "analyze"
HELP = "local dimension vs sigma, vs training-set size, and reach/align/slide ridge traces (plots + table)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", type=Path, default=None, metavar="DIR",
      help="a folder written by scripts/train_default.py (default: the embedded model)")
    a("--out", type=Path, default=Path("analyze"), metavar="DIR", help="output folder")
    a("--sigmas", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02],
      help="noise levels of the dimension-vs-sigma curves")
    a("--small-sigma", type=float, default=0.05,
      help="the 'small sigma' of the headline comparison and the training-set-size plot")
    a("--points", type=int, default=8, help="evaluation digits per group (rare / frequent)")
    a("--at", choices=["held-out", "train"], default="held-out",
      help="evaluate the dimension at noised held-out digits or at noised training digits")
    a("--subset-sizes", type=int, nargs="+", default=[2, 5, 10, 20, 50, 130],
      help="training-set sizes of the oracle subsets (capped at the class size)")
    a("--subset-sigmas", type=float, nargs="+", default=[0.5, 0.3, 0.2, 0.1],
      help="noise levels of the dimension-vs-size curves")
    a("--trajectories", type=int, default=2, help="traced trajectories per traced class")
    a("--trace-classes", type=int, nargs="+", default=None,
      help="classes to trace (default: the first rare and the first frequent class)")
    a("--steps", type=int, default=24, help="Euler steps of a traced trajectory")
    a("--ridge-dim", type=int, default=1, help="dimension d of the log-density ridge")
    a("--neighbours", type=int, default=32, help="nearest training samples K used by the ridge")
    a("--seed", type=int, default=0, help="seed of point choice, noise and trajectories")
    a("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from steersample.commands import _analyze_report as report
    from steersample.default import held_out_digits, load_default, load_default_info

    _validate(args)
    pipe, ref = load_default(args.model)
    info = load_default_info(args.model)
    images, labels = held_out_digits(info) if args.at == "held-out" else (ref.latents.cpu(), ref.labels.cpu())
    sigmas = sorted(set(args.sigmas) | {args.small_sigma}, reverse=True)
    gen = torch.Generator().manual_seed(args.seed)
    groups = {"rare": info.rare_classes, "frequent": info.frequent_classes}
    points = {g: _pick_points(images, labels, classes, args.points, gen) for g, classes in groups.items()}
    trace_classes = args.trace_classes or list(info.rare_classes[:1] + info.frequent_classes[:1])
    unknown = sorted(set(trace_classes) - set(ref.classes.tolist()))
    if unknown:
        raise ValueError(f"--trace-classes {unknown} are not in the training set (classes "
                         f"{ref.classes.tolist()}); pick from those")
    sizes = {c: int((ref.labels == c).sum()) for c in ref.classes.tolist()}
    subset_sizes = sorted({min(n, min(sizes[c] for c in info.frequent_classes)) for n in args.subset_sizes})

    total = (2 * len(sigmas) * sum(len(p[0]) for p in points.values())
             + len(subset_sizes) * len(args.subset_sigmas) * len(points["frequent"][0])
             + len(trace_classes) * args.steps)
    bar = tqdm(total=total, desc="analyze", unit="job", disable=args.no_progress)
    dims = _dimension_vs_sigma(pipe, ref, points, sigmas, gen, bar.update)
    by_size = _dimension_vs_size(ref, points["frequent"], subset_sizes, args.subset_sigmas, gen, bar.update)
    traces = _traces(pipe, ref, trace_classes, args, gen, bar.update)
    bar.close()

    result = {
        "model": str(info.path), "rare_classes": list(info.rare_classes),
        "frequent_classes": list(info.frequent_classes), "train_per_class": sizes,
        "dim": ref.dim, "sigmas": sigmas, "small_sigma": args.small_sigma,
        "points_per_group": args.points, "points_at": args.at, "dimension_vs_sigma": dims,
        "subset_sizes": subset_sizes, "subset_sigmas": list(args.subset_sigmas),
        "dimension_vs_size": by_size, "traces": traces, "ridge_dim": args.ridge_dim,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    paths = report.write_all(result, args.out)
    (args.out / "analyze.json").write_text(json.dumps(result, indent=1) + "\n")
    print(report.headline(result))
    for path in paths + [args.out / "analyze.json"]:
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- parts
def _pick_points(images: torch.Tensor, labels: torch.Tensor, classes, count: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """``count`` digits, round-robin over ``classes``, random within a class."""
    pools = {c: (labels == c).nonzero().flatten() for c in classes}
    pools = {c: p[torch.randperm(p.numel(), generator=gen)] for c, p in pools.items() if p.numel()}
    if not pools:
        raise ValueError(f"no digits of classes {list(classes)} to evaluate at; try the other --at")
    picks, picked_labels, order = [], [], sorted(pools)
    for i in range(count):
        c = order[i % len(order)]
        pool = pools[c]
        picks.append(int(pool[(i // len(order)) % pool.numel()]))
        picked_labels.append(c)
    return images[picks], picked_labels


def _dimension_vs_sigma(pipe, ref, points, sigmas, gen, tick) -> dict:
    from steersample.geometry import as_denoiser, local_dimension

    out: dict = {"oracle": {}, "model": {}}
    for group, (x0, labs) in points.items():
        noise = torch.randn(x0.shape, generator=gen)
        oracle_dims = {s: [] for s in sigmas}
        model_dims = {s: [] for s in sigmas}
        for j, c in enumerate(labs):
            oracle_fn, model_fn = as_denoiser(ref, labels=c), as_denoiser(pipe, labels=c)
            for s in sigmas:
                x = (1 - s) * x0[j:j + 1] + s * noise[j:j + 1]
                oracle_dims[s].append(local_dimension(oracle_fn, x.double(), s).dimension)
                tick()
                model_dims[s].append(local_dimension(model_fn, x, s, ad="reverse").dimension)
                tick()
        out["oracle"][group] = {str(s): v for s, v in oracle_dims.items()}
        out["model"][group] = {str(s): v for s, v in model_dims.items()}
    return out


def _dimension_vs_size(ref, frequent_points, sizes, sub_sigmas, gen, tick) -> dict:
    from steersample.geometry import as_denoiser, local_dimension
    from steersample.reference.reference_set import ReferenceSet

    x0, labs = frequent_points
    noise = torch.randn(x0.shape, generator=gen)
    orders = {c: ref.indices(c)[torch.randperm(ref.indices(c).numel(), generator=gen)] for c in set(labs)}
    out: dict = {}
    for n in sizes:
        subsets = {c: as_denoiser(ReferenceSet(ref.latents[order[:n].to(ref.latents.device)]))
                   for c, order in orders.items()}
        row = {}
        for s in sub_sigmas:
            values = []
            for j, c in enumerate(labs):
                x = ((1 - s) * x0[j:j + 1] + s * noise[j:j + 1]).double()
                values.append(local_dimension(subsets[c], x, s).dimension)
                tick()
            row[str(s)] = values
        out[str(n)] = row
    return out


def _traces(pipe, ref, classes, args, gen, tick) -> list[dict]:
    from steersample.geometry import as_denoiser, ridge_trace
    from steersample.evaluation.metrics import nn_ratio

    grid = torch.linspace(1.0, 0.0, args.steps + 1, dtype=torch.float64)[1:-1]
    out = []
    for c in classes:
        model_fn = as_denoiser(pipe, labels=c)
        noise = torch.randn(args.trajectories, *ref.sample_shape, generator=gen)
        with torch.no_grad():   # first Euler step from pure noise (sigma = 1) onto the grid
            x = noise + (float(grid[0]) - 1.0) * (noise - model_fn(noise, 1.0))
        tick()
        trace = ridge_trace(model_fn, ref, x, grid, label=c, dim=args.ridge_dim,
                            k=args.neighbours, max_iter=100, tol=1e-4, refresh_every=5,
                            progress=tick)
        ratio = nn_ratio(trace.trajectory[-1].to(ref.latents.dtype), ref)   # copy if < 1/3
        out.append({
            "label": c, "sigmas": trace.sigmas.tolist(),
            "distance": trace.distance.T.tolist(), "normal_error": trace.normal_error.T.tolist(),
            "tangential_error": trace.tangential_error.T.tolist(),
            "centre_distance": trace.centre_distance.T.tolist(),
            "converged": trace.converged.T.tolist(), "final_nn_ratio": ratio.tolist(),
        })
    return out


def _validate(args: argparse.Namespace) -> None:
    for name in ("points", "trajectories", "steps", "neighbours"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps < 3:
        raise ValueError(f"--steps must be >= 3 (the trace needs interior sigmas), got {args.steps}")
    if args.ridge_dim < 0:
        raise ValueError(f"--ridge-dim must be >= 0, got {args.ridge_dim}")
    for s in list(args.sigmas) + list(args.subset_sigmas) + [args.small_sigma]:
        if not (0.0 < s < 1.0) or math.isnan(s):
            raise ValueError(f"noise levels must lie in (0, 1), got {s}; e.g. --sigmas 0.5 0.1 0.02")
    if any(n < 1 for n in args.subset_sizes):
        raise ValueError(f"--subset-sizes must be >= 1, got {args.subset_sizes}")
