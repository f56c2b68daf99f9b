#!/usr/bin/env python
"""Train steersample's embedded default model: a tiny class-conditional flow-matching DiT on 8x8 digits.

What it trains
    A diffusers ``DiTTransformer2DModel`` (pixel space, 1 channel, 8x8, patch 2, 10 classes plus
    the null class 10 for classifier-free guidance) on scikit-learn's bundled digits scaled to
    [-1, 1]. Flow matching in the diffusers convention (``SCIENCE.md``)::

        x_s = (1 - s) * x0 + s * eps,   eps ~ N(0, I),   target v = eps - x0
        loss = mean || v_theta(x_s, timestep=1000 * s, y) - (eps - x0) ||^2

    The noise level ``s`` is drawn uniformly in [0, 1] (``--sigma-sampling uniform``). The
    SD3 logit-normal (arXiv 2403.03206, ``--sigma-sampling logit-normal``) spends less training
    on low noise, the refinement stage where a model learns to land exactly on training images.
    In a short pilot (6,000 steps, rare classes 0/4/7, guidance 4) logit-normal with
    class-balanced batches gave rare copy rates 0.05/0.60/0.55, uniform noise levels with
    3x rare oversampling 0.60/0.75/0.65; the two changes were not separated.

Label dropout (classifier-free guidance)
    diffusers' ``LabelEmbedding`` drops labels itself in training mode with the *global* RNG and,
    because every DiT block owns its own label embedding, independently per block. This script
    switches that off (``dropout_prob = 0`` on every ``LabelEmbedding``) and instead replaces a
    label by the null id ``num_embeds_ada_norm`` (= 10) with probability ``--label-dropout``,
    drawn from the script's own seeded generator, the same for all blocks.

The imbalanced split
    ``steersample.data.split_indices`` with the seed: a *rare* class keeps ``--rare-count``
    random images for training, a *frequent* class ``--frequent-count``; everything else is held
    out (the quality reference for Frechet distance). Batches draw a class first, a rare class with
    weight ``--rare-weight`` (6) and a frequent one with weight 1, then an image of that class
    uniformly. Each rare image is therefore seen about 6 * 130 / 10 = 78 times as often as each
    frequent one: the small model (2 blocks, width 64, 0.2 M parameters) memorises the rare
    classes and generalises on the frequent ones. The rare classes 2, 4 and 8 are the ones whose
    training images lie furthest from the rest of the training set, so a copy is unambiguous
    under the ratio test (class 0 digits are so alike that copies of them are hard to tell apart).

Determinism
    All randomness (initialisation, split, batches, noise, label dropout, evaluation noise) comes
    from ``--seed``. Results are bit-reproducible for the same seed, torch version and thread count
    (``--threads``, default 1; float reductions differ across thread counts). One thread is also
    the fastest setting here: the model is so small that intra-op threading mostly synchronises,
    and on a shared 2-core machine a 2-thread run was several times slower.

Output (``--out``, default ``steersample/assets/default``)
    ``transformer/`` (diffusers format, safetensors), ``scheduler/`` (stock
    ``FlowMatchEulerDiscreteScheduler`` config), ``reference.safetensors`` (the training
    ``ReferenceSet``: latents = training images (N, 1, 8, 8), labels), ``metadata.json`` (split
    indices, rare and frequent classes, training config, git commit, wall time, evaluation).

Evaluation
    After training, ``--eval-samples`` samples per class are drawn with a plain Euler loop and CFG
    (``--eval-guidance``) and judged: copy rate by the ratio test d1/d2 < 1/3 against the training
    set, class accuracy of the scikit-learn judge. ``steersample compare`` is the full report.

Example (the shipped model)::

    python scripts/train_default.py --out steersample/assets/default
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "steersample" / "assets" / "default"
NULL_CLASS = 10


# ----------------------------------------------------------------------------- data and split
def imbalanced_split(labels: torch.Tensor, rare: tuple[int, ...], rare_count: int,
                     frequent_count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted index tensors (train, held_out): ``steersample.data.split_indices`` per-class counts."""
    from steersample.data import split_indices

    counts = {c: rare_count if c in rare else frequent_count for c in range(10)}
    return split_indices(labels, counts, seed=seed)


# ----------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace):
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    model = DiTTransformer2DModel(
        num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=1,
        out_channels=1, num_layers=args.layers, sample_size=getattr(args, "sample_size", 8),
        patch_size=args.patch_size, num_embeds_ada_norm=10, norm_num_groups=1, dropout=0.0,
    )
    # label dropout is done explicitly below, from our generator, identically for all blocks
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


@torch.no_grad()
def euler_sample(model, labels: torch.Tensor, steps: int, guidance: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Plain Euler with CFG on sigmas linspace(1, 1/1000, steps) then 0 (the stock diffusers grid)."""
    size = model.config.sample_size
    x = torch.randn((len(labels), 1, size, size), generator=generator)
    sigmas = torch.cat([torch.linspace(1.0, 1e-3, steps), torch.zeros(1)])
    null = torch.full_like(labels, model.config.num_embeds_ada_norm)  # the null class
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((2 * len(labels),), float(sigma) * 1000.0)
        v = model(hidden_states=torch.cat([x, x]), timestep=t,
                  class_labels=torch.cat([labels, null])).sample
        v_cond, v_uncond = v.chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + (sigma_next - sigma) * v
    return x


def quick_eval(model, train_x, train_y, all_x, all_y, rare, args) -> dict:
    """Copy rate (ratio test vs the training set) and judge accuracy per class."""
    from sklearn.svm import SVC

    judge = SVC(gamma="scale").fit(all_x.flatten(1).numpy(), all_y.numpy())
    g = torch.Generator().manual_seed(args.seed + 1)
    labels = torch.arange(10).repeat_interleave(args.eval_samples)
    x = euler_sample(model, labels, args.eval_steps, args.eval_guidance, g).clamp(-1, 1)
    d = torch.cdist(x.flatten(1).double(), train_x.flatten(1).double())
    d2 = d.topk(2, largest=False).values
    ratio = d2[:, 0] / d2[:, 1].clamp_min(1e-12)
    copy = (ratio < 1.0 / 3.0).float()
    pred = torch.tensor(judge.predict(x.flatten(1).numpy()))
    correct = (pred == labels).float()
    per_class = {c: {"copy_rate": copy[labels == c].mean().item(),
                     "accuracy": correct[labels == c].mean().item()} for c in range(10)}
    rare_m = torch.isin(labels, torch.tensor(rare))
    return {
        "per_class": per_class,
        "rare_copy_rate": copy[rare_m].mean().item(),
        "frequent_copy_rate": copy[~rare_m].mean().item(),
        "frequent_copy_rate_max": max(per_class[c]["copy_rate"] for c in range(10) if c not in rare),
        "rare_copy_rate_min": min(per_class[c]["copy_rate"] for c in rare),
        "rare_accuracy": correct[rare_m].mean().item(),
        "frequent_accuracy": correct[~rare_m].mean().item(),
        "frequent_accuracy_min": min(per_class[c]["accuracy"] for c in range(10) if c not in rare),
    }


# ----------------------------------------------------------------------------- training
def train(args: argparse.Namespace) -> dict:
    state = git_state()  # recorded at the start: other commits may land while training runs
    from steersample.data import load_digits

    all_x, all_y = load_digits()
    rare = tuple(sorted(args.rare_classes))
    train_idx, held_idx = imbalanced_split(all_y, rare, args.rare_count, args.frequent_count,
                                           args.seed)
    train_x, train_y = all_x[train_idx], all_y[train_idx]
    print(f"train {len(train_idx)} images (rare {rare} x {args.rare_count}, frequent x "
          f"{args.frequent_count}), held out {len(held_idx)}", flush=True)
    model, result = fit(args, train_x, train_y, all_x, all_y, rare)
    if args.out is not None:
        save(model, args, train_idx, held_idx, train_x, train_y, rare, result, state)
    return result


def fit(args: argparse.Namespace, train_x: torch.Tensor, train_y: torch.Tensor,
        all_x: torch.Tensor, all_y: torch.Tensor, rare: tuple[int, ...]):
    """Train (all draws from ``args.seed``) and evaluate: ``(EMA model in eval mode, result)``.

    ``train_x`` (N, 1, S, S) with ten classes, labels 0..9 (null class 10); ``all_x``/``all_y``
    the judge's training data; ``args`` as ``parse_args`` gives, plus an optional
    ``sample_size`` (S, default 8; ``scripts/train_letters.py`` uses 16). The global RNG is
    touched only here, for the model initialisation.
    """
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)  # model initialisation only; all later draws use `g`
    g = torch.Generator().manual_seed(args.seed)

    by_class = [torch.nonzero(train_y == c).flatten() for c in range(10)]
    class_sizes = torch.tensor([len(b) for b in by_class])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), class_sizes.cumsum(0)[:-1]])
    order = torch.cat(by_class)  # training indices grouped by class
    class_weights = torch.tensor([args.rare_weight if c in rare else 1.0 for c in range(10)])

    model = build_model(args)
    model.train()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    start, cpu_start = time.time(), time.process_time()
    running = 0.0
    for step in range(1, args.steps + 1):
        # class-balanced batch: class uniform, then an image of that class uniform
        cls = torch.multinomial(class_weights, args.batch_size, replacement=True, generator=g)
        within = (torch.rand(args.batch_size, generator=g) * class_sizes[cls]).long()
        idx = order[offsets[cls] + within]
        x0, y = train_x[idx], train_y[idx]
        drop = torch.rand(args.batch_size, generator=g) < args.label_dropout
        y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        if args.sigma_sampling == "logit-normal":
            sigma = torch.sigmoid(torch.randn(args.batch_size, generator=g))
        else:
            sigma = torch.rand(args.batch_size, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        x_s = (1.0 - s) * x0 + s * eps
        # cosine learning-rate decay after a linear warm-up
        warm = min(1.0, step / args.warmup)
        lr = args.lr * warm * (0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        v = model(hidden_states=x_s, timestep=sigma * 1000.0, class_labels=y).sample
        loss = (v - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)
        running += loss.item()
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            ema_model = copy.deepcopy(model).eval()
            with torch.no_grad():
                for e, p in zip(ema, ema_model.parameters()):
                    p.copy_(e)
            ev = quick_eval(ema_model, train_x, train_y, all_x, all_y, list(rare), args)
            print(f"step {step:6d}  eval: rare copy {ev['rare_copy_rate']:.2f} "
                  f"(min {ev['rare_copy_rate_min']:.2f}), frequent copy "
                  f"{ev['frequent_copy_rate']:.2f} (max {ev['frequent_copy_rate_max']:.2f}), "
                  f"frequent accuracy {ev['frequent_accuracy']:.2f} "
                  f"(min {ev['frequent_accuracy_min']:.2f})", flush=True)
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:6d}  loss {running / args.log_every:.4f}  lr {lr:.2e}  "
                  f"{time.time() - start:7.1f} s", flush=True)
            running = 0.0
    train_seconds = time.time() - start
    train_cpu_seconds = time.process_time() - cpu_start

    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            p.copy_(e)
    model.eval()
    result = {"train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
              "threads": args.threads, "n_params": n_params}
    print(f"training: {train_seconds:.1f} s wall, {train_cpu_seconds:.1f} s CPU "
          f"({args.threads} threads)", flush=True)
    if args.eval_samples > 0:
        result["eval"] = quick_eval(model, train_x, train_y, all_x, all_y, list(rare), args)
        ev = result["eval"]
        print(json.dumps({k: v for k, v in ev.items() if k != "per_class"}, indent=1))
        for c, m in ev["per_class"].items():
            print(f"  class {c} {'rare' if c in rare else 'freq'}  copy {m['copy_rate']:.2f}  "
                  f"acc {m['accuracy']:.2f}")
    return model, result


def git_state() -> dict:
    """The commit this run starts from and whether this script differs from it (``dirty``)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", "scripts/train_default.py"))
        return {"git_commit": commit, "script_dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "script_dirty": None}


def save(model, args, train_idx, held_idx, train_x, train_y, rare, result, state) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from steersample.reference.reference_set import ReferenceSet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "transformer", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler().save_pretrained(out / "scheduler")
    ReferenceSet(train_x, train_y).save(
        out / "reference.safetensors",
        metadata={"description": "training set of the steersample default model"})
    config = {k: v for k, v in vars(args).items() if k != "out"}
    meta = {
        "description": "steersample embedded default: class-conditional flow-matching DiT on "
                       "scikit-learn 8x8 digits in [-1, 1], imbalanced split",
        "rare_classes": list(rare),
        "frequent_classes": [c for c in range(10) if c not in rare],
        "null_class": NULL_CLASS,
        "split": {"train_indices": train_idx.tolist(), "held_out_indices": held_idx.tolist(),
                  "train_per_class": [int((train_y == c).sum()) for c in range(10)]},
        "training_config": config,
        "command": "python scripts/train_default.py " + " ".join(sys.argv[1:]),
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
    a("--seed", type=int, default=0, help="seed for everything (default 0)")
    a("--threads", type=int, default=1,
      help="torch CPU threads (default 1: the tensors are tiny, a second thread mostly waits)")
    a("--rare-classes", type=int, nargs="+", default=[2, 4, 8], help="rare classes")
    a("--rare-count", type=int, default=10, help="training images per rare class (<= 10)")
    a("--frequent-count", type=int, default=130, help="training images per frequent class")
    a("--rare-weight", type=float, default=6.0,
      help="batch-sampling weight of a rare class relative to a frequent one (1: class-balanced)")
    a("--sigma-sampling", choices=["uniform", "logit-normal"], default="uniform",
      help="distribution of the training noise level")
    a("--heads", type=int, default=2, help="attention heads")
    a("--head-dim", type=int, default=32, help="channels per head")
    a("--layers", type=int, default=2, help="transformer blocks")
    a("--patch-size", type=int, default=2, help="patch size (8 must be divisible by it)")
    a("--steps", type=int, default=10000, help="optimiser steps")
    a("--batch-size", type=int, default=256, help="batch size")
    a("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--warmup", type=int, default=200, help="linear warm-up steps")
    a("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    a("--label-dropout", type=float, default=0.1, help="probability of the null label (CFG)")
    a("--log-every", type=int, default=1000, help="print the loss every N steps")
    a("--eval-samples", type=int, default=20, help="samples per class for the final check (0: skip)")
    a("--eval-every", type=int, default=0, help="also evaluate the EMA weights every N steps")
    a("--eval-steps", type=int, default=30, help="Euler steps for the final check")
    a("--eval-guidance", type=float, default=4.0, help="CFG scale for the final check")
    args = p.parse_args(argv)
    if not 1 <= args.rare_count <= 10:
        p.error(f"--rare-count must be in 1..10, got {args.rare_count}")
    if 8 % args.patch_size:
        p.error(f"--patch-size must divide 8, got {args.patch_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    train(args)
    print(f"wall time {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
