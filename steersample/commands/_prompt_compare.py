"""`steersample compare` on a text-to-image folder with a reference store (see ``_prompt_runs``).

Plain and steered samples of every prompt from the same seeds (constant CFG, and the same CFG
plus the recommended steerer, ``recommended_for_scale``: NoveltySteering when the store's labels
name the prompts, else AttractorRepulsion(0.5)), judged in latent
space: ratio-test copy rate against the reference, Meehan et al.'s data-copying Z_U and the
distance ratio against held-out data, precision/recall (k = 3) against held-out; cost as model
evaluations and seconds. The digit judges (SVC accuracy, PCA Fréchet distance) have no meaning
here and are left out. Writes sheet.png (each sample beside its nearest training image, decoded
by the pipeline's VAE, copies framed in red), report.json and report.md.
"""

from __future__ import annotations

import io
import json
import math
import time

import torch

from steersample.commands._timed import Setting
from steersample.commands._prompt_runs import PromptInputs, generate, judge_prompts, load_inputs, seeds_for

__all__ = ["prompt_settings", "run_compare", "render_markdown", "render_sheet", "decode"]

LEFT_OUT = ["class accuracy (the digit SVC judge)", "Fréchet distance (the digits' PCA space)"]


def _validate(args) -> None:
    if getattr(args, "classes", None) is not None:
        raise ValueError("--classes is for the digits model; a prompt model samples the prompts of "
                         "--prompts FILE")
    for name in ("samples", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.samples < 2:
        raise ValueError(f"--samples must be at least 2 (precision/recall need two), got {args.samples}")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")


def prompt_settings(guidance: float, labelled: bool = False) -> tuple[Setting, Setting]:
    """(plain, steered) for a prompt model: constant CFG, and the same CFG plus the recommended
    steerer (``recommended_for_scale``, as ``ss.recommended_steering`` gives for the store):
    ``NoveltySteering()`` when the store's labels name the prompts (``labelled``; the prompt
    audit's best on the prompt testbed by the digits audit's rule, and the digits' best), else
    ``AttractorRepulsion(strength=0.5)`` (NoveltySteering needs each prompt's class). Calls pass
    each prompt's store label as ``reference_labels`` when there is one."""
    from steersample.sampling.guidance import GuidanceSchedule
    from steersample.steering.recommended import recommended_for_scale

    kw = recommended_for_scale(guidance, labelled=labelled)
    return (Setting("plain", f"constant CFG {guidance:g}", GuidanceSchedule.constant(guidance)),
            Setting("steered", f"constant CFG {guidance:g} + " + " + ".join(repr(s) for s in kw["steering"]),
                    kw["guidance"], tuple(kw["steering"])))


def run_compare(args, check_writable, write_atomic) -> int:
    """The prompt-model branch of ``compare.run`` (its file helpers are passed in)."""
    from tqdm.auto import tqdm

    _validate(args)
    check_writable(args.out)
    t0 = time.perf_counter()
    inputs = load_inputs(args)
    indices = list(range(len(inputs.prompts)))
    prompts, seeds, which = seeds_for(inputs, indices, args.samples, args.seed)
    runs = {}
    batches = [range(s, min(s + args.batch_size, len(seeds))) for s in range(0, len(seeds), args.batch_size)]
    with tqdm(total=2 * args.steps * len(batches), desc="compare", unit="step",
              disable=args.no_progress) as bar:
        for setting in prompt_settings(args.guidance, inputs.labelled):
            bar.set_postfix_str(setting.name)
            parts, evals, seconds = [], 0, 0.0
            for items in batches:
                x, e, s = generate(inputs, prompts[items.start:items.stop], seeds[items.start:items.stop],
                                   setting.guidance, setting.steering, args.steps, bar,
                                   labels=inputs.labels_of(which[items.start:items.stop].tolist()))
                parts.append(x)
                evals, seconds = max(evals, e), seconds + s
            samples = torch.cat(parts)
            runs[setting.name] = (setting, samples, judge_prompts(inputs, samples, which), evals, seconds)
    summary = summarise(runs, inputs, args, time.perf_counter() - t0)
    sheet = render_sheet(runs, inputs, which, args.sheet_samples)
    markdown = render_markdown(summary)
    write_atomic(args.out / "sheet.png", sheet)
    write_atomic(args.out / "report.json", (json.dumps(summary, indent=1) + "\n").encode())
    write_atomic(args.out / "report.md", markdown.encode())
    print(markdown)
    print(f"wrote {args.out / 'sheet.png'}, {args.out / 'report.json'}, {args.out / 'report.md'}")
    return 0


def summarise(runs: dict, inputs: PromptInputs, args, seconds: float) -> dict:
    results = {}
    for name, (setting, samples, judged, evals, secs) in runs.items():
        results[name] = {
            "description": setting.description,
            "guidance": setting.guidance.to_dict(),
            "steering": [repr(s) for s in setting.steering],
            **judged["overall"],
            "per_prompt": judged["per_prompt"], "groups": judged["groups"],
            "model_evals_per_sample": evals, "model_evals": evals * samples.shape[0],
            "seconds": round(secs, 3),
        }
    plain = results.get("plain", {}).get("seconds")
    for r in results.values():
        r["seconds_vs_plain"] = round(r["seconds"] / plain, 3) if plain else None
    return {
        "kind": "prompt", **inputs.paths, "pipeline": inputs.kind,
        "latent_shape": list(inputs.latent_shape), "call": inputs.call,
        "prompts": [p.text for p in inputs.prompts],
        "groups": {g: [inputs.prompts[i].text for i in m] for g, m in inputs.groups.items()},
        "samples_per_prompt": args.samples, "steps": args.steps, "guidance": args.guidance,
        "seed": args.seed, "reference_size": len(inputs.reference),
        "heldout_size": None if inputs.heldout is None else len(inputs.heldout),
        "judges_left_out": LEFT_OUT, "results": results,
        "seconds_total": round(seconds, 1), "torch_threads": torch.get_num_threads(),
    }


def _f(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_markdown(summary: dict) -> str:
    res = summary["results"]
    names = list(res)
    lines = [
        "# steersample compare (prompt model)", "",
        f"Model `{summary['model']}` ({summary['pipeline']}), reference `{summary['reference']}` "
        f"({summary['reference_size']} latents {tuple(summary['latent_shape'])}), held-out "
        f"`{summary['heldout']}` ({summary['heldout_size']}); {summary['samples_per_prompt']} samples "
        f"per prompt, {summary['steps']} steps, CFG {summary['guidance']:g}, seed {summary['seed']}. "
        "Copy: d(NN1)/d(NN2) < 1/3 against the reference, in latent space. Z_U: Meehan et al.'s "
        "data-copying test against held-out (< 0: closer to the training set than unseen data); "
        "dist: median nearest-training distance over held-out's; prec/rec: k=3 against held-out. "
        f"Left out (digit-only judges): {', '.join(summary['judges_left_out'])}.", "",
        "| run | setting | copy | Z_U | dist | prec | rec | evals/sample | s | vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = res[n]
        lines.append(f"| {n} | {r['description']} | {_f(r['copy_rate'])} | {_f(r.get('z_u'), 1)} | "
                     f"{_f(r.get('distance_ratio'))} | {_f(r.get('precision'))} | {_f(r.get('recall'))} | "
                     f"{r['model_evals_per_sample']} | {_f(r['seconds'])} | {_f(r['seconds_vs_plain'])}x |")
    lines += ["", "## Per group", "", "| group | run | copy | Z_U (worst prompt) | dist | prec |",
              "|---|---|---|---|---|---|"]
    for g in summary["groups"]:
        for n in names:
            f = res[n]["groups"].get(g, {})
            lines.append(f"| {g} | {n} | {_f(f.get('copy_rate'))} | {_f(f.get('z_u'), 1)} "
                         f"({_f(f.get('z_u_min'), 1)}) | {_f(f.get('distance_ratio'))} | "
                         f"{_f(f.get('precision'))} |")
    lines += ["", "## Per prompt", "", "| prompt | group | " + " | ".join(
        f"copy {n} | Z_U {n} | prec {n}" for n in names) + " |", "|---|---|" + "---|" * 3 * len(names)]
    for i, row in enumerate(res[names[0]]["per_prompt"]):
        cells = []
        for n in names:
            p = res[n]["per_prompt"][i]
            cells += [_f(p["copy_rate"]), _f(p["z_u"], 1), _f(p["precision"])]
        lines.append(f"| {row['prompt']} | {row['group']} | " + " | ".join(cells) + " |")
    lines += ["", f"Total time {summary['seconds_total']:.0f} s.", ""]
    return "\n".join(lines)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of latents in the transformer's layout ``(B, C, h, w)`` -> images in [0, 1]."""
    vae = pipe.vae
    z = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    out = []
    for i in range(0, len(z), 16):
        out.append(vae.decode(z[i:i + 16], return_dict=False)[0].float().clamp(-1, 1))
    return (torch.cat(out) + 1) / 2


def render_sheet(runs: dict, inputs: PromptInputs, which: torch.Tensor, shown: int,
                 tile: int = 64, rows_of: list[int] | None = None) -> bytes:
    """One row per prompt (those in ``rows_of``, default all): for each run (a dict name ->
    ``(setting, samples, judged)``), the first ``shown`` samples of the prompt each beside its
    nearest training image (decoded), copies framed in red."""
    import numpy as np
    from PIL import Image

    rows = [p for p in dict.fromkeys(which.tolist()) if rows_of is None or p in rows_of]
    shown = max(1, min([shown] + [int((which == p).sum()) for p in rows]))
    picks = [int(i) for p in rows for i in torch.nonzero(which == p).flatten()[:shown]]
    names = list(runs)
    latents, flags = [], []
    for n in names:
        x, judged = runs[n][1], runs[n][2]
        _, idx = inputs.reference.nearest(x[picks].float(), k=1)
        latents += [x[picks], inputs.reference.rows(idx[:, 0]).reshape(len(picks), *inputs.latent_shape).float()]
        flags.append(judged["copies"][picks])
    images = decode(inputs.pipe, torch.cat(latents)).permute(0, 2, 3, 1).cpu().numpy()
    pad, gap = 3, 12
    width = len(names) * (shown * (2 * tile + pad) + gap)
    sheet = np.full((len(rows) * (tile + 2 * pad) + pad, width, 3), 255, dtype=np.uint8)
    count = len(picks)
    for r_i, n in enumerate(names):
        base = 2 * r_i * count
        for j, p in enumerate(picks):
            row, k = divmod(j, shown)
            y = pad + row * (tile + 2 * pad)
            x0 = r_i * (shown * (2 * tile + pad) + gap) + k * (2 * tile + pad)
            for off, img in ((0, images[base + j]), (tile, images[base + count + j])):
                arr = (img * 255).astype(np.uint8)
                if arr.shape[2] == 1:
                    arr = np.repeat(arr, 3, axis=2)
                pil = Image.fromarray(arr).resize((tile, tile), Image.NEAREST)
                sheet[y:y + tile, x0 + off:x0 + off + tile] = np.asarray(pil)
            if bool(flags[r_i][j]):
                sheet[y - 2:y, x0:x0 + 2 * tile] = sheet[y + tile:y + tile + 2, x0:x0 + 2 * tile] = (220, 30, 30)
                sheet[y - 2:y + tile + 2, x0:x0 + 2] = sheet[y - 2:y + tile + 2, x0 + 2 * tile - 2:x0 + 2 * tile] = (220, 30, 30)
    # labels: the run names above, each row's prompt (shortened) on the left
    from PIL import ImageDraw

    left, top = 120, 16
    canvas = Image.new("RGB", (sheet.shape[1] + left, sheet.shape[0] + top), (255, 255, 255))
    canvas.paste(Image.fromarray(sheet), (left, top))
    draw = ImageDraw.Draw(canvas)
    for r_i, n in enumerate(names):
        draw.text((left + r_i * (shown * (2 * tile + pad) + gap) + pad, 2), f"{n}: sample | nearest training",
                  fill=(0, 0, 0))
    for row, p in enumerate(rows):
        text = inputs.prompts[p].text
        text = text if len(text) <= 20 else text[:19] + "…"
        draw.text((4, top + pad + row * (tile + 2 * pad) + tile // 2 - 6), text, fill=(0, 0, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
