"""Telemetry records: fields, shapes, frozenness, and copy flags against a reference set built
from the outputs themselves (tiny class-conditional flow pipeline)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from steersample.evaluation import metrics
from steersample.sampling.guidance import GuidanceSchedule
from steersample.reference.reference_set import ReferenceSet
from steersample.sampling.telemetry import SampleTelemetry, StepTelemetry, Telemetry
from steersample.testing import tiny_flow_pipeline

STEPS = 5
LABELS = [1, 4, 4, 7]


@pytest.fixture(scope="module")
def pipe():
    return tiny_flow_pipeline()


@pytest.fixture(scope="module")
def outputs(pipe):
    return pipe(class_labels=LABELS, num_inference_steps=STEPS, guidance_scale=2.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def run(pipe, **kw):
    args = dict(class_labels=LABELS, num_inference_steps=STEPS, guidance_scale=2.0, output_type="latent",
                generator=torch.Generator().manual_seed(0), return_telemetry=True)
    args.update(kw)
    return pipe(**args)


def test_top_level_export():
    import steersample as ss

    assert ss.Telemetry is Telemetry


def test_fields_and_shapes_without_reference(pipe):
    g = GuidanceSchedule(scale=3.0, window=(0.3, 0.8))
    tel = run(pipe, guidance=g, guidance_scale=None).telemetry
    assert isinstance(tel, Telemetry) and len(tel.steps) == STEPS and tel.final is None
    assert [s.step for s in tel.steps] == list(range(STEPS))
    sigmas = tel.sigmas
    assert sigmas.shape == (STEPS,) and bool((sigmas[1:] < sigmas[:-1]).all())
    assert [s.sigma_next for s in tel.steps][:-1] == sigmas[1:].tolist() and tel.steps[-1].sigma_next == 0.0
    assert tel.model_evals.tolist() == [1 + int(g.needs_uncond(s)) for s in sigmas.tolist()]
    assert tel.guidance_scales.tolist() == [g.scale_at(s) for s in sigmas.tolist()]
    assert tel.steering_magnitude.shape == (STEPS, len(LABELS)) and tel.steering_magnitude.abs().sum() == 0
    assert tel.oracle_top1 is None and tel.oracle_index is None and tel.nearest_index is None
    step = tel.steps[0]
    assert isinstance(step, StepTelemetry)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.sigma = 0.5
    with pytest.raises(TypeError):
        step.scores["x"] = 1
    json.dumps(tel.as_dict())


def test_copy_flags_on_a_reference_made_of_the_outputs(pipe, outputs):
    distractors = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = ReferenceSet(torch.cat([outputs, distractors]))
    tel = run(pipe, reference=ref).telemetry
    final = tel.final
    assert isinstance(final, SampleTelemetry)
    for name in ("nearest_index", "nearest_distance", "second_distance", "nn_ratio", "is_copy"):
        assert getattr(final, name).shape == (len(LABELS),)
    # samples 1 and 2 share class 4 but differ; each output's nearest neighbour is itself
    assert final.nearest_index.tolist() == [0, 1, 2, 3]
    assert final.is_copy.all() and bool((final.nearest_distance < 1e-3).all())
    torch.testing.assert_close(final.nn_ratio, metrics.nn_ratio(outputs, ref), rtol=0, atol=1e-6)
    assert metrics.copy_rate(outputs, ref) == 1.0
    # per-step oracle and nearest records; at the last (almost clean) step the posterior sits on the copy
    assert tel.oracle_top1.shape == tel.oracle_index.shape == tel.nearest_index.shape == (STEPS, len(LABELS))
    assert bool(((tel.oracle_top1 >= 0) & (tel.oracle_top1 <= 1)).all())
    assert bool((tel.oracle_top1[-1] > 0.99).all())
    assert tel.oracle_index[-1].tolist() == [0, 1, 2, 3] == tel.nearest_index[-1].tolist()
    as_dict = tel.as_dict()
    assert as_dict["final_is_copy"] == [True] * 4 and len(as_dict["oracle_top1"]) == STEPS


def test_no_copy_flags_against_unrelated_reference(pipe):
    ref = ReferenceSet(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(4)))
    final = run(pipe, reference=ref).telemetry.final
    assert not final.is_copy.any()
    assert bool((final.nn_ratio > 1 / 3).all())


def test_labelled_reference_restricts_the_oracle_to_each_class(pipe, outputs):
    labels = torch.tensor(LABELS + [1, 4, 7, 7])
    extra = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    ref = ReferenceSet(torch.cat([outputs, extra]), labels=labels)
    tel = run(pipe, reference=ref).telemetry
    for step in range(STEPS):
        assert labels[tel.oracle_index[step]].tolist() == LABELS
        assert labels[tel.nearest_index[step]].tolist() == LABELS
    with pytest.raises(ValueError, match=r"no samples of classes \[7\]"):
        run(pipe, reference=ReferenceSet(outputs[:3], labels=torch.tensor(LABELS[:3])))
