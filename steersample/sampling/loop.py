"""The one denoising loop every steered pipeline calls (``DESIGN.md``, "The denoising loop").

Pipelines only prepare inputs (a model adapter, latents, a scheduler with its timesteps set,
the conditioning) and decode; :func:`sample` owns the iteration. Per step i, with the diffusers
flow convention (sigma = 1 is noise, ``timestep = 1000 * sigma``, the model predicts
``v = eps - x0``):

    sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
    if guidance.needs_uncond(sigma):                       # CFG window: skip the pass outside
        v_uncond, v_cond = model([x, x], t, [uncond, cond]) # one batched pass (SD3, DiT)
                                                            # or two passes (Flux true CFG)
    else:
        v_cond, v_uncond = model(x, t, cond), None
    v = guidance.combine(v_cond, v_uncond, sigma)           # v_u + w(sigma) (v_c - v_u)
    for steerer in steering:                                # StepState -> adjusted v
        v = steerer(StepState(..., pred=v, x0_hat=x - sigma * v)).prediction
    x = scheduler.step(v, t, x)                             # Euler: x + (sigma_next - sigma) v
    telemetry; callback_on_step_end(pipeline, i, t, {"latents": x, ...})   # stock semantics

Every piece of per-run state (telemetry recorder, stacked conditioning, step counter) is a local
of :func:`sample`; the pipeline, the scheduler passed in (the pipelines pass a per-run copy) and
the steerers are only read. Numerics: the loop does not cast; the scheduler integrates in
float32 as diffusers does, the model adapter casts at the model call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from steersample.sampling.protocol import Conditioning, LatentLayout, SteeringOutput, StepState
from steersample.sampling.telemetry import Telemetry, TelemetryRecorder

__all__ = ["ModelFn", "SampleResult", "sample"]

ModelFn = Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any], str], torch.Tensor]
"""``model_fn(x, t, cond, branch) -> v``: x ``(R, *shape)``, t the scheduler's 0-d timestep,
``cond`` keyword tensors with R rows, ``branch`` one of ``"cond"``, ``"uncond"``, ``"both"``
(the batched ``[uncond, cond]`` pass; adapters may use it for cache contexts). Returns v with
x's shape."""


@dataclass(frozen=True)
class SampleResult:
    """The loop's output: final latents (loop layout) and telemetry (None unless requested)."""

    latents: torch.Tensor
    telemetry: Telemetry | None = None


def sample(
    model_fn: ModelFn,
    latents: torch.Tensor,
    scheduler: Any,
    conditioning: Conditioning,
    guidance: Any,
    *,
    steering: Sequence[Any] = (),
    reference: Any = None,
    layout: LatentLayout | None = None,
    pipeline: Any = None,
    callback_on_step_end: Callable[..., dict] | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    return_telemetry: bool = False,
) -> SampleResult:
    """Run the denoising loop over ``scheduler.timesteps`` (set them before calling).

    Args:
        model_fn: model adapter, see :data:`ModelFn`.
        latents: ``(B, ...)`` initial noise x at sigma = scheduler.sigmas[0].
        scheduler: a diffusers flow-matching scheduler with ``timesteps``, ``sigmas`` and
            ``step``; it is stepped in place, so pass a per-run copy.
        conditioning: see :class:`Conditioning`.
        guidance: a ``GuidanceSchedule`` (``needs_uncond``, ``scale_at``, ``combine``).
        steering: steerer instances, applied in order (``steering.resolve_steering``).
        reference: ``ReferenceSet`` in ``layout.shape`` (or None); feeds steerers and telemetry.
        layout: reference layout of the latents (default: identity, ``latents.shape[1:]``).
        pipeline: the calling pipeline: ``progress_bar``, ``interrupt`` and the first argument
            of ``callback_on_step_end``. None runs without progress bar or interruption. As in
            diffusers' own loops, ``pipeline._current_timestep`` is ``t`` while step ``t`` runs
            and None after the run (diffusers' cache hooks read it through
            ``pipeline.current_timestep``); a step is skipped while ``pipeline.interrupt`` is True.
        callback_on_step_end: ``callback(pipeline, i, t, callback_kwargs) -> dict``, called after
            the scheduler step; a returned ``"latents"`` replaces the current latents, a returned
            name from ``conditioning.callback_keys`` replaces that conditional tensor.
        callback_on_step_end_tensor_inputs: names put in ``callback_kwargs``.
        return_telemetry: build a :class:`~steersample.sampling.telemetry.Telemetry` record.

    Returns:
        :class:`SampleResult` with the final latents.
    """
    layout = layout or LatentLayout(tuple(latents.shape[1:]))
    timesteps = scheduler.timesteps
    sigmas = scheduler.sigmas.tolist()
    num_steps = len(timesteps)
    num_warmup_steps = max(num_steps - num_steps * scheduler.order, 0)
    recorder = (
        TelemetryRecorder(reference, layout.unpack, conditioning.labels) if return_telemetry else None
    )
    stacked = None  # the batched [uncond, cond] keywords, built on first use
    progress = pipeline.progress_bar(total=num_steps) if pipeline is not None else None

    with contextlib.ExitStack() as run_scope:
        # 0. per-run steerer state (e.g. forward hooks on the model), released when the run ends
        steering = tuple(_bind(steerer, pipeline, run_scope) for steerer in steering)
        bar = run_scope.enter_context(progress) if progress is not None else None
        for i, t in enumerate(timesteps):
            if pipeline is not None and getattr(pipeline, "interrupt", False):
                continue
            if pipeline is not None:
                pipeline._current_timestep = t
            sigma, sigma_next = sigmas[i], sigmas[i + 1]

            # 1. model: conditional pass, plus the unconditional one where guidance needs it
            need_uncond = guidance.needs_uncond(sigma)
            if need_uncond and conditioning.batched:
                stacked = stacked if stacked is not None else conditioning.stacked()
                v_uncond, v_cond = model_fn(torch.cat([latents] * 2), t, stacked, "both").chunk(2)
            else:
                v_cond = model_fn(latents, t, conditioning.cond, "cond")
                v_uncond = (
                    model_fn(latents, t, conditioning.uncond, "uncond") if need_uncond else None
                )
            model_evals = 2 if need_uncond else 1

            # 2. guidance: v = v_uncond + w(sigma) * (v_cond - v_uncond)
            v_guided = v = guidance.combine(v_cond, v_uncond, sigma)
            scale = guidance.scale_at(sigma) if need_uncond else 1.0

            # 3. steerers, in order, each on the prediction left by the previous one
            scores: dict[str, Any] = {}
            for steerer in steering:
                state = StepState(
                    step=i, num_steps=num_steps, sigma=sigma, sigma_next=sigma_next, timestep=t,
                    latents=latents, pred=v, pred_cond=v_cond, pred_uncond=v_uncond,
                    guidance_scale=scale, conditioning=conditioning, layout=layout,
                    reference=reference,
                )
                out: SteeringOutput = steerer(state)
                v = out.prediction
                scores.update({f"{steerer.name}.{k}": val for k, val in out.telemetry.items()})

            # 4. scheduler step x_sigma -> x_sigma_next, then telemetry on (x_sigma, v)
            latents_next = scheduler.step(v, t, latents, return_dict=False)[0]
            if recorder is not None:
                recorder.record(
                    step=i, sigma=sigma, sigma_next=sigma_next, model_evals=model_evals,
                    guidance_scale=scale, latents=latents, x0_hat=latents - sigma * v,
                    v_guided=v_guided, v_steered=v, scores=scores,
                )
            latents = latents_next

            # 5. callback_on_step_end (stock semantics: returned tensors replace ours)
            if callback_on_step_end is not None:
                latents, edited = _step_end_callback(
                    callback_on_step_end, pipeline, i, t, latents, conditioning,
                    callback_on_step_end_tensor_inputs,
                )
                if edited is not conditioning:
                    conditioning, stacked = edited, None

            if bar is not None and (
                i == num_steps - 1 or ((i + 1) > num_warmup_steps and (i + 1) % scheduler.order == 0)
            ):
                bar.update()
    if pipeline is not None:
        pipeline._current_timestep = None

    telemetry = recorder.finish(latents) if recorder is not None else None
    return SampleResult(latents=latents, telemetry=telemetry)


def _bind(steerer: Any, pipeline: Any, run_scope: contextlib.ExitStack) -> Any:
    """The steerer this run uses: ``steerer.bind(pipeline)`` entered in ``run_scope`` when the
    steerer has a ``bind`` method (a context manager yielding a per-run steerer, e.g. one that
    hooks ``pipeline.transformer`` and unhooks on exit), else the steerer itself."""
    bind = getattr(steerer, "bind", None)
    return run_scope.enter_context(bind(pipeline)) if callable(bind) else steerer


def _step_end_callback(callback, pipeline, i, t, latents, conditioning, names):
    """Call ``callback(pipeline, i, t, kwargs)``; return the (possibly replaced) latents and
    conditioning. ``kwargs`` holds ``latents`` and the conditional tensors named in ``names``."""
    keys = conditioning.callback_keys
    kwargs = {
        name: latents if name == "latents" else conditioning.cond[keys[name]] for name in names
    }
    returned = dict(callback(pipeline, i, t, kwargs) or {})
    latents = returned.pop("latents", latents)
    edits = {keys[name]: value for name, value in returned.items() if name in keys}
    if edits:
        conditioning = replace(conditioning, cond={**conditioning.cond, **edits})
    return latents, conditioning
