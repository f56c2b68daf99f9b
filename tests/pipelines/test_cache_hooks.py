"""diffusers' cache hooks on the steered SD3 and Flux pipelines, against the stock pipeline with
the same hook; plus what the hooks and diffusers' fast tests read from a pipeline:
``current_timestep``, ``interrupt``, stock input checks.

Neutral settings (no window, no steerers, stock scheduler; CFG as the stock argument means it):
the steered output equals the stock output with the same hook, bit for bit.

Stock ``StableDiffusion3Pipeline`` has neither ``current_timestep`` nor cache contexts, so there
the stock reference gets the timestep from a forward pre-hook on its transformer, and only hooks
that need no cache context run on it. ``FirstBlockCache`` and ``TaylorSeer`` do not run on
``SD3Transformer2DModel`` in diffusers itself (its last joint block returns no text stream,
which both hooks subtract or cast); the steered SD3 pipeline still passes them cache contexts.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import hooks

from steersample.pipelines import SteeredFluxPipeline, SteeredStableDiffusion3Pipeline
from steersample.testing import tiny_flux_pipeline, tiny_sd3_pipeline

STEPS = 6


def _configs(timestep):
    """Each cache hook of ``diffusers.hooks`` that ``transformer.enable_cache`` accepts, with
    settings under which it really skips work on a 6-step run (``timestep``: callback)."""
    return {
        "pyramid_attention_broadcast": lambda: hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800),
            spatial_attention_block_identifiers=["transformer_blocks"],
            current_timestep_callback=timestep,
        ),
        "faster_cache": lambda: hooks.FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 901),
            unconditional_batch_skip_range=2,
            attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=True,  # its CFG-frequency path expects video latents
            current_timestep_callback=timestep,
        ),
        "first_block_cache": lambda: hooks.FirstBlockCacheConfig(threshold=0.8),
        "taylorseer": lambda: hooks.TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=1, max_order=1,
            taylor_factors_dtype=torch.float32, use_lite_mode=True,
        ),
        "mag_cache": lambda: hooks.MagCacheConfig(
            threshold=0.06, max_skip_steps=3, retention_ratio=0.2,
            num_inference_steps=STEPS, mag_ratios=torch.ones(STEPS),
        ),
        "text_kv_cache": lambda: hooks.TextKVCacheConfig(),
        "sea_cache": lambda: hooks.SeaCacheConfig(),
    }


HOOKS = sorted(_configs(None))
SD3_HOOKS = ["pyramid_attention_broadcast", "faster_cache", "mag_cache", "text_kv_cache", "sea_cache"]
FLUX_CALL = dict(prompt="a cat", negative_prompt="dark", true_cfg_scale=3.0, height=16, width=16,
                 max_sequence_length=16)
SD3_CALL = dict(prompt="a cat", height=8, width=8)  # stock CFG (guidance_scale 7)


def _run(pipe, **kw):
    return pipe(**kw, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def _enable(transformer, config):
    """``enable_cache`` where the model has it (Flux); the hook's ``apply_*`` function otherwise
    (SD3Transformer2DModel has no CacheMixin)."""
    if hasattr(transformer, "enable_cache"):
        transformer.enable_cache(config)
        return
    apply = {
        hooks.PyramidAttentionBroadcastConfig: hooks.apply_pyramid_attention_broadcast,
        hooks.FasterCacheConfig: hooks.apply_faster_cache,
        hooks.MagCacheConfig: hooks.apply_mag_cache,
        hooks.TextKVCacheConfig: hooks.apply_text_kv_cache,
        hooks.SeaCacheConfig: hooks.apply_sea_cache,
    }[type(config)]
    apply(transformer, config)


def _hooked_modules(transformer) -> int:
    return sum(
        1 for m in transformer.modules()
        if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_flux_cache_hook_output_equals_stock_with_the_same_hook(hook):
    stock = tiny_flux_pipeline(num_layers=2)
    steered = tiny_flux_pipeline(pipeline_class=SteeredFluxPipeline, num_layers=2)
    stock.transformer.enable_cache(_configs(lambda: stock.current_timestep)[hook]())
    steered.transformer.enable_cache(_configs(lambda: steered.current_timestep)[hook]())
    assert _hooked_modules(steered.transformer) > 0
    expected = _run(stock, **FLUX_CALL)
    assert torch.equal(_run(steered, **FLUX_CALL), expected)
    # hook state is reset after each call (maybe_free_model_hooks), so a second call repeats
    assert torch.equal(_run(steered, **FLUX_CALL), expected)
    assert steered.current_timestep is None


@pytest.mark.parametrize("hook", SD3_HOOKS)
def test_sd3_cache_hook_output_equals_stock_with_the_same_hook(hook):
    stock = tiny_sd3_pipeline(num_layers=2)
    steered = tiny_sd3_pipeline(pipeline_class=SteeredStableDiffusion3Pipeline, num_layers=2)
    seen = {}  # the stock loop's timestep, read before the (hooked) forward
    stock.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(t=kwargs["timestep"][0]), with_kwargs=True
    )
    _enable(stock.transformer, _configs(lambda: seen["t"])[hook]())
    _enable(steered.transformer, _configs(lambda: steered.current_timestep)[hook]())
    assert _hooked_modules(steered.transformer) > 0
    assert torch.equal(_run(steered, **SD3_CALL), _run(stock, **SD3_CALL))
    assert steered.current_timestep is None


def test_cache_hook_really_skips_work_and_a_window_still_applies():
    """PAB changes the output (it skips attention), and a σ-window on top skips negative passes."""
    from steersample.sampling.guidance import GuidanceSchedule

    pipe = tiny_flux_pipeline(pipeline_class=SteeredFluxPipeline, num_layers=2)
    plain = _run(pipe, **FLUX_CALL)
    pipe.transformer.enable_cache(_configs(lambda: pipe.current_timestep)["pyramid_attention_broadcast"]())
    cached = _run(pipe, **FLUX_CALL)
    assert not torch.equal(cached, plain)
    kw = {k: v for k, v in FLUX_CALL.items() if k != "true_cfg_scale"}
    out = pipe(**kw, guidance=GuidanceSchedule(scale=3.0, window=(0.4, 0.9)), num_inference_steps=STEPS,
               output_type="latent", generator=torch.Generator().manual_seed(0), return_telemetry=True)
    assert out.telemetry.model_evals.sum().item() < 2 * STEPS


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_current_timestep_and_interrupt_as_stock(family):
    build, cls, kw = {
        "flux": (tiny_flux_pipeline, SteeredFluxPipeline, FLUX_CALL),
        "sd3": (tiny_sd3_pipeline, SteeredStableDiffusion3Pipeline, SD3_CALL),
    }[family]

    def runs(pipe):
        seen = []

        def callback(p, i, t, kwargs):
            seen.append(getattr(p, "_current_timestep", None))
            if i == 2:
                p._interrupt = True  # stock: the remaining steps are skipped
            return {}

        out = pipe(**kw, num_inference_steps=STEPS, output_type="latent", callback_on_step_end=callback,
                   generator=torch.Generator().manual_seed(0)).images
        return out, seen

    stock_out, stock_seen = runs(build())
    steered = build(pipeline_class=cls)
    out, seen = runs(steered)
    assert torch.equal(out, stock_out)
    assert len(seen) == 3
    if family == "flux":
        assert [float(t) for t in seen] == [float(t) for t in stock_seen]
    else:  # stock SD3 does not track it; the steered one does, as stock Flux
        assert stock_seen == [None] * 3 and all(t is not None for t in seen)
        assert [float(t) for t in seen] == sorted((float(t) for t in seen), reverse=True)
    assert steered.current_timestep is None and steered.interrupt


def test_flux_negative_embeds_shape_check_as_stock():
    """diffusers' ``test_flux_negative_embeds_shape_check``, on the steered pipeline."""
    pipe = tiny_flux_pipeline(pipeline_class=SteeredFluxPipeline)
    inputs = dict(
        prompt_embeds=torch.randn(1, 4, 32), pooled_prompt_embeds=torch.randn(1, 32),
        negative_prompt_embeds=torch.randn(1, 5, 32), negative_pooled_prompt_embeds=torch.randn(1, 32),
        height=16, width=16, num_inference_steps=1, output_type="latent",
    )
    with pytest.raises(ValueError, match="must have the same shape when passed directly"):
        pipe(**inputs, true_cfg_scale=2.0, generator=torch.manual_seed(0))
    pipe(**inputs, true_cfg_scale=1.0, generator=torch.manual_seed(0))


@pytest.mark.parametrize("family", ["flux", "sd3", "flow"])
@pytest.mark.parametrize("steps", [-3, 0])
def test_bad_num_inference_steps_is_refused_by_name(family, steps):
    from steersample.testing import tiny_flow_pipeline

    build, kw = {
        "flux": (lambda: tiny_flux_pipeline(pipeline_class=SteeredFluxPipeline), FLUX_CALL),
        "sd3": (lambda: tiny_sd3_pipeline(pipeline_class=SteeredStableDiffusion3Pipeline), SD3_CALL),
        "flow": (tiny_flow_pipeline, dict(class_labels=[1])),
    }[family]
    pipe = build()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises((ValueError, TypeError), match="num_inference_steps"):
        pipe(**kw, num_inference_steps=steps, output_type="latent")
    assert not calls
