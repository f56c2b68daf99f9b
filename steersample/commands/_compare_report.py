"""Report pieces of ``steersample compare``: the JSON summary, its Markdown table, the PNG sheet.

Kept apart from the command so the command reads as "validate, generate, judge, write".
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

__all__ = ["render_markdown", "render_sheet", "summarise"]


def _group(report, samples, labels, held_x, held_y, classes, judge=None) -> dict:
    """Copy rate, accuracy and FD pooled over the samples of ``classes`` (``judge``: the
    testbed's, default the digits')."""
    from steersample.evaluation.judge import digits_judge

    frechet_distance = (judge or digits_judge()).frechet_distance

    figures = report.for_classes(classes)
    mask = torch.isin(labels, torch.tensor(list(classes), dtype=labels.dtype))
    held = torch.isin(held_y, torch.tensor(list(classes), dtype=held_y.dtype))
    fd = None
    if int(mask.sum()) >= 2 and int(held.sum()) >= 2:
        fd = frechet_distance(samples[mask], held_x[held])
    return {"classes": list(classes), **figures, "fd": fd}


def summarise(runs: dict, info, classes: list[int], args, seconds: float,
              reference, judge=None, held=None) -> dict:
    """The JSON report: settings, then per run pooled / rare / frequent / per-class figures.

    ``judge`` and ``held`` (held-out images, labels) default to the testbed's
    (``judge.judge_for(info)``, ``default.held_out(info.path)``)."""
    from steersample.default import held_out
    from steersample.evaluation.judge import judge_for
    from steersample.evaluation.novelty import novelty_by_class

    held_x, held_y = held_out(info.path) if held is None else held
    judge = judge_for(info) if judge is None else judge
    testbed = getattr(info, "testbed", "digits")
    rare = [c for c in classes if c in info.rare_classes]
    frequent = [c for c in classes if c in info.frequent_classes]
    out = {
        "model": str(info.path),
        "model_git_commit": info.git_commit,
        "classes": classes,
        "rare_classes": rare,
        "frequent_classes": frequent,
        "samples_per_class": args.samples,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "copy_test": "ratio d(NN1)/d(NN2) < 1/3 against the training set (pixels)",
        "novelty_test": ("data-copying Z_U (Meehan et al. 2020) and median nearest-training "
                         "distance over held-out's, against each class's held-out "
                         f"{'letters' if testbed == 'letters' else 'digits'}; "
                         "precision/recall k=3 (Kynkaanniemi et al. 2019) against them"),
        "settings": {},
        "results": {},
    }
    if testbed != "digits":   # (the digits report stays as it was)
        out["testbed"] = testbed
        out["class_names"] = list(info.class_names)
    for name, (setting, samples, report, evals, secs) in runs.items():
        labels = torch.tensor(classes).repeat_interleave(args.samples)
        novelty = novelty_by_class(samples, labels, reference, held_x, held_y,
                                   {"rare": rare, "frequent": frequent})
        out["settings"][name] = {"description": setting.description,
                                 "guidance": setting.guidance.to_dict(),
                                 "steering": [getattr(s, "name", str(s)) for s in setting.steering]}
        out["results"][name] = {
            "copy_rate": report.copy_rate,
            "accuracy": report.accuracy,
            "fd": report.fd,
            "rare": ({**_group(report, samples, labels, held_x, held_y, rare, judge),
                      **novelty["groups"]["rare"]} if rare else None),
            "frequent": ({**_group(report, samples, labels, held_x, held_y, frequent, judge),
                          **novelty["groups"]["frequent"]} if frequent else None),
            "per_class": [{"label": r.label, "kind": "rare" if r.label in rare else "frequent",
                           "count": r.count, "copy_rate": r.copy_rate, "accuracy": r.accuracy,
                           "fd": r.fd, "diversity": r.diversity,
                           **novelty["per_class"][r.label]} for r in report.per_class],
            "model_evals_per_sample": evals,
            "model_evals": evals * len(labels),
            "seconds": secs,
        }
    out["seconds_total"] = seconds
    return out


def _f(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _noun(summary: dict) -> str:
    return "letters" if summary.get("testbed") == "letters" else "digits"


def _label(summary: dict, label: int) -> str:
    """``"3"``; with class names (testbeds other than digits) ``"3 G"``."""
    names = summary.get("class_names") or []
    return f"{label} {names[label]}" if label < len(names) else str(label)


def render_markdown(summary: dict) -> str:
    """Markdown: settings, a per-class table (plain vs steered), group rows, cost."""
    res, names = summary["results"], list(summary["results"])
    noun = _noun(summary)
    lines = [
        "# steersample compare",
        "",
        f"Model `{summary['model']}` (trained from commit `{summary['model_git_commit'][:12]}`); "
        f"{summary['samples_per_class']} samples per class, {summary['steps']} steps, "
        f"guidance {summary['guidance']:g}, seed {summary['seed']}.",
        "",
    ]
    for name in names:
        lines.append(f"- **{name}**: {summary['settings'][name]['description']}")
    lines += ["", f"Copy: {summary['copy_test']}. Accuracy: the judge's SVC. FD: to the held-out "
              f"{noun} of that class, 16-d PCA features. Diversity: mean pairwise l2.", ""]
    head = ["class", "kind"]
    for metric in ("copy", "accuracy", "FD", "diversity"):
        head += [f"{metric} {n}" for n in names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    per = {n: {r["label"]: r for r in res[n]["per_class"]} for n in names}
    for label in summary["classes"]:
        row = [_label(summary, label), per[names[0]][label]["kind"]]
        for key, digits in (("copy_rate", 2), ("accuracy", 2), ("fd", 1), ("diversity", 2)):
            row += [_f(per[n][label][key], digits) for n in names]
        lines.append("| " + " | ".join(row) + " |")
    for group in ("rare", "frequent"):
        if res[names[0]][group] is None:
            continue
        row = [f"**{group}**", ", ".join(_label(summary, c) for c in res[names[0]][group]["classes"])]
        for key, digits in (("copy_rate", 2), ("accuracy", 2), ("fd", 1)):
            row += [f"**{_f(res[n][group][key], digits)}**" for n in names]
        row += ["" for _ in names]
        lines.append("| " + " | ".join(row) + " |")
    row = ["**all**", ""]
    for key, digits in (("copy_rate", 2), ("accuracy", 2), ("fd", 1)):
        row += [f"**{_f(res[n][key], digits)}**" for n in names]
    lines += ["| " + " | ".join(row + ["" for _ in names]) + " |", ""]
    lines += _novelty_table(summary, names, per)
    lines += ["| run | model evaluations per sample | model evaluations | seconds | FD (all) "
              "| accuracy (all) | rare Z_U | rare precision |",
              "|---|---|---|---|---|---|---|---|"]
    for n in names:
        rare = res[n]["rare"] or {}
        lines.append(f"| {n} | {res[n]['model_evals_per_sample']} | {res[n]['model_evals']} | "
                     f"{res[n]['seconds']:.2f} | {_f(res[n]['fd'], 2)} | {_f(res[n]['accuracy'], 2)} | "
                     f"{_f(rare.get('z_u'), 1)} | {_f(rare.get('precision'), 2)} |")
    lines += ["", f"Total time {summary['seconds_total']:.1f} s.", ""]
    if summary.get("seconds_counts"):
        lines[-1:-1] = [f"Seconds: {summary['seconds_counts']}.", ""]
    return "\n".join(lines)


def _novelty_table(summary: dict, names: list[str], per: dict) -> list[str]:
    """Markdown rows: data-copying Z_U, distance ratio, precision per class and group."""
    res = summary["results"]
    lines = [f"Novelty: {summary['novelty_test']}. Z_U < 0: closer to the training set than "
             f"unseen real {_noun(summary)} (copying); distance ratio 1: as far as they are."
             + (" Held-out halves of one class against each other score |Z_U| < 1, ratio "
                "0.95-0.99, precision 0.91-0.98." if _noun(summary) == "digits" else ""), ""]
    head = ["class", "kind"]
    for metric in ("Z_U", "distance", "precision"):
        head += [f"{metric} {n}" for n in names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = (("z_u", 1), ("distance_ratio", 2), ("precision", 2))
    for label in summary["classes"]:
        row = [_label(summary, label), per[names[0]][label]["kind"]]
        for key, digits in keys:
            row += [_f(per[n][label].get(key), digits) for n in names]
        lines.append("| " + " | ".join(row) + " |")
    for group in ("rare", "frequent"):
        if res[names[0]][group] is None:
            continue
        row = [f"**{group}** (Z_U: C_T, worst)",
               ", ".join(_label(summary, c) for c in res[names[0]][group]["classes"])]
        row += [f"**{_f(res[n][group].get('z_u'), 1)}** ({_f(res[n][group].get('z_u_min'), 1)})"
                for n in names]
        for key, digits in keys[1:]:
            row += [f"**{_f(res[n][group].get(key), digits)}**" for n in names]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _tile(image: torch.Tensor, scale: int) -> np.ndarray:
    """(1, H, W) in [-1, 1] -> (H*scale, W*scale) grey in [0, 1], dark strokes on white."""
    grey = (1.0 - (image[0].clamp(-1, 1) + 1.0) / 2.0).numpy()
    return np.kron(grey, np.ones((scale, scale)))


def render_sheet(runs: dict, reference, classes: list[int], samples: int, shown: int, info) -> bytes:
    """PNG bytes: one row per class; per run, pairs (sample | nearest training image).

    A red frame marks a copy (ratio test), a grey one a novel sample.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = max(1, min(shown, samples))
    side = int(next(iter(runs.values()))[1].shape[-1])   # 8 (digits), 16 (letters)
    scale, pad, gap = max(1, 32 // side), 3, 24
    cell = side * scale
    pair_w = 2 * cell + 3 * pad
    block_w = shown * (pair_w + pad)
    names = list(runs)
    width = len(names) * block_w + (len(names) - 1) * gap
    row_h = cell + 2 * pad + 6
    canvas = np.ones((len(classes) * row_h, width, 3))
    for run_i, name in enumerate(names):
        _, x, report, _, _ = runs[name]
        _, nn_idx = reference.nearest(x.to(reference.latents.dtype), k=1)
        nearest = reference.latents[nn_idx[:, 0]].float().cpu()
        for row, c in enumerate(classes):
            for j in range(shown):
                k = row * samples + j
                top = row * row_h + 3
                left = run_i * (block_w + gap) + j * (pair_w + pad)
                frame = (0.85, 0.1, 0.1) if bool(report.copy[k]) else (0.75, 0.75, 0.75)
                canvas[top:top + cell + 2 * pad, left:left + pair_w] = frame
                for col, img in enumerate((x[k], nearest[k])):
                    y0, x0 = top + pad, left + pad + col * (cell + pad)
                    canvas[y0:y0 + cell, x0:x0 + cell] = _tile(img, scale)[..., None]
    fig_w, fig_h = (width + 90) / 100, (canvas.shape[0] + 70) / 100
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=100)
    ax = fig.add_axes((70 / (width + 90), 10 / (canvas.shape[0] + 70), width / (width + 90),
                       canvas.shape[0] / (canvas.shape[0] + 70)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([i * (block_w + gap) + block_w / 2 for i in range(len(names))])
    ax.set_xticklabels([f"{n}  (sample | nearest training image)" for n in names])
    ax.xaxis.tick_top()
    ax.set_yticks([r * row_h + row_h / 2 for r in range(len(classes))])
    names = tuple(getattr(info, "class_names", ())) if getattr(info, "testbed", "digits") != "digits" else ()
    ax.set_yticklabels([f"{c}{f' {names[c]}' if c < len(names) else ''} "
                        f"{'rare' if c in info.rare_classes else 'freq'}" for c in classes])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.text(0.01, 0.005, "red frame: copy (d1/d2 < 1/3 vs training set)", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
