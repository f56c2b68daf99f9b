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
    assert isinstance(kw["guidance"], ss.GuidanceSchedule) and kw["guidance"].scale_at(0.5) == 3.0
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
    assert isinstance(ss.recommended_steering(unlabelled)["steering"][0], ss.AttractorRepulsion)
