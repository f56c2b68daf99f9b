"""What the page says about itself: which controls applied, stale results, presets, dead controls.

Pure Python (no gradio, no model). The app calls these with the raw control values (as the
browser sends them) and shows the answers as Markdown lines and slider states:

* :func:`applied_controls`: the controls that shaped a comparison (the JSON report lists these
  and only these; the stale check compares against them);
* :func:`changed_controls`: controls moved since the results on screen were made;
* :func:`preset_changes` / :func:`active_preset`: whether a preset's values still hold;
* :func:`outer_scale_reasons`, :func:`strength_state`: why a control cannot act right now.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

from steersample.studio.settings import (LIMITS, PRESETS, RANDOM_SEED, preset_values,
                                         steerer_strength_range)

__all__ = ["CONTROL_LABELS", "applied_controls", "changed_controls", "describe_change",
           "active_preset", "preset_changes", "outer_scale_reasons", "strength_state",
           "run_caption"]

CONTROL_LABELS: dict[str, str] = {
    **{name: limit.label for name, limit in LIMITS.items()},
    "model": "Model", "class_id": "Class", "prompt": "Prompt",
    "window_relative": "Window relative to σ*", "schedule": "Schedule",
    "steering": "Steering method",
}


def applied_controls(request: Any, window: tuple[float, float],
                     random_seed: bool = False) -> dict[str, Any]:
    """The controls that acted on ``request`` (a ``StudioRequest``), by name.

    ``window`` is the steered arm's absolute window ``(lo, hi)`` (``RunPlan.window``): the scale
    above acts only when ``hi < 1``, the scale below only when ``lo > 0``. The absolute window
    values act only without "relative", the reaches only with it; the share of steps above σ*
    only on the phase-aware schedule; the shift not on the profile grid; the strength only with
    a steerer that takes one.
    """
    from steersample.studio.settings import steerer_strength_parameter

    out: dict[str, Any] = {"model": request.model}
    if request.class_id is not None:
        out["class_id"] = request.class_id
    if request.prompt is not None:
        out["prompt"] = request.prompt
    out.update(seed=request.seed, num_samples=request.num_samples, steps=request.steps,
               guidance_scale=request.guidance_scale, window_relative=request.window_relative)
    if random_seed:
        out["random_seed"] = True
    if request.window_relative:
        out.update(below_boundary=request.below_boundary, above_boundary=request.above_boundary)
    else:
        out.update(window_lo=request.window_lo, window_hi=request.window_hi)
    lo, hi = window
    if hi < 1.0:
        out["scale_above"] = request.scale_above
    if lo > 0.0:
        out["scale_below"] = request.scale_below
    out["schedule"] = request.schedule
    if request.schedule != "profile":  # the profile grid sets its own spacing
        out["shift"] = request.shift
    if request.schedule == "phase-aware":
        out["navigation_fraction"] = request.navigation_fraction
    out["steering"] = request.steering
    if request.steering != "none" and steerer_strength_parameter(request.steering) is not None:
        out["strength"] = request.strength
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, str) and isinstance(b, numbers.Real) or isinstance(b, str) and isinstance(a, numbers.Real):
        try:
            return math.isclose(float(a), float(b), abs_tol=1e-9)
        except ValueError:
            return False
    return a == b


def changed_controls(applied: Mapping[str, Any], values: Mapping[str, Any]) -> list[str]:
    """Names of the controls in ``applied`` whose current value (``values``) differs.

    A seed box at −1 (random) matches a run that drew its seed at random.
    """
    changed = []
    for name, then in applied.items():
        if name == "random_seed" or name not in values:
            continue
        now = values[name]
        if name == "seed" and applied.get("random_seed") and _same(now, RANDOM_SEED):
            continue
        if not _same(now, then):
            changed.append(name)
    return changed


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, numbers.Real):
        return f"{float(value):g}"
    return str(value)


def describe_change(name: str, then: Any, now: Any) -> str:
    """``"Guidance scale w 3 → 8"``."""
    return f"{CONTROL_LABELS.get(name, name)} {_show(then)} → {_show(now)}"


def preset_changes(name: str, values: Mapping[str, Any], model_shift: float = 1.0,
                   kind: str = "class", labelled: bool = False) -> list[tuple[str, Any, Any]]:
    """``(control, preset value, current value)`` for each control moved away from preset ``name``.

    The guidance scale is read from ``values`` ("best steering" depends on it)."""
    w = float(values.get("guidance_scale", LIMITS["guidance_scale"].default))
    wanted = preset_values(name, w, model_shift, kind, labelled)
    return [(key, want, values[key]) for key, want in wanted.items()
            if key in values and not _same(values[key], want)]


def active_preset(values: Mapping[str, Any], model_shift: float = 1.0,
                  kind: str = "class", labelled: bool = False) -> str | None:
    """The first preset whose every value holds in ``values``, or None (``kind``, ``labelled``:
    the model's, see :func:`~steersample.studio.settings.preset_values`)."""
    for name in PRESETS:
        if not preset_changes(name, values, model_shift, kind, labelled):
            return name
    return None


def outer_scale_reasons(values: Mapping[str, Any],
                        boundary_sigma: float | None) -> tuple[str | None, str | None]:
    """Why the scale above / below the window cannot act now (None: it acts).

    With a relative window and σ* unknown nothing is disabled (the run will say what is
    missing)."""
    if values.get("window_relative"):
        if boundary_sigma is None or not math.isfinite(boundary_sigma):
            return None, None
        hi = min(1.0, boundary_sigma + float(values["above_boundary"]))
        lo = max(0.0, boundary_sigma - float(values["below_boundary"]))
    else:
        lo, hi = float(values["window_lo"]), float(values["window_hi"])
    above = ("no effect: the window reaches σ = 1, no step lies above it" if hi >= 1.0
             else None)
    below = ("no effect: the window reaches σ = 0, no step lies below it" if lo <= 0.0
             else None)
    return above, below


def strength_state(steering: str) -> tuple[bool, float, str]:
    """``(enabled, maximum, info)`` of the strength slider for steering method ``steering``."""
    limit = LIMITS["strength"]
    if steering == "none":
        return False, limit.maximum, "no effect: choose a steering method"
    accepted = steerer_strength_range(steering)
    if accepted is None:
        return False, limit.maximum, f"no effect: {steering} has no strength to set"
    high = accepted[1]
    note = f"{steering} accepts {accepted[0]:g} to {high:g}" if high < limit.maximum else ""
    return True, high, note


def run_caption(applied: Mapping[str, Any], class_name: str | None, preset: str | None) -> str:
    """One line naming what made the results on screen (class, seeds, steps, scale, preset)."""
    seed, count = int(applied["seed"]), int(applied["num_samples"])
    seeds = f"seed {seed}" if count == 1 else f"seeds {seed}–{seed + count - 1}"
    if applied.get("random_seed"):
        seeds += " (random)"
    what = f"class {class_name}" if class_name is not None else f"“{applied.get('prompt', '')}”"
    parts = [what, seeds, f"{applied['steps']} steps", f"w = {_show(applied['guidance_scale'])}",
             f"preset {preset}" if preset else "custom settings"]
    return " · ".join(parts)
