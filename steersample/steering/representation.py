"""Representation spikiness (Zhang et al., ICLR 2026, arXiv 2512.20963) and steering on it.

Memorised samples drive a few hidden units very hard ("spiky" representations); generalised
samples spread their energy over many units ("balanced"). For a transformer block output
h ``(R, T, C)`` (R rows, T image tokens, C channels) the measure follows the authors' code:

    m_c       = max_t h[r, t, c]                  per-channel max over the tokens ("spatial max")
    spikiness = std_c(m_c)                        population std across channels (the score)
    l4/l2     = ‖m‖₄ / ‖m‖₂                       a kurtosis-like alternative

:class:`RepresentationSteering` hooks chosen blocks (``block_names(model)`` lists them: every
``...transformer_blocks.<i>`` of DiT, SD3 and Flux), records the spikiness of each sample at
every step (telemetry ``spikiness``) and, during late steps (σ ≤ ``sigma_max``), damps spiky
activations: with τ = mean_c(m_c) + ``spread`` · std_c(m_c) per row,

    h ← sign(h) · (τ + (|h| − τ)(1 − strength))   where |h| > τ,    h unchanged elsewhere,

so strength 0 records only, strength 1 clips every activation at τ. Zhang et al. report that
representation steering edits generalised samples and leaves memorised ones unchanged; the audit
measures what damping does here.

Per-run state (hook handles, the σ of the next model call, the spikiness recorded since the last
step) lives in a :class:`RepresentationRun` made by ``bind(pipeline)`` when the sampling loop
starts a run and closed (hooks removed) when it ends, so one steerer instance can serve concurrent
runs; a hook acts only in the thread (context) of the run that installed it.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import re
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import torch

from steersample.sampling.protocol import SteeringOutput

if TYPE_CHECKING:  # pragma: no cover
    from steersample.sampling.protocol import StepState

__all__ = [
    "spikiness",
    "l4_over_l2",
    "block_names",
    "resolve_layers",
    "image_tokens",
    "damp",
    "hooked",
    "RepresentationRun",
    "RepresentationSteering",
]

_BLOCK = re.compile(r"(.*\.)?(single_)?transformer_blocks\.\d+")
_ACTIVE_RUNS: contextvars.ContextVar[tuple] = contextvars.ContextVar("steersample_runs", default=())


# ----------------------------------------------------------------------------- measures
def _channel_max(h: torch.Tensor) -> torch.Tensor:
    """Per-channel max over tokens: ``(R, T, C)`` -> ``(R, C)``; ``(R, C, H, W)`` -> ``(R, C)``."""
    if h.dim() == 3:
        return h.amax(dim=1)
    if h.dim() == 4:
        return h.flatten(2).amax(dim=2)
    if h.dim() == 2:
        return h
    raise ValueError(
        f"expected block activations of shape (R, T, C) or (R, C, H, W), got {tuple(h.shape)}"
    )


def spikiness(h: torch.Tensor) -> torch.Tensor:
    """Zhang et al.'s score: std across channels of the per-channel token max, ``(R,)`` float32."""
    return _channel_max(h.detach().float()).std(dim=1, unbiased=False)


def l4_over_l2(h: torch.Tensor) -> torch.Tensor:
    """‖m‖₄ / ‖m‖₂ of the per-channel token max ``m`` (a kurtosis-like spikiness), ``(R,)``."""
    m = _channel_max(h.detach().float())
    return m.pow(4).sum(1).pow(0.25) / m.square().sum(1).sqrt().clamp_min(1e-30)


# ----------------------------------------------------------------------------- blocks
def block_names(model: torch.nn.Module) -> list[str]:
    """Names of the hookable transformer blocks of ``model`` (``transformer_blocks.<i>`` and,
    for Flux, ``single_transformer_blocks.<i>``), in module order."""
    return [name for name, _ in model.named_modules() if _BLOCK.fullmatch(name)]


def resolve_layers(model: torch.nn.Module, layers: Sequence[str] | None) -> tuple[str, ...]:
    """The block names to hook: ``layers`` checked against the model, or the middle block.

    Raises:
        ValueError: a name the model lacks (the message lists the available blocks), or a model
            without transformer blocks.
    """
    available = block_names(model)
    if layers is None:
        if not available:
            raise ValueError(
                f"{type(model).__name__} has no transformer blocks to hook (no module named "
                f"'transformer_blocks.<i>'); pass layers=[...] with names from model.named_modules()"
            )
        return (available[len(available) // 2],)
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules or not name]
    if missing:
        raise ValueError(
            f"{type(model).__name__} has no layer(s) {missing}; available blocks: {available}"
        )
    return tuple(layers)


def image_tokens(output: Any) -> torch.Tensor:
    """The image-token activations of a block output: the tensor itself, or the last tensor of
    a tuple (SD3 and Flux blocks return ``(encoder_hidden_states, hidden_states)``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in reversed(output):
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"cannot find activations in a block output of type {type(output).__name__}")


def _replace_image_tokens(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    items = list(output)
    for j in range(len(items) - 1, -1, -1):
        if isinstance(items[j], torch.Tensor):
            items[j] = new
            break
    return type(output)(items) if isinstance(output, tuple) else items


def damp(h: torch.Tensor, strength: float, spread: float) -> torch.Tensor:
    """Soft-clip activations above τ = mean_c(m) + spread · std_c(m) (per row) by ``strength``."""
    m = _channel_max(h.detach().float())
    tau = (m.mean(1) + spread * m.std(1, unbiased=False)).clamp_min(0.0)
    tau = tau.reshape(-1, *([1] * (h.dim() - 1))).to(h.dtype)
    mag = h.abs()
    over = mag > tau
    damped = torch.sign(h) * (tau + (mag - tau) * (1.0 - strength))
    return torch.where(over, damped, h)


# ----------------------------------------------------------------------------- per-run state
class RepresentationRun:
    """One sampling run of a :class:`RepresentationSteering`: hooks, σ of the next call, records.

    Made by ``RepresentationSteering.bind(pipeline)``; use as a context manager (the loop does).
    """

    needs_reference: ClassVar[bool] = False

    def __init__(self, steerer: "RepresentationSteering", model: torch.nn.Module) -> None:
        self.name = steerer.name
        self.steerer = steerer
        self.model = model
        self.layers = resolve_layers(model, steerer.layers)
        self.next_sigma = 1.0                      # σ of the next model call (step 0: noise)
        self.records: list[torch.Tensor] = []      # (R,) spikiness per hooked forward
        self._handles: list[Any] = []
        self._token: Any = None

    def __enter__(self) -> "RepresentationRun":
        modules = dict(self.model.named_modules())
        for name in self.layers:
            self._handles.append(modules[name].register_forward_hook(self._hook))
        self._token = _ACTIVE_RUNS.set(_ACTIVE_RUNS.get() + (self,))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._token is not None:
            _ACTIVE_RUNS.reset(self._token)
            self._token = None

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if self not in _ACTIVE_RUNS.get():          # another run's forward on a shared model
            return None
        h = image_tokens(output)
        self.records.append(spikiness(h).cpu())
        s = self.steerer
        if s.strength > 0.0 and self.next_sigma <= s.sigma_max:
            return _replace_image_tokens(output, damp(h, s.strength, s.spread))
        return None

    def __call__(self, state: "StepState") -> SteeringOutput:
        batch = state.latents.shape[0]
        score = _conditional_rows(self.records, batch, len(self.layers))
        self.records = []
        self.next_sigma = float(state.sigma_next)
        return SteeringOutput(state.pred, {"spikiness": score})


def _conditional_rows(records: list[torch.Tensor], batch: int, layers: int) -> torch.Tensor:
    """Mean spikiness over the hooked layers of the conditional pass, ``(batch,)``.

    A batched [uncond, cond] pass has 2B rows (cond = the second half); separate passes run the
    conditional one first (Flux true CFG)."""
    per_layer = []
    for rec in records:
        if rec.shape[0] == 2 * batch:
            per_layer.append(rec[batch:])
        elif rec.shape[0] == batch:
            per_layer.append(rec)
        if len(per_layer) == layers:
            break
    if not per_layer:
        return torch.full((batch,), math.nan)
    return torch.stack(per_layer).mean(0)


# ----------------------------------------------------------------------------- the steerer
class RepresentationSteering:
    """Damp spiky activations of chosen transformer blocks in late steps (Zhang et al.).

    Args:
        strength: in [0, 1]; 0 only records spikiness, 1 clips activations at τ (see module).
        layers: block names to hook (``block_names(model)``); None = the middle block.
        sigma_max: damp only while σ ≤ sigma_max (late steps; the spikiness is recorded always).
        spread: τ = mean + spread · std of the per-channel maxima (per sample).

    Needs the pipeline's transformer: the sampling loop calls :meth:`bind` with the pipeline.
    Telemetry: ``spikiness`` ``(B,)`` per step (mean over the hooked blocks, conditional pass).
    """

    name: ClassVar[str] = "representation"
    needs_reference: ClassVar[bool] = False

    def __init__(self, strength: float = 0.5, layers: Sequence[str] | None = None,
                 sigma_max: float = 0.5, spread: float = 2.0) -> None:
        self.strength = _check_unit(strength, "strength")
        if layers is not None:
            if isinstance(layers, str):
                layers = [layers]
            if not all(isinstance(n, str) for n in layers) or not layers:
                raise TypeError(f"layers must be a list of block names, got {layers!r}")
            layers = tuple(layers)
        self.layers = layers
        self.sigma_max = _check_unit(sigma_max, "sigma_max")
        if isinstance(spread, bool) or not isinstance(spread, numbers.Real) or not math.isfinite(spread):
            raise ValueError(f"spread must be a finite number, got {spread!r}; e.g. spread=2.0")
        self.spread = float(spread)

    def __repr__(self) -> str:
        return (f"RepresentationSteering(strength={self.strength:g}, layers={self.layers}, "
                f"sigma_max={self.sigma_max:g}, spread={self.spread:g})")

    def bind(self, pipeline: Any) -> RepresentationRun:
        """The per-run steerer for a run of ``pipeline`` (hooks ``pipeline.transformer``)."""
        model = pipeline if isinstance(pipeline, torch.nn.Module) else getattr(pipeline, "transformer", None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                "RepresentationSteering hooks the model's transformer blocks, so it needs the "
                "pipeline: call it through a steered pipeline (steering=[...]) or "
                "sample(..., pipeline=pipe)"
            )
        return RepresentationRun(self, model)

    def __call__(self, state: "StepState") -> SteeringOutput:
        raise ValueError(
            "RepresentationSteering was called without a run: the sampling loop binds it to the "
            "pipeline (steerer.bind(pipeline)); pass it in a steered pipeline's steering=[...]"
        )


def _check_unit(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}; e.g. {name}=0.5")
    return value


@contextlib.contextmanager
def hooked(model: torch.nn.Module, layers: Sequence[str] | None = None) -> Iterator[list[torch.Tensor]]:
    """Record the spikiness ``(R,)`` of every forward of the given blocks while inside the block.

    Yields the list the records are appended to (one per hooked block per forward); the hooks are
    removed on exit.
    """
    names = resolve_layers(model, layers)
    records: list[torch.Tensor] = []
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, a, o: records.append(spikiness(image_tokens(o)).cpu())) for n in names]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
