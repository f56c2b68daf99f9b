"""ss.recommended_steering: the keyword arguments compare's steered run and the studio use."""

from __future__ import annotations

import pytest
import torch

import steersample as ss
from steersample.commands.compare import settings


def test_recommended_steering_is_what_compare_runs():
    ref = ss.ReferenceSet(torch.randn(8, 1, 4, 4), labels=torch.arange(8) % 2)
    kw = ss.recommended_steering(ref, scale=3.0)
    assert set(kw) == {"guidance", "steering"}
    # CFG 3 in navigation only (sigma > 0.6), the unconditional prediction below
    g = kw["guidance"]
    assert isinstance(g, ss.GuidanceSchedule)
    assert [g.scale_at(s) for s in (1.0, 0.9, 0.61, 0.6, 0.3, 0.01)] == [3.0, 3.0, 3.0, 0.0, 0.0, 0.0]
    steered = settings(3.0)[1]
    assert steered.guidance == kw["guidance"]
    assert [repr(s) for s in steered.steering] == [repr(s) for s in kw["steering"]]


def test_recommended_steering_runs_in_a_pipeline_call():
    pipe, ref = ss.load_default()
    kw = ss.recommended_steering(ref, scale=4.0)
    out = pipe(class_labels=[2, 3], num_inference_steps=4, reference=ref, output_type="latent",
               generator=[torch.Generator().manual_seed(k) for k in range(2)], **kw)
    assert out.images.shape == (2, 1, 8, 8) and torch.isfinite(out.images).all()


@pytest.mark.parametrize("args, error, match", [
    ((torch.zeros(3, 4),), TypeError, "ReferenceSet"),
    ((None,), TypeError, "ReferenceSet"),
])
def test_bad_reference_is_refused(args, error, match):
    with pytest.raises(error, match=match):
        ss.recommended_steering(*args)


def test_bad_scale_is_refused():
    ref = ss.ReferenceSet(torch.randn(4, 2))
    with pytest.raises(ValueError, match="finite number"):
        ss.recommended_steering(ref, scale=float("nan"))


def test_labelled_sets_get_novelty_steering_unlabelled_ones_attractor_repulsion():
    labelled = ss.ReferenceSet(torch.randn(8, 1, 4, 4), labels=torch.arange(8) % 2)
    unlabelled = ss.ReferenceSet(torch.randn(8, 1, 4, 4))
    assert isinstance(ss.recommended_steering(labelled)["steering"][0], ss.NoveltySteering)
    kw = ss.recommended_steering(unlabelled, scale=4.0)
    assert isinstance(kw["steering"][0], ss.AttractorRepulsion)
    assert kw["guidance"] == ss.GuidanceSchedule.constant(4.0)   # as AttractorRepulsion was measured


def test_the_navigation_window_leaves_rare_classes_to_novelty_and_changes_frequent_ones():
    """NoveltySteering replaces a rare-class sample's prediction below sigma 0.9, so the
    recommended window gives it exactly what constant CFG + NoveltySteering gives; a frequent
    class's sample is refined unconditionally below sigma 0.6, so it differs."""
    pipe, ref = ss.load_default()

    def run(labels, guidance):
        return pipe(class_labels=labels, num_inference_steps=8, reference=ref, output_type="latent",
                    generator=[torch.Generator().manual_seed(k) for k in range(len(labels))],
                    guidance=guidance, steering=[ss.NoveltySteering()]).images

    window = ss.recommended_steering(ref, scale=4.0)["guidance"]
    constant = ss.GuidanceSchedule.constant(4.0)
    assert torch.equal(run([2, 4, 8], window), run([2, 4, 8], constant))
    frequent_window, frequent_constant = run([0, 3], window), run([0, 3], constant)
    assert (frequent_window - frequent_constant).abs().amax() > 1e-2
