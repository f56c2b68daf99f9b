"""``SteeredFlowPipeline``: a class-conditional flow-matching transformer, steered.

Drives any diffusers transformer that takes ``class_labels`` (for example
``DiTTransformer2DModel``) and predicts the flow velocity ``v = eps - x0`` at
``timestep = 1000 * sigma``. Works in pixel space (no VAE; images in [-1, 1]) and in a VAE's
latent space. Label ids ``0 .. K-1`` are classes and the last id ``K`` (``num_embeds_ada_norm``
for DiT) is the null class used for the unconditional CFG pass.

    pipe = SteeredFlowPipeline(transformer=dit, scheduler=FlowMatchEulerDiscreteScheduler())
    out = pipe(class_labels=[3, 7], guidance=GuidanceSchedule(scale=3.0, window=(0.4, 0.9)),
               num_inference_steps=30, generator=torch.Generator().manual_seed(0), output_type="np")

Also loads as a diffusers custom pipeline (``custom_pipeline=<this file>``); imports are absolute.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor

from steersample.pipelines._common import (
    quiet_transformers,
    check_latents,
    check_num_inference_steps,
    check_reference,
    finish,
    per_run_scheduler,
    resolve_guidance,
    uses_uncond,
    wants_telemetry,
)
from steersample.sampling.loop import sample
from steersample.sampling.protocol import Conditioning
from steersample.steering.registry import resolve_steering

with quiet_transformers():  # the SD3 module builds CLIP/SigLIP processors that warn without torchvision
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

__all__ = ["SteeredFlowPipeline"]

_NUM_CLASS_KEYS = ("num_embeds_ada_norm", "num_class_embeds", "num_classes")


class SteeredFlowPipeline(DiffusionPipeline):
    """Class-conditional flow-matching pipeline with guidance schedules, steering and telemetry.

    Args:
        transformer: a class-conditional transformer, ``forward(hidden_states, timestep,
            class_labels)``, predicting ``v`` (extra output channels, e.g. a learned variance,
            are dropped).
        scheduler: a flow-matching scheduler (``FlowMatchEulerDiscreteScheduler`` or
            ``steersample.PhaseAwareFlowMatchScheduler``).
        vae: optional ``AutoencoderKL``; without one the model works on pixels in [-1, 1].
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.vae_scale_factor = (
            2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def num_classes(self) -> int:
        """Number of real classes K; label id K is the null (unconditional) class."""
        for key in _NUM_CLASS_KEYS:
            value = self.transformer.config.get(key)
            if value is not None:
                return int(value)
        raise ValueError(
            f"{type(self.transformer).__name__} has none of the config keys {_NUM_CLASS_KEYS}; "
            "SteeredFlowPipeline needs a class-conditional transformer"
        )

    @property
    def null_class(self) -> int:
        """The label id of the unconditional (CFG) pass: the last one, ``num_classes``."""
        return self.num_classes

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    @property
    def current_timestep(self):
        """The timestep of the step being run, None outside a call (diffusers' cache hooks)."""
        return getattr(self, "_current_timestep", None)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def _labels(self, class_labels: Any, device: torch.device) -> torch.Tensor:
        try:
            labels = torch.as_tensor(class_labels, device=device).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            labels = None
        if (
            labels is None
            or labels.numel() == 0
            or labels.dtype.is_floating_point
            or labels.dtype == torch.bool
        ):
            raise ValueError(
                f"class_labels must be integer class ids, e.g. [3, 7]; got {class_labels!r}"
            )
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"class_labels {labels[bad].tolist()} are outside 0..{self.num_classes - 1} "
                f"(the model has {self.num_classes} classes; id {self.null_class} is the null "
                "class reserved for guidance)"
            )
        return labels.long()

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, cond: dict, branch: str) -> torch.Tensor:
        """v = transformer(x, 1000 sigma, labels), cast at the call, extra channels dropped."""
        dtype = self.transformer.dtype
        out = self.transformer(
            hidden_states=x.to(dtype),
            timestep=t.expand(x.shape[0]),
            class_labels=cond["class_labels"],
            return_dict=False,
        )[0]
        return out[:, : x.shape[1]].to(x.dtype)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        *,
        guidance: Any = None,
        steering: Any = None,
        reference: Any = None,
        return_telemetry: bool | None = None,
    ):
        """Generate one image per class label.

        Args:
            class_labels: ``int``, list or ``(B,)`` tensor of ids in ``0 .. num_classes - 1``.
            num_inference_steps: steps of the scheduler (ignored when ``sigmas`` is given).
            guidance_scale: constant CFG scale (default 4.0, as diffusers' ``DiTPipeline``);
                same as ``guidance=GuidanceSchedule(scale=w)``.
            generator: one generator, or one per sample (sample k then does not depend on the
                batch it is in).
            latents: ``(B, C, H, W)`` initial noise (finite); drawn from ``generator`` if None.
            sigmas, mu: custom sigma grid and dynamic-shift ``mu``, as in the SD3 pipeline.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end: ``callback(pipe, i, t, {"latents": ...}) -> dict``.
            guidance: ``GuidanceSchedule`` or float.
            steering: steerers or registry names, applied in order.
            reference: ``ReferenceSet`` in this pipeline's latent layout ``(C, H, W)``.
            return_telemetry: None (default) attaches ``steersample.Telemetry`` as
            ``output.telemetry``; True also returns it in the ``return_dict=False`` tuple; False
            records none (fastest).
        """
        # 1. validate everything before any model call
        schedule = resolve_guidance(guidance, guidance_scale, 4.0, "guidance_scale")
        steerers = resolve_steering(steering, reference)
        check_num_inference_steps(num_inference_steps, sigmas)
        if callback_on_step_end is not None and hasattr(callback_on_step_end, "tensor_inputs"):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {sorted(unknown)} not in "
                f"{self._callback_tensor_inputs}"
            )
        device = self._execution_device
        labels = self._labels(class_labels, device)
        size = self.transformer.config.sample_size
        shape = (labels.shape[0], self.transformer.config.in_channels, size, size)
        check_latents(latents, shape)
        check_reference(reference, shape[1:])

        # 2. sigma grid (per-run scheduler copy)
        if self.scheduler.config.get("use_dynamic_shifting", False) and mu is None:
            patch = self.transformer.config.get("patch_size") or 1
            mu = calculate_shift(
                (size // patch) ** 2,
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
        scheduler_kwargs = {"mu": mu} if mu is not None else {}
        scheduler, timesteps = per_run_scheduler(
            self.scheduler, num_inference_steps, device, sigmas, **scheduler_kwargs
        )
        self._num_timesteps = len(timesteps)
        self._interrupt = False

        # 3. initial noise and conditioning (null class for the unconditional branch)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        null = torch.full_like(labels, self.null_class)
        conditioning = Conditioning(
            cond={"class_labels": labels},
            uncond={"class_labels": null} if uses_uncond(schedule, scheduler.sigmas) else None,
            batched=True,
            labels=labels,
        )

        # 4. the loop
        result = sample(
            self._model_fn,
            latents,
            scheduler,
            conditioning,
            schedule,
            steering=steerers,
            reference=reference,
            pipeline=self,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            return_telemetry=wants_telemetry(return_dict, return_telemetry),
        )

        # 5. decode
        images = self.decode(result.latents, output_type)
        self.maybe_free_model_hooks()
        return finish(images, result.telemetry, return_dict, return_telemetry)

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> Any:
        """Latents -> images: through the VAE if there is one, else pixels in [-1, 1]."""
        if output_type == "latent":
            return latents
        if self.vae is not None:
            shift = self.vae.config.get("shift_factor") or 0.0
            latents = latents / self.vae.config.scaling_factor + shift
            images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        else:
            images = latents
        return self.image_processor.postprocess(images.float(), output_type=output_type)
