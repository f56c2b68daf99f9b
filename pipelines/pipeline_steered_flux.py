"""``SteeredFluxPipeline``: Flux with true-CFG guidance schedules and steering.

A subclass of diffusers' ``FluxPipeline`` that keeps every stock argument and adds ``guidance=``,
``steering=``, ``reference=`` and ``return_telemetry=``. Flux has two kinds of guidance:

- the **distilled guidance embedding** of guidance-distilled checkpoints (``guidance_scale``,
  stock meaning, default 3.5, used when ``transformer.config.guidance_embeds``), which is an
  input of every model call and costs nothing extra;
- **true CFG** with a negative prompt (stock ``true_cfg_scale``), two passes per step. Here it is
  driven by a ``GuidanceSchedule``: ``guidance=`` (schedule or float), or ``true_cfg_scale=w``
  meaning ``GuidanceSchedule.from_guidance_scale(w)``. Outside the schedule's window the
  negative pass is skipped.

As in the stock pipeline, ``true_cfg_scale > 1`` without a negative prompt runs no CFG; an
explicit ``guidance=`` without one uses the empty prompt ``""`` as the negative prompt.
Reference sets hold *unpacked* latents ``(C, H / 8, W / 8)`` (as ``vae.encode`` gives them,
scaled and shifted as the transformer sees them); the loop packs and unpacks for telemetry.
``reference_labels=`` (one per prompt or per image) names the class of a labelled reference set
each prompt asks for, so that per-class steerers act on prompts as on class labels (as in
``SteeredSD3Pipeline``).
Also loads as a diffusers custom pipeline (``custom_pipeline=<this file>``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils import logging

from steersample.pipelines._common import (
    check_latents,
    check_reference_labels,
    check_num_inference_steps,
    check_reference,
    finish,
    per_run_scheduler,
    resolve_guidance,
    uses_uncond,
    wants_telemetry,
)
from steersample.sampling.loop import sample
from steersample.sampling.protocol import Conditioning, LatentLayout
from steersample.steering.registry import resolve_steering

__all__ = ["SteeredFluxPipeline"]

logger = logging.get_logger(__name__)


class SteeredFluxPipeline(FluxPipeline):
    """``FluxPipeline`` driven by ``steersample.sampling.loop.sample`` (see the module docstring).

    Extra keyword arguments of ``__call__`` (keyword-only): ``guidance``, ``steering``,
    ``reference``, ``return_telemetry``, as in ``SteeredStableDiffusion3Pipeline``.
    """

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, cond: dict, branch: str) -> torch.Tensor:
        timestep = t.expand(x.shape[0]).to(x.dtype)
        with self.transformer.cache_context(branch):
            return self.transformer(
                hidden_states=x,
                timestep=timestep / 1000,
                guidance=cond["guidance"],
                pooled_projections=cond["pooled_projections"],
                encoder_hidden_states=cond["encoder_hidden_states"],
                txt_ids=cond["txt_ids"],
                img_ids=cond["img_ids"],
                joint_attention_kwargs=cond["joint_attention_kwargs"],
                return_dict=False,
            )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: Any = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        *,
        guidance: Any = None,
        steering: Any = None,
        reference: Any = None,
        reference_labels: Any = None,
        return_telemetry: bool | None = None,
    ):
        """Stock ``FluxPipeline.__call__`` plus ``guidance``, ``steering``, ``reference`` and
        ``return_telemetry`` (see the module docstring)."""
        # 1. validate everything before any model call
        schedule = resolve_guidance(guidance, true_cfg_scale, 1.0, "true_cfg_scale")
        steerers = resolve_steering(steering, reference)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, prompt_2, height, width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        check_num_inference_steps(num_inference_steps, sigmas)
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        num_samples = batch_size * num_images_per_prompt
        channels = self.transformer.config.in_channels // 4
        lat_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        lat_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        check_latents(latents, (num_samples, (lat_h // 2) * (lat_w // 2), channels * 4))
        check_reference(reference, (channels, lat_h, lat_w))
        ref_labels = check_reference_labels(reference_labels, batch_size, num_samples, reference)
        has_negative = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        if guidance is None and not has_negative and schedule.scale != 1.0:
            logger.warning("true_cfg_scale > 1 without a negative prompt: no CFG (stock behaviour)")
            schedule = type(schedule)()
        device = self._execution_device
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        # 2. sigma grid on a per-run scheduler copy (stock sigmas and mu)
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            (lat_h // 2) * (lat_w // 2),
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        scheduler, timesteps = per_run_scheduler(
            self.scheduler, num_inference_steps, device, sigmas, mu=mu
        )
        scheduler.set_begin_index(0)
        self._num_timesteps = len(timesteps)
        need_uncond = uses_uncond(schedule, scheduler.sigmas)
        if need_uncond and not has_negative:
            if self.text_encoder is None or self.text_encoder_2 is None:
                raise ValueError(
                    "guidance needs an unconditional pass but there is no negative prompt and no "
                    "text encoders to encode one; pass negative_prompt_embeds and "
                    "negative_pooled_prompt_embeds"
                )
            negative_prompt = ""
        if need_uncond and prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(  # stock FluxPipeline's message (diffusers' tests match it)
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when "
                    f"passed directly, but got: `prompt_embeds` {tuple(prompt_embeds.shape)} != "
                    f"`negative_prompt_embeds` {tuple(negative_prompt_embeds.shape)}; pass "
                    "embeddings of the same sequence length (the same max_sequence_length)"
                )

        # 3. prompt embeddings (negative ones only if some step needs the unconditional pass)
        lora_scale = joint_attention_kwargs.get("scale", None) if joint_attention_kwargs else None
        encode = dict(
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, **encode,
        )
        if need_uncond:
            negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids = self.encode_prompt(
                prompt=negative_prompt, prompt_2=negative_prompt_2,
                prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, **encode,
            )

        # 4. latents (packed 2x2 tokens), exactly as the stock pipeline draws them
        latents, latent_image_ids = self.prepare_latents(
            num_samples, channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        distilled = None
        if self.transformer.config.guidance_embeds:
            distilled = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
            distilled = distilled.expand(latents.shape[0])

        # 5. conditioning: separate positive / negative passes, IP-Adapter embeddings per branch
        cond_jak, uncond_jak = self._ip_adapter_kwargs(
            joint_attention_kwargs, device, num_samples, width, height,
            ip_adapter_image, ip_adapter_image_embeds,
            negative_ip_adapter_image, negative_ip_adapter_image_embeds,
        )
        shared = {"guidance": distilled, "img_ids": latent_image_ids}
        conditioning = Conditioning(
            cond={
                "encoder_hidden_states": prompt_embeds,
                "pooled_projections": pooled_prompt_embeds,
                "txt_ids": text_ids,
                "joint_attention_kwargs": cond_jak,
                **shared,
            },
            uncond={
                "encoder_hidden_states": negative_prompt_embeds,
                "pooled_projections": negative_pooled_prompt_embeds,
                "txt_ids": negative_text_ids,
                "joint_attention_kwargs": uncond_jak,
                **shared,
            }
            if need_uncond
            else None,
            batched=False,
            labels=ref_labels,
            callback_keys={"prompt_embeds": "encoder_hidden_states"},
        )
        layout = LatentLayout(
            (channels, lat_h, lat_w),
            to_reference=lambda x: self._unpack_latents(x, height, width, self.vae_scale_factor),
            from_reference=lambda z: self._pack_latents(z, z.shape[0], channels, lat_h, lat_w),
        )

        # 6. the loop
        result = sample(
            self._model_fn,
            latents,
            scheduler,
            conditioning,
            schedule,
            steering=steerers,
            reference=reference,
            layout=layout,
            pipeline=self,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            return_telemetry=wants_telemetry(return_dict, return_telemetry),
        )

        # 7. decode as the stock pipeline does
        latents = result.latents
        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(self.vae.device), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return finish(image, result.telemetry, return_dict, return_telemetry)

    def _ip_adapter_kwargs(
        self, joint_attention_kwargs, device, num_samples, width, height,
        image, image_embeds, negative_image, negative_image_embeds,
    ) -> tuple[dict, dict]:
        """``joint_attention_kwargs`` of the positive and negative passes (stock IP-Adapter rules:
        a missing side defaults to a black image)."""
        base = dict(joint_attention_kwargs or {})
        has_pos = image is not None or image_embeds is not None
        has_neg = negative_image is not None or negative_image_embeds is not None
        if not has_pos and not has_neg:
            return base, base
        num_adapters = self.transformer.encoder_hid_proj.num_ip_adapters
        black = [np.zeros((width, height, 3), dtype=np.uint8)] * num_adapters
        if not has_neg:
            negative_image = black
        if not has_pos:
            image = black
        pos = self.prepare_ip_adapter_image_embeds(image, image_embeds, device, num_samples)
        neg = self.prepare_ip_adapter_image_embeds(
            negative_image, negative_image_embeds, device, num_samples
        )
        return {**base, "ip_adapter_image_embeds": pos}, {**base, "ip_adapter_image_embeds": neg}
