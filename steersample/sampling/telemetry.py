"""Telemetry of one sampling run: typed, frozen records (``output.telemetry``).

A run of S steps on a batch of B samples gives one :class:`StepTelemetry` per step and, when a
``ReferenceSet`` was passed, one :class:`SampleTelemetry` for the finished latents:

    tel = out.telemetry
    tel.sigmas              # (S,)   noise level at each step (sigma = 1 is noise)
    tel.model_evals         # (S,)   model evaluations per step (see below)
    tel.guidance_scales     # (S,)   CFG scale used (1.0 where the unconditional pass was skipped)
    tel.steering_magnitude  # (S, B) ||v_steered - v_guided||_2 per sample
    tel.oracle_top1         # (S, B) max_i gamma_i(x_sigma, sigma) of the empirical oracle
    tel.oracle_index        # (S, B) argmax_i gamma_i, the reference sample the posterior favours
    tel.nearest_index       # (S, B) nearest reference sample to x0_hat = x_sigma - sigma * v
    tel.final.nn_ratio      # (B,)   d(x, NN1) / d(x, NN2) of the final latents
    tel.final.is_copy       # (B,)   nn_ratio < 1/3 (metrics.COPY_THRESHOLD; SCIENCE.md section 6)

**Model-evaluation convention.** One evaluation is one forward of the model on the B samples
of the batch. A batched conditional + unconditional pass (a forward on 2B rows, as SD3 and the
class-conditional pipeline do) counts as 2, as do the two separate passes of Flux true CFG.
A run of S steps whose guidance window contains K of them costs ``S + K`` evaluations.
Extra passes made by a steerer (for example SD3 skip-layer guidance) are reported by that
steerer under ``scores`` (key ``"<name>.model_evals"``), not in ``model_evals``.

The recorder (:class:`TelemetryRecorder`) is created per run inside the sampling loop; nothing
here is stored on a pipeline or steerer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from steersample.reference.ratio import COPY_THRESHOLD, ratio_from_distances

__all__ = ["StepTelemetry", "SampleTelemetry", "Telemetry", "TelemetryRecorder"]


@dataclass(frozen=True)
class StepTelemetry:
    """What happened at one step (tensors are on the CPU, per sample of the batch).

    Attributes:
        step: step index, 0-based.
        sigma, sigma_next: noise level before and after the step.
        model_evals: model evaluations in this step (1, or 2 with an unconditional pass).
        guidance_scale: the CFG scale ``w`` applied at ``sigma``.
        steering_magnitude: ``(B,)`` l2 norm of the total change the steerers made to v.
        oracle_top1, oracle_index: ``(B,)`` empirical-oracle top-1 posterior weight and its
            reference index at ``(x_sigma, sigma)``; None without a reference set.
        nearest_index: ``(B,)`` reference index nearest to ``x0_hat``; None without a reference.
        scores: steerer telemetry, ``"<steerer name>.<key>"`` -> ``(B,)`` tensor or float.
    """

    step: int
    sigma: float
    sigma_next: float
    model_evals: int
    guidance_scale: float
    steering_magnitude: torch.Tensor
    oracle_top1: torch.Tensor | None = None
    oracle_index: torch.Tensor | None = None
    nearest_index: torch.Tensor | None = None
    scores: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class SampleTelemetry:
    """Per-sample verdict on the finished latents against the reference set, each ``(B,)``."""

    nearest_index: torch.Tensor
    nearest_distance: torch.Tensor
    second_distance: torch.Tensor
    nn_ratio: torch.Tensor
    is_copy: torch.Tensor


@dataclass(frozen=True)
class Telemetry:
    """The whole run: ``steps`` (one record per executed step) and ``final`` (or None)."""

    steps: tuple[StepTelemetry, ...]
    final: SampleTelemetry | None = None

    @property
    def sigmas(self) -> torch.Tensor:
        """(S,) float64 noise level at each step."""
        return torch.tensor([s.sigma for s in self.steps], dtype=torch.float64)

    @property
    def model_evals(self) -> torch.Tensor:
        """(S,) int64 model evaluations per step."""
        return torch.tensor([s.model_evals for s in self.steps], dtype=torch.int64)

    @property
    def total_model_evals(self) -> int:
        """Sum of :attr:`model_evals` (``S + K`` with K steps inside the guidance window)."""
        return int(sum(s.model_evals for s in self.steps))

    @property
    def guidance_scales(self) -> torch.Tensor:
        """(S,) float64 CFG scale per step."""
        return torch.tensor([s.guidance_scale for s in self.steps], dtype=torch.float64)

    @property
    def steering_magnitude(self) -> torch.Tensor:
        """(S, B) steering magnitude per step and sample."""
        return torch.stack([s.steering_magnitude for s in self.steps])

    @property
    def oracle_top1(self) -> torch.Tensor | None:
        """(S, B) oracle top-1 weight, or None without a reference set."""
        return self._stack("oracle_top1")

    @property
    def oracle_index(self) -> torch.Tensor | None:
        """(S, B) oracle arg-max index, or None without a reference set."""
        return self._stack("oracle_index")

    @property
    def nearest_index(self) -> torch.Tensor | None:
        """(S, B) index of the reference sample nearest to x0_hat, or None."""
        return self._stack("nearest_index")

    def _stack(self, name: str) -> torch.Tensor | None:
        values = [getattr(s, name) for s in self.steps]
        if not values or values[0] is None:
            return None
        return torch.stack(values)

    def as_dict(self) -> dict[str, Any]:
        """Plain lists and floats (JSON-ready), one key per per-step field and per final field."""
        out: dict[str, Any] = {
            "sigma": self.sigmas.tolist(),
            "model_evals": self.model_evals.tolist(),
            "guidance_scale": self.guidance_scales.tolist(),
            "steering_magnitude": self.steering_magnitude.tolist() if self.steps else [],
        }
        for name in ("oracle_top1", "oracle_index", "nearest_index"):
            value = self._stack(name)
            if value is not None:
                out[name] = value.tolist()
        for key in sorted({k for s in self.steps for k in s.scores}):
            out[key] = [_plain(s.scores.get(key)) for s in self.steps]
        if self.final is not None:
            for name in SampleTelemetry.__dataclass_fields__:
                out[f"final_{name}"] = getattr(self.final, name).tolist()
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    return value


def _per_sample_norm(delta: torch.Tensor) -> torch.Tensor:
    return delta.detach().flatten(1).float().norm(dim=1).cpu()


class TelemetryRecorder:
    """Collects :class:`StepTelemetry` during one run (created by the loop, one per run).

    Args:
        reference: ``ReferenceSet`` or None; with it, every step records oracle top-1 weight and
            index at ``(x_sigma, sigma)`` and the nearest reference index of ``x0_hat``.
        to_reference: maps loop latents ``(B, ...)`` to the reference layout ``(B, *shape)``.
        labels: ``(B,)`` class labels restricting the oracle to each sample's class, or None.
    """

    def __init__(
        self,
        reference: Any = None,
        to_reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        self._reference = reference
        self._to_reference = to_reference or (lambda x: x)
        self._labels = None
        self._oracle = None
        if reference is not None:
            from steersample.oracle.empirical import EmpiricalOracle

            self._oracle = EmpiricalOracle(reference)
            if labels is not None and getattr(reference, "labels", None) is not None:
                self._labels = labels.detach().cpu()
                missing = sorted(set(self._labels.tolist()) - set(reference.labels.tolist()))
                if missing:
                    raise ValueError(
                        f"the reference set has no samples of classes {missing}, which this call "
                        "generates; add them to the ReferenceSet or pass one without labels"
                    )
        self._steps: list[StepTelemetry] = []

    def record(
        self,
        *,
        step: int,
        sigma: float,
        sigma_next: float,
        model_evals: int,
        guidance_scale: float,
        latents: torch.Tensor,
        x0_hat: torch.Tensor,
        v_guided: torch.Tensor,
        v_steered: torch.Tensor,
        scores: Mapping[str, Any],
    ) -> None:
        """Record one step; ``latents`` is x_sigma and ``x0_hat = latents - sigma * v_steered``."""
        if v_steered is v_guided:
            magnitude = torch.zeros(latents.shape[0])
        else:
            magnitude = _per_sample_norm(v_steered - v_guided)
        top1 = index = nearest = None
        if self._oracle is not None:
            x = self._to_reference(latents).detach().float().cpu()
            post = self._oracle.posterior(x, float(sigma), labels=self._labels)
            top1, index = post.top1.detach().cpu(), post.index.detach().cpu()
            x0 = self._to_reference(x0_hat).detach().float().cpu()
            _, idx = self._reference.nearest(x0, k=1, labels=self._labels)
            nearest = torch.as_tensor(idx)[:, 0].cpu()
        self._steps.append(
            StepTelemetry(
                step=step,
                sigma=float(sigma),
                sigma_next=float(sigma_next),
                model_evals=int(model_evals),
                guidance_scale=float(guidance_scale),
                steering_magnitude=magnitude,
                oracle_top1=top1,
                oracle_index=index,
                nearest_index=nearest,
                scores=MappingProxyType({k: _detach(v) for k, v in scores.items()}),
            )
        )

    def finish(self, latents: torch.Tensor) -> Telemetry:
        """Close the run: per-sample nearest neighbour, ratio and copy flag of ``latents``."""
        final = None
        if self._reference is not None:
            x = self._to_reference(latents).detach().float().cpu()
            dist, idx = self._reference.nearest(x, k=2)
            dist, idx = torch.as_tensor(dist).double(), torch.as_tensor(idx)
            ratio = ratio_from_distances(dist)
            final = SampleTelemetry(
                nearest_index=idx[:, 0].cpu(),
                nearest_distance=dist[:, 0].cpu(),
                second_distance=dist[:, 1].cpu(),
                nn_ratio=ratio.cpu(),
                is_copy=(ratio < COPY_THRESHOLD).cpu(),
            )
        return Telemetry(steps=tuple(self._steps), final=final)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value
