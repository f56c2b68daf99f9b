"""``SteeredStableDiffusion3Pipeline``: Stable Diffusion 3 with guidance schedules and steering.

A subclass of diffusers' ``StableDiffusion3Pipeline`` that keeps every stock argument and adds
``guidance=`` (a ``GuidanceSchedule`` or float), ``steering=``, ``reference=`` and
``return_telemetry=``. It prepares inputs as the stock pipeline does (same prompt encoding, same
``[negative, positive]`` batching, same latents and timesteps) and hands the denoising to
``steersample.sampling.loop.sample``; with neutral settings its output equals the stock pipeline's.

    pipe = SteeredStableDiffusion3Pipeline.from_pipe(stock_sd3)
    out = pipe("a cat", guidance=GuidanceSchedule(scale=7.0, window=(0.4, 0.9)), return_telemetry=True)

``guidance_scale=w`` keeps its stock meaning (CFG when ``w > 1``); skip-layer guidance
(``skip_guidance_layers``) runs as a steerer after CFG, exactly where the stock loop applies it.
Also loads as a diffusers custom pipeline (``custom_pipeline=<this file>``).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.cache_utils import CacheMixin
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

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
from steersample.sampling.protocol import Conditioning, StepState
from steersample.sampling.protocol import SteeringOutput
from steersample.steering.registry import resolve_steering

__all__ = ["SteeredStableDiffusion3Pipeline"]


class _SkipLayerGuidance:
    """SD3's skip-layer guidance as a steerer (built per call, so it may hold the transformer).

    Where CFG ran and ``N * start < step < N * stop`` (stock rule, N = number of steps):
    ``v <- v + scale * (v_cond - v_skip)`` with ``v_skip`` the conditional prediction of the
    transformer with ``layers`` skipped (one extra model evaluation, reported as
    ``skip_layer_guidance.model_evals``).
    """

    name: ClassVar[str] = "skip_layer_guidance"
    needs_reference: ClassVar[bool] = False

    def __init__(self, transformer, layers, scale: float, start: float, stop: float):
        self.transformer, self.layers = transformer, layers
        self.scale, self.start, self.stop = scale, start, stop

    def __call__(self, state: StepState) -> SteeringOutput:
        n = state.num_steps
        if state.pred_uncond is None or not (n * self.start < state.step < n * self.stop):
            return SteeringOutput(state.pred, {"model_evals": 0})
        cond = state.conditioning.cond
        with CacheMixin.cache_context(self.transformer, "skip_layers"):  # own cache-hook state
            v_skip = self.transformer(
                hidden_states=state.latents,
                timestep=state.timestep.expand(state.latents.shape[0]),
                encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"],
                joint_attention_kwargs=cond["joint_attention_kwargs"],
                return_dict=False,
                skip_layers=self.layers,
            )[0]
        return SteeringOutput(
            state.pred + (state.pred_cond - v_skip) * self.scale, {"model_evals": 1}
        )


class SteeredStableDiffusion3Pipeline(StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` driven by ``steersample.sampling.loop.sample``.

    Extra keyword arguments of ``__call__`` (all keyword-only):
        guidance: ``GuidanceSchedule`` or float; excludes a different ``guidance_scale``.
        steering: steerers or registry names, applied in order after guidance.
        reference: ``ReferenceSet`` of latents shaped like this call's latents
            ``(C, H / 8, W / 8)``, in the transformer's (scaled) latent space.
        reference_labels: optional class ids of a labelled ``reference`` (e.g. a store whose
            labels are prompt ids), one per prompt or per image: the class each prompt asks
            for, so that per-class steerers (``NoveltySteering``, ``AttractorRepulsion``'s
            scarce-class delay) act on text prompts as on class labels.
        return_telemetry: None (default) attaches ``steersample.Telemetry`` as
            ``output.telemetry``; True also returns it in the ``return_dict=False`` tuple; False
            records none (fastest).

    Callbacks (``callback_on_step_end``) see and may replace ``latents`` and the *conditional*
    ``prompt_embeds`` / ``pooled_prompt_embeds`` (the stock pipeline hands them the
    ``[negative, positive]`` concatenation instead). Guidance comes from the schedule, so
    callbacks that switch CFG off by setting ``pipe._guidance_scale`` (``SD3CFGCutoffCallback``)
    have no effect here: use a ``GuidanceSchedule`` window instead.
    """

    @property
    def current_timestep(self):
        """The timestep of the step being run (None outside a call), as ``FluxPipeline`` has it:
        diffusers' cache hooks read it (``current_timestep_callback=lambda: pipe.current_timestep``)."""
        return getattr(self, "_current_timestep", None)

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, cond: dict, branch: str) -> torch.Tensor:
        # a cache context per pass, as diffusers' CFG pipelines name them ("cond", "uncond", and
        # "cond_uncond" for the batched pass), so stateful cache hooks (FirstBlockCache,
        # TaylorSeer, MagCache, ...) work; SD3Transformer2DModel has no CacheMixin of its own
        name = "cond_uncond" if branch == "both" else branch
        with CacheMixin.cache_context(self.transformer, name):
            return self.transformer(
                hidden_states=x,
                timestep=t.expand(x.shape[0]),
                encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"],
                joint_attention_kwargs=cond["joint_attention_kwargs"],
                return_dict=False,
            )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        *,
        guidance: Any = None,
        steering: Any = None,
        reference: Any = None,
        reference_labels: Any = None,
        return_telemetry: bool | None = None,
    ):
        """Stock ``StableDiffusion3Pipeline.__call__`` plus ``guidance``, ``steering``,
        ``reference`` and ``return_telemetry`` (see the class docstring)."""
        # 1. validate everything before any model call
        schedule = resolve_guidance(guidance, guidance_scale, 7.0, "guidance_scale")
        steerers = resolve_steering(steering, reference)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, prompt_2, prompt_3, height, width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
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
        channels = self.transformer.config.in_channels
        shape = (channels, int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor)
        check_latents(latents, (num_samples, *shape))
        check_reference(reference, shape)
        ref_labels = check_reference_labels(reference_labels, batch_size, num_samples, reference)
        device = self._execution_device
        self._joint_attention_kwargs = joint_attention_kwargs
        self._clip_skip = clip_skip
        self._current_timestep = None
        self._interrupt = False

        # 2. sigma grid on a per-run scheduler copy (mu as the stock pipeline computes it)
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            patch = self.transformer.config.patch_size
            mu = calculate_shift(
                (shape[1] // patch) * (shape[2] // patch),
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
        scheduler, timesteps = per_run_scheduler(
            self.scheduler, num_inference_steps, device, sigmas, **({"mu": mu} if mu is not None else {})
        )
        self._num_timesteps = len(timesteps)
        self._guidance_scale = schedule.scale
        need_uncond = uses_uncond(schedule, scheduler.sigmas)

        # 3. prompt embeddings (negative ones only if some step needs the unconditional pass)
        lora_scale = joint_attention_kwargs.get("scale", None) if joint_attention_kwargs else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                prompt_3=prompt_3,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                negative_prompt_3=negative_prompt_3,
                do_classifier_free_guidance=need_uncond,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                device=device,
                clip_skip=clip_skip,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )
        )

        # 4. latents, exactly as the stock pipeline draws them
        latents = self.prepare_latents(
            num_samples, channels, height, width, prompt_embeds.dtype, device, generator, latents
        )

        # 5. conditioning: one batched [negative, positive] pass where CFG runs
        cond_kwargs, uncond_kwargs = dict(joint_attention_kwargs or {}), dict(joint_attention_kwargs or {})
        if (ip_adapter_image is not None and self.is_ip_adapter_active) or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, num_samples, need_uncond
            )
            negative_image_embeds, image_embeds = (
                image_embeds.chunk(2) if need_uncond else (None, image_embeds)
            )
            cond_kwargs["ip_adapter_image_embeds"] = image_embeds
            uncond_kwargs["ip_adapter_image_embeds"] = negative_image_embeds
        jak = joint_attention_kwargs is not None or "ip_adapter_image_embeds" in cond_kwargs
        conditioning = Conditioning(
            cond={
                "encoder_hidden_states": prompt_embeds,
                "pooled_projections": pooled_prompt_embeds,
                "joint_attention_kwargs": cond_kwargs if jak else None,
            },
            uncond={
                "encoder_hidden_states": negative_prompt_embeds,
                "pooled_projections": negative_pooled_prompt_embeds,
                "joint_attention_kwargs": uncond_kwargs if jak else None,
            }
            if need_uncond
            else None,
            batched=True,
            labels=ref_labels,
            callback_keys={
                "prompt_embeds": "encoder_hidden_states",
                "pooled_prompt_embeds": "pooled_projections",
            },
        )
        if skip_guidance_layers is not None:
            slg = _SkipLayerGuidance(
                self.transformer, skip_guidance_layers, skip_layer_guidance_scale,
                skip_layer_guidance_start, skip_layer_guidance_stop,
            )
            steerers = (slg, *steerers)

        # 6. the loop
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

        # 7. decode as the stock pipeline does
        latents = result.latents
        if output_type == "latent":
            image = latents
        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return finish(image, result.telemetry, return_dict, return_telemetry)
