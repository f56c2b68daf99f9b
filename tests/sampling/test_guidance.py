"""GuidanceSchedule: formula, presets (window edges and needs_uncond), combine, round trips, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import steersample as ss
from steersample.sampling.guidance import SIGMA_ATOL, GuidanceSchedule


def brute_scale(g: GuidanceSchedule, sigma: float) -> float:
    """The hard-edge definition, written out."""
    lo, hi = g.window
    if sigma > hi:
        return g.scale_above
    if sigma > lo:
        return g.scale
    return g.scale_below


def test_design_example_and_public_name():
    g = ss.GuidanceSchedule(scale=5.0, window=(0.4, 0.9), scale_above=1.0, scale_below=1.0)
    assert g.scale_at(0.95) == 1.0
    assert g.scale_at(0.9) == 5.0  # hi is inside
    assert g.scale_at(0.65) == 5.0
    assert g.scale_at(0.4) == 1.0  # lo is outside
    assert g.scale_at(0.1) == 1.0
    assert not g.needs_uncond(0.95) and g.needs_uncond(0.9) and not g.needs_uncond(0.4)


def test_scale_matches_definition_on_a_fine_grid():
    g = GuidanceSchedule(scale=4.0, window=(0.25, 0.75), scale_above=-1.5, scale_below=2.0)
    for s in torch.linspace(0, 1, 401, dtype=torch.float64).tolist():
        if min(abs(s - 0.25), abs(s - 0.75)) > SIGMA_ATOL:
            assert g.scale_at(s) == brute_scale(g, s)
    # tensor input: same values, shape and dtype kept
    sig = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    w = g.scale_at(sig)
    assert w.shape == sig.shape and w.dtype == sig.dtype
    assert w.tolist() == [[brute_scale(g, float(s)) for s in row] for row in sig]


def test_float32_grid_points_on_edges_use_the_inclusive_side():
    g = GuidanceSchedule.interval(3.0, 0.4, 0.9)
    s32 = torch.tensor([0.9, 0.4], dtype=torch.float32)  # 0.9f < 0.9 and 0.4f > 0.4 in float64
    assert g.scale_at(s32).tolist() == [3.0, 1.0]
    # the diffusers timestep route: sigma = (1000 * sigma) / 1000 in float32
    t = s32 * 1000
    assert g.scale_at(t / 1000).tolist() == [3.0, 1.0]
    assert g.needs_uncond(s32[0]) and not g.needs_uncond(s32[1])


def test_constant_preset():
    g = GuidanceSchedule.constant(7.0)
    for s in (0.0, 1e-4, 0.5, 1.0):
        assert g.scale_at(s) == 7.0 and g.needs_uncond(s)
    one = GuidanceSchedule.constant(1.0)
    assert not any(one.needs_uncond(s) for s in (0.0, 0.5, 1.0))
    # the dataclass default is plain CFG over every evaluated sigma, as DESIGN.md promises
    assert GuidanceSchedule(scale=7.0).scale_at(1.0) == 7.0
    assert GuidanceSchedule(scale=7.0).scale_at(1e-3) == 7.0


def test_interval_preset_edges():
    g = GuidanceSchedule.interval(5.0, 0.4, 0.9)
    assert g == GuidanceSchedule(scale=5.0, window=(0.4, 0.9))
    assert [g.scale_at(s) for s in (1.0, 0.9 + 1e-3, 0.9, 0.4 + 1e-3, 0.4, 0.0)] == [1, 1, 5, 5, 1, 1]
    assert [g.needs_uncond(s) for s in (1.0, 0.9, 0.41, 0.4)] == [False, True, True, False]


def test_delayed_preset_edges():
    g = GuidanceSchedule.delayed(6.0, 0.7)
    assert [g.scale_at(s) for s in (1.0, 0.7 + 1e-3, 0.7, 0.1, 0.0)] == [1, 1, 6, 6, 6]
    assert [g.needs_uncond(s) for s in (1.0, 0.71, 0.7, 0.0)] == [False, False, True, True]


def test_opposite_preset_edges():
    g = GuidanceSchedule.opposite(6.0, -2.0, 0.7)
    assert [g.scale_at(s) for s in (1.0, 0.7 + 1e-3, 0.7, 0.2)] == [-2, -2, 6, 6]
    assert all(g.needs_uncond(s) for s in (1.0, 0.7, 0.2))  # -2 and 6 both need uncond
    # opposite guidance with w_early = 1 is the delayed preset
    assert GuidanceSchedule.opposite(6.0, 1.0, 0.7) == GuidanceSchedule.delayed(6.0, 0.7)


class _Profile:  # duck-typed PhaseProfile
    boundary_sigma = 0.5


def test_from_phase_preset_edges():
    g = GuidanceSchedule.from_phase(_Profile(), 4.0)
    assert g.window == pytest.approx((0.4, 0.9))
    assert g.scale_at(0.95) == 1.0 and g.scale_at(0.6) == 4.0 and g.scale_at(0.35) == 1.0
    assert not g.needs_uncond(0.95) and g.needs_uncond(0.5)
    # number instead of a profile, clipping to [0, 1]
    g2 = GuidanceSchedule.from_phase(0.8, 3.0, below=0.9, above=0.5)
    assert g2.window == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"phase boundary sigma must lie in \(0, 1\)"):
        GuidanceSchedule.from_phase(1.2, 3.0)
    with pytest.raises(ValueError, match="not both 0"):
        GuidanceSchedule.from_phase(0.5, 3.0, below=0.0, above=0.0)


def test_from_guidance_scale_reproduces_stock_rule():
    assert GuidanceSchedule.from_guidance_scale(7.0) == GuidanceSchedule.constant(7.0)
    for w in (1.0, 0.5, 0.0, -3.0):  # stock SD3 / Flux skip CFG for any scale <= 1
        assert not GuidanceSchedule.from_guidance_scale(w).needs_uncond(0.5)


def test_ramp_is_linear_and_continuous():
    g = GuidanceSchedule(scale=5.0, window=(0.4, 0.9), ramp=0.1)
    assert g.scale_at(0.9) == pytest.approx(3.0)  # centre of the upper ramp
    assert g.scale_at(0.4) == pytest.approx(3.0)
    assert g.scale_at(0.925) == pytest.approx(2.0)
    assert g.scale_at(0.95) == 1.0 and g.scale_at(0.85) == 5.0 and g.scale_at(0.35) == 1.0
    assert not g.needs_uncond(0.96) and g.needs_uncond(0.94)
    s = torch.linspace(0, 1, 2001, dtype=torch.float64)
    w = g.scale_at(s)
    assert (w.diff().abs() <= 40.0 * 1e-3 / 0.1 * 1.01).all()  # slope bounded by (5-1)/ramp
    assert w.tolist() == pytest.approx([g.scale_at(x) for x in s.tolist()])


def test_combine_formula_and_skip():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    g = GuidanceSchedule.interval(4.5, 0.3, 0.8)
    # bit-for-bit the stock SD3 expression
    assert torch.equal(g.combine(cond, uncond, 0.5), uncond + 4.5 * (cond - uncond))
    assert g.combine(cond, None, 0.9) is cond
    assert g.combine(cond, uncond, 0.9) is cond
    with pytest.raises(ValueError, match="pred_uncond is None"):
        g.combine(cond, None, 0.5)
    # one sigma per sample
    sig = torch.tensor([0.5, 0.95])
    out = g.combine(cond, uncond, sig)
    assert torch.equal(out[0], uncond[0] + 4.5 * (cond[0] - uncond[0]))
    assert torch.equal(out[1], cond[1])
    # negative scale = opposite guidance
    neg = GuidanceSchedule.constant(-2.0)
    assert torch.allclose(neg.combine(cond, uncond, 0.5), cond - 3.0 * (cond - uncond))


def test_count_evaluations():
    sigmas = torch.linspace(1, 0.05, 20)  # 1.0, 0.95, ..., 0.05 in float32, hitting both edges
    g = GuidanceSchedule.interval(5.0, 0.4, 0.9)
    inside = [0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45]  # lo < sigma <= hi
    assert g.count_evaluations(sigmas) == 20 + len(inside)
    assert GuidanceSchedule.constant(5.0).count_evaluations(sigmas) == 40
    assert GuidanceSchedule.constant(1.0).count_evaluations(sigmas) == 20


def test_dict_json_round_trip():
    for g in (
        GuidanceSchedule(),
        GuidanceSchedule.interval(5.0, 0.4, 0.9),
        GuidanceSchedule.opposite(7.0, -2.0, 0.6),
        GuidanceSchedule(scale=3.0, window=(0.2, 0.7), ramp=0.05, scale_below=1.5),
    ):
        d = json.loads(json.dumps(g.to_dict()))
        assert GuidanceSchedule.from_dict(d) == g
    assert GuidanceSchedule.from_dict({"scale": 2.0}) == GuidanceSchedule(scale=2.0)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"window": (0.5, 0.5)}, ValueError, "0 <= lo < hi <= 1"),
        ({"window": (0.6, 0.4)}, ValueError, "0 <= lo < hi <= 1"),
        ({"window": (-0.1, 0.5)}, ValueError, "0 <= lo < hi <= 1"),
        ({"window": (0.2, 1.5)}, ValueError, "0 <= lo < hi <= 1"),
        ({"window": (0.1, 0.2, 0.3)}, TypeError, "pair"),
        ({"scale": math.nan}, ValueError, "scale must be finite"),
        ({"scale_above": math.inf}, ValueError, "scale_above must be finite"),
        ({"scale_below": -math.inf}, ValueError, "scale_below must be finite"),
        ({"scale": "7"}, TypeError, "real number"),
        ({"ramp": -0.1}, ValueError, "ramp must lie in"),
        ({"window": (0.4, 0.5), "ramp": 0.2}, ValueError, "ramp must lie in"),
    ],
)
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GuidanceSchedule(**kwargs)


def test_bad_dicts_and_presets():
    with pytest.raises(ValueError, match=r"unknown GuidanceSchedule key\(s\) \['scael'\]"):
        GuidanceSchedule.from_dict({"scael": 5.0})
    with pytest.raises(TypeError, match="mapping"):
        GuidanceSchedule.from_dict([("scale", 5.0)])
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        GuidanceSchedule.interval(5.0, 0.9, 0.4)
    with pytest.raises(ValueError, match="sigma_start must be finite"):
        GuidanceSchedule.delayed(5.0, math.nan)
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        GuidanceSchedule.delayed(5.0, 0.0)
    with pytest.raises(ValueError, match="one noise level"):
        GuidanceSchedule.constant(2.0).needs_uncond(torch.tensor([0.1, 0.2]))


def test_frozen():
    g = GuidanceSchedule()
    with pytest.raises(Exception):
        g.scale = 3.0  # type: ignore[misc]
