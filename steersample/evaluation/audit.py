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
from steersample.steering.detect import (ConditionalDeviation, PosteriorConcentration, SpikinessDetector,
                                detection_curve, score_matrix)
from steersample.sampling.guidance import GuidanceSchedule
from steersample.steering.representation import RepresentationSteering

__all__ = ["Method", "default_grid", "quick_grid", "MethodResult", "AuditResult", "run_audit",
           "select_best", "targets", "BEST_STRENGTH", "REFERENCE_FREE", "DETECTOR_FRACTIONS"]

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
    RepresentationSteering; combinations (15 grid points)."""
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
    grid += [
        Method("attractor-0.5+jain-delayed", "combination", 0.5, delayed, (ar(0.5),)),
        Method("attractor-0.5+representation-0.5", "combination", 0.5, plain,
               (ar(0.5), RepresentationSteering(strength=0.5))),
    ]
    return tuple(grid)


def quick_grid(w: float) -> tuple[Method, ...]:
    """Plain, the two Jain presets and AttractorRepulsion at the best measured strength."""
    keep = {"plain", "jain-delayed", "jain-opposite", f"attractor-{BEST_STRENGTH:g}"}
    return tuple(m for m in default_grid(w) if m.name in keep)


@dataclass(frozen=True)
class GroupFigures:
    """Judge figures over the samples of a group of classes."""

    copy_rate: float
    accuracy: float
    fd: float
    diversity: float


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


def _group(samples, labels, classes, reference, held_x, held_y) -> GroupFigures:
    from steersample.evaluation.judge import class_accuracy, copy_flags, diversity, frechet_distance

    mask = torch.isin(labels, torch.tensor(list(classes)))
    x, y = samples[mask], labels[mask]
    held = torch.isin(held_y, torch.tensor(list(classes)))
    return GroupFigures(
        copy_rate=float(copy_flags(x, reference).double().mean()),
        accuracy=class_accuracy(x, y),
        fd=frechet_distance(x, held_x[held]),
        diversity=sum(diversity(x[y == c]) for c in classes) / len(classes),
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
        pipe, reference, info: ``steersample.load_default(...)`` and ``load_default_info(...)``.
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
    from steersample.default import held_out_digits

    held_x, held_y = held_out_digits(info)
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
            rare=_group(x, labels, rare, reference, held_x, held_y),
            frequent=_group(x, labels, frequent, reference, held_x, held_y),
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
                    torch_threads=torch.get_num_threads())
    return AuditResult(results, settings)


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
def select_best(audit: AuditResult) -> MethodResult:
    """The best steered setting by the issue's acceptance rule, in tiers:

    1. rare copy rate ≤ 0.05, rare accuracy ≥ max(0.9, the Jain presets' rare accuracy),
       frequent FD within 2 % of plain, frequent copy rate ≤ plain's and rare FD ≤ 1.05 × plain;
    2. the same without the rare-FD limit;
    3. the same with the accuracy floor at 0.9 only;
    within a tier the lowest rare FD wins (then the lower copy rate). Failing all tiers: the
    lowest rare copy rate among methods with rare accuracy ≥ 0.9 (or all).
    """
    plain = _plain(audit)
    steered = [r for r in audit.results if r.method.name != "plain"]
    if not steered:
        raise ValueError("the grid has no steered method to choose from; add one besides 'plain'")
    jain = [r.rare.accuracy for r in audit.results if r.method.family.startswith("jain")]
    floor = max([0.9] + jain)

    def works(r: MethodResult, accuracy: float) -> bool:
        return (r.rare.copy_rate <= 0.05 and r.rare.accuracy >= accuracy
                and abs(r.frequent.fd / plain.frequent.fd - 1.0) <= 0.02
                and r.frequent.copy_rate <= plain.frequent.copy_rate)

    tiers = ([r for r in steered if works(r, floor) and r.rare.fd <= 1.05 * plain.rare.fd],
             [r for r in steered if works(r, floor)], [r for r in steered if works(r, 0.9)])
    for pool in tiers:
        if pool:
            return min(pool, key=lambda r: (r.rare.fd, r.rare.copy_rate))
    pool = [r for r in steered if r.rare.accuracy >= 0.9] or steered
    return min(pool, key=lambda r: (r.rare.copy_rate, r.rare.fd))


def _plain(audit: AuditResult) -> MethodResult:
    for r in audit.results:
        if r.method.name == "plain":
            return r
    raise ValueError("the grid needs a 'plain' method to compare against")


def _at_fraction(points, fraction: float):
    usable = [p for p in points if p.fraction <= fraction + 1e-9]
    return usable[-1] if usable else None


def targets(audit: AuditResult, best: MethodResult | None = None) -> list[tuple[str, str, bool]]:
    """``(target, measured, met)`` for each "Done when" number of the issue."""
    plain = _plain(audit)
    best = best or select_best(audit)
    rows = [
        ("plain rare copy rate >= 0.7", f"{plain.rare.copy_rate:.3f}", plain.rare.copy_rate >= 0.7),
        ("best rare copy rate <= 0.05", f"{best.rare.copy_rate:.3f}", best.rare.copy_rate <= 0.05),
        ("best rare accuracy >= 0.9", f"{best.rare.accuracy:.3f}", best.rare.accuracy >= 0.9),
        ("best rare FD <= 1.05 x plain", f"{best.rare.fd:.3f} vs {plain.rare.fd:.3f} "
         f"({best.rare.fd / plain.rare.fd:.3f}x)", best.rare.fd <= 1.05 * plain.rare.fd),
        ("best frequent FD within 2 % of plain", f"{best.frequent.fd:.3f} vs {plain.frequent.fd:.3f}",
         abs(best.frequent.fd / plain.frequent.fd - 1) <= 0.02),
        ("best frequent copy rate unchanged", f"{best.frequent.copy_rate:.3f} vs "
         f"{plain.frequent.copy_rate:.3f}", best.frequent.copy_rate <= plain.frequent.copy_rate),
    ]
    for jain in ("jain-delayed", "jain-opposite"):
        j = next((r for r in audit.results if r.method.name == jain), None)
        if j is not None:
            met = best.rare.copy_rate < j.rare.copy_rate and best.rare.accuracy >= j.rare.accuracy
            rows.append((f"beats {jain} (lower rare copy, accuracy >= its)",
                         f"copy {best.rare.copy_rate:.3f} vs {j.rare.copy_rate:.3f}, accuracy "
                         f"{best.rare.accuracy:.3f} vs {j.rare.accuracy:.3f}", met))
    aurocs = []
    for name in REFERENCE_FREE:
        point = _at_fraction(plain.detection.get(name, {}).get("all", ()), 0.2)
        if point is not None and not math.isnan(point.auroc):
            aurocs.append((point.auroc, name, point.steps))
    if aurocs:
        value, name, k = max(aurocs)
        rows.append(("best reference-free detector AUROC >= 0.95 within 20 % of steps",
                     f"{name}: {value:.3f} after {k} steps", value >= 0.95))
    # the cost of the chosen setting where it is AttractorRepulsion, else of the default one
    default = AttractorRepulsion()
    ar = best if best.method.steering and all(
        isinstance(x, AttractorRepulsion) for x in best.method.steering) else next(
        (r for r in audit.results if r.method.steering and all(
            isinstance(x, AttractorRepulsion) and repr(x) == repr(default) for x in r.method.steering)),
        None)
    if ar is not None and ar.seconds and plain.seconds:
        rows.append(("AttractorRepulsion wall time <= 1.2x plain",
                     f"{ar.seconds / plain.seconds:.2f}x ({ar.method.name}; CPU "
                     f"{ar.cpu_seconds / plain.cpu_seconds:.2f}x)", ar.seconds <= 1.2 * plain.seconds))
    return rows
