"""The embedded prompt testbed: ``load_default("prompt")`` offline, its stores and call layout."""

from __future__ import annotations

import socket

import pytest
import torch

import steersample as ss
from steersample.default import DEFAULT_MODELS, held_out
from steersample.pipelines import SteeredStableDiffusion3Pipeline


@pytest.fixture(scope="module")
def prompt_default():
    torch.set_num_threads(1)
    return ss.load_default("prompt")


def test_load_default_prompt_offline_round_trip(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted during load_default('prompt')")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe, ref = ss.load_default(name="prompt")
    assert isinstance(pipe, SteeredStableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    out = pipe("a digit seven", num_inference_steps=2, max_sequence_length=0, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, *ref.latents.shape[1:]) == (1, 4, 8, 8)


def test_prompt_default_reference_and_heldout(prompt_default):
    pipe, ref = prompt_default
    meta = ref.manifest.metadata
    assert meta["prompts"][7] == "a digit seven"
    assert set(meta["groups"]) == {"rare", "frequent"} and "a digit two" in meta["groups"]["rare"]
    counts = torch.bincount(ref.labels, minlength=10)
    assert counts[2] == counts[4] == counts[8] == 5 and counts[0] == 130
    x, y = held_out("prompt")
    assert x.shape[1:] == ref.latents.shape[1:] and len(x) == len(y) > 800
    info = ss.load_default_info("prompt") if hasattr(ss, "load_default_info") else None
    if info is not None:
        assert info.rare_classes == (2, 4, 8)
    assert DEFAULT_MODELS["prompt"].name == "prompt"


def test_prompt_default_copies_a_rare_prompt_and_decodes(prompt_default):
    """Plain CFG 4 on a rare prompt lands on a training latent (ratio test); images in [0, 1]."""
    pipe, ref = prompt_default
    g = [torch.Generator().manual_seed(k) for k in range(4)]
    out = pipe(["a digit four"] * 4, num_inference_steps=30, guidance_scale=4.0,
               max_sequence_length=0, output_type="latent", generator=g)
    ratio = ss.metrics.nn_ratio(out.images.float(), ref)
    assert (ratio < 1 / 3).float().mean() >= 0.75
    img = pipe("a digit one", num_inference_steps=4, max_sequence_length=0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3) and 0.0 <= img.min() and img.max() <= 1.0
