"""The steerer registry: one table of names the CLI and the studio list and build steerers from.

:data:`STEERERS` maps a name to a steerer class (the protocol is
``steersample.sampling.protocol``); it lists the built-in steerers below, and
:func:`register_steerer` adds a user's class. :func:`make_steerer` builds one from a name, and
:func:`resolve_steering` turns a pipeline's ``steering=`` argument into instances and checks
reference requirements before any model call.
"""

from __future__ import annotations

from typing import Any, Iterable

from steersample.sampling.protocol import NoSteering, Steerer, SteeringOutput
from steersample.steering.attractor import AttractorRepulsion
from steersample.steering.novelty import NoveltySteering
from steersample.steering.representation import RepresentationSteering

__all__ = [
    "SteeringOutput",
    "Steerer",
    "NoSteering",
    "STEERERS",
    "register_steerer",
    "make_steerer",
    "resolve_steering",
]


STEERERS: dict[str, type] = {
    cls.name: cls for cls in (NoSteering, AttractorRepulsion, NoveltySteering, RepresentationSteering)
}
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
            "(register a new one with @steersample.steering.registry.register_steerer)"
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
