"""Shared by ``steersample compare``'s runs (digits and prompt models): a sampling setting and
the timed, counted pipeline call."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Setting", "timed_call"]


@dataclass(frozen=True)
class Setting:
    """One sampling configuration: a name, a description, and the pipeline arguments."""

    name: str
    description: str
    guidance: object  # a GuidanceSchedule
    steering: tuple = ()


def timed_call(pipe: Any, bar: Any = None, **kwargs: Any) -> tuple[Any, int, float]:
    """``pipe(**kwargs)`` with latents out and no telemetry: ``(output, rows, seconds)``.

    ``seconds`` is what a user pays for the call (no telemetry is recorded: with a reference set
    that would add an exact-oracle pass per step); ``rows`` counts the samples the transformer
    saw (a forward pre-hook: a batched cond+uncond call counts 2 per sample), so model
    evaluations per sample are ``rows // batch``. ``bar`` (a tqdm bar or None) advances a step
    at a time.
    """
    rows = [0]

    def count(module, args, call_kwargs):
        hidden = args[0] if args else call_kwargs["hidden_states"]
        rows[0] += int(hidden.shape[0])

    def on_step_end(pipeline, i, t, step_kwargs):
        if bar is not None:
            bar.update(1)
        return step_kwargs

    handle = pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
    try:
        start = time.perf_counter()
        out = pipe(output_type="latent", return_telemetry=False, callback_on_step_end=on_step_end,
                   **kwargs)
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    return out, rows[0], seconds
