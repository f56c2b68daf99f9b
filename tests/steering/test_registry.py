"""Steerer protocol, registry and the no-op steerer."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

import steersample as ss
from steersample.steering.registry import (
    STEERERS,
    NoSteering,
    Steerer,
    SteeringOutput,
    make_steerer,
    register_steerer,
    resolve_steering,
)
from steersample.testing import tiny_flow_pipeline


def test_no_steering_is_registered_exported_and_identity():
    assert STEERERS["none"] is NoSteering and ss.NoSteering is NoSteering
    steerer = make_steerer("none")
    assert isinstance(steerer, Steerer) and steerer.needs_reference is False
    pred = torch.randn(2, 3)

    class State:
        pass

    state = State()
    state.pred = pred
    out = steerer(state)
    assert out.prediction is pred and dict(out.telemetry) == {}


def test_steering_output_telemetry_is_read_only():
    out = SteeringOutput(torch.zeros(1), {"a": 1.0})
    with pytest.raises(TypeError):
        out.telemetry["b"] = 2.0
    with pytest.raises(AttributeError):
        out.prediction = torch.ones(1)


def test_unknown_name_lists_registered_ones():
    with pytest.raises(ValueError, match=r"unknown steerer 'nope'.*'none'"):
        make_steerer("nope")
    with pytest.raises(ValueError, match="unknown steerer"):
        resolve_steering(["none", "nope"])


def test_resolve_accepts_names_instances_and_single_items():
    custom = NoSteering()
    out = resolve_steering(["none", custom])
    assert isinstance(out[0], NoSteering) and out[1] is custom
    assert resolve_steering(None) == ()
    assert len(resolve_steering("none")) == 1 and resolve_steering(custom) == (custom,)
    with pytest.raises(TypeError, match=r"pass an instance, e.g. steering=\[NoSteering\(\)\]"):
        resolve_steering([NoSteering])
    with pytest.raises(TypeError, match="registry names"):
        resolve_steering([3])


class NeedsRef:
    name: ClassVar[str] = "needs-ref-test"
    needs_reference: ClassVar[bool] = True

    def __call__(self, state):
        return SteeringOutput(state.pred)


def test_reference_requirement_is_checked_with_a_fix():
    with pytest.raises(ValueError, match=r"needs a reference set: pass reference=steersample.ReferenceSet"):
        resolve_steering([NeedsRef()])
    assert len(resolve_steering([NeedsRef()], reference=object())) == 1


def test_register_validates_class_attributes_and_duplicates():
    class NoName:
        needs_reference = False

    class NoFlag:
        name = "flagless"

    with pytest.raises(TypeError, match="`name = '<registry key>'`"):
        register_steerer(NoName)
    with pytest.raises(TypeError, match="needs_reference"):
        register_steerer(NoFlag)

    class Other:
        name = "none"
        needs_reference = False

    with pytest.raises(ValueError, match="taken by NoSteering"):
        register_steerer(Other)

    @register_steerer
    class Scale:
        name = "scale-test"
        needs_reference = False

        def __init__(self, factor: float = 2.0):
            self.factor = factor

        def __call__(self, state):
            return SteeringOutput(state.pred * self.factor)

    try:
        assert make_steerer("scale-test", factor=3.0).factor == 3.0
        with pytest.raises(TypeError):
            make_steerer("scale-test", fcator=3.0)  # typos are not swallowed
    finally:
        del STEERERS["scale-test"]


def test_no_steering_in_a_pipeline_changes_nothing():
    pipe = tiny_flow_pipeline()
    kw = dict(class_labels=[1, 4], num_inference_steps=3, guidance_scale=2.0, output_type="latent")
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    steered = pipe(**kw, generator=torch.Generator().manual_seed(0), steering=["none", NoSteering()])
    assert torch.equal(plain, steered.images)
