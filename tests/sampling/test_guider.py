"""ScheduledClassifierFreeGuidance: driven as diffusers' modular denoise blocks drive guiders."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.guiders import BaseGuidance, ClassifierFreeGuidance

from steersample.sampling.guidance import GuidanceSchedule
from steersample.sampling.guider import ScheduledClassifierFreeGuidance

logging.getLogger("diffusers.guiders.guider_utils").setLevel(logging.ERROR)  # "experimental" warning


def toy_model(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor):
    return torch.tanh(hidden_states) * encoder_hidden_states.mean() + timestep.reshape(-1, 1) / 1000


def denoise(guider: BaseGuidance, num_steps: int = 8, shift: float = 3.0):
    """The per-step protocol of diffusers' StableDiffusion3LoopDenoiser, with a toy model."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 5, generator=gen)
    cond, uncond = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    batches_per_step = []
    for i, t in enumerate(scheduler.timesteps):
        guider_inputs = {"hidden_states": (latents, latents), "encoder_hidden_states": (cond, uncond)}
        guider.set_state(step=i, num_inference_steps=num_steps, timestep=t)
        guider_state = guider.prepare_inputs(guider_inputs)
        for batch in guider_state:
            guider.prepare_models(None)
            timestep = t.expand(batch.hidden_states.shape[0])
            batch.noise_pred = toy_model(batch.hidden_states, batch.encoder_hidden_states, timestep)
            guider.cleanup_models(None)
        batches_per_step.append(len(guider_state))
        noise_pred = guider(guider_state).pred
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents, batches_per_step, scheduler.sigmas[:-1]


def test_is_a_diffusers_guider():
    guider = ScheduledClassifierFreeGuidance.from_schedule(GuidanceSchedule.interval(5.0, 0.4, 0.9))
    assert isinstance(guider, BaseGuidance)
    assert guider.schedule == GuidanceSchedule.interval(5.0, 0.4, 0.9)


def test_constant_schedule_equals_diffusers_cfg_bit_for_bit():
    ours, ours_batches, _ = denoise(ScheduledClassifierFreeGuidance.from_schedule(GuidanceSchedule.constant(4.5)))
    stock, stock_batches, _ = denoise(ClassifierFreeGuidance(guidance_scale=4.5))
    assert torch.equal(ours, stock)
    assert ours_batches == stock_batches == [2] * 8


@pytest.mark.parametrize(
    "schedule",
    [
        GuidanceSchedule.interval(5.0, 0.4, 0.9),
        GuidanceSchedule.delayed(6.0, 0.7),
        GuidanceSchedule.opposite(6.0, -2.0, 0.7),
        GuidanceSchedule(scale=4.0, window=(0.3, 0.8), ramp=0.2),
        GuidanceSchedule.constant(1.0),
    ],
)
def test_uncond_batch_only_where_scale_is_not_one(schedule):
    guider = ScheduledClassifierFreeGuidance.from_schedule(schedule)
    latents, batches, sigmas = denoise(guider)
    assert batches == [2 if schedule.needs_uncond(float(s)) else 1 for s in sigmas]
    assert sum(batches) == schedule.count_evaluations(sigmas)
    # same result as combining with the schedule by hand (the loop in steersample.sampling.loop does this)
    reference, _, _ = denoise(_ByHand(schedule))
    assert torch.equal(latents, reference)


class _ByHand(ClassifierFreeGuidance):
    """Always runs both batches and combines with GuidanceSchedule.combine at sigma = t / 1000."""

    def __init__(self, schedule: GuidanceSchedule):
        super().__init__(guidance_scale=2.0)
        self._schedule = schedule

    def forward(self, pred_cond, pred_uncond=None):
        out = super().forward(pred_cond, pred_uncond)
        out.pred = self._schedule.combine(pred_cond, pred_uncond, float(self._timestep) / 1000)
        return out


def test_sigma_is_read_from_the_timestep_with_float32_edges():
    guider = ScheduledClassifierFreeGuidance.from_schedule(GuidanceSchedule.interval(5.0, 0.4, 0.9))
    for t, n in [(1000.0, 1), (900.0, 2), (650.0, 2), (400.0, 1), (100.0, 1)]:
        guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(t, dtype=torch.float32))
        assert guider.sigma == pytest.approx(t / 1000)
        assert guider.num_conditions == n
    # a batch of equal timesteps is fine, differing ones are refused
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.full((3,), 650.0))
    assert guider.num_conditions == 2
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor([650.0, 950.0]))
    with pytest.raises(ValueError, match="one timestep per step for the whole batch"):
        guider.num_conditions
    other = ScheduledClassifierFreeGuidance(scale=5.0, window=(0.4, 0.9), num_train_timesteps=500)
    other.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(300.0))
    assert other.sigma == pytest.approx(0.6) and other.num_conditions == 2


def test_disabled_and_state_errors():
    guider = ScheduledClassifierFreeGuidance(scale=5.0)
    assert guider.num_conditions == 2  # before set_state: uncond needed somewhere
    with pytest.raises(ValueError, match="call set_state"):
        guider.forward(torch.ones(1), torch.zeros(1))
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(500.0))
    with pytest.raises(ValueError, match="no unconditional prediction"):
        guider.forward(torch.ones(1))
    out = guider.forward(torch.ones(1), torch.zeros(1))
    assert out.pred.item() == 5.0 and guider.current_scale == 5.0
    guider.disable()
    assert guider.num_conditions == 1 and guider.forward(torch.ones(1)).pred.item() == 1.0
    assert ScheduledClassifierFreeGuidance(scale=5.0, enabled=False).num_conditions == 1
    assert "sigma" in guider.get_state() and "num_conditions" in repr(guider)


def test_config_round_trip(tmp_path):
    schedule = GuidanceSchedule(scale=6.0, window=(0.35, 0.85), scale_above=-1.0, ramp=0.1)
    guider = ScheduledClassifierFreeGuidance.from_schedule(schedule.to_dict())
    guider.save_pretrained(tmp_path)
    assert (tmp_path / "guider_config.json").exists()
    loaded = ScheduledClassifierFreeGuidance.from_pretrained(tmp_path)
    assert loaded.schedule == schedule
    assert ScheduledClassifierFreeGuidance.from_config(guider.config).schedule == schedule
    assert guider.new(scale=2.0).schedule == GuidanceSchedule(
        scale=2.0, window=(0.35, 0.85), scale_above=-1.0, ramp=0.1
    )


def test_bad_input():
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        ScheduledClassifierFreeGuidance(scale=5.0, window=(0.9, 0.4))
    with pytest.raises(ValueError, match="scale must be finite"):
        ScheduledClassifierFreeGuidance(scale=float("nan"))
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive integer"):
        ScheduledClassifierFreeGuidance(num_train_timesteps=0)
    with pytest.raises(TypeError, match="must be a GuidanceSchedule"):
        ScheduledClassifierFreeGuidance.from_schedule(5.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown GuidanceSchedule key"):
        ScheduledClassifierFreeGuidance.from_schedule({"scael": 5.0})


# ------------------------------------------------------------------ a real modular pipeline
@pytest.fixture(scope="module")
def modular_sd3():
    from diffusers.modular_pipelines import StableDiffusion3AutoBlocks

    from steersample.testing import tiny_sd3_pipeline

    base = tiny_sd3_pipeline(FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe = StableDiffusion3AutoBlocks().init_pipeline()
    pipe.update_components(
        transformer=base.transformer,
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    calls: list[int] = []
    base.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    return pipe, calls, base


def run_modular(pipe, calls, guider, steps=6):
    pipe.update_components(guider=guider)
    calls.clear()
    # modular SD3 encodes a negative prompt only when one is given; without it the "uncond"
    # batch reuses the conditional embeddings and CFG changes nothing
    latents = pipe(
        prompt="a cat", negative_prompt="", num_inference_steps=steps, height=8, width=8,
        generator=torch.Generator().manual_seed(0), output="latents",
    )
    return latents, len(calls)


def test_inside_modular_sd3_pipeline(modular_sd3):
    pipe, calls, base = modular_sd3
    stock, stock_calls = run_modular(pipe, calls, ClassifierFreeGuidance(guidance_scale=5.0))
    constant = ScheduledClassifierFreeGuidance.from_schedule(GuidanceSchedule.constant(5.0))
    ours, our_calls = run_modular(pipe, calls, constant)
    assert torch.equal(ours, stock) and our_calls == stock_calls == 12
    # and the classic StableDiffusion3Pipeline agrees up to batching (one batch of 2 there, two of 1 here)
    classic = base(
        prompt="a cat", num_inference_steps=6, height=8, width=8, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ).images
    assert torch.allclose(classic, ours, atol=1e-5, rtol=0)
    window = GuidanceSchedule.interval(5.0, 0.4, 0.9)
    windowed, windowed_calls = run_modular(pipe, calls, ScheduledClassifierFreeGuidance.from_schedule(window))
    sigmas = pipe.scheduler.sigmas[:-1]
    assert windowed_calls == window.count_evaluations(sigmas) == 9  # 6 cond + 3 uncond (0.8, 0.6, 0.4006)
    assert torch.isfinite(windowed).all() and (windowed - stock).abs().max() > 1e-3
