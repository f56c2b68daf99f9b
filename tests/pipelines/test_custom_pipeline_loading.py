"""Each pipeline file loads as a diffusers custom pipeline from a saved directory
(``custom_pipeline=<file>.py, trust_remote_code=True``) and converts from the stock pipeline with
``from_pipe``; outputs equal the directly imported class's: bit for bit in process, within a
float32 rounding bound across a save and load (see
``test_loads_as_custom_pipeline_from_saved_directory`` for why)."""

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


# float32 unit roundoff (2^-24 ~ 6e-8; eps = 2^-23). A GEMM kernel that sums in another order
# moves each dot product by a few units of roundoff; three sampler steps through a one-layer
# transformer carry that to a few ULP of the output (3.6e-7 to 6e-7 measured on outputs of
# magnitude ~2, i.e. 2-3 ULP). 64 ULP of the output's scale bounds that with room; a real
# difference (another weight, timestep, mask or schedule) moves latents by 1e-3 or more.
SAVE_LOAD_ATOL = 64 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("case", sorted(CASES))
def test_loads_as_custom_pipeline_from_saved_directory(case, tmp_path):
    """A saved-and-reloaded pipeline matches ``from_pipe`` of the source to float32 rounding, and
    bit for bit once its weights sit in freshly allocated memory.

    Why not bit for bit as loaded: the weights load identically (every tensor equal), the
    scheduler too, but diffusers and transformers load safetensors without a copy: each parameter
    is a view of the file's private memory map at its offset in the file. The data start after an
    8-byte length and a JSON header padded to 8 bytes, so a tensor may sit 4 or 8 bytes off a
    16-byte boundary, whereas torch's allocator aligns to 64 bytes. MKL's sgemm takes another code
    path (another summation order) for such operands. Measured (torch 2.13.0 CPU with MKL 2024.2,
    2-core AVX-512 AMD EPYC, safetensors 0.8.0, transformers 5.25.0, diffusers 0.42.1): Flux's
    transformer file has a 6,400-byte header, so every weight is at 8 mod 16 and the first
    difference is the time embedding's first ``nn.Linear`` (1.2e-7); SD3's transformer happens to
    load 16-byte aligned, but its CLIP encoders (loaded by transformers, at 0, 4 and 8 mod 16)
    give pooled embeddings 3.6e-7 to 4.8e-7 apart. ``MKL_CBWR=AUTO,STRICT`` (MKL's conditional
    numerical reproducibility) makes the runs equal, and so does cloning the loaded parameters
    (checked below). safetensors 0.6.2, 0.7.0 and 0.8.0 write the same header and load at the
    same offsets; whether a machine shows the difference depends on the GEMM kernel its CPU gets
    for misaligned operands (the landing machine's did not).
    """
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
    torch.testing.assert_close(
        images, expected, rtol=0, atol=SAVE_LOAD_ATOL * max(1.0, expected.abs().max().item())
    )
    assert telemetry.model_evals.tolist() == expected_telemetry.model_evals.tolist()
    # the cause above, checked: weights copied into freshly allocated (aligned) memory give
    # exactly the in-process output
    with torch.no_grad():
        for component in loaded.components.values():
            for param in component.parameters() if isinstance(component, torch.nn.Module) else ():
                param.data = param.data.clone()
    assert torch.equal(run(loaded, call_kwargs)[0], expected)


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
