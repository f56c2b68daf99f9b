"""The memorisation audit: every method × strength grid point on one model, judged the same way.

For each grid point (a guidance schedule plus steerers) the audit samples the same seeds
(sample k always starts from the same noise), with the three detectors riding along passively,
and records

- copy rate (ratio test d(NN₁)/d(NN₂) < 1/3 against the training set), class accuracy (the
  judge's classifier), Fréchet distance to the held-out digits (pooled over the group's classes,
  as ``steersample compare`` does) and diversity, for the rare and the frequent classes;
- model evaluations per sample and the cost of a run (a separate timing pass without telemetry
  or detectors, interleaved across methods, minimum over repeats; wall and CPU seconds);
- for each detector, AUROC and TPR at 1 % FPR of "this sample is a copy" after k steps
  (:func:`steersample.steering.detect.detection_curve`), on all samples and within the rare classes.

:func:`select_best` applies the issue's acceptance rule to pick the best steered setting;
:func:`targets` checks it against the numbers the issue asks for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from steersample.steering.attractor import AttractorRepulsion
from steersample.steering.novelty import NoveltySteering
from steersample.steering.detect import (ConditionalDeviation, PosteriorConcentration, SpikinessDetector,
                                detection_curve, score_matrix)
from steersample.sampling.guidance import GuidanceSchedule
from steersample.steering.representation import RepresentationSteering
from steersample.steering.recommended import recommended_for_scale

__all__ = ["Method", "default_grid", "quick_grid", "MethodResult", "AuditResult", "run_audit",
           "select_best", "choose_best", "targets", "meets_bands", "rare_table", "BANDS", "TESTBED_BANDS", "bands_for",
           "BEST_STRENGTH", "REFERENCE_FREE", "DETECTOR_FRACTIONS"]

REFERENCE_FREE = ("cond_deviation", "spikiness")
DETECTOR_FRACTIONS = (0.1, 0.2, 0.5, 1.0)
JAIN_DELAY_SIGMA = 0.5         # Jain et al. static transition: t > 500 of 1000 -> no CFG
JAIN_OPPOSITE_SIGMA = 0.65     # opposite guidance -2 while t > 650
JAIN_OPPOSITE_SCALE = -2.0


@dataclass(frozen=True)
class Method:
    """One grid point: a name, its family and strength (for the plot), guidance and steerers."""

    name: str
    family: str
    strength: float | None
    guidance: GuidanceSchedule
    steering: tuple = ()


BEST_STRENGTH = 0.5
"""AttractorRepulsion strength of the best measured setting on the default model (CFG 4); also
the steerer's default."""


def default_grid(w: float) -> tuple[Method, ...]:
    """Plain CFG ``w``; Jain et al.'s delayed and opposite presets; a CFG interval; CFG in
    navigation only (unconditional refinement for every sample); AttractorRepulsion at several
    strengths and triggers, with and without its per-sample navigation delay for scarce classes;
    RepresentationSteering; NoveltySteering at its data-derived distance targets and at two
    scaled-down targets (the distance / precision frontier) and with CFG in navigation only
    (``recommended_steering``'s setting); combinations (19 grid points)."""
    plain = GuidanceSchedule.constant(w)
    delayed = GuidanceSchedule.delayed(w, JAIN_DELAY_SIGMA)
    interval = GuidanceSchedule.interval(w, 0.4, 0.9)

    def ar(strength: float = 1.0, trigger: float = 0.8, scarce: int = 32) -> AttractorRepulsion:
        return AttractorRepulsion(strength=strength, trigger=trigger, scarce=scarce)

    grid = [
        Method("plain", "plain", None, plain),
        Method("jain-delayed", "jain-delayed", None, delayed),
        Method("jain-opposite", "jain-opposite", None,
               GuidanceSchedule.opposite(w, JAIN_OPPOSITE_SCALE, JAIN_OPPOSITE_SIGMA)),
        Method("cfg-interval", "cfg-interval", None, interval),
        Method("cfg-navigation-only", "cfg-interval", None,
               GuidanceSchedule(scale=w, window=(0.6, 1.0), scale_below=0.0)),
    ]
    grid += [Method(f"attractor-{s:g}", "attractor", s, plain, (ar(s),)) for s in (0.25, 0.5, 1.0)]
    grid += [Method(f"attractor-0.5-trigger-{t:g}", "attractor", 0.5, plain, (ar(0.5, t),))
             for t in (0.7, 0.9)]
    grid += [Method(f"attractor-{s:g}-no-delay", "attractor-no-delay", s, plain,
                    (ar(s, 0.8 if s != 1.0 else 0.7, scarce=0),)) for s in (0.5, 1.0)]
    grid += [Method("representation-0.5", "representation", 0.5, plain,
                    (RepresentationSteering(strength=0.5),))]
    grid += [Method("novelty", "novelty", 1.0, plain, (NoveltySteering(),))]
    grid += [Method(f"novelty-target-{t:g}", "novelty", t, plain, (NoveltySteering(strength=t),))
             for t in (0.92, 0.85)]
    recommended = recommended_for_scale(w)   # NoveltySteering() with CFG in navigation only
    grid += [Method("novelty+cfg-navigation-only", "novelty", 1.0, recommended["guidance"],
                    tuple(recommended["steering"]))]
    grid += [
        Method("attractor-0.5+jain-delayed", "combination", 0.5, delayed, (ar(0.5),)),
        Method("attractor-0.5+representation-0.5", "combination", 0.5, plain,
               (ar(0.5), RepresentationSteering(strength=0.5))),
    ]
    return tuple(grid)


def quick_grid(w: float) -> tuple[Method, ...]:
    """Plain, the two Jain presets, AttractorRepulsion(0.5) and NoveltySteering() with constant
    CFG and with CFG in navigation only (the recommended setting)."""
    keep = {"plain", "jain-delayed", "jain-opposite", f"attractor-{BEST_STRENGTH:g}", "novelty",
            "novelty+cfg-navigation-only"}
    return tuple(m for m in default_grid(w) if m.name in keep)


@dataclass(frozen=True)
class GroupFigures:
    """Judge figures over the samples of a group of classes.

    ``z_u`` is Meehan et al.'s C_T over the group's classes, each class judged against its own
    held-out digits (``evaluation.novelty.novelty_by_class``); the ``*_min`` fields are the worst
    class of the group, since the novelty targets hold per class.
    """

    copy_rate: float
    accuracy: float
    fd: float
    diversity: float
    z_u: float = math.nan
    z_u_min: float = math.nan
    distance_ratio: float = math.nan
    distance_ratio_min: float = math.nan
    precision: float = math.nan
    precision_min: float = math.nan
    recall: float = math.nan
    accuracy_min: float = math.nan


@dataclass(frozen=True)
class MethodResult:
    """Everything measured for one grid point."""

    method: Method
    rare: GroupFigures
    frequent: GroupFigures
    model_evals: float
    seconds: float | None
    cpu_seconds: float | None
    detection: dict = field(default_factory=dict)   # detector -> scope -> tuple[DetectionPoint]
    samples: torch.Tensor | None = None


@dataclass(frozen=True)
class AuditResult:
    """The audit: settings and one :class:`MethodResult` per grid point (grid order)."""

    results: tuple[MethodResult, ...]
    settings: dict


def _group(samples, labels, classes, reference, held_x, held_y, judge=None) -> GroupFigures:
    from steersample.evaluation.judge import copy_flags, digits_judge
    from steersample.evaluation.novelty import novelty_by_class

    judge = judge or digits_judge()
    class_accuracy, diversity, frechet_distance = judge.class_accuracy, judge.diversity, judge.frechet_distance

    mask = torch.isin(labels, torch.tensor(list(classes)))
    x, y = samples[mask], labels[mask]
    held = torch.isin(held_y, torch.tensor(list(classes)))
    novelty = novelty_by_class(x, y, reference, held_x, held_y, {"group": list(classes)})
    group, per = novelty["groups"]["group"], novelty["per_class"].values()

    def worst(key: str) -> float:
        values = [row[key] for row in per if row[key] is not None]
        return min(values) if values else math.nan

    def num(value) -> float:
        return math.nan if value is None else float(value)

    return GroupFigures(
        copy_rate=float(copy_flags(x, reference).double().mean()),
        accuracy=class_accuracy(x, y),
        fd=frechet_distance(x, held_x[held]),
        diversity=sum(diversity(x[y == c]) for c in classes) / len(classes),
        z_u=num(group["z_u"]), z_u_min=num(group["z_u_min"]),
        distance_ratio=num(group["distance_ratio"]), distance_ratio_min=worst("distance_ratio"),
        precision=num(group["precision"]), precision_min=worst("precision"),
        recall=num(group["recall"]),
        accuracy_min=min(class_accuracy(x[y == c], y[y == c]) for c in classes),
    )


def _generators(count: int, seed: int, first: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in range(first, first + count)]


def _sample(pipe, method: Method, labels, steps: int, seed: int, reference, detectors=(),
            telemetry: bool = False, first: int = 0):
    return pipe(class_labels=labels, num_inference_steps=steps, guidance=method.guidance,
                generator=_generators(len(labels), seed, first), output_type="latent",
                steering=[*method.steering, *detectors], reference=reference,
                return_telemetry=telemetry)


def run_audit(pipe, reference, info, grid: Sequence[Method], *, rare_samples: int = 128,
              frequent_samples: int = 48, steps: int = 30, seed: int = 0, timing_repeats: int = 3,
              timing_samples: int = 192, progress: Callable[[str], Any] | None = None,
              world=None, batch_size: int = 64) -> AuditResult:
    """Run every grid point on ``pipe`` (the default model) and judge it.

    Args:
        pipe, reference, info: ``steersample.load_default(...)`` and ``load_default_info(...)``;
            the held-out images come from ``info``'s folder (``steersample.default.held_out``),
            the judge from its metadata (``judge.judge_for(info)``: digits or letters).
        grid: the methods (e.g. :func:`default_grid`).
        rare_samples, frequent_samples: samples per rare / frequent class.
        steps: sampling steps.
        seed: sample k of a class list always uses seed ``seed * 1000003 + k``.
        timing_repeats: interleaved timing passes (0: skip timing).
        timing_samples: batch of the timing pass (rare classes, cycled).
        progress: called with a short description before each unit of work (a progress bar).
        world: a :class:`steersample.distributed.Distributed` (default: this process alone);
            under ``accelerate launch`` the samples are split over the processes and merged,
            and the timing pass runs on the main process only.
        batch_size: samples per pipeline call; the same batches whatever the number of
            processes, so the merged results equal a one-process run.
    """
    from steersample.distributed import Distributed
    from steersample.default import held_out
    from steersample.evaluation.judge import judge_for

    held_x, held_y = held_out(info.path)
    judge = judge_for(info)
    testbed = getattr(info, "testbed", "digits")
    rare, frequent = list(info.rare_classes), list(info.frequent_classes)
    labels = torch.cat([torch.tensor(rare).repeat_interleave(rare_samples),
                        torch.tensor(frequent).repeat_interleave(frequent_samples)])
    is_rare = torch.isin(labels, torch.tensor(rare))
    tick = progress or (lambda _: None)
    world = world or Distributed()
    measured = []
    for method in grid:
        tick(f"sample {method.name}")
        detectors = (ConditionalDeviation(), SpikinessDetector(), PosteriorConcentration())

        def unit(items: range) -> dict[str, torch.Tensor]:
            out = _sample(pipe, method, labels[items.start:items.stop], steps, seed, reference,
                          detectors, telemetry=True, first=items.start)
            rows = {det.name: score_matrix(out.telemetry, det.name).T for det in detectors}
            evals = torch.full((len(items),), float(out.telemetry.total_model_evals), dtype=torch.float64)
            return {"x": out.images.detach().float(), "evals": evals, **rows}

        merged = world.map(unit, len(labels), batch_size)
        x = merged["x"].clamp(-1.0, 1.0)   # as the decoded image
        from steersample.evaluation.judge import copy_flags

        copy = copy_flags(x, reference)
        detection = {}
        for det in detectors:
            scores = merged[det.name].T
            detection[det.name] = {"all": detection_curve(scores, copy),
                                   "rare": detection_curve(scores[:, is_rare], copy[is_rare])}
        measured.append(dict(
            method=method,
            rare=_group(x, labels, rare, reference, held_x, held_y, judge),
            frequent=_group(x, labels, frequent, reference, held_x, held_y, judge),
            model_evals=float(merged["evals"].max()),
            detection=detection, samples=x,
        ))
    times = (_timing(pipe, grid, reference, rare, steps, seed, timing_repeats, timing_samples, tick)
             if world.is_main else {})
    results = tuple(MethodResult(seconds=times.get(m["method"].name, (None, None))[0],
                                 cpu_seconds=times.get(m["method"].name, (None, None))[1], **m)
                    for m in measured)
    settings = dict(model=str(info.path), model_git_commit=info.git_commit, rare_classes=rare,
                    frequent_classes=frequent, rare_samples=rare_samples,
                    frequent_samples=frequent_samples, steps=steps, seed=seed,
                    timing_repeats=timing_repeats, timing_samples=timing_samples,
                    torch_threads=torch.get_num_threads(), processes=world.world_size,
                    testbed=testbed, bands=dict(bands_for(testbed)),
                    heldout_diversity={"rare": _mean_diversity(judge, held_x, held_y, rare),
                                       "frequent": _mean_diversity(judge, held_x, held_y, frequent)})
    return AuditResult(results, settings)


def rare_table(audit: AuditResult, diversity: bool = False) -> list[str]:
    """Markdown lines: one row per method of ``audit`` with its rare group's Z_U C_T, distance
    ratio, precision and accuracy, the worst class in brackets (and the group's diversity)."""
    head = "| method | rare Z_U (worst) | distance (worst) | precision (worst) | accuracy (worst) |"
    lines = [head + (" diversity |" if diversity else ""), "|---|---|---|---|---|" + ("---|" if diversity else "")]
    for r in audit.results:
        f = r.rare
        lines.append(f"| {r.method.name} | {f.z_u:+.1f} ({f.z_u_min:+.1f}) | {f.distance_ratio:.2f} "
                     f"({f.distance_ratio_min:.2f}) | {f.precision:.2f} ({f.precision_min:.2f}) | "
                     f"{f.accuracy:.2f} ({f.accuracy_min:.2f}) |" + (f" {f.diversity:.2f} |" if diversity else ""))
    return lines


def _mean_diversity(judge, x: torch.Tensor, y: torch.Tensor, classes) -> float:
    """The judge's diversity (mean pairwise distance within a class) averaged over ``classes``:
    what real unseen data scores, beside the samples' ``GroupFigures.diversity``."""
    values = [judge.diversity(x[y == c]) for c in classes if int((y == c).sum()) > 1]
    return sum(values) / len(values) if values else math.nan


def _timing(pipe, grid, reference, rare, steps, seed, repeats, batch, tick) -> dict:
    """Min over ``repeats`` interleaved passes of (wall, CPU) seconds per method, no telemetry."""
    if repeats <= 0:
        return {}
    labels = torch.tensor(rare).repeat(batch // len(rare) + 1)[:batch]
    best: dict[str, tuple[float, float]] = {}
    for r in range(repeats):
        for method in grid:
            tick(f"time {method.name} ({r + 1}/{repeats})")
            wall, cpu = time.perf_counter(), time.process_time()
            _sample(pipe, method, labels, steps, seed + 1, reference)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            old = best.get(method.name, (math.inf, math.inf))
            best[method.name] = (min(old[0], wall), min(old[1], cpu))
    return best


# ----------------------------------------------------------------------------- verdicts
# the novelty issue's bands (every rare class), judged against held-out data
BANDS = {"z_u": -3.0, "z_u_stretch": -1.0, "distance_ratio": 0.8, "accuracy": 0.9,
         "precision": 0.8, "cost": 1.3}
TESTBED_BANDS = {
    "digits": BANDS,
    # issue #15 part 4: the second testbed "with the same metrics and bands (accuracy >= 0.85,
    # precision >= 0.7)"
    "letters": {**BANDS, "accuracy": 0.85, "precision": 0.7},
    # a prompt model's audit (commands/_prompt_audit): no class judge, so no accuracy band
    "prompt": {**BANDS, "accuracy": None},
}
"""The bands by testbed (``DefaultInfo.testbed``; the audit records it in its settings)."""


def bands_for(testbed: str | None = None) -> dict:
    """The bands of a testbed (None: digits); unknown testbeds raise ``ValueError``."""
    if testbed is None:
        return BANDS
    if testbed not in TESTBED_BANDS:
        raise ValueError(f"no bands for testbed {testbed!r}; known: {', '.join(TESTBED_BANDS)}")
    return TESTBED_BANDS[testbed]


def _audit_bands(audit: AuditResult) -> dict:
    return bands_for(audit.settings.get("testbed"))


def _frequent_kept(r: MethodResult, plain: MethodResult) -> bool:
    """Frequent classes no worse than plain: FD within 2 %, precision within 0.02, |Z_U| + 1
    (a testbed without an FD judge, NaN for plain, or without frequent classes, None, skips
    what it lacks)."""
    f, p = r.frequent, plain.frequent
    if f is None or p is None:
        return True
    return ((math.isnan(p.fd) or f.fd <= 1.02 * p.fd) and not f.precision < p.precision - 0.02
            and not abs(f.z_u) > abs(p.z_u) + 1.0)


def _legible(r: MethodResult, bands: dict = BANDS) -> bool:
    """Every rare class's judge accuracy in the band (a testbed without a class judge, band
    None, has no such test)."""
    return bands["accuracy"] is None or r.rare.accuracy_min >= bands["accuracy"]


def _on_data(r: MethodResult, bands: dict = BANDS) -> bool:
    return _legible(r, bands) and r.rare.precision_min >= bands["precision"]


def meets_bands(r: MethodResult, plain: MethodResult, bands: dict | None = None) -> bool:
    """Every rare class: Z_U >= -3, distance ratio >= 0.8, accuracy >= 0.9, precision >= 0.8
    (``bands``, default the digits' :data:`BANDS`; letters: accuracy >= 0.85, precision >= 0.7,
    see :data:`TESTBED_BANDS`); frequent classes kept (:func:`_frequent_kept`)."""
    bands = BANDS if bands is None else bands
    return (r.rare.z_u_min >= bands["z_u"] and r.rare.distance_ratio_min >= bands["distance_ratio"]
            and _on_data(r, bands) and _frequent_kept(r, plain))


def _novel(r: MethodResult, plain: MethodResult, bands: dict = BANDS) -> bool:
    """Every rare class passes the data-copying and distance bands and stays legible (judge
    accuracy); frequent classes kept."""
    b = r.rare
    return (b.z_u_min >= bands["z_u"] and b.distance_ratio_min >= bands["distance_ratio"]
            and _legible(r, bands) and _frequent_kept(r, plain))


def select_best(audit: AuditResult) -> MethodResult:
    """The best steered setting, judged by held-out data (the novelty issue's rule), in tiers:

    1. methods meeting every band (:func:`meets_bands`), highest worst-class Z_U first;
    2. methods whose rare samples are not copies by the data-copying test (every rare class:
       Z_U >= -3, distance ratio >= 0.8) and stay legible (accuracy >= 0.9), frequent classes
       kept: highest worst-class precision first;
    3. methods that stay on the data (accuracy >= 0.9, precision >= 0.8 in every rare class)
       but still copy: highest worst-class Z_U first;
    4. methods with every rare class's accuracy >= 0.9, then all: highest worst-class Z_U.

    Within a tier the ranking is by the measured figure itself, not a pass count, so the choice
    holds if a band's threshold moves a little. The thresholds are the testbed's
    (:func:`bands_for` of ``audit.settings["testbed"]``; the figures above are the digits').
    """
    return choose_best(_plain(audit), [r for r in audit.results if r.method.name != "plain"],
                       _audit_bands(audit))


def choose_best(plain, steered, bands: dict = BANDS):
    """:func:`select_best`'s tiers on any results: objects with ``.rare`` and ``.frequent``
    figures as :class:`GroupFigures` names them (``frequent`` may be None: no frequent classes),
    ``plain`` the unsteered one; ``bands`` as :data:`TESTBED_BANDS` (accuracy None: no class
    judge). The prompt audit shares it, so every testbed picks its best by one rule."""
    steered = list(steered)
    if not steered:
        raise ValueError("the grid has no steered method to choose from; add one besides 'plain'")

    def frequent(r: MethodResult) -> float:   # ties (same rare figures): the better frequent classes
        return -math.inf if r.frequent is None else _finite(r.frequent.precision)

    def by_z(r: MethodResult):
        return (_finite(r.rare.z_u_min), _finite(r.rare.precision_min), frequent(r))

    def by_precision(r: MethodResult):
        return (_finite(r.rare.precision_min), _finite(r.rare.z_u_min), frequent(r))

    tiers = ((by_z, [r for r in steered if meets_bands(r, plain, bands)]),
             (by_precision, [r for r in steered if _novel(r, plain, bands)]),
             (by_z, [r for r in steered if _on_data(r, bands) and _frequent_kept(r, plain)]),
             (by_z, [r for r in steered if _legible(r, bands)]),
             (by_z, steered))
    for key, pool in tiers:
        if pool:
            return max(pool, key=key)
    raise AssertionError("unreachable: the last tier is every steered method")


def _finite(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _plain(audit: AuditResult) -> MethodResult:
    for r in audit.results:
        if r.method.name == "plain":
            return r
    raise ValueError("the grid needs a 'plain' method to compare against")


def _at_fraction(points, fraction: float):
    usable = [p for p in points if p.fraction <= fraction + 1e-9]
    return usable[-1] if usable else None


def targets(audit: AuditResult, best: MethodResult | None = None) -> list[tuple[str, str, bool]]:
    """``(target, measured, met)`` for each number the novelty issue asks for (and the
    detector and cost targets of earlier issues)."""
    plain = _plain(audit)
    best = best or select_best(audit)
    bands = _audit_bands(audit)
    b, fr, pf = best.rare, best.frequent, plain.frequent
    rows = [
        ("plain rare copy rate >= 0.7 (the testbed copies)", f"{plain.rare.copy_rate:.3f}",
         plain.rare.copy_rate >= 0.7),
        ("plain rare Z_U far below 0 (worst class <= -5)", f"{plain.rare.z_u_min:.2f}",
         plain.rare.z_u_min <= -5),
        (f"best rare Z_U >= {bands['z_u']:g} in every class", f"{b.z_u_min:.2f} (C_T {b.z_u:.2f})",
         b.z_u_min >= bands["z_u"]),
        (f"stretch: best rare Z_U >= {bands['z_u_stretch']:g} in every class", f"{b.z_u_min:.2f}",
         b.z_u_min >= bands["z_u_stretch"]),
        (f"best rare distance ratio >= {bands['distance_ratio']:g} in every class",
         f"{b.distance_ratio_min:.3f}", b.distance_ratio_min >= bands["distance_ratio"]),
        (f"best rare accuracy >= {bands['accuracy']:g} in every class", f"{b.accuracy_min:.3f}",
         b.accuracy_min >= bands["accuracy"]),
        (f"best rare precision >= {bands['precision']:g} in every class", f"{b.precision_min:.3f}",
         b.precision_min >= bands["precision"]),
        ("best frequent FD within 2 % of plain", f"{fr.fd:.3f} vs {pf.fd:.3f}", fr.fd <= 1.02 * pf.fd),
        ("best frequent precision no worse than plain (-0.02)", f"{fr.precision:.3f} vs {pf.precision:.3f}",
         not fr.precision < pf.precision - 0.02),
        ("best frequent |Z_U| no worse than plain (+1)", f"{fr.z_u:.2f} vs {pf.z_u:.2f}",
         not abs(fr.z_u) > abs(pf.z_u) + 1.0),
    ]
    if best.seconds and plain.seconds:
        rows.append((f"best wall time <= {bands['cost']:g}x plain", f"{best.seconds / plain.seconds:.2f}x "
                     f"(CPU {best.cpu_seconds / plain.cpu_seconds:.2f}x)",
                     best.seconds <= bands["cost"] * plain.seconds))
    aurocs = []
    for name in REFERENCE_FREE:
        point = _at_fraction(plain.detection.get(name, {}).get("all", ()), 0.2)
        if point is not None and not math.isnan(point.auroc):
            aurocs.append((point.auroc, name, point.steps))
    if aurocs:
        value, name, k = max(aurocs)
        rows.append(("best reference-free detector AUROC >= 0.95 within 20 % of steps",
                     f"{name}: {value:.3f} after {k} steps", value >= 0.95))
    return rows
