"""Steerers: small components the sampling loop hands each step's state to.

Protocol (``DESIGN.md``, "The denoising loop and the steering protocol"):

    class MySteerer:
        name = "mine"                 # registry key (CLI, studio)
        needs_reference = False       # True: the pipeline call must pass reference=ReferenceSet

        def __init__(self, strength: float = 0.5):   # explicit keyword arguments only
            self.strength = strength

        def __call__(self, state: StepState) -> SteeringOutput:
            v = state.pred + ...                     # (B, *shape), same dtype/device as state.pred
            return SteeringOutput(v, {"my_score": per_sample_tensor})

A steerer receives a frozen :class:`~steersample.sampling.StepState` (step index, sigma,
sigma_next, latents x_sigma, the guided prediction ``pred`` so far, ``pred_cond``,
``pred_uncond``, ``x0_hat = latents - sigma * pred``, conditioning/labels, reference set) and
returns the adjusted velocity plus its telemetry. Steerers run in the order given; each sees the
prediction left by the previous one. A steerer keeps no per-run state on ``self`` (one instance
may serve concurrent runs); anything that must persist across steps belongs in the loop.

:data:`STEERERS` is the one registry table (name -> class) that the CLI and the studio list;
:func:`register_steerer` adds a class, :func:`make_steerer` builds one from a name, and
:func:`resolve_steering` turns a pipeline's ``steering=`` argument into instances and checks
reference requirements before any model call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from steersample.sampling import StepState

__all__ = [
    "SteeringOutput",
    "Steerer",
    "NoSteering",
    "STEERERS",
    "register_steerer",
    "make_steerer",
    "resolve_steering",
]


@dataclass(frozen=True)
class SteeringOutput:
    """What a steerer returns.

    Attributes:
        prediction: the adjusted velocity ``v``, shape ``(B, *shape)`` like ``state.pred``.
        telemetry: steerer scores, ``key -> (B,) tensor or float``; the loop records them as
            ``"<steerer name>.<key>"`` in each step's ``scores``.
    """

    prediction: torch.Tensor
    telemetry: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "telemetry", MappingProxyType(dict(self.telemetry)))


@runtime_checkable
class Steerer(Protocol):
    """Structural type of a steerer (see the module docstring)."""

    name: ClassVar[str]
    needs_reference: ClassVar[bool]

    def __call__(self, state: "StepState") -> SteeringOutput: ...


STEERERS: dict[str, type] = {}
"""Registry: steerer name -> class. The CLI and the studio list and build steerers from it."""


def register_steerer(cls: type) -> type:
    """Class decorator adding ``cls`` to :data:`STEERERS` under ``cls.name``.

    Raises:
        TypeError: the class lacks a string ``name`` or a bool ``needs_reference``.
        ValueError: another class is already registered under that name.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name = '<registry key>'`")
    if not isinstance(getattr(cls, "needs_reference", None), bool):
        raise TypeError(f"{cls.__name__} needs a class attribute `needs_reference = True/False`")
    if STEERERS.get(name, cls) is not cls:
        raise ValueError(
            f"steerer name {name!r} is taken by {STEERERS[name].__name__}; pick another `name`"
        )
    STEERERS[name] = cls
    return cls


def make_steerer(name: str, **kwargs: Any) -> Steerer:
    """Build the registered steerer ``name`` with keyword arguments ``kwargs``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the known names).
    """
    if name not in STEERERS:
        raise ValueError(
            f"unknown steerer {name!r}; registered steerers are {sorted(STEERERS)} "
            "(register a new one with @steersample.steering.register_steerer)"
        )
    return STEERERS[name](**kwargs)


def resolve_steering(steering: Any, reference: Any = None) -> tuple[Steerer, ...]:
    """Turn a pipeline's ``steering=`` argument into a tuple of steerer instances.

    Args:
        steering: None, one steerer or name, or an iterable of steerers and/or registry names
            (names are built with their default arguments).
        reference: the call's ``reference=`` (a ``ReferenceSet`` or None).

    Raises:
        ValueError: an unknown name, or a steerer with ``needs_reference = True`` and no
            ``reference=``.
        TypeError: an item is neither a name nor a callable steerer.
    """
    if steering is None:
        return ()
    items: Iterable[Any] = (
        [steering] if isinstance(steering, str) or callable(steering) else steering
    )
    steerers = []
    for item in items:
        steerer = make_steerer(item) if isinstance(item, str) else item
        if isinstance(steerer, type):
            raise TypeError(
                f"steering got the class {steerer.__name__}; pass an instance, "
                f"e.g. steering=[{steerer.__name__}()]"
            )
        if not callable(steerer) or not isinstance(getattr(steerer, "name", None), str):
            raise TypeError(
                f"steering items must be registry names {sorted(STEERERS)} or steerer instances "
                f"(a `name` attribute and __call__(state) -> SteeringOutput); got {item!r}"
            )
        if getattr(steerer, "needs_reference", False) and reference is None:
            raise ValueError(
                f"steerer {steerer.name!r} needs a reference set: pass "
                "reference=steersample.ReferenceSet(latents, labels) to the pipeline call"
            )
        steerers.append(steerer)
    return tuple(steerers)


@register_steerer
class NoSteering:
    """The identity steerer: returns the prediction unchanged and no telemetry.

    Useful as the "plain" arm of a comparison (the studio's left image) and as the smallest
    example of the protocol. ``steering=[NoSteering()]`` gives output identical to no steering.
    """

    name: ClassVar[str] = "none"
    needs_reference: ClassVar[bool] = False

    def __call__(self, state: "StepState") -> SteeringOutput:
        return SteeringOutput(state.pred)

    def __repr__(self) -> str:
        return "NoSteering()"


# steerers defined in their own modules register themselves on import (kept last: they import
# register_steerer and SteeringOutput from this module)
from steersample import attractor as _attractor  # noqa: E402,F401
from steersample import representation as _representation  # noqa: E402,F401
