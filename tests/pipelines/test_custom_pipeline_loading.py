"""Each pipeline file loads as a diffusers custom pipeline from a saved directory
(``custom_pipeline=<file>.py, trust_remote_code=True``) and converts from the stock pipeline with
``from_pipe``; outputs equal the directly imported class's."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

import steersample.pipelines.pipeline_steered_flow as flow_module
import steersample.pipelines.pipeline_steered_flux as flux_module
import steersample.pipelines.pipeline_steered_sd3 as sd3_module
from steersample.sampling.guidance import GuidanceSchedule
from steersample.pipelines import SteeredFlowPipeline, SteeredFluxPipeline, SteeredStableDiffusion3Pipeline
from steersample.testing import tiny_flow_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

WINDOW = GuidanceSchedule(scale=3.0, window=(0.3, 0.8))

CASES = {
    "sd3": (
        tiny_sd3_pipeline, sd3_module, SteeredStableDiffusion3Pipeline,
        dict(text_encoder_3=None, tokenizer_3=None),
        dict(prompt="a cat", height=8, width=8),
    ),
    "flux": (
        tiny_flux_pipeline, flux_module, SteeredFluxPipeline, {},
        dict(prompt="a cat", negative_prompt="dark", height=16, width=16, max_sequence_length=16),
    ),
    "flow": (tiny_flow_pipeline, flow_module, SteeredFlowPipeline, {}, dict(class_labels=[2, 5])),
}


def run(pipe, call_kwargs):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**call_kwargs, num_inference_steps=3, guidance=WINDOW, output_type="latent",
               generator=torch.Generator().manual_seed(0), return_telemetry=True)
    return out.images, out.telemetry


@pytest.mark.parametrize("case", sorted(CASES))
def test_loads_as_custom_pipeline_from_saved_directory(case, tmp_path):
    build, module, cls, load_kwargs, call_kwargs = CASES[case]
    source = build()
    source.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=module.__file__, trust_remote_code=True, **load_kwargs
    )
    assert type(loaded).__name__ == cls.__name__ and type(loaded) is not cls  # the file's own copy
    direct = cls.from_pipe(source)
    images, telemetry = run(loaded, call_kwargs)
    expected, expected_telemetry = run(direct, call_kwargs)
    assert torch.equal(images, expected)
    assert telemetry.model_evals.tolist() == expected_telemetry.model_evals.tolist()


@pytest.mark.parametrize("case", ["sd3", "flux"])
def test_from_pipe_and_custom_pipeline_from_pipe(case):
    build, module, cls, _, call_kwargs = CASES[case]
    stock = build()
    converted = cls.from_pipe(stock)
    assert isinstance(converted, cls) and converted.transformer is stock.transformer
    remote = DiffusionPipeline.from_pipe(stock, custom_pipeline=module.__file__, trust_remote_code=True)
    assert type(remote).__name__ == cls.__name__ and remote.transformer is stock.transformer
    assert torch.equal(run(converted, call_kwargs)[0], run(remote, call_kwargs)[0])


def test_flow_pipeline_round_trips_through_its_own_from_pretrained(tmp_path):
    pipe = tiny_flow_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = SteeredFlowPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None and loaded.null_class == 10
    call_kwargs = CASES["flow"][4]
    assert torch.equal(run(loaded, call_kwargs)[0], run(pipe, call_kwargs)[0])
