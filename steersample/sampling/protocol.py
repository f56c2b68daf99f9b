"""The steerer protocol: what the sampling loop hands a steerer and what it gets back.

``DESIGN.md``, "The denoising loop and the steering protocol"::

    class MySteerer:
        name = "mine"                 # registry key (CLI, studio)
        needs_reference = False       # True: the pipeline call must pass reference=ReferenceSet

        def __init__(self, strength: float = 0.5):   # explicit keyword arguments only
            self.strength = strength

        def __call__(self, state: StepState) -> SteeringOutput:
            v = state.pred + ...                     # (B, *shape), same dtype/device as state.pred
            return SteeringOutput(v, {"my_score": per_sample_tensor})

A steerer receives a frozen :class:`StepState` (step index, sigma,
sigma_next, latents x_sigma, the guided prediction ``pred`` so far, ``pred_cond``,
``pred_uncond``, ``x0_hat = latents - sigma * pred``, conditioning/labels, reference set) and
returns the adjusted velocity plus its telemetry. Steerers run in the order given; each sees the
prediction left by the previous one. A steerer keeps no per-run state on ``self`` (one instance
may serve concurrent runs); anything that must persist across steps belongs in the loop.

The registry that names steerers for the CLI and the studio is ``steersample.steering.registry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

import torch

__all__ = ["Conditioning", "LatentLayout", "StepState", "SteeringOutput", "Steerer", "NoSteering"]


@dataclass(frozen=True)
class Conditioning:
    """What the model is conditioned on.

    Attributes:
        cond: keyword arguments of the conditional pass (tensors have B rows).
        uncond: keyword arguments of the unconditional pass, or None when none is available.
        batched: True: cond and uncond run as one pass on ``cat([uncond, cond])`` (every tensor
            value is concatenated along dim 0, recursively through dicts; other values come from
            ``cond``), as the stock SD3 pipeline does. False: two passes, cond first (Flux).
        labels: ``(B,)`` class labels (class-conditional models), used by reference telemetry.
        callback_keys: callback tensor name -> key of ``cond`` (e.g. SD3
            ``{"prompt_embeds": "encoder_hidden_states"}``). Callbacks see and may replace the
            *conditional* tensors.
    """

    cond: Mapping[str, Any]
    uncond: Mapping[str, Any] | None = None
    batched: bool = True
    labels: torch.Tensor | None = None
    callback_keys: Mapping[str, str] = field(default_factory=dict)

    def stacked(self) -> dict[str, Any]:
        """Keyword arguments of the batched pass: ``[uncond, cond]`` along dim 0."""
        if self.uncond is None:
            raise ValueError("this conditioning has no unconditional branch to stack")
        return _stack(self.uncond, self.cond)


def _stack(uncond: Any, cond: Any) -> Any:
    if isinstance(cond, torch.Tensor):
        return torch.cat([uncond, cond], dim=0)
    if isinstance(cond, Mapping):
        return {key: _stack(uncond[key], value) for key, value in cond.items()}
    return cond


@dataclass(frozen=True)
class LatentLayout:
    """How the loop's latents relate to a reference set's layout.

    ``shape`` is one sample's shape in reference layout; ``to_reference`` maps loop latents
    ``(B, ...)`` to ``(B, *shape)`` and ``from_reference`` maps back (identity when None; Flux
    packs ``(C, H, W)`` latents into ``(H/2 * W/2, 4C)`` tokens and unpacks them here).
    """

    shape: tuple[int, ...]
    to_reference: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_reference: Callable[[torch.Tensor], torch.Tensor] | None = None

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Loop latents -> reference layout."""
        return x if self.to_reference is None else self.to_reference(x)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Reference layout -> loop latents."""
        return x if self.from_reference is None else self.from_reference(x)


@dataclass(frozen=True)
class StepState:
    """Everything a steerer may read at step ``step`` (tensors are ``(B, *shape)``).

    ``pred`` is the guided velocity after the previous steerers, ``pred_cond``/``pred_uncond``
    the raw model outputs (``pred_uncond`` None where the guidance window skipped it), and
    ``x0_hat = latents - sigma * pred`` the one-step denoised estimate.
    """

    step: int
    num_steps: int
    sigma: float
    sigma_next: float
    timestep: torch.Tensor
    latents: torch.Tensor
    pred: torch.Tensor
    pred_cond: torch.Tensor
    pred_uncond: torch.Tensor | None
    guidance_scale: float
    conditioning: Conditioning
    layout: LatentLayout
    reference: Any = None

    @property
    def x0_hat(self) -> torch.Tensor:
        """One-step denoised estimate ``x_sigma - sigma * v``."""
        return self.latents - self.sigma * self.pred

    @property
    def labels(self) -> torch.Tensor | None:
        """``(B,)`` class labels, or None for text-conditioned models."""
        return self.conditioning.labels


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

    def __call__(self, state: StepState) -> SteeringOutput: ...



class NoSteering:
    """The identity steerer: returns the prediction unchanged and no telemetry.

    Useful as the "plain" arm of a comparison (the studio's left image) and as the smallest
    example of the protocol. ``steering=[NoSteering()]`` gives output identical to no steering.
    """

    name: ClassVar[str] = "none"
    needs_reference: ClassVar[bool] = False

    def __call__(self, state: StepState) -> SteeringOutput:
        return SteeringOutput(state.pred)

    def __repr__(self) -> str:
        return "NoSteering()"
