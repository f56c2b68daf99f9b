"""`steersample audit` on a text-to-image folder with a reference store (see ``_prompt_runs``).

The digits audit's guidance presets and AttractorRepulsion strengths (label-free: no
RepresentationSteering, whose hooks are DiT-specific), each judged per prompt group in latent
space: ratio-test copy rate, data-copying Z_U (C_T over the group's prompts, worst prompt),
distance ratio and precision/recall against held-out; model evaluations per sample and the
time of rare-group batches (min of interleaved passes without telemetry). Writes audit.md,
audit.json and sheet.png (plain and the best setting, samples beside their nearest training
image).
"""

from __future__ import annotations

import json
import math
import time

import torch

from steersample.commands._prompt_runs import generate, judge_prompts, load_inputs, seeds_for

__all__ = ["prompt_grid", "run_audit", "select_best"]

_FAMILIES = ("plain", "jain-delayed", "jain-opposite", "cfg-interval", "attractor")   # label-free


def prompt_grid(guidance: float, quick: bool, labelled: bool = False):
    """The digits grid's label-free methods (``evaluation.audit``), AttractorRepulsion at
    strengths 1.5 and 2 (default grid), AttractorRepulsion with Jain et al.'s delayed guidance,
    and, when the store's labels name the prompts (``labelled``: each call passes
    ``reference_labels``), NoveltySteering as in the digits grid."""
    from steersample.evaluation.audit import Method, default_grid, quick_grid
    from steersample.steering.attractor import AttractorRepulsion

    base = (quick_grid if quick else default_grid)(guidance)
    grid = [m for m in base if m.family in _FAMILIES and "trigger" not in m.name]
    delayed = next(m.guidance for m in base if m.name == "jain-delayed")
    if not quick:   # past strength 1 (opposite guidance in refinement): the frontier's far end
        grid += [Method(f"attractor-{s:g}", "attractor", s, base[0].guidance,
                        (AttractorRepulsion(strength=s),)) for s in (1.5, 2.0)]
    grid.append(Method("attractor-0.5+jain-delayed", "combination", 0.5, delayed,
                       (AttractorRepulsion(strength=0.5),)))
    if quick:
        grid = [m for m in grid if m.name != "attractor-0.5+jain-delayed"] + [grid[-1]]
    if labelled:
        grid += [m for m in base if m.family == "novelty"]
    return tuple(grid)


def _figures(row: dict, group: str | None):
    """A prompt audit row's group as :class:`~steersample.evaluation.audit.GroupFigures` (worst
    prompt of each figure from the per-prompt rows; no class judge: accuracy and FD are NaN)."""
    from steersample.evaluation.audit import GroupFigures

    figures = row["groups"].get(group) if group is not None else None
    if figures is None:
        return None

    def num(value) -> float:
        return math.nan if value is None else float(value)

    def worst(key: str) -> float:
        values = [num(p[key]) for p in row["per_prompt"] if p["group"] == group and p[key] is not None]
        return min(values) if values else num(figures.get(key))

    return GroupFigures(copy_rate=num(figures.get("copy_rate")), accuracy=math.nan, fd=math.nan,
                        diversity=math.nan, z_u=num(figures.get("z_u")),
                        z_u_min=num(figures.get("z_u_min", figures.get("z_u"))),
                        distance_ratio=num(figures.get("distance_ratio")),
                        distance_ratio_min=worst("distance_ratio"),
                        precision=num(figures.get("precision")), precision_min=worst("precision"),
                        recall=num(figures.get("recall")))


def select_best(rows: list[dict], group: str) -> dict:
    """The best steered row by the digits audit's tiers (``evaluation.audit.choose_best``) with
    the prompt testbed's bands (``TESTBED_BANDS["prompt"]``: the digits bands, no accuracy):
    every ``group`` prompt Z_U >= -3, distance ratio >= 0.8 and precision >= 0.8 with the other
    prompts kept (a group named "frequent": precision within 0.02 of plain's, |Z_U| + 1),
    highest worst-prompt Z_U first; else the most precise row the data-copying test does not
    call a copier; else the highest worst-prompt Z_U of those that stay on the data; else of all.
    ``rows[0]`` is plain."""
    from types import SimpleNamespace

    from steersample.evaluation.audit import bands_for, choose_best

    other = "frequent" if group != "frequent" and "frequent" in rows[0]["groups"] else None

    def wrap(row: dict):
        return SimpleNamespace(row=row, method=SimpleNamespace(name=row["method"]),
                               rare=_figures(row, group), frequent=_figures(row, other))

    return choose_best(wrap(rows[0]), [wrap(r) for r in rows[1:]], bands_for("prompt")).row


def run_audit(args, check_writable, write_atomic) -> int:
    from tqdm.auto import tqdm

    from steersample.commands._prompt_compare import render_sheet

    for name in ("rare_samples", "frequent_samples"):
        if getattr(args, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 2, got {getattr(args, name)}")
    if args.steps < 2 or args.batch_size < 1 or args.timing_repeats < 0 or not math.isfinite(args.guidance):
        raise ValueError("--steps must be >= 2, --batch-size >= 1, --timing-repeats >= 0 and "
                         "--guidance finite")
    check_writable(args.out)
    start = time.perf_counter()
    inputs = load_inputs(args)
    grid = prompt_grid(args.guidance, args.grid == "quick", inputs.labelled)
    rare = [i for i in inputs.groups.get("rare", [])]
    prompts, seeds, which = [], [], []
    for i in range(len(inputs.prompts)):
        n = args.rare_samples if i in rare else args.frequent_samples
        p, s, w = seeds_for(inputs, [i], n, args.seed)
        prompts, seeds, which = prompts + p, seeds + s, which + w.tolist()
    which = torch.tensor(which)
    batches = [range(s, min(s + args.batch_size, len(seeds))) for s in range(0, len(seeds), args.batch_size)]
    timing_group = rare or list(range(len(inputs.prompts)))
    tp, ts, tw = seeds_for(inputs, timing_group, max(1, -(-args.batch_size // len(timing_group))), args.seed)
    tp, ts, tw = tp[:args.batch_size], ts[:args.batch_size], inputs.labels_of(tw[:args.batch_size].tolist())
    rows, samples_of, times = [], {}, {m.name: [] for m in grid}
    with tqdm(total=len(grid) * (len(batches) + args.timing_repeats), desc="audit", unit="batch",
              disable=args.no_progress) as bar:
        for m in grid:
            parts, evals = [], 0
            for items in batches:
                x, e, _ = generate(inputs, prompts[items.start:items.stop], seeds[items.start:items.stop],
                                   m.guidance, m.steering, args.steps,
                                   labels=inputs.labels_of(which[items.start:items.stop].tolist()))
                parts.append(x)
                evals = max(evals, e)
                bar.update(1)
            samples = torch.cat(parts)
            judged = judge_prompts(inputs, samples, which)
            samples_of[m.name] = (m, samples, judged)
            rows.append({"method": m.name, "family": m.family, "strength": m.strength,
                         "guidance": m.guidance.to_dict(), "steering": [repr(s) for s in m.steering],
                         **{k: v for k, v in judged["overall"].items()}, "groups": judged["groups"],
                         "per_prompt": judged["per_prompt"], "model_evals_per_sample": evals})
        for _ in range(args.timing_repeats):   # interleaved: each pass times every method once
            for m in grid:
                times[m.name].append(generate(inputs, tp, ts, m.guidance, m.steering, args.steps,
                                              labels=tw)[2])
                bar.update(1)
    plain_s = min(times["plain"]) if times["plain"] else None
    for r in rows:
        s = min(times[r["method"]]) if times[r["method"]] else None
        r["seconds"] = None if s is None else round(s, 3)
        r["seconds_vs_plain"] = round(s / plain_s, 3) if s and plain_s else None
    group = "rare" if "rare" in inputs.groups else next(iter(inputs.groups))
    best = select_best(rows, group)
    summary = {"kind": "prompt", **inputs.paths, "pipeline": inputs.kind, "call": inputs.call,
               "groups": {g: [inputs.prompts[i].text for i in m] for g, m in inputs.groups.items()},
               "rare_samples": args.rare_samples, "frequent_samples": args.frequent_samples,
               "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "grid": args.grid,
               "timing": {"repeats": args.timing_repeats, "samples": len(ts),
                          "torch_threads": torch.get_num_threads()},
               "judges_left_out": ["class accuracy (digit SVC)", "Fréchet distance (digit PCA)",
                                   "detector AUROC (needs per-step telemetry; digits audit only)"],
               "results": rows, "best": best["method"], "best_group": group,
               "seconds_total": round(time.perf_counter() - start, 1)}
    sheet = render_sheet({n: samples_of[n] for n in dict.fromkeys(("plain", best["method"]))},
                         inputs, which, 6, rows_of=rare or None)
    markdown = render_markdown(summary)
    write_atomic(args.out / "sheet.png", sheet)
    write_atomic(args.out / "audit.json", (json.dumps(summary, indent=1) + "\n").encode())
    write_atomic(args.out / "audit.md", markdown.encode())
    print(markdown)
    print(f"wrote {args.out / 'audit.md'}, audit.json, sheet.png in {summary['seconds_total']:.0f} s")
    return 0


def _f(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_markdown(summary: dict) -> str:
    groups = list(summary["groups"])
    lines = ["# steersample audit (prompt model)", "",
             f"Model `{summary['model']}`, reference `{summary['reference']}`, held-out "
             f"`{summary['heldout']}`; rare prompts x {summary['rare_samples']}, others x "
             f"{summary['frequent_samples']}; {summary['steps']} steps, CFG {summary['guidance']:g}. "
             "Per group: copy rate (ratio test, latent space), Z_U C_T (worst prompt), distance ratio "
             "and precision k=3 against held-out. Time: min of "
             f"{summary['timing']['repeats']} interleaved passes of {summary['timing']['samples']} "
             "samples. Left out: " + ", ".join(summary["judges_left_out"]) + ".", "",
             "| method | " + " | ".join(f"{g} copy | {g} Z_U (worst) | {g} dist | {g} prec" for g in groups)
             + " | evals/sample | s | vs plain |",
             "|---|" + "---|" * (4 * len(groups) + 3)]
    for r in summary["results"]:
        cells = []
        for g in groups:
            f = r["groups"].get(g, {})
            cells += [_f(f.get("copy_rate")), f"{_f(f.get('z_u'), 1)} ({_f(f.get('z_u_min'), 1)})",
                      _f(f.get("distance_ratio")), _f(f.get("precision"))]
        name = f"**{r['method']}**" if r["method"] == summary["best"] else r["method"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['model_evals_per_sample']} | "
                     f"{_f(r['seconds'], 3)} | {_f(r['seconds_vs_plain'])}x |")
    lines += ["", f"Best steered setting: **{summary['best']}**, by the digits audit's rule on the "
              f"{summary['best_group']} group (`steersample.commands._prompt_audit.select_best`): "
              "the highest worst-prompt Z_U among the methods meeting every band (every prompt: "
              "Z_U >= -3, distance ratio >= 0.8, precision >= 0.8; other prompts kept); else the "
              "most precise method the data-copying test does not call a copier (Z_U and distance "
              "bands); else the highest Z_U among those that stay on the data (precision band).",
              "", f"Total time {summary['seconds_total']:.0f} s.", ""]
    return "\n".join(lines)
