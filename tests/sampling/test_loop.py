"""The shared loop (`steersample.sampling.loop.sample`) on an analytic model: Euler steps by hand,
guidance windows, batched vs separate passes, steerer state, callbacks, interruption."""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from steersample.sampling.guidance import GuidanceSchedule
from steersample.sampling.loop import sample
from steersample.sampling.protocol import Conditioning, LatentLayout, StepState
from steersample.steering.registry import SteeringOutput

B, SHAPE, STEPS = 3, (2, 4, 4), 6


class LinearModel:
    """v = 0.5 x + c + 0.1 t/1000, c from the conditioning; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond, branch):
        self.calls.append((branch, x.shape[0]))
        return 0.5 * x + cond["c"] + 0.1 * t / 1000


def scheduler(steps=STEPS):
    s = FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(steps)
    return s


def conditioning(batched=True):
    g = torch.Generator().manual_seed(1)
    c = torch.randn(B, *SHAPE, generator=g)
    return Conditioning(cond={"c": c}, uncond={"c": torch.zeros_like(c)}, batched=batched)


def noise():
    return torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(0))


def euler_by_hand(x, cond, w_of_sigma, steps=STEPS):
    s = scheduler(steps)
    sigmas = s.sigmas.tolist()
    for i, t in enumerate(s.timesteps):
        v_c = 0.5 * x + cond.cond["c"] + 0.1 * t / 1000
        w = w_of_sigma(sigmas[i])
        if w != 1.0:
            v_u = 0.5 * x + cond.uncond["c"] + 0.1 * t / 1000
            v_c = v_u + w * (v_c - v_u)
        x = x + (sigmas[i + 1] - sigmas[i]) * v_c
    return x


@pytest.mark.parametrize("batched", [True, False])
def test_loop_matches_euler_by_hand_with_window(batched):
    g = GuidanceSchedule(scale=3.0, window=(0.3, 0.8))
    cond = conditioning(batched)
    model = LinearModel()
    out = sample(model, noise(), scheduler(), cond, g, return_telemetry=True)
    expected = euler_by_hand(noise(), cond, g.scale_at)
    torch.testing.assert_close(out.latents, expected, rtol=0, atol=1e-6)

    inside = sum(g.needs_uncond(s) for s in scheduler().sigmas[:-1].tolist())
    assert 0 < inside < STEPS
    assert out.telemetry.total_model_evals == STEPS + inside
    rows = sum(n for _, n in model.calls) // B
    assert rows == STEPS + inside  # evaluations = rows / B, batched or not
    if batched:
        assert [b for b, _ in model.calls].count("both") == inside
    else:
        assert [b for b, _ in model.calls].count("uncond") == inside


def test_batched_and_separate_passes_agree():
    g = GuidanceSchedule(scale=4.0)
    a = sample(LinearModel(), noise(), scheduler(), conditioning(True), g).latents
    b = sample(LinearModel(), noise(), scheduler(), conditioning(False), g).latents
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_scale_one_never_calls_uncond_and_telemetry_is_none_by_default():
    model = LinearModel()
    out = sample(model, noise(), scheduler(), conditioning(), GuidanceSchedule(scale=1.0))
    assert out.telemetry is None
    assert [b for b, _ in model.calls] == ["cond"] * STEPS


class Recorder:
    name = "recorder"
    needs_reference = False

    def __init__(self):
        self.states = []

    def __call__(self, state):
        self.states.append(state)
        return SteeringOutput(state.pred, {"sigma": state.sigma})


class Push:
    name = "push"
    needs_reference = False

    def __init__(self, amount):
        self.amount = amount

    def __call__(self, state):
        return SteeringOutput(state.pred + self.amount, {"amount": torch.full((B,), self.amount)})


def test_steerers_see_step_state_in_order_and_are_recorded():
    g = GuidanceSchedule(scale=2.0, window=(0.4, 0.9))
    first, push, last = Recorder(), Push(0.25), Recorder()
    out = sample(
        LinearModel(), noise(), scheduler(), conditioning(), g,
        steering=[first, push, last], return_telemetry=True,
    )
    assert len(first.states) == len(last.states) == STEPS
    for i, (a, b) in enumerate(zip(first.states, last.states)):
        assert isinstance(a, StepState) and a.step == i and a.num_steps == STEPS
        torch.testing.assert_close(b.pred, a.pred + 0.25)  # saw the push
        torch.testing.assert_close(a.x0_hat, a.latents - a.sigma * a.pred)
        assert (a.pred_uncond is None) == (not g.needs_uncond(a.sigma))
        assert a.guidance_scale == (g.scale_at(a.sigma) if a.pred_uncond is not None else 1.0)
        assert a.sigma_next < a.sigma
    tel = out.telemetry
    expected_norm = 0.25 * (torch.tensor(SHAPE).prod().float().sqrt())
    torch.testing.assert_close(tel.steering_magnitude, expected_norm.expand(STEPS, B))
    assert tel.steps[2].scores["recorder.sigma"] == first.states[2].sigma
    assert tel.steps[0].scores["push.amount"].shape == (B,)


class FakePipeline:
    """What the loop reads from a pipeline: progress_bar, interrupt."""

    def __init__(self, stop_after=None):
        self.totals, self._interrupt, self.stop_after = [], False, stop_after

    @property
    def interrupt(self):
        return self._interrupt

    @contextlib.contextmanager
    def progress_bar(self, total):
        self.totals.append(total)
        yield self

    def update(self):
        self.updates = getattr(self, "updates", 0) + 1


def test_callback_replaces_latents_and_conditioning_and_can_interrupt():
    pipe = FakePipeline()
    seen = []

    def callback(p, i, t, kwargs):
        assert p is pipe
        seen.append((i, float(t), sorted(kwargs)))
        if i == 1:
            return {"latents": torch.zeros_like(kwargs["latents"]), "prompt_embeds": kwargs["prompt_embeds"] * 0}
        if i == 3:
            p._interrupt = True
        return {}

    cond = Conditioning(
        cond=conditioning().cond, uncond=conditioning().uncond, callback_keys={"prompt_embeds": "c"}
    )
    model = LinearModel()
    out = sample(
        model, noise(), scheduler(), cond, GuidanceSchedule(scale=2.0), pipeline=pipe,
        callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    assert [s[0] for s in seen] == [0, 1, 2, 3]  # interrupted after step 3
    assert seen[0][2] == ["latents", "prompt_embeds"]
    assert pipe.totals == [STEPS] and pipe.updates == 4
    # from step 2 on: x restarted at 0 with c = 0 and uncond c = 0 -> v = 0.5 x + 0.1 t/1000
    s = scheduler()
    x = torch.zeros(B, *SHAPE)
    for i in (2, 3):
        t, sig, nxt = s.timesteps[i], s.sigmas[i], s.sigmas[i + 1]
        x = x + (nxt - sig) * (0.5 * x + 0.1 * t / 1000)
    torch.testing.assert_close(out.latents, x, rtol=0, atol=1e-6)


def test_layout_round_trip_and_stacking():
    layout = LatentLayout((4, 2), to_reference=lambda x: x.reshape(-1, 4, 2), from_reference=lambda z: z.reshape(-1, 8))
    x = torch.arange(16.0).reshape(2, 8)
    assert layout.unpack(x).shape == (2, 4, 2)
    torch.testing.assert_close(layout.pack(layout.unpack(x)), x)
    cond = Conditioning(
        cond={"a": torch.ones(2, 3), "extra": {"b": torch.ones(2)}, "flag": "x"},
        uncond={"a": torch.zeros(2, 3), "extra": {"b": torch.zeros(2)}, "flag": "x"},
    )
    st = cond.stacked()
    assert st["a"][:2].sum() == 0 and st["a"][2:].sum() == 6  # [uncond, cond]
    assert st["extra"]["b"].tolist() == [0, 0, 1, 1] and st["flag"] == "x"
    with pytest.raises(ValueError, match="no unconditional"):
        Conditioning(cond={"a": torch.ones(1)}).stacked()
