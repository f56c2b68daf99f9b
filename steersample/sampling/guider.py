"""A diffusers guider that applies a :class:`~steersample.sampling.guidance.GuidanceSchedule` by noise level.

diffusers' guiders (``diffusers.guiders``, used by Modular Diffusers) switch CFG on and off with
``start``/``stop`` given as fractions of the **step count**, so a window's meaning in noise level
changes with the shift and the number of steps. :class:`ScheduledClassifierFreeGuidance` reads
σ from the timestep instead::

    guider = ScheduledClassifierFreeGuidance.from_schedule(GuidanceSchedule.interval(5.0, 0.4, 0.9))
    modular_pipe.update_components(guider=guider)      # e.g. StableDiffusion3AutoBlocks().init_pipeline()

Per step the modular denoise blocks call ``set_state(step, num_inference_steps, timestep)``, then
``prepare_inputs`` (one batch per condition), run the model once per batch, and call the guider
on the batches. This guider takes ``σ = timestep / num_train_timesteps`` from ``set_state``;
where the schedule's scale is exactly 1.0, ``num_conditions`` is 1 and ``prepare_inputs`` returns
only the conditional batch, so the unconditional model call is skipped; elsewhere it returns
(cond, uncond) and ``forward`` returns ``pred_uncond + w(σ)·(pred_cond − pred_uncond)``, the same
expression as ``ClassifierFreeGuidance`` (bit-identical for a constant schedule, see the tests).

What diffusers' guider API does not allow, and why:

* **Per-sample noise levels.** ``num_conditions`` (and so whether the unconditional batch runs)
  is one decision for the whole batch per ``set_state`` call, so a guider cannot skip the
  unconditional pass for some samples only. A timestep tensor with differing entries (per-sample
  or per-token timesteps) is refused with a ``ValueError``; a batch that shares one σ (what every
  modular denoise block passes: ``t`` from ``enumerate(timesteps)``) works.
* **σ is inferred, not given.** The API passes the scheduler's *timestep*, not σ. This guider
  assumes diffusers' flow-matching convention ``timestep = σ·num_train_timesteps`` (true for
  ``FlowMatchEulerDiscreteScheduler`` and :class:`~steersample.sampling.scheduler.PhaseAwareFlowMatchScheduler`);
  with a scheduler that maps σ to timesteps differently (e.g. DDPM-style discrete schedules),
  windows in σ would be misread.
* **Telemetry.** ``GuiderOutput`` has fixed fields (``pred``, ``pred_cond``, ``pred_uncond``), so
  the scale used per step is not reported through it; read ``guider.current_scale`` after the
  call, or ``guider.schedule.scale_at(σ)``.
* ``start``/``stop`` (step fractions) are deliberately not exposed: the window lives in σ.

Note on modular SD3 (diffusers 0.42): its text-encoder block encodes a negative prompt only when
one is passed; without ``negative_prompt=""`` the "unconditional" batch reuses the conditional
embeddings, so any CFG guider (this one or diffusers') runs the extra pass and changes nothing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from steersample.sampling.guidance import GuidanceSchedule

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

__all__ = ["ScheduledClassifierFreeGuidance"]


class ScheduledClassifierFreeGuidance(BaseGuidance):
    """Classifier-free guidance whose scale is a :class:`GuidanceSchedule` of σ.

    Args (the :class:`GuidanceSchedule` fields, stored in ``guider_config.json``):
        scale, window, scale_above, scale_below, ramp: see :class:`GuidanceSchedule`.
        num_train_timesteps: σ = timestep / num_train_timesteps (1000 for SD3 and Flux).
        enabled: False gives the conditional prediction only, at every step.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(
        self,
        scale: float = 1.0,
        window: tuple[float, float] | list[float] = (0.0, 1.0),
        scale_above: float = 1.0,
        scale_below: float = 1.0,
        ramp: float = 0.0,
        num_train_timesteps: int = 1000,
        enabled: bool = True,
    ):
        super().__init__(start=0.0, stop=1.0, enabled=enabled)
        self.schedule = GuidanceSchedule(
            scale=scale, window=tuple(window), scale_above=scale_above, scale_below=scale_below, ramp=ramp
        )
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}.")
        # JSON keeps lists, not tuples: store the validated window as a list
        self.register_to_config(window=list(self.schedule.window))
        self.current_scale: float | None = None

    @classmethod
    def from_schedule(
        cls, schedule: GuidanceSchedule, *, num_train_timesteps: int = 1000, enabled: bool = True
    ) -> ScheduledClassifierFreeGuidance:
        """The guider for ``schedule`` (``GuidanceSchedule`` or its ``to_dict()``)."""
        if isinstance(schedule, dict):
            schedule = GuidanceSchedule.from_dict(schedule)
        if not isinstance(schedule, GuidanceSchedule):
            raise TypeError(f"schedule must be a GuidanceSchedule, got {type(schedule).__name__}.")
        return cls(**schedule.to_dict(), num_train_timesteps=num_train_timesteps, enabled=enabled)

    # ---------------------------------------------------------------- state
    @property
    def sigma(self) -> float | None:
        """σ of the current step (``timestep / num_train_timesteps``), None before ``set_state``."""
        t = self._timestep
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            flat = t.detach().reshape(-1)
            if flat.numel() == 0:
                raise ValueError("the timestep passed to set_state is empty.")
            if flat.numel() > 1 and not bool((flat == flat[0]).all()):
                raise ValueError(
                    "ScheduledClassifierFreeGuidance needs one timestep per step for the whole batch "
                    f"(diffusers decides num_conditions per batch), got differing values {flat.tolist()}."
                )
            t = flat[0].item()
        t = float(t)
        if not math.isfinite(t):
            raise ValueError(f"timestep must be finite, got {t!r}.")
        return t / self.config.num_train_timesteps

    def _scale_now(self) -> float | None:
        """The scale at the current σ (1.0 when disabled), None before ``set_state``."""
        if not self._enabled:
            return 1.0
        sigma = self.sigma
        return None if sigma is None else self.schedule.scale_at(sigma)

    @property
    def num_conditions(self) -> int:
        """2 (cond + uncond) where the scale at the current σ differs from 1.0, else 1.

        Before ``set_state`` it is 2 unless the schedule is 1.0 everywhere.
        """
        w = self._scale_now()
        if w is None:
            return 1 if self.schedule == GuidanceSchedule.constant(1.0) else 2
        return 1 if w == 1.0 else 2

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        state["sigma"] = self.sigma
        state["scale"] = self._scale_now()
        return state

    # ---------------------------------------------------------------- batches
    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[BlockState]:
        """One batch per condition: ``data[key][0]`` conditional, ``[1]`` unconditional."""
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, i, name) for i, name in zip(indices, self._input_predictions)]

    def prepare_inputs_from_block_state(
        self, data: BlockState, input_fields: dict[str, str | tuple[str, str]]
    ) -> list[BlockState]:
        """As :meth:`prepare_inputs`, for blocks that name their fields (LTX, Wan, Z-Image)."""
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [
            self._prepare_batch_from_block_state(input_fields, data, i, name)
            for i, name in zip(indices, self._input_predictions)
        ]

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        """``pred_uncond + w(σ)·(pred_cond − pred_uncond)``; ``pred_cond`` alone where ``w(σ) = 1``."""
        w = self._scale_now()
        if w is None:
            raise ValueError("call set_state(step, num_inference_steps, timestep) before the guider.")
        self.current_scale = w
        if w == 1.0:
            pred = pred_cond
        else:
            if pred_uncond is None:
                raise ValueError(
                    f"the guidance scale at sigma={self.sigma!r} is {w!r} but no unconditional prediction "
                    "was given; call set_state before prepare_inputs so the unconditional batch is prepared."
                )
            pred = pred_uncond + w * (pred_cond - pred_uncond)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
