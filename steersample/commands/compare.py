"""Plain versus steered sampling on the same seeds, judged for copies, accuracy and quality.

Loads the embedded default model (or --model FOLDER written by scripts/train_default.py or
scripts/train_letters.py, or a default's name: digits, letters),
draws --samples images of every requested class twice from the same initial noise: once plain
(constant CFG at --guidance) and once steered (the setting named in the report:
``ss.recommended_steering``, today the same CFG in navigation only (sigma > 0.6, the
unconditional prediction below) plus NoveltySteering(), the best setting of `steersample audit`;
a prompt model's store without prompt labels gets constant CFG plus AttractorRepulsion(0.5)).
Every sample is
judged by steersample.evaluation.judge:
copy = ratio test d(NN1)/d(NN2) < 1/3 against the model's training set; class accuracy = an
SVC trained on all 1,797 digits; FD to the held-out digits in a fixed 16-d PCA space;
diversity = mean pairwise distance. On the letters testbed the judge is the same recipe fitted
on every rendered letter (``judge.judge_for(info)``) and the held-out images are its unseen fonts.

Writes into --out: sheet.png (plain | steered, each sample beside its nearest training image,
copies framed in red), report.json and report.md. Existing files are replaced only once the
new ones are complete; nothing else in the folder is touched.

Data-parallel: `accelerate launch --multi_gpu --num_processes N -m steersample.cli compare ...`
splits the seeds into fixed batches of --batch-size over the processes (CPU or GPUs) and the
main process writes exactly the files a one-process run writes (timings aside).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from steersample.commands._timed import Setting

__all__ = ["NAME", "HELP", "DEFAULT_GUIDANCE", "DEFAULT_SAMPLES", "DEFAULT_STEPS", "Setting",
           "add_arguments", "run", "settings"]

NAME = "compare"
HELP = "plain vs steered samples of the embedded default on the same seeds: sheet + report"

DEFAULT_GUIDANCE = 4.0
DEFAULT_SAMPLES = 32
DEFAULT_STEPS = 30
DEFAULT_OUT = Path("steersample-out") / "compare"
DEFAULT_BATCH = 64
_SEED_STRIDE = 10_000  # sample k of class c uses seed + c * _SEED_STRIDE + k


def _describe(guidance) -> str:
    lo, hi = guidance.window
    if (lo, hi) == (0.0, 1.0) or guidance.scale_above == guidance.scale_below == guidance.scale:
        return f"constant CFG {guidance.scale:g}"
    return (f"CFG {guidance.scale:g} for sigma in ({lo:g}, {hi:g}], {guidance.scale_above:g} above, "
            f"{guidance.scale_below:g} below")


def settings(guidance: float) -> tuple[Setting, Setting]:
    """(plain, steered) at CFG scale ``guidance``.

    "Steered" is :func:`steersample.recommended_steering` at the same scale (the setting
    ``steersample audit`` ranks best on the embedded default, judged against held-out digits;
    see the README's audit table), so the CLI, the studio's best preset and a user's pipeline
    call agree.
    """
    from steersample.sampling.guidance import GuidanceSchedule
    from steersample.steering.recommended import recommended_for_scale

    plain = Setting("plain", f"constant CFG {guidance:g}", GuidanceSchedule.constant(guidance))
    kw = recommended_for_scale(guidance)
    steered = Setting("steered", f"{_describe(kw['guidance'])} + "
                      + " + ".join(repr(s) for s in kw["steering"]),
                      kw["guidance"], tuple(kw["steering"]))
    return plain, steered


# ----------------------------------------------------------------------------- arguments
def _class_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"class {text!r} is not an integer; use class ids 0-9 "
                                         "(digits 0-9; letters 0-9 = A B E G K M R S W X)")
    if not 0 <= value <= 9:
        raise argparse.ArgumentTypeError(f"class {value} is outside 0-9; use class ids 0-9")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, metavar="FOLDER",
                        help="a model folder written by scripts/train_default.py, or an SD3/Flux "
                             "pipeline folder with --reference and --prompts ('prompt': the "
                             "embedded prompt testbed) (default: the embedded default)%(default).0s")
    parser.add_argument("--reference", type=Path, default=None, metavar="STORE",
                        help="prompt models: the training latents (a store folder from `steersample "
                             "index build` or a ReferenceSet .safetensors file)%(default).0s")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="prompt models: one prompt a line, optionally 'prompt<TAB>group'%(default).0s")
    parser.add_argument("--heldout", type=Path, default=None, metavar="STORE",
                        help="prompt models: held-out real latents for Z_U and precision/recall "
                             "(store folder or .safetensors)%(default).0s")
    parser.add_argument("--classes", type=_class_id, nargs="+", default=None, metavar="C",
                        help="class ids to sample (default: all, 0-9; letters: 0-9 = A B E G K "
                             "M R S W X)%(default).0s")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="samples per class, for each of plain and steered")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help="CFG scale for both runs (steered: for sigma > 0.6 only, and "
                             "NoveltySteering replaces it for rare-class samples below sigma 0.9)")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"base seed; sample k of class c uses seed + {_SEED_STRIDE}*c + k")
    parser.add_argument("--sheet-samples", type=int, default=8,
                        help="samples per class shown on the sheet")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help="samples per pipeline call (fixed, so any number of processes under "
                             "`accelerate launch` writes the same report)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="FOLDER",
                        help="output folder for sheet.png, report.json and report.md")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress bar%(default).0s")


def _validate(args: argparse.Namespace) -> list[int]:
    classes = list(range(10)) if args.classes is None else list(dict.fromkeys(args.classes))
    for c in classes:
        if not isinstance(c, int) or not 0 <= c <= 9:
            raise ValueError(f"class {c!r} is outside 0-9; pass --classes with digits 0-9")
    for name in ("samples", "steps", "batch_size"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.samples < 2:
        raise ValueError(f"--samples must be at least 2 (diversity and FD need two), got {args.samples}")
    if args.sheet_samples < 0:
        raise ValueError(f"--sheet-samples must be >= 0, got {args.sheet_samples}")
    if not torch.isfinite(torch.tensor(args.guidance)):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")
    return classes


def _check_writable(out: Path) -> None:
    """Create ``out`` if needed and prove a file can be written there (nothing is deleted)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".steersample-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"cannot write to the output folder {str(out)!r} ({err.strerror or err}); "
            f"pass --out with a folder you can write to"
        ) from err


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: an old file survives a failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- generation
def _generate(pipe, setting: Setting, labels: torch.Tensor, seeds: list[int], steps: int,
              bar, reference=None, device: str | torch.device = "cpu") -> tuple[torch.Tensor, int, float]:
    """Samples (B, 1, 8, 8) in [-1, 1], model evaluations per sample, seconds.

    The time is what a user pays for this sampling call: no telemetry is recorded (with a
    reference set that would add an exact-oracle pass per step). Model evaluations are counted
    exactly by a forward hook on the transformer (rows seen / samples; a batched cond+uncond
    call counts 2)."""
    from steersample.commands._timed import timed_call
    from steersample.distributed import seeded_generators

    out, rows, seconds = timed_call(
        pipe, bar, class_labels=labels, guidance=setting.guidance, steering=list(setting.steering),
        reference=reference if setting.steering else None, num_inference_steps=steps,
        generator=seeded_generators(seeds, device))
    return out.images.float().clamp(-1.0, 1.0), rows // len(seeds), seconds


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from steersample.commands._compare_report import render_markdown, render_sheet, summarise
    from steersample.default import held_out, load_default, load_default_info
    from steersample.distributed import Distributed
    from steersample.evaluation.judge import judge_for

    from steersample.commands._prompt_runs import uses_prompt_model

    if uses_prompt_model(args):   # an SD3/Flux folder with a reference store
        from steersample.commands._prompt_compare import run_compare

        return run_compare(args, _check_writable, _write_atomic)
    classes = _validate(args)
    world = Distributed()   # several processes under `accelerate launch`, else this one
    try:
        t0 = time.perf_counter()
        info = load_default_info(args.model)   # a bad --model fails here, before --out is created
        known = set(info.rare_classes) | set(info.frequent_classes)
        if args.classes is None:
            classes = sorted(known)
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise ValueError(f"class(es) {unknown} are not classes of the model {str(info.path)!r}; "
                             f"its classes are {sorted(known)}")
        pipe, reference = load_default(args.model)
        if world.is_main:
            _check_writable(args.out)
        pipe.to(world.device)
        held_x, held_y = held_out(info.path)
        judge = judge_for(info)

        labels = torch.tensor(classes).repeat_interleave(args.samples)
        seeds = [args.seed + _SEED_STRIDE * c + k for c in classes for k in range(args.samples)]
        mine = len(world.my_units(len(seeds), args.batch_size))
        runs = {}
        with tqdm(total=2 * args.steps * mine, desc="compare", unit="step",
                  disable=args.no_progress or not world.is_main) as bar:
            for setting in settings(args.guidance):
                bar.set_postfix_str(setting.name)
                spent = [0.0]

                def unit(items: range) -> dict[str, torch.Tensor]:
                    x, evals, seconds = _generate(pipe, setting, labels[items.start:items.stop],
                                                  seeds[items.start:items.stop], args.steps, bar,
                                                  reference, world.device)
                    spent[0] += seconds
                    return {"x": x, "evals": torch.full((len(items),), evals, dtype=torch.int64)}

                merged = world.map(unit, len(seeds), args.batch_size)
                if world.is_main:
                    samples = merged["x"]
                    report = judge.judge(samples, labels, reference, held_x, held_y)
                    runs[setting.name] = (setting, samples, report, int(merged["evals"].max()), spent[0])
        if not world.is_main:   # the main process judges and writes the merged results
            world.leave()       # ends a launched helper here (status 0)
            return 0

        summary = summarise(runs, info, classes, args, seconds=time.perf_counter() - t0,
                            reference=reference, judge=judge, held=(held_x, held_y))
        summary["processes"] = world.world_size
        summary["seconds_counts"] = (
            "wall seconds on the main process: each run's sampling of the main process's share of "
            f"the seeds (the {world.world_size} processes sample in parallel); seconds_total: the "
            "main process's whole command" if world.world_size > 1 else
            "wall seconds of each run's sampling; seconds_total: the whole command"
        )
        sheet = render_sheet(runs, reference, classes, args.samples, args.sheet_samples, info)
        markdown = render_markdown(summary)
        # all three files exist in memory: only now replace anything on disk
        _write_atomic(args.out / "sheet.png", sheet)
        _write_atomic(args.out / "report.json", (json.dumps(summary, indent=1) + "\n").encode())
        _write_atomic(args.out / "report.md", markdown.encode())
        print(markdown)
        print(f"wrote {args.out / 'sheet.png'}, {args.out / 'report.json'}, {args.out / 'report.md'}")
        return 0
    finally:
        world.close()   # tear down the process group (a launched helper has already left)
