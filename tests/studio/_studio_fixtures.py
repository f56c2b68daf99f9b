"""Shared pieces of the studio tests: a tiny served model and a server on a free local port."""

from __future__ import annotations

import contextlib
import socket

import torch

TINY = "tiny"

# a fast request: 2 samples, 4 steps; every control the /generate endpoint takes
FAST_REQUEST = dict(model=TINY, class_id=3, prompt="", seed=5, num_samples=2, steps=4,
                    guidance_scale=2.0, scale_above=1.0, scale_below=1.0, window_relative=False,
                    window_lo=0.4, window_hi=0.9, below_boundary=0.1, above_boundary=0.4,
                    schedule="shift", shift=1.0, navigation_fraction=0.5, steering="none",
                    strength=1.0)


def tiny_reference():
    """8 real digits of each class (80 images, (1, 8, 8) in [-1, 1]) with labels."""
    from steersample.data import load_digits
    from steersample.reference.reference_set import ReferenceSet

    images, labels = load_digits()
    pick = torch.cat([(labels == c).nonzero().flatten()[:8] for c in range(10)])
    return ReferenceSet(images[pick], labels[pick])


def tiny_heldout():
    """8 other real digits of each class (80 images) with labels: the held-out data."""
    from steersample.data import load_digits

    images, labels = load_digits()
    pick = torch.cat([(labels == c).nonzero().flatten()[8:16] for c in range(10)])
    return images[pick], labels[pick]


def tiny_model():
    """A ``StudioModel`` around the tiny class-conditional DiT of ``steersample.testing``,
    judged as digits and with held-out digits (so tiles carry both readings)."""
    from steersample.studio.engine import StudioModel
    from steersample.testing import tiny_flow_pipeline

    return StudioModel(TINY, tiny_flow_pipeline(), tiny_reference(), "class",
                       description="tiny test model", digits=True, heldout=tiny_heldout())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(demo):
    """Launch ``demo`` on 127.0.0.1 and a free port; yield its URL; close it afterwards."""
    from steersample.studio.app import launch

    _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), block=False)
    try:
        yield url
    finally:
        demo.close()


PROMPT_MODEL = "prompt testbed"

# a fast request on the shipped prompt testbed: 2 samples, 6 steps, attractor steering
PROMPT_REQUEST = {**FAST_REQUEST, "model": PROMPT_MODEL, "class_id": None,
                  "prompt": "a digit two", "steps": 6, "window_lo": 0.0, "window_hi": 1.0,
                  "steering": "attractor"}


def prompt_model():
    """The shipped prompt testbed (``--model prompt``) with its reference, held-out set and
    prompts, as ``steersample demo --model prompt`` serves it."""
    from steersample.studio.engine import load_prompt_model

    return load_prompt_model("prompt")
