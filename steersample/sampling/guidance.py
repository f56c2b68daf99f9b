"""Classifier-free guidance as a function of the noise level σ.

A :class:`GuidanceSchedule` maps σ to a CFG scale ``w(σ)`` and combines predictions as

    pred = pred_uncond + w(σ) · (pred_cond − pred_uncond)

(the form diffusers' SD3 and Flux ``true_cfg`` pipelines use, written the same way so that a
constant schedule reproduces them bit for bit). The scale is piecewise constant in σ:

    w(σ) = scale_above     if σ > hi
           scale           if lo < σ ≤ hi        (window = (lo, hi))
           scale_below     if σ ≤ lo

with optional linear ramps of width ``ramp`` centred on each edge. Windows are given in σ, not
in step fractions as diffusers' guiders' ``start``/``stop`` are, so the same window means the
same noise levels under any shift or step count.

* ``w = 1`` gives the conditional prediction alone: **a scale of exactly 1.0 needs no
  unconditional pass** (:meth:`GuidanceSchedule.needs_uncond` is False there), which is where
  windowed guidance saves model evaluations.
* ``w > 1`` is ordinary CFG. ``0 < w < 1`` interpolates towards the unconditional prediction,
  ``w = 0`` is the unconditional prediction, and ``w < 0`` is *opposite guidance* (Jain et al.,
  arXiv 2411.16738), which pushes away from the condition.
* Stock diffusers SD3 (``guidance_scale``) and Flux (``true_cfg_scale``) run CFG only when the
  scale is **> 1** and treat anything ≤ 1 as "no CFG". A schedule applies every scale it holds
  except exactly 1.0; :meth:`GuidanceSchedule.from_guidance_scale` reproduces the stock rule.

Presets: :meth:`~GuidanceSchedule.constant`, :meth:`~GuidanceSchedule.interval`
(Kynkäänniemi et al., arXiv 2404.07724; Liu et al., arXiv 2512.02826 use σ ∈ (0.4, 0.9]),
:meth:`~GuidanceSchedule.delayed` and :meth:`~GuidanceSchedule.opposite` (Jain et al.),
:meth:`~GuidanceSchedule.from_phase` (a window placed relative to the phase boundary σ*).

Edges and rounding: σ read from a float32 scheduler grid (or from ``timestep / 1000``) differs
from the decimal edge by a few float32 ulps, so hard edges are matched with a tolerance of
``SIGMA_ATOL`` = 1e-6: a σ within 1e-6 of ``hi`` counts as ``σ = hi`` (inside) and one within
1e-6 of ``lo`` counts as ``σ = lo`` (outside, ``scale_below``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["GuidanceSchedule", "SIGMA_ATOL"]

SIGMA_ATOL = 1e-6


def _finite_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}; pass a finite number such as 1.0.")
    return value


def _boundary(profile: Any) -> float:
    """σ* from a ``PhaseProfile`` (its ``boundary_sigma``) or a plain number, checked in (0, 1)."""
    value = getattr(profile, "boundary_sigma", profile)
    value = _finite_float("phase boundary sigma", value)
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"phase boundary sigma must lie in (0, 1), got {value!r}; pass a PhaseProfile or a "
            "noise level strictly between data (0) and noise (1)."
        )
    return value


@dataclass(frozen=True)
class GuidanceSchedule:
    """CFG scale as a piecewise-constant function of σ (see the module docstring for the formula).

    Args:
        scale: scale inside the window, ``lo < σ ≤ hi``.
        window: ``(lo, hi)`` with ``0 ≤ lo < hi ≤ 1``. The default ``(0, 1)`` covers every σ a
            sampler evaluates, so ``GuidanceSchedule(scale=w)`` is plain CFG with scale ``w``.
        scale_above: scale for ``σ > hi`` (the first, noisiest steps).
        scale_below: scale for ``σ ≤ lo`` (the last, cleanest steps).
        ramp: width in σ of linear ramps centred on ``lo`` and ``hi`` (0 = hard edges). The scale
            goes linearly from the outer value at ``edge ∓ ramp/2`` to the inner one at
            ``edge ± ramp/2``; ``ramp`` must not exceed ``hi − lo``.

    Example::

        g = GuidanceSchedule(scale=5.0, window=(0.4, 0.9))
        g.scale_at(0.95), g.scale_at(0.9), g.scale_at(0.4)    # 1.0, 5.0, 1.0
        g.needs_uncond(0.95)                                  # False: skip the uncond pass
    """

    scale: float = 1.0
    window: tuple[float, float] = (0.0, 1.0)
    scale_above: float = 1.0
    scale_below: float = 1.0
    ramp: float = 0.0

    def __post_init__(self) -> None:
        for name in ("scale", "scale_above", "scale_below"):
            object.__setattr__(self, name, _finite_float(name, getattr(self, name)))
        window = self.window
        if isinstance(window, (str, bytes)) or not isinstance(window, Iterable):
            raise TypeError(f"window must be a pair (lo, hi) of noise levels, got {window!r}.")
        window = tuple(window)
        if len(window) != 2:
            raise TypeError(f"window must be a pair (lo, hi) of noise levels, got {window!r}.")
        lo = _finite_float("window lo", window[0])
        hi = _finite_float("window hi", window[1])
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(
                f"window must satisfy 0 <= lo < hi <= 1 (sigma = 1 is noise), got ({lo!r}, {hi!r}); "
                "for example window=(0.4, 0.9)."
            )
        object.__setattr__(self, "window", (lo, hi))
        ramp = _finite_float("ramp", self.ramp)
        if ramp < 0.0 or ramp > hi - lo:
            raise ValueError(
                f"ramp must lie in [0, hi - lo] = [0, {hi - lo!r}] so the two edge ramps do not "
                f"overlap, got {ramp!r}; use ramp=0 for hard edges."
            )
        object.__setattr__(self, "ramp", ramp)

    # ---------------------------------------------------------------- evaluation
    def scale_at(self, sigma: float | Tensor) -> float | Tensor:
        """The scale ``w(σ)``.

        Args:
            sigma: a number, or a tensor of any shape (e.g. ``(B,)``).

        Returns:
            A Python float for a number, else a tensor shaped like ``sigma`` (its dtype when
            floating point, float32 otherwise; its device).
        """
        if isinstance(sigma, Tensor):
            out_dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
            w = self._scale_float64(sigma.detach().to("cpu", torch.float64))
            return w.to(device=sigma.device, dtype=out_dtype)
        s = torch.tensor(_finite_float("sigma", sigma), dtype=torch.float64)
        return self._scale_float64(s).item()

    def _scale_float64(self, s: Tensor) -> Tensor:
        """``w(σ)`` for a float64 tensor of σ (one implementation for numbers and tensors)."""
        lo, hi = self.window
        r, tol = self.ramp, SIGMA_ATOL
        # hard edges: scale_below for σ <= lo, scale for lo < σ <= hi, scale_above for σ > hi
        w = torch.full_like(s, self.scale_below)
        w = torch.where(s > lo + tol, torch.full_like(s, self.scale), w)
        w = torch.where(s > hi + tol, torch.full_like(s, self.scale_above), w)
        if r > 0.0:
            # linear ramps on the open bands |σ − edge| < ramp/2; exact constants elsewhere
            t_lo = (s - (lo - r / 2)) / r
            t_hi = (s - (hi - r / 2)) / r
            in_lo = (s > lo - r / 2 + tol) & (s < lo + r / 2 - tol)
            in_hi = (s > hi - r / 2 + tol) & (s < hi + r / 2 - tol)
            w = torch.where(in_lo, self.scale_below + (self.scale - self.scale_below) * t_lo, w)
            w = torch.where(in_hi, self.scale + (self.scale_above - self.scale) * t_hi, w)
        return w

    def needs_uncond(self, sigma: float | Tensor) -> bool:
        """Whether the unconditional prediction is needed at ``sigma``: False iff ``w(σ) == 1.0``.

        ``sigma`` is a number or a one-element tensor (use :meth:`scale_at` for batches).
        """
        if isinstance(sigma, Tensor):
            if sigma.numel() != 1:
                raise ValueError(
                    f"needs_uncond takes one noise level, got a tensor of shape {tuple(sigma.shape)}; "
                    "call it per step with the step's sigma."
                )
            sigma = sigma.item()
        return self.scale_at(sigma) != 1.0

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor | None, sigma: float | Tensor) -> Tensor:
        """Guided prediction ``pred_uncond + w(σ) · (pred_cond − pred_uncond)``.

        Args:
            pred_cond: conditional prediction, ``(B, ...)``.
            pred_uncond: unconditional prediction of the same shape, or None where ``w(σ) == 1``.
            sigma: a number or one-element tensor (one σ for the batch), or a ``(B,)`` tensor
                (one σ per sample; the scales broadcast over the trailing dimensions).

        Returns:
            The guided prediction, shaped like ``pred_cond``. Where ``w(σ) == 1`` for every
            sample, ``pred_cond`` itself is returned unchanged (no arithmetic); with per-sample σ,
            samples at ``w == 1`` get their ``pred_cond`` values exactly.
        """
        if isinstance(sigma, Tensor) and sigma.numel() != 1:
            w = self.scale_at(sigma)
            if bool((w == 1.0).all()):
                return pred_cond
            if pred_uncond is None:
                raise ValueError(
                    "pred_uncond is None but the guidance scale differs from 1 at some of the "
                    f"noise levels {sigma.tolist()}; run the unconditional pass where needs_uncond is True."
                )
            w = w.to(device=pred_cond.device, dtype=pred_cond.dtype)
            w = w.reshape(w.shape + (1,) * (pred_cond.ndim - w.ndim))
            # samples whose scale is exactly 1 keep pred_cond bit for bit, as in the scalar case
            return torch.where(w == 1.0, pred_cond, pred_uncond + w * (pred_cond - pred_uncond))
        if isinstance(sigma, Tensor):
            sigma = sigma.item()
        w = self.scale_at(sigma)
        if w == 1.0:
            return pred_cond
        if pred_uncond is None:
            raise ValueError(
                f"pred_uncond is None but the guidance scale at sigma={sigma!r} is {w!r}, not 1; "
                "run the unconditional pass where needs_uncond(sigma) is True."
            )
        return pred_uncond + w * (pred_cond - pred_uncond)

    def count_evaluations(self, sigmas: Iterable[float] | Tensor) -> int:
        """Model evaluations (per sample) over the evaluated noise levels ``sigmas``.

        One conditional evaluation per σ plus one unconditional one where :meth:`needs_uncond`.
        """
        if isinstance(sigmas, Tensor):
            sigmas = sigmas.reshape(-1).tolist()
        return sum(1 + int(self.needs_uncond(float(s))) for s in sigmas)

    # ---------------------------------------------------------------- presets
    @classmethod
    def constant(cls, w: float) -> GuidanceSchedule:
        """Plain CFG: scale ``w`` at every σ (``w = 1`` means no guidance and no uncond pass)."""
        return cls(scale=w, window=(0.0, 1.0), scale_above=w, scale_below=w)

    @classmethod
    def from_guidance_scale(cls, guidance_scale: float) -> GuidanceSchedule:
        """Stock diffusers semantics of a single ``guidance_scale``: CFG only when it is > 1.

        SD3's ``guidance_scale`` and Flux's ``true_cfg_scale`` skip CFG for any value ≤ 1; this
        returns ``constant(guidance_scale)`` when it is > 1 and ``constant(1.0)`` otherwise.
        """
        w = _finite_float("guidance_scale", guidance_scale)
        return cls.constant(w if w > 1.0 else 1.0)

    @classmethod
    def interval(cls, w: float, lo: float, hi: float) -> GuidanceSchedule:
        """Limited-interval guidance: scale ``w`` for ``lo < σ ≤ hi``, none (1.0) elsewhere.

        Kynkäänniemi et al. (arXiv 2404.07724); Liu et al. (arXiv 2512.02826) report
        σ ∈ (0.4, 0.9] as much better than guidance everywhere.
        """
        return cls(scale=w, window=(lo, hi), scale_above=1.0, scale_below=1.0)

    @classmethod
    def delayed(cls, w: float, sigma_start: float) -> GuidanceSchedule:
        """No guidance while ``σ > sigma_start`` (the early, noisy steps), then scale ``w``.

        Jain et al. (arXiv 2411.16738): CFG applied inside the attraction basin of a memorised
        sample causes the copy; starting it after the transition avoids the basin.
        """
        start = _finite_float("sigma_start", sigma_start)
        return cls(scale=w, window=(0.0, start), scale_above=1.0, scale_below=w)

    @classmethod
    def opposite(cls, w: float, w_early: float, sigma_start: float) -> GuidanceSchedule:
        """Opposite guidance ``w_early`` (e.g. −2) while ``σ > sigma_start``, then scale ``w``.

        Jain et al. (arXiv 2411.16738): a negative early scale pushes the trajectory out of the
        attraction basin before normal CFG takes over.
        """
        start = _finite_float("sigma_start", sigma_start)
        return cls(scale=w, window=(0.0, start), scale_above=w_early, scale_below=w)

    @classmethod
    def from_phase(
        cls, profile: Any, w: float, *, below: float = 0.1, above: float = 0.4, ramp: float = 0.0
    ) -> GuidanceSchedule:
        """A window placed relative to the phase boundary σ*: scale ``w`` for
        ``σ* − below < σ ≤ σ* + above`` (clipped to [0, 1]), none (1.0) elsewhere.

        Guidance covers the navigation stage just above σ*, where the layout forms, and stops
        shortly into refinement, where the posterior collapses onto single training samples
        (Liu et al., arXiv 2512.02826). The defaults give the paper's σ ∈ (0.4, 0.9] when σ* = 0.5.

        Args:
            profile: a ``PhaseProfile`` (its ``boundary_sigma`` is read) or σ* as a number.
            w: scale inside the window.
            below, above: window extent below and above σ*, in σ (each ≥ 0, not both 0).
            ramp: edge ramp width (see :class:`GuidanceSchedule`).
        """
        boundary = _boundary(profile)
        below = _finite_float("below", below)
        above = _finite_float("above", above)
        if below < 0.0 or above < 0.0 or below + above == 0.0:
            raise ValueError(
                f"below and above must be >= 0 and not both 0, got below={below!r}, above={above!r}; "
                "for example below=0.1, above=0.4."
            )
        lo = max(0.0, boundary - below)
        hi = min(1.0, boundary + above)
        return cls(scale=w, window=(lo, hi), scale_above=1.0, scale_below=1.0, ramp=ramp)

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``window`` as a list) that :meth:`from_dict` reads back."""
        d = asdict(self)
        d["window"] = list(self.window)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GuidanceSchedule:
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys raise."""
        if not isinstance(d, Mapping):
            raise TypeError(f"from_dict expects a mapping such as GuidanceSchedule.to_dict(), got {type(d).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown GuidanceSchedule key(s) {unknown}; the allowed keys are {sorted(known)}."
            )
        return cls(**dict(d))
