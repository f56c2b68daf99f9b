"""What the studio's controls mean: limits, presets, and a validated :class:`StudioRequest`.

Pure Python (no gradio, no model): the Gradio layer builds its sliders from :data:`LIMITS`,
sends the raw control values to :func:`parse_request`, and the engine turns the request into
pipeline arguments with :func:`plan_runs`. Every error is a ``ValueError`` that names the
control and says how to fix it; the page shows it in its message line.

The two arms of a comparison share seeds, steps, class and model:

* **plain**: constant CFG at the guidance scale, the model's own scheduler, no steering;
* **steered**: CFG ``w(σ)`` with the window and outer scales below, the chosen schedule
  (``shift`` or phase-aware around σ*), and the chosen steerer at the chosen strength.

The guidance window is ``lo < σ ≤ hi`` (σ = 1 is noise). With "relative to phase boundary" it
is ``(σ* − below, σ* + above]`` clipped to [0, 1], σ* being the class's phase boundary
(``PhaseProfile.boundary_sigma``); ``(0.1, 0.4)`` around σ* = 0.5 is the paper's (0.4, 0.9].
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Mapping

__all__ = [
    "Limit",
    "LIMITS",
    "SCHEDULES",
    "PRESETS",
    "StudioRequest",
    "RunPlan",
    "parse_request",
    "plan_runs",
    "steerer_names",
    "steerers_for",
    "CLASS_ONLY_STEERERS",
    "steerer_strength_parameter",
    "steerer_summary",
    "steerer_default_strength",
    "steerer_strength_range",
    "preset_values",
    "PRESET_DESCRIPTIONS",
    "RANDOM_SEED",
]


@dataclass(frozen=True)
class Limit:
    """Range, default and step of one numeric control (the slider and the validator share it)."""

    label: str
    minimum: float
    maximum: float
    default: float
    step: float
    integer: bool = False
    info: str = ""


LIMITS: dict[str, Limit] = {
    "seed": Limit("Seed", 0, 2**31 - 1, 0, 1, True, info="−1: a random seed"),
    "num_samples": Limit("Samples", 1, 16, 4, 1, True),
    "steps": Limit("Steps", 2, 100, 20, 1, True),
    "guidance_scale": Limit("Guidance scale w", -10.0, 20.0, 3.0, 0.1,
                            info="plain: at every step; steered: inside the window"),
    "scale_above": Limit("Scale for σ > hi", -10.0, 20.0, 1.0, 0.1,
                         info="early steps; < 0: opposite guidance"),
    "scale_below": Limit("Scale for σ ≤ lo", -10.0, 20.0, 1.0, 0.1, info="late steps"),
    "window_lo": Limit("Window low σ", 0.0, 1.0, 0.0, 0.01),
    "window_hi": Limit("Window high σ", 0.0, 1.0, 1.0, 0.01),
    "below_boundary": Limit("Reach below σ*", 0.0, 1.0, 0.1, 0.01, info="lo = σ* − reach"),
    "above_boundary": Limit("Reach above σ*", 0.0, 1.0, 0.4, 0.01, info="hi = σ* + reach"),
    "shift": Limit("Shift", 0.1, 10.0, 1.0, 0.1, info="σ ← sσ / (1 + (s − 1)σ)"),
    "navigation_fraction": Limit("Share of steps above σ*", 0.05, 0.95, 0.5, 0.05),
    "strength": Limit("Steering strength", 0.0, 3.0, 1.0, 0.05),
}

RANDOM_SEED = -1
"""The seed value that asks for a fresh random seed (the request records the one drawn)."""

SCHEDULES: tuple[str, ...] = ("shift", "phase-aware", "profile")
"""Steered-side schedules: stock grid with a shift, the phase-aware grid around σ*, or the
phase-derived grid of ``PhaseAwareFlowMatchScheduler.from_profile`` (steps dense where the
class's posterior mean moves fastest along the oracle's trajectories; it sets its own spacing,
so the shift does not apply)."""

# preset name -> control values it sets (controls it leaves out keep their value);
# "best steering" is read from `steersample compare`, the one place that defines it
PRESETS: dict[str, dict[str, Any]] = {
    "plain": dict(window_relative=False, window_lo=0.0, window_hi=1.0, scale_above=1.0,
                  scale_below=1.0, schedule="shift", steering="none"),
    "paper window": dict(window_relative=False, window_lo=0.4, window_hi=0.9, scale_above=1.0,
                         scale_below=1.0, schedule="shift", steering="none"),
    "Jain delayed": dict(window_relative=True, below_boundary=1.0, above_boundary=0.0,
                         scale_above=1.0, scale_below=1.0, schedule="shift", steering="none"),
    "Jain opposite": dict(window_relative=True, below_boundary=1.0, above_boundary=0.0,
                          scale_above=-2.0, scale_below=1.0, schedule="shift", steering="none"),
    "best steering": {},
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "plain": "no window, no steering: the steered side equals the plain side",
    "paper window": "CFG only on σ ∈ (0.4, 0.9], the guidance-interval paper's window",
    "Jain delayed": "no CFG above σ*, CFG from σ* down: the class is chosen before guidance",
    "Jain opposite": "opposite guidance (w = −2) above σ*, CFG below it: pushes away from copies",
    "best steering": "what `steersample compare` calls steered: its window, scales and steerer",
}


def _registry() -> dict[str, type]:
    """``steersample.steering.registry.STEERERS``, complete.

    Steerers register themselves when their module is imported, and every public steerer is
    exported at top level (``DESIGN.md``), so importing the modules of the package's public
    names (``steersample._EXPORTS``) registers them all, including ones added later.
    """
    import importlib
    import logging

    import steersample
    from steersample.steering.registry import STEERERS

    for module in sorted(set(steersample._EXPORTS.values())):
        try:
            importlib.import_module(module)
        except ImportError as err:  # an optional dependency missing: list the others
            logging.getLogger("steersample.studio").warning("skipping %s: %s", module, err)
    return STEERERS


def steerer_names() -> list[str]:
    """Registered steerers (``steersample.steering.registry.STEERERS``), ``"none"`` first."""
    return sorted(_registry(), key=lambda name: (name != "none", name))


CLASS_ONLY_STEERERS: dict[str, str] = {
    "novelty": "NoveltySteering needs class labels (its class model and per-class distances): "
               "a prompt model offers it only when its store's labels name its prompts; use attractor",
}
"""Steerers that need class labels, with why: offered for a prompt (text-to-image) model only
when its reference store's labels name the prompts (each run passes the prompt's label as
``reference_labels``)."""


def steerers_for(kind: str, labelled: bool = False) -> list[str]:
    """The steering methods a model of ``kind`` (``"class"`` or ``"prompt"``) offers; a prompt
    model whose store labels name its prompts (``labelled``) offers all of them."""
    names = steerer_names()
    if kind == "class" or labelled:
        return names
    return [n for n in names if n not in CLASS_ONLY_STEERERS]


def steerer_strength_parameter(name: str) -> str | None:
    """The constructor argument the strength slider sets for steerer ``name``, or None.

    It is ``strength`` when the class takes one, else its first float-valued keyword argument
    (``scale``, ``weight``...); None for steerers with nothing to set (``"none"``).
    """
    params = inspect.signature(_registry()[name].__init__).parameters
    if "strength" in params:
        return "strength"
    for param in params.values():
        if param.name != "self" and isinstance(param.default, float):
            return param.name
    return None


def steerer_default_strength(name: str) -> float | None:
    """The default of the argument the strength slider sets (None if there is none)."""
    param = steerer_strength_parameter(name)
    if param is None:
        return None
    default = inspect.signature(_registry()[name].__init__).parameters[param].default
    return float(default) if isinstance(default, (int, float)) else None


def steerer_summary(name: str) -> str:
    """One line for the UI: the steerer's docstring summary and what the strength sets."""
    cls = _registry()[name]
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    param = steerer_strength_parameter(name)
    effect = (f"strength sets `{cls.__name__}({param}=…)`" if param is not None
              else "the strength slider has no effect")
    return f"{doc} ({effect})" if doc else effect


def steerer_strength_range(name: str) -> tuple[float, float] | None:
    """The strength slider's values steerer ``name`` accepts, as ``(low, high)``; None if the
    slider sets nothing. Found by constructing the steerer on the slider's grid (a steerer
    validates its own arguments), so a steerer limited to [0, 1] gets a slider up to 1."""
    from steersample.steering.registry import make_steerer

    param = steerer_strength_parameter(name)
    if param is None:
        return None
    limit = LIMITS["strength"]
    grid = [round(limit.minimum + k * limit.step, 6)
            for k in range(int(round((limit.maximum - limit.minimum) / limit.step)) + 1)]
    accepted = []
    for value in grid:
        try:
            make_steerer(name, **{param: value})
        except (TypeError, ValueError):
            continue
        accepted.append(value)
    return (min(accepted), max(accepted)) if accepted else None


def _best_steering_preset(guidance_scale: float) -> dict[str, Any]:
    """Controls reproducing ``steersample compare``'s "steered" setting at scale ``w``."""
    from steersample.commands.compare import settings

    steered = settings(guidance_scale)[1]
    g = steered.guidance
    values: dict[str, Any] = dict(window_relative=False, window_lo=g.window[0],
                                  window_hi=g.window[1], scale_above=g.scale_above,
                                  scale_below=g.scale_below, guidance_scale=g.scale,
                                  schedule="shift", steering="none")
    if steered.steering:
        first = steered.steering[0]
        values["steering"] = first.name
        param = steerer_strength_parameter(first.name)
        if param is not None and hasattr(first, param):
            values["strength"] = float(getattr(first, param))
    return values


def preset_values(name: str, guidance_scale: float, model_shift: float = 1.0,
                  kind: str = "class", labelled: bool = False) -> dict[str, Any]:
    """Control values of preset ``name`` (the plain preset also restores the model's shift).

    For a prompt model (``kind="prompt"``) "best steering" is compare's steered setting when its
    store's labels name the prompts (``labelled``: novelty steering, as ``steersample compare``
    runs it there), else attractor steering at its default strength (novelty needs classes)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    if name == "best steering":
        values = _best_steering_preset(guidance_scale)
        if values.get("steering") not in steerers_for(kind, labelled):
            values["steering"] = "attractor"
            values["strength"] = steerer_default_strength("attractor") or LIMITS["strength"].default
    else:
        values = dict(PRESETS[name])
    values.setdefault("shift", model_shift)
    return values


@dataclass(frozen=True)
class StudioRequest:
    """One validated press of "Generate" (see the module docstring for what each field means)."""

    model: str
    class_id: int | None
    prompt: str | None
    seed: int
    num_samples: int
    steps: int
    guidance_scale: float
    scale_above: float
    scale_below: float
    window_relative: bool
    window_lo: float
    window_hi: float
    below_boundary: float
    above_boundary: float
    schedule: str
    shift: float
    navigation_fraction: float
    steering: str
    strength: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _number(name: str, value: Any) -> float | int:
    limit = LIMITS[name]
    span = f"between {_fmt(limit.minimum)} and {_fmt(limit.maximum)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{limit.label}: expected a number {span}, got {value!r}")
    if limit.integer:
        if float(value) != int(value):
            raise ValueError(f"{limit.label}: expected a whole number {span}, got {value!r}")
        value = int(value)
    if not limit.minimum <= value <= limit.maximum:
        hint = f" ({limit.info})" if name == "seed" else ""
        raise ValueError(f"{limit.label} must lie {span}{hint}, got {_fmt(value)}; "
                         "pick a value in that range")
    return value if limit.integer else float(value)


def parse_request(values: Mapping[str, Any], *, models: Mapping[str, Any]) -> StudioRequest:
    """Check raw control values (as the UI or the API sends them) and build the request.

    Args:
        values: control name -> value, one entry per :class:`StudioRequest` field.
        models: the served models by name (``engine.StudioModel``), for the model, class and
            prompt checks.

    Raises:
        ValueError: a value is missing, out of range, or not a choice; the message names the
            control and the allowed values.
    """
    missing = [f for f in StudioRequest.__dataclass_fields__ if f not in values]
    if missing:
        raise ValueError(f"missing controls {missing}")
    name = values["model"]
    if name not in models:
        raise ValueError(f"unknown model {name!r}; the studio serves {sorted(models)} "
                         "(models are chosen when the studio is launched, with --model)")
    model = models[name]
    class_id, prompt = None, None
    if model.kind == "class":
        raw = values["class_id"]
        if isinstance(raw, bool) or not isinstance(raw, numbers.Integral):
            if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
                raw = int(raw)
            else:
                raise ValueError(f"Class: expected a class id 0..{model.num_classes - 1}, got {raw!r}")
        if not 0 <= int(raw) < model.num_classes:
            raise ValueError(f"Class {raw} does not exist: model {name!r} has classes "
                             f"0..{model.num_classes - 1}")
        class_id = int(raw)
    else:
        prompt = values["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("Prompt: type a prompt for this text-to-image model")
        if len(prompt) > 1000:
            raise ValueError(f"Prompt: at most 1000 characters, got {len(prompt)}")
    values = dict(values)
    if not isinstance(values["seed"], bool) and values["seed"] == RANDOM_SEED:
        import random  # a fresh seed for this request; the request records it

        samples = _number("num_samples", values["num_samples"])
        values["seed"] = random.SystemRandom().randrange(0, LIMITS["seed"].maximum - samples + 2)
    numbers_ = {key: _number(key, values[key]) for key in
                ("seed", "num_samples", "steps", "guidance_scale", "scale_above", "scale_below",
                 "window_lo", "window_hi", "below_boundary", "above_boundary", "shift",
                 "navigation_fraction", "strength")}
    if numbers_["seed"] + numbers_["num_samples"] - 1 > LIMITS["seed"].maximum:
        raise ValueError("Seed: seed + samples - 1 must not exceed 2**31 - 1; lower the seed")
    relative = values["window_relative"]
    if not isinstance(relative, bool):
        raise ValueError(f"Relative to phase boundary: expected true or false, got {relative!r}")
    if not relative and not numbers_["window_lo"] < numbers_["window_hi"]:
        raise ValueError(f"Guidance window: low σ ({numbers_['window_lo']:g}) must be below high σ "
                         f"({numbers_['window_hi']:g}); widen the window")
    if relative and numbers_["below_boundary"] + numbers_["above_boundary"] == 0:
        raise ValueError("Guidance window: reaches of 0 below and 0 above σ* make an empty window; "
                         "raise one of them")
    if values["schedule"] not in SCHEDULES:
        raise ValueError(f"Schedule: choose one of {list(SCHEDULES)}, got {values['schedule']!r}")
    names = steerer_names()
    if values["steering"] not in names:
        raise ValueError(f"Steering: unknown method {values['steering']!r}; choose one of {names}")
    if values["steering"] not in model.steerers:
        raise ValueError(f"Steering {values['steering']!r}: "
                         f"{CLASS_ONLY_STEERERS[values['steering']]} (model {name!r} is a "
                         f"text-to-image model; it offers {model.steerers})")
    if (values["steering"] in CLASS_ONLY_STEERERS and model.kind == "prompt"
            and prompt not in model.prompt_labels):
        raise ValueError(f"Steering {values['steering']!r} needs the prompt's class in the store: pick "
                         f"one of model {name!r}'s prompts (free text has no class there), or use attractor")
    return StudioRequest(model=name, class_id=class_id, prompt=prompt, window_relative=relative,
                         schedule=values["schedule"], steering=values["steering"], **numbers_)


@dataclass(frozen=True)
class RunPlan:
    """Pipeline arguments of the two arms, plus what the plot and the report show.

    Attributes:
        plain_guidance, steered_guidance: ``GuidanceSchedule`` of each arm.
        steered_scheduler_options: keyword arguments for
            ``PhaseAwareFlowMatchScheduler.from_config(model_config, **options)``, or
            ``{"from_profile": True}`` for ``from_profile(model_config, class profile)``.
        steering: steerer instances of the steered arm (empty for ``"none"``).
        window: ``(lo, hi)`` of the steered guidance window, absolute σ.
        boundary_sigma: σ* used (the class's phase boundary), or None if not needed/known.
    """

    plain_guidance: Any
    steered_guidance: Any
    steered_scheduler_options: dict[str, Any]
    steering: tuple[Any, ...]
    window: tuple[float, float]
    boundary_sigma: float | None


def _check_boundary(boundary_sigma: float | None, what: str) -> float:
    if boundary_sigma is None or not math.isfinite(boundary_sigma):
        raise ValueError(f"{what} needs the phase boundary σ*, which this model/class does not "
                         "have (no labelled reference set, or the top-1 curve never crosses 0.5); "
                         "use an absolute window and the shift schedule")
    if not 0.0 < boundary_sigma < 1.0:
        raise ValueError(f"{what} needs σ* strictly inside (0, 1), but this class's σ* is "
                         f"{boundary_sigma:g} (its training images are memorised at every noise "
                         "level); use an absolute window and the shift schedule")
    return float(boundary_sigma)


def plan_runs(request: StudioRequest, boundary_sigma: float | None) -> RunPlan:
    """Turn a request into the two arms' pipeline arguments (pure; no model call).

    Raises:
        ValueError: a relative window or the phase-aware schedule without a usable σ*, or a
            steerer that rejects its strength.
    """
    from steersample.sampling.guidance import GuidanceSchedule
    from steersample.steering.registry import make_steerer

    w = request.guidance_scale
    if request.window_relative:
        sigma_star = _check_boundary(boundary_sigma, "A window relative to the phase boundary")
        lo = max(0.0, sigma_star - request.below_boundary)
        hi = min(1.0, sigma_star + request.above_boundary)
        if not lo < hi:
            raise ValueError(f"Guidance window: σ* = {sigma_star:.3f} with these reaches gives the "
                             f"empty window ({lo:g}, {hi:g}]; widen it")
    else:
        lo, hi = request.window_lo, request.window_hi
    steered_guidance = GuidanceSchedule(scale=w, window=(lo, hi), scale_above=request.scale_above,
                                        scale_below=request.scale_below)
    options: dict[str, Any] = {"shift": request.shift}
    if request.schedule == "profile":
        options = {"from_profile": True}
    if request.schedule == "phase-aware":
        options["phase_boundary"] = _check_boundary(boundary_sigma, "The phase-aware schedule")
        options["navigation_fraction"] = request.navigation_fraction
    steering: tuple[Any, ...] = ()
    if request.steering != "none":
        param = steerer_strength_parameter(request.steering)
        kwargs = {param: request.strength} if param is not None else {}
        try:
            steering = (make_steerer(request.steering, **kwargs),)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Steering {request.steering!r} at strength {request.strength:g}: {err}")
    return RunPlan(plain_guidance=GuidanceSchedule.constant(w), steered_guidance=steered_guidance,
                   steered_scheduler_options=options, steering=steering, window=(lo, hi),
                   boundary_sigma=boundary_sigma)
