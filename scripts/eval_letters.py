#!/usr/bin/env python
"""Measure whether the ``letters`` default copies its rare letters and generalises on the others.

Per letter, ``--samples`` (64) plain samples from ``load_default(--model)`` (CFG ``--guidance``
4, ``--steps`` 30, seeds ``class * samples + i``), against the training set ``ref`` and the
held-out set (fonts unseen for that letter):

- ``copy``: ``ss.metrics.copy_rate(samples, ref)`` (ratio test d1/d2 < 1/3 over the whole
  training set); ``copy_cls``: the same with neighbours restricted to the letter's training images;
- ``Z_U``: Meehan, Chaudhuri & Dasgupta (AISTATS 2020) data-copying statistic with cells =
  letters: distances of samples and of held-out images to their nearest training image of the
  letter, Mann-Whitney U (``scipy.stats.mannwhitneyu``) standardised; negative = copying;
- ``dist_ratio``: median nearest-training distance of samples over that of held-out images;
- ``precision``: Kynkaenniemi et al. (k = 3) against the letter's held-out images; for scale,
  the same for half the held-out set against the other half and for the training images;
- ``judge``: accuracy of an SVC (``gamma="scale"``) trained on every rendered letter.

    python scripts/eval_letters.py [--model letters] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch


def z_u(d_samples: torch.Tensor, d_held: torch.Tensor) -> float:
    """Mann-Whitney U of samples vs held-out distances, standardised (negative: samples closer)."""
    from scipy.stats import mannwhitneyu

    m, n = len(d_samples), len(d_held)
    u = mannwhitneyu(d_samples.numpy(), d_held.numpy(), alternative="two-sided").statistic
    return float((u - m * n / 2.0) / math.sqrt(m * n * (m + n + 1) / 12.0))


def precision(samples: torch.Tensor, real: torch.Tensor, k: int = 3) -> float:
    """Share of samples inside the k-NN balls of the real images (Kynkaenniemi et al. 2019)."""
    real = real.flatten(1).double()
    d_rr = torch.cdist(real, real)
    radii = d_rr.topk(k + 1, largest=False).values[:, k]  # k-th neighbour, self excluded
    d_sr = torch.cdist(samples.flatten(1).double(), real)
    return float((d_sr <= radii[None]).any(1).double().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="letters", help="a default name or model folder")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    from sklearn.svm import SVC

    import steersample as ss
    from steersample.default import held_out, load_default, load_default_info
    from steersample.letters import LETTERS, render_letters

    pipe, ref = load_default(args.model)
    info = load_default_info(args.model)
    held_x, held_y = held_out(args.model)
    cfg = info.training_config
    all_x, all_y, _ = render_letters(seed=cfg.get("render_seed", 0),
                                     variants=cfg.get("variants", 8))
    judge = SVC(gamma="scale").fit(all_x.flatten(1).numpy(), all_y.numpy())
    rows = []
    for c, letter in enumerate(LETTERS):
        gens = [torch.Generator().manual_seed(c * args.samples + i) for i in range(args.samples)]
        x = pipe(class_labels=[c] * args.samples, num_inference_steps=args.steps,
                 guidance_scale=args.guidance, generator=gens, output_type="latent").images
        x = x.clamp(-1, 1)
        train_c = ref.latents[ref.labels == c].flatten(1).double()
        held_c = held_x[held_y == c]
        d_s = torch.cdist(x.flatten(1).double(), train_c).min(1).values
        d_h = torch.cdist(held_c.flatten(1).double(), train_c).min(1).values
        pred = torch.as_tensor(judge.predict(x.flatten(1).numpy()))
        rows.append({
            "letter": letter, "rare": c in info.rare_classes, "n_train": int(len(train_c)),
            "n_held": int(len(held_c)),
            "copy": ss.metrics.copy_rate(x, ref),
            "copy_cls": ss.metrics.copy_rate(x, ref, labels=torch.full((len(x),), c)),
            "z_u": z_u(d_s, d_h),
            "dist_ratio": float(d_s.median() / d_h.median()),
            "precision": precision(x, held_c),
            "judge": float((pred == c).double().mean()),
            "held_precision_half": precision(held_c[1::2], held_c[0::2]),
            "train_precision": precision(ref.latents[ref.labels == c], held_c),
        })
        r = rows[-1]
        print(f"{letter} {'rare' if r['rare'] else 'freq'}  train {r['n_train']:3d}  "
              f"copy {r['copy']:.2f}  copy_cls {r['copy_cls']:.2f}  Z_U {r['z_u']:+6.1f}  "
              f"dist_ratio {r['dist_ratio']:.2f}  precision {r['precision']:.2f}  "
              f"judge {r['judge']:.2f}  (precision of: held-out half vs other half "
              f"{r['held_precision_half']:.2f}, training images {r['train_precision']:.2f})",
              flush=True)
    # sanity: letters are recognisable across fonts (an SVC fit on the training set only)
    cross = SVC(gamma="scale").fit(ref.latents.flatten(1).numpy(), ref.labels.numpy())
    cross_acc = float((torch.as_tensor(cross.predict(held_x.flatten(1).numpy())) == held_y)
                      .double().mean())
    print(f"SVC fit on the training set, accuracy on the held-out fonts: {cross_acc:.2f}; "
          f"{time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
