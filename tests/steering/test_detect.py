"""Detectors: scores against their formulas (Wen et al. conditional deviation, Zhang et al.
spikiness, oracle posterior concentration), telemetry keys, evaluation helpers against
scikit-learn, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from steersample.steering.detect import (DETECTORS, ConditionalDeviation, PosteriorConcentration,
                                SpikinessDetector, aggregate, auroc, detection_curve,
                                score_matrix, tpr_at_fpr)
from steersample.oracle.empirical import EmpiricalOracle
from steersample.reference.reference_set import ReferenceSet
from steersample.steering.representation import RepresentationSteering
from steersample.sampling.protocol import Conditioning, LatentLayout, StepState
from steersample.steering.registry import resolve_steering
from steersample.testing import tiny_flow_pipeline

STEPS = 4


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def state(x, sigma, cond, uncond, reference=None, labels=None):
    return StepState(step=0, num_steps=STEPS, sigma=sigma, sigma_next=sigma / 2, timestep=torch.tensor(1000 * sigma),
                     latents=x, pred=cond, pred_cond=cond, pred_uncond=uncond, guidance_scale=2.0,
                     conditioning=Conditioning(cond={}, labels=labels),
                     layout=LatentLayout(tuple(x.shape[1:])), reference=reference)


def test_conditional_deviation_is_the_norm_of_the_guidance_term():
    x = torch.randn(3, 1, 4, 4, generator=gen())
    vc, vu = torch.randn(3, 1, 4, 4, generator=gen(1)), torch.randn(3, 1, 4, 4, generator=gen(2))
    out = ConditionalDeviation()(state(x, 0.7, vc, vu))
    assert torch.equal(out.prediction, vc)
    assert torch.allclose(out.telemetry["score"], (vc - vu).flatten(1).norm(dim=1))
    assert bool(torch.isnan(ConditionalDeviation()(state(x, 0.7, vc, None)).telemetry["score"]).all())


@pytest.mark.parametrize("labels", [None, torch.tensor([0, 1, 1])])
def test_posterior_concentration_matches_the_exact_oracle(labels):
    latents = torch.randn(10, 3, generator=gen(3))
    ref = ReferenceSet(latents, torch.tensor([0] * 5 + [1] * 5))
    x = torch.randn(3, 3, generator=gen(4))
    for sigma in (0.9, 0.5, 0.1):
        out = PosteriorConcentration(neighbours=10)(state(x, sigma, x, None, ref, labels))
        exact = EmpiricalOracle(ref).posterior(x, sigma, labels=labels).top1
        assert torch.allclose(out.telemetry["score"], exact.double(), atol=1e-6)


def test_spikiness_detector_records_the_hooked_block():
    pipe = tiny_flow_pipeline(num_layers=2)
    kw = dict(class_labels=[1, 2], num_inference_steps=STEPS, guidance_scale=2.0,
              output_type="latent", return_telemetry=True)
    plain = pipe(generator=gen(), **kw)
    out = pipe(generator=gen(), steering=[SpikinessDetector(), ConditionalDeviation()], **kw)
    assert torch.equal(out.images, plain.images)                       # passive
    scores = score_matrix(out.telemetry, "spikiness")
    ref = score_matrix_from(pipe(generator=gen(), steering=[RepresentationSteering(strength=0.0)],
                                 **kw).telemetry)
    assert scores.shape == (STEPS, 2) and torch.allclose(scores, ref)
    assert score_matrix(out.telemetry, "cond_deviation").shape == (STEPS, 2)
    assert sum(len(m._forward_hooks) for m in pipe.transformer.modules()) == 0
    with pytest.raises(ValueError, match="no 'posterior.score'"):
        score_matrix(out.telemetry, "posterior")


def score_matrix_from(tel):
    return torch.stack([s.scores["representation.spikiness"].double() for s in tel.steps])


def test_evaluation_helpers_match_sklearn():
    from sklearn.metrics import roc_auc_score

    scores = torch.randn(200, generator=gen(5), dtype=torch.float64)
    positive = (scores + torch.randn(200, generator=gen(6), dtype=torch.float64)) > 0.5
    assert auroc(scores, positive) == pytest.approx(roc_auc_score(positive.numpy(), scores.numpy()))
    neg = scores[~positive]
    thr = torch.quantile(neg, 0.99)
    assert tpr_at_fpr(scores, positive) == pytest.approx(float((scores[positive] > thr).double().mean()))
    assert auroc(torch.tensor([3.0, 1.0]), torch.tensor([True, False])) == 1.0
    assert math.isnan(auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])))
    m = torch.tensor([[1.0, math.nan], [3.0, 4.0]])
    assert aggregate(m, 1)[0] == 1.0 and math.isnan(float(aggregate(m, 1)[1]))
    assert aggregate(m, 2).tolist() == [2.0, 4.0]
    curve = detection_curve(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([False, True]))
    assert [(p.steps, p.auroc) for p in curve] == [(1, 1.0), (2, 0.5)]


def test_bad_input():
    with pytest.raises(ValueError, match="needs a reference set"):
        resolve_steering([PosteriorConcentration()], reference=None)
    with pytest.raises(ValueError, match="neighbours must be an int >= 2"):
        PosteriorConcentration(neighbours=1)
    with pytest.raises(ValueError, match="got 3 scores but 2 labels"):
        auroc(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="steps must lie in 1..2"):
        aggregate(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="needs the pipeline"):
        SpikinessDetector().bind(None)
    pipe = tiny_flow_pipeline(num_layers=2)
    with pytest.raises(ValueError, match="available blocks"):
        pipe(class_labels=[1], num_inference_steps=2, steering=[SpikinessDetector(layers="nope")])
    assert sorted(DETECTORS) == ["cond_deviation", "posterior", "spikiness"]
