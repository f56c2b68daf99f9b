"""Where the steps go: stock, shifted and phase-aware grids, and what a CFG window saves.

Prints two tables (CPU, offline, a few seconds):

1. **Steps above and below σ*** for the grids diffusers samples on and for the phase-aware grid,
   at 20, 28 and 50 steps. σ* is the digits profile's boundary
   (``PhaseProfile.estimate`` of the bundled scikit-learn digits, seed 0). Grids are read from
   real schedulers after ``set_timesteps``: ``FlowMatchEulerDiscreteScheduler`` with shift 1,
   shift 3 (SD3's default) and Flux's dynamic shift (``linspace(1, 1/N, N)`` with μ for a
   1024² image, 4096 tokens), and ``PhaseAwareFlowMatchScheduler(phase_boundary=σ*)`` at
   navigation fractions 0.5 and 0.7. "above" counts evaluated σ_i > σ* (the appended terminal
   0 is not evaluated).
2. **Model evaluations with and without a CFG window**, counted exactly: the project's
   denoising loop (``steersample.sampling.loop.sample``) runs with a model stub that counts its
   calls (batch 1, one call per pass), once with CFG everywhere and once with the window;
   the count is checked against ``N + #{σ_i in the window}`` and against the diffusers-guider
   protocol (``ScheduledClassifierFreeGuidance``: one transformer call per prepared batch).

Run: ``python benchmarks/schedules.py [--seed 0]``.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from steersample.data import load_digits
from steersample.sampling.guidance import GuidanceSchedule
from steersample.sampling.guider import ScheduledClassifierFreeGuidance
from steersample.oracle.phases import PhaseProfile
from steersample.reference.reference_set import ReferenceSet
from steersample.sampling.loop import sample
from steersample.sampling.protocol import Conditioning
from steersample.sampling.scheduler import PhaseAwareFlowMatchScheduler
from steersample.sampling.schedules import calculate_mu, count_above

__all__ = ["main"]

STEPS = (20, 28, 50)


def grids(num_steps: int, boundary: float) -> dict[str, FlowMatchEulerDiscreteScheduler]:
    """Schedulers with their timesteps set for ``num_steps``, by name."""
    out: dict[str, FlowMatchEulerDiscreteScheduler] = {}
    stock = FlowMatchEulerDiscreteScheduler()
    stock.set_timesteps(num_steps)
    out["stock (shift 1)"] = stock
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sd3.set_timesteps(num_steps)
    out["shift 3 (SD3)"] = sd3
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    flux.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=calculate_mu(4096))
    out["dynamic (Flux, 1024^2)"] = flux
    for fraction in (0.5, 0.7):
        phase = PhaseAwareFlowMatchScheduler(phase_boundary=boundary, navigation_fraction=fraction)
        phase.set_timesteps(num_steps)
        out[f"phase-aware f={fraction}"] = phase
    return out


def table_steps(boundary: float) -> str:
    rows = [f"{'grid':<24} {'steps':>5} {'above σ*':>9} {'below σ*':>9} {'share above':>12}"]
    for n in STEPS:
        for name, sched in grids(n, boundary).items():
            sig = sched.sigmas[:-1]
            above = count_above(sig, boundary)
            rows.append(f"{name:<24} {n:>5} {above:>9} {n - above:>9} {above / n:>12.3f}")
    return "\n".join(rows)


class CountingModel:
    """``model_fn`` for :func:`steersample.sampling.loop.sample`: counts passes, returns v = x (stub)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, cond, branch):
        self.calls += 2 if branch == "both" else 1
        return 0.5 * x


def loop_evaluations(scheduler_factory, num_steps: int, guidance: GuidanceSchedule) -> int:
    scheduler = scheduler_factory()
    scheduler.set_timesteps(num_steps)
    model = CountingModel()
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    sample(model, x, scheduler, Conditioning(cond={}, uncond={}, batched=False), guidance)
    return model.calls


def guider_evaluations(scheduler_factory, num_steps: int, guidance: GuidanceSchedule) -> int:
    """Transformer calls under diffusers' modular guider protocol (one per prepared batch)."""
    scheduler = scheduler_factory()
    scheduler.set_timesteps(num_steps)
    guider = ScheduledClassifierFreeGuidance.from_schedule(guidance)
    calls = 0
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(step=i, num_inference_steps=num_steps, timestep=t)
        calls += len(guider.prepare_inputs({"hidden_states": (torch.zeros(1), torch.zeros(1))}))
    return calls


def table_windows(boundary: float, scale: float = 5.0) -> str:
    windows = {
        "everywhere (0, 1]": (0.0, 1.0),
        "paper (0.4, 0.9]": (0.4, 0.9),
    }
    for width in (0.1, 0.2, 0.4, 0.6):
        lo, hi = max(0.0, boundary - width / 2), min(1.0, boundary + width / 2)
        windows[f"σ* ± {width / 2:.2f}"] = (lo, hi)
    phase_window = GuidanceSchedule.from_phase(boundary, scale).window
    windows["from_phase default"] = phase_window
    factories = {
        "shift 3 (SD3)": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
        "phase-aware f=0.5": lambda: PhaseAwareFlowMatchScheduler(phase_boundary=boundary),
    }
    rows = [
        f"{'grid':<18} {'steps':>5} {'window':<20} {'lo':>6} {'hi':>6} {'width':>6} "
        f"{'evals full CFG':>14} {'evals window':>12} {'saved':>7}"
    ]
    full = GuidanceSchedule.constant(scale)
    for grid_name, factory in factories.items():
        for n in STEPS:
            without = loop_evaluations(factory, n, full)
            for name, (lo, hi) in windows.items():
                g = GuidanceSchedule.interval(scale, lo, hi)
                with_window = loop_evaluations(factory, n, g)
                # exact bookkeeping: N + number of evaluated sigmas inside (lo, hi]; the guider agrees
                sched = factory()
                sched.set_timesteps(n)
                expected = g.count_evaluations(sched.sigmas[:-1])
                if with_window != expected or guider_evaluations(factory, n, g) != expected:
                    raise RuntimeError(f"evaluation count mismatch for {grid_name} {name} at {n} steps")
                if without != 2 * n:
                    raise RuntimeError(f"full CFG should cost {2 * n} evaluations, counted {without}")
                saved = 1 - with_window / without
                rows.append(
                    f"{grid_name:<18} {n:>5} {name:<20} {lo:>6.3f} {hi:>6.3f} {hi - lo:>6.3f} "
                    f"{without:>14} {with_window:>12} {saved:>6.1%}"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the phase-profile queries")
    args = parser.parse_args(argv)
    logging.getLogger("diffusers.guiders.guider_utils").setLevel(logging.ERROR)

    images, labels = load_digits()
    profile = PhaseProfile.estimate(ReferenceSet(images, labels), torch.Generator().manual_seed(args.seed))
    boundary = profile.boundary_sigma
    print(f"digits phase profile (N={len(images)}, seed {args.seed}): σ* = {boundary:.4f}\n")
    print("Table 1. Evaluated steps above and below σ*")
    print(table_steps(boundary))
    print("\nTable 2. Model evaluations per sample, CFG everywhere vs. in a window (scale 5)")
    print(table_windows(boundary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
