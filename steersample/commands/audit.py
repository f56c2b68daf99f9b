"""Audit memorisation controls on the embedded default model: every method x strength grid point.

``--model letters`` (or the folder ``steersample/assets/letters``) audits the letters testbed with
its own judge, held-out fonts and bands (``steersample.evaluation.audit.TESTBED_BANDS``).

Samples the same seeds with plain CFG, Jain et al.'s delayed and opposite guidance (arXiv
2411.16738), a CFG interval, AttractorRepulsion and RepresentationSteering at several strengths
and their combinations, with the three detectors riding along. Judges rare and frequent classes
separately (copy rate by the ratio test, data-copying Z_U, distance ratio and precision/recall
against each class's held-out digits, class accuracy, FD to the held-out digits, diversity),
counts model evaluations and times every method (interleaved passes without telemetry).

Writes into --out: audit.md (tables, detector curves, targets), audit.json, pareto.png (rare
Z_U against precision and accuracy) and sheet.png (rare-class samples of the key methods, one row each).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

NAME = "audit"
HELP = "memorisation audit of the default model: method x strength grid, detectors, Pareto plot"
DEFAULT_OUT = Path("steersample-out") / "audit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from steersample.commands.compare import DEFAULT_GUIDANCE, DEFAULT_STEPS

    parser.add_argument("--model", type=Path, default=None, metavar="FOLDER",
                        help="a folder written by scripts/train_default.py or train_letters.py, "
                             "a default's name ('digits', 'letters'; default: digits), or "
                             "an SD3/Flux pipeline folder with --reference and --prompts ('prompt': "
                             "the embedded prompt testbed)")
    parser.add_argument("--reference", type=Path, default=None, metavar="STORE",
                        help="prompt models: the training latents (store folder or .safetensors)")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="prompt models: one prompt a line, optionally 'prompt<TAB>group' "
                             "(group 'rare' gets --rare-samples, others --frequent-samples)")
    parser.add_argument("--heldout", type=Path, default=None, metavar="STORE",
                        help="prompt models: held-out real latents (store folder or .safetensors)")
    parser.add_argument("--grid", choices=["default", "quick"], default="default",
                        help="quick: plain, the Jain presets, AttractorRepulsion(0.5) and NoveltySteering() "
                             "with constant CFG and with CFG in navigation only")
    parser.add_argument("--rare-samples", type=int, default=128, help="samples per rare class")
    parser.add_argument("--frequent-samples", type=int, default=48,
                        help="samples per frequent class")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of sample 0 (then +1 each)")
    parser.add_argument("--timing-repeats", type=int, default=3,
                        help="interleaved timing passes per method (0: no timing)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="FOLDER",
                        help="output folder")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="samples per pipeline call (fixed, so any number of processes "
                             "under `accelerate launch` writes the same report)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _validate(args: argparse.Namespace) -> None:
    for name in ("rare_samples", "frequent_samples"):
        if getattr(args, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 2 (FD and diversity "
                             f"need two), got {getattr(args, name)}")
    if args.steps < 2:
        raise ValueError(f"--steps must be at least 2, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.timing_repeats < 0:
        raise ValueError(f"--timing-repeats must be >= 0, got {args.timing_repeats}")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from steersample.evaluation.audit import default_grid, quick_grid, run_audit, select_best, targets
    from steersample.commands.compare import _check_writable, _write_atomic
    from steersample.default import load_default, load_default_info

    from steersample.distributed import Distributed

    from steersample.commands._prompt_runs import uses_prompt_model

    if uses_prompt_model(args):   # an SD3/Flux folder with a reference store
        from steersample.commands._prompt_audit import run_audit as run_prompt_audit

        return run_prompt_audit(args, _check_writable, _write_atomic)
    _validate(args)
    world = Distributed()   # several processes under `accelerate launch`, else this one
    try:
        start = time.perf_counter()
        info = load_default_info(args.model)   # a bad --model fails here, before --out is created
        pipe, reference = load_default(args.model)
        if world.is_main:
            _check_writable(args.out)
        pipe.to(world.device)
        grid = (default_grid if args.grid == "default" else quick_grid)(args.guidance)
        units = len(grid) * (1 + args.timing_repeats)
        with tqdm(total=units, desc="audit", unit="run", disable=args.no_progress or not world.is_main) as bar:
            def progress(text: str) -> None:
                if progress.started:
                    bar.update(1)
                progress.started = True
                bar.set_postfix_str(text)
            progress.started = False
            audit = run_audit(pipe, reference, info, grid, rare_samples=args.rare_samples,
                              frequent_samples=args.frequent_samples, steps=args.steps,
                              seed=args.seed, timing_repeats=args.timing_repeats, progress=progress,
                              world=world, batch_size=args.batch_size)
            bar.update(1)
        if not world.is_main:   # the main process judges and writes the merged results
            world.leave()       # ends a launched helper here (status 0)
            return 0
        best = select_best(audit)
        checks = targets(audit, best)
        seconds = time.perf_counter() - start
        summary = to_json(audit, best, checks, args, seconds)
        summary["settings"]["class_names"] = list(info.class_names)
        markdown = render_markdown(summary)
        plot, sheet = render_pareto(audit, best), render_sheet(audit, best, reference)
        _write_atomic(args.out / "pareto.png", plot)
        _write_atomic(args.out / "sheet.png", sheet)
        _write_atomic(args.out / "audit.json", (json.dumps(summary, indent=1) + "\n").encode())
        _write_atomic(args.out / "audit.md", markdown.encode())
        print(markdown)
        print(f"wrote {args.out / 'audit.md'}, audit.json, pareto.png, sheet.png in {seconds:.0f} s"
              + (f" ({world.world_size} processes)" if world.world_size > 1 else ""))
        return 0
    finally:
        world.close()   # tear down the process group (a launched helper has already left)


# ----------------------------------------------------------------------------- report
def _r(x, digits=3):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), digits)


def to_json(audit, best, checks, args, seconds) -> dict:
    rows = []
    for r in audit.results:
        det = {name: {scope: [{"steps": p.steps, "fraction": _r(p.fraction), "auroc": _r(p.auroc),
                               "tpr_at_1pct": _r(p.tpr_at_1pct)} for p in pts]
                      for scope, pts in scopes.items()} for name, scopes in r.detection.items()}
        rows.append({
            "method": r.method.name, "family": r.method.family, "strength": r.method.strength,
            "guidance": r.method.guidance.to_dict(),
            "steering": [repr(s) for s in r.method.steering],
            "rare": {k: _r(v) for k, v in vars(r.rare).items()},
            "frequent": {k: _r(v) for k, v in vars(r.frequent).items()},
            "model_evals_per_sample": r.model_evals, "seconds": _r(r.seconds),
            "cpu_seconds": _r(r.cpu_seconds), "detection": det,
        })
    return {"settings": {**audit.settings, "guidance": args.guidance, "grid": args.grid},
            "results": rows, "best": best.method.name,
            "targets": [{"target": t, "measured": m, "met": bool(ok)} for t, m, ok in checks],
            "seconds_total": round(seconds, 1),
            "seconds_counts": ("each method's seconds / cpu_seconds: the minimum over "
                               f"{audit.settings.get('timing_repeats')} interleaved timing passes "
                               "of one batch on the main process, without telemetry; "
                               "seconds_total: the main process's whole command"
                               + (f" ({audit.settings.get('processes')} processes sample the "
                                  "judged seeds in parallel)"
                                  if (audit.settings.get('processes') or 1) > 1 else ""))}


def _f(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def _named(classes: list, settings: dict) -> str:
    """``[0, 3, 5]``, and on a testbed other than digits its names: ``[0, 3, 5] (A G M)``."""
    names = settings.get("class_names") or []
    if settings.get("testbed", "digits") == "digits" or not names:
        return str(classes)
    return f"{classes} ({' '.join(names[c] if c < len(names) else '?' for c in classes)})"


def render_markdown(summary: dict) -> str:
    from steersample.evaluation.audit import BANDS

    s = summary["settings"]
    noun = "letters" if s.get("testbed") == "letters" else "digits"
    bands = s.get("bands") or BANDS
    plain = next(r for r in summary["results"] if r["method"] == "plain")
    lines = [
        "# steersample audit", "",
        f"Model `{s['model']}` (commit `{str(s['model_git_commit'])[:12]}`); rare classes "
        f"{_named(s['rare_classes'], s)} x {s['rare_samples']} samples, frequent "
        f"{_named(s['frequent_classes'], s)} x "
        f"{s['frequent_samples']}; {s['steps']} steps, CFG {s['guidance']:g}, seed {s['seed']}. "
        f"Copy: d(NN1)/d(NN2) < 1/3 against the training set. Z_U: Meehan et al.'s data-copying "
        f"test against each class's held-out {noun} (< 0: closer to the training set than unseen "
        f"{noun}; C_T over the group, worst class in brackets); dist: median nearest-training "
        f"distance over held-out's; prec: precision k=3 against held-out; div: mean pairwise "
        f"distance between a class's samples, averaged over the group (held-out {noun}: rare "
        f"{_f(s.get('heldout_diversity', {}).get('rare'), 2)}, frequent "
        f"{_f(s.get('heldout_diversity', {}).get('frequent'), 2)}; below it, samples vary less "
        f"than real data). FD: pooled over the group's classes "
        f"against their held-out {noun} (16-d PCA). Time: min of {s['timing_repeats']} interleaved "
        f"passes of {s['timing_samples']} rare-class samples without telemetry "
        f"({s['torch_threads']} torch threads; the machine is shared, so compare ratios).", "",
        "| method | rare copy | rare acc (worst) | rare Z_U C_T (worst) | rare dist (worst) "
        "| rare prec (worst) | rare div | rare FD | freq acc | freq Z_U | freq prec | freq FD "
        "| evals/sample | s | s vs plain | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        ra, fr = r["rare"], r["frequent"]
        ratio = (f"{r['seconds'] / plain['seconds']:.2f}x"
                 if r["seconds"] and plain["seconds"] else "n/a")
        name = f"**{r['method']}**" if r["method"] == summary["best"] else r["method"]
        lines.append(
            f"| {name} | {_f(ra['copy_rate'], 2)} | {_f(ra['accuracy'], 2)} ({_f(ra['accuracy_min'], 2)}) | "
            f"{_f(ra['z_u'], 1)} ({_f(ra['z_u_min'], 1)}) | {_f(ra['distance_ratio'], 2)} "
            f"({_f(ra['distance_ratio_min'], 2)}) | {_f(ra['precision'], 2)} ({_f(ra['precision_min'], 2)}) | "
            f"{_f(ra['diversity'], 2)} | {_f(ra['fd'], 2)} | {_f(fr['accuracy'], 2)} | {_f(fr['z_u'], 1)} | "
            f"{_f(fr['precision'], 2)} | {_f(fr['fd'], 2)} | {r['model_evals_per_sample']:g} | "
            f"{_f(r['seconds'], 2)} | {ratio} | {_f(r['cpu_seconds'], 2)} |")
    lines += ["", f"Best steered setting: **{summary['best']}**: the highest worst-class rare Z_U "
              f"among the methods meeting every band (every rare class: Z_U >= {bands['z_u']:g}, "
              f"distance ratio >= {bands['distance_ratio']:g}, accuracy >= {bands['accuracy']:g}, "
              f"precision >= {bands['precision']:g}; frequent classes kept); else the most precise "
              "method the data-copying test does not call a copier (Z_U and distance bands, "
              "accuracy); else the highest Z_U among those that stay on the data (accuracy and "
              "precision bands); see "
              "`steersample.evaluation.audit.select_best`. "
              "The sheet shows rare-class samples: nearest training image of each plain sample, "
              "plain, Jain delayed, Jain opposite, best.", "", "## Detection on plain sampling", "",
              "AUROC / TPR at 1 % FPR of \"this sample is a copy\" from each detector's score "
              "averaged over the first k steps; *all* = every sample, *rare* = within the rare "
              "classes only (copy versus novel sample of the same class).", "",
              "| detector | scope | " + " | ".join(
                  f"k={p['steps']} ({p['fraction']:.0%})" for p in _picks(plain)) + " |",
              "|---|---|" + "---|" * len(_picks(plain))]
    for name, scopes in plain["detection"].items():
        for scope, pts in scopes.items():
            chosen = [pts[p["steps"] - 1] for p in _picks(plain)]
            lines.append(f"| {name} | {scope} | " + " | ".join(
                f"{_f(p['auroc'])} / {_f(p['tpr_at_1pct'], 2)}" for p in chosen) + " |")
    lines += ["", "## Targets (issue \"Done when\")", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |"
              for t in summary["targets"]]
    lines += ["", f"Total time {summary['seconds_total']:.0f} s.", ""]
    return "\n".join(lines)


def _picks(plain: dict) -> list[dict]:
    pts = next(iter(next(iter(plain["detection"].values())).values()))
    total = len(pts)
    wanted = sorted({1, max(1, round(0.1 * total)), max(1, int(0.2 * total)), round(0.5 * total), total})
    return [pts[k - 1] for k in wanted]


def render_pareto(audit, best) -> bytes:
    """Two panels, one point per method: worst rare class's data-copying Z_U (x) against its
    precision and its judge accuracy (y); the bands as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from steersample.evaluation.audit import bands_for

    bands = bands_for(audit.settings.get("testbed"))
    markers = {"plain": "s", "jain-delayed": "v", "jain-opposite": "^", "cfg-interval": "D",
               "attractor": "o", "attractor-no-delay": "h", "representation": "P",
               "combination": "X"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, field, label in ((axes[0], "precision_min", "rare precision k=3 vs held-out (worst class)"),
                             (axes[1], "accuracy_min", "rare accuracy, judge (worst class)")):
        for family in dict.fromkeys(r.method.family for r in audit.results):
            pts = [r for r in audit.results if r.method.family == family]
            ax.plot([r.rare.z_u_min for r in pts], [getattr(r.rare, field) for r in pts],
                    markers.get(family, "o"), label=family, ms=7)
            for r in pts:
                ax.annotate(r.method.name.replace("attractor", "AR").replace("representation", "RS"),
                            (r.rare.z_u_min, getattr(r.rare, field)), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.plot([best.rare.z_u_min], [getattr(best.rare, field)], "o", ms=14, mfc="none",
                mec="red", label="best")
        ax.axvline(bands["z_u"], color="grey", ls="--", lw=0.8)
        ax.axhline(bands["precision" if field == "precision_min" else "accuracy"], color="grey",
                   ls="--", lw=0.8)
        ax.set_xlabel("rare data-copying Z_U, worst class (< 0: copying; band >= -3)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("steersample audit: novelty against held-out data vs staying on the data")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def render_sheet(audit, best, reference, per_row: int = 24) -> bytes:
    """Rare-class samples of plain, the Jain presets and the best setting, one row each, with
    the nearest training image of each plain sample in the first row."""
    import numpy as np
    from PIL import Image

    names = ["plain", "jain-delayed", "jain-opposite", best.method.name]
    rows = [r for n in dict.fromkeys(names) for r in audit.results if r.method.name == n]
    rare = audit.settings["rare_classes"]
    n_rare = audit.settings["rare_samples"]
    pick = [c * n_rare + k for c in range(len(rare)) for k in range(min(per_row // len(rare), n_rare))]
    plain = rows[0].samples[pick]
    _, idx = reference.nearest(plain.float(), k=1)
    grids = [reference.latents[idx[:, 0]].float().cpu()] + [r.samples[pick] for r in rows]
    h, w = plain.shape[-2:]
    scale, pad = max(1, 48 // max(h, w)), 2   # digits: 6x, 16x16 letters: 3x
    th, tw = h * scale + pad, w * scale + pad
    img = np.full((len(grids) * th + pad, len(pick) * tw + pad), 255, dtype=np.uint8)
    for i, g in enumerate(grids):
        for j, x in enumerate(g):
            a = ((1 - (x.reshape(h, w).clamp(-1, 1).numpy() + 1) / 2) * 255).astype(np.uint8)
            img[pad + i * th: pad + i * th + h * scale, pad + j * tw: pad + j * tw + w * scale] = \
                np.kron(a, np.ones((scale, scale), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
