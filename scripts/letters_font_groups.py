#!/usr/bin/env python
"""Does NoveltySteering's distance target explain the letters testbed's data-copying gap?

The letters training set holds jittered variants of each font (``steersample.letters``): a
training image's nearest other image is a sibling of its own font, nearer than any unseen font,
so the leave-one-out distance target falls short of the held-out fonts' distance. This script
re-renders the letters exactly as ``scripts/train_letters.py`` did, recovers each training
image's font, and audits the rare letters (the audit's seeds, CFG 4, 30 steps) with

- ``NoveltySteering()`` (the defaults: leave-one-out targets), and
- ``NoveltySteering(groups=...)`` with the groups (letter, font): a training image's whole font
  is left out of its target (``steersample.steering.novelty.leave_one_out_distances``).

Nothing else changes. Prints rare-letter Z_U (C_T, worst letter), distance ratio, precision and
accuracy for plain CFG and both, as ``steersample audit`` measures them.

    python scripts/letters_font_groups.py [--rare-samples 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

import torch


def font_groups(info, reference) -> torch.Tensor:
    """``(N,)`` group id (label · 1000 + font) of each training image, from a fresh render."""
    from steersample.letters import render_letters

    config = info.training_config
    x, _, fonts = render_letters(seed=int(config.get("render_seed", 0)), variants=int(config["variants"]))
    train = torch.as_tensor(info.train_indices)
    if not torch.allclose(x[train], reference.latents.cpu(), atol=1e-6):
        raise SystemExit("the re-rendered training images differ from the shipped reference set; "
                         "this script needs the letters default trained by scripts/train_letters.py")
    return reference.labels.cpu().long() * 1000 + fonts[train].long()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rare-samples", type=int, default=128, help="samples per rare letter (128)")
    parser.add_argument("--seed", type=int, default=0, help="the audit's seed (0)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import steersample as ss
    from steersample.default import load_default_info
    from steersample.evaluation.audit import Method, rare_table, run_audit
    from steersample.sampling.guidance import GuidanceSchedule

    pipe, reference = ss.load_default("letters")
    info = load_default_info("letters")
    groups = font_groups(info, reference)
    cfg = GuidanceSchedule.constant(4.0)
    grid = (Method("plain", "plain", None, cfg),
            Method("novelty", "novelty", 1.0, cfg, (ss.NoveltySteering(),)),
            Method("novelty, font groups", "novelty", 1.0, cfg, (ss.NoveltySteering(groups=groups),)))
    audit = run_audit(pipe, reference, info, grid, rare_samples=args.rare_samples, frequent_samples=2,
                      seed=args.seed, timing_repeats=0)
    print("\n".join(rare_table(audit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
