"""``AttractorRepulsion``: keep samples out of memorised attractors, per sample, in refinement.

A model that memorises a reference set behaves, in the refinement stage, like the empirical
oracle (``SCIENCE.md`` §1): its one-step estimate x̂₀ snaps onto the nearest training sample x⁽¹⁾
and the trajectory ends on a copy. Pushing straight away from x⁽¹⁾ (AMG, Chen et al. CVPR 2024;
SPELL, Kirchhof et al. arXiv 2410.06025) leaves the data and damages the image, and pulling
towards the posterior mean of several neighbours collapses every sample of one attractor onto
the same blurred blend. This steerer does two things, only to samples that are falling into an
attractor and only from the moment they start to:

**Flag.** A sample is flagged, and stays flagged for the rest of the run, when at two
consecutive steps (one step could be a passing dip of a generalising sample)

- it is in its refinement stage: the oracle posterior of (x_σ, σ) over its K nearest reference
  samples is concentrated, max_k γ_k ≥ 1/2 (the per-sample form of "σ below the phase boundary
  σ*", where the mean top-1 weight crosses 1/2; Liu et al., arXiv 2512.02826), and
- its x̂₀ is falling into one reference sample: d(x̂₀, NN₁) / d(x̂₀, NN₂) < ``trigger``.

Both tests are ratios, so the defaults hold on any data scale; nothing is tuned to digits.

**Refine without the pull.** A flagged sample is refined with guidance scale ``1 − strength``
(``v = v_u + (1 − strength)(v_c − v_u)``; strength 1 is the unconditional model): the
condition-specific refinement is what snaps onto the few training samples of a rare condition
(classifier-free guidance inside the attraction basin causes the copy; Jain et al., arXiv
2411.16738), while the unconditional model, fitted to all the data, refines details without
snapping. The layout the navigation stage chose is kept; no image is damaged.

**Scarce conditions skip CFG in navigation.** A condition with fewer than ``scarce`` reference
samples (the samples of the sample's class in a labelled reference set: the effective count of
the class-conditional oracle posterior at σ = 1) cannot be generalised by the model, and
classifier-free guidance in the navigation stage is what drives such a sample into the basin of
one of them and exaggerates its layout (Jain et al., arXiv 2411.16738). While σ >
``navigation_sigma`` (Jain et al.'s static transition, t = 500 of 1000), samples of a scarce
condition use the conditional prediction alone (guidance scale 1): Jain et al.'s delayed
guidance, per sample. Samples of other conditions, and every sample of an unlabelled call or
reference set (text prompts: use ``GuidanceSchedule.delayed`` there), are untouched.

**Slide along the ridge** (the guarantee, and the only tool where a step has no unconditional
pass). Where a flagged sample's estimate is still within ratio ``SLIDE_RATIO`` of one sample,
x̂₀ moves along the ridge between training samples (He, Qiu, Tao, arXiv 2602.06021,
``SCIENCE.md`` §4):

    y   = x_σ / (1 − σ)                    the current point in data units (noise σ/(1 − σ))
    N   = the K nearest reference samples of y (of the sample's class when labelled)
    a   = argmin_{a ∈ Δ_c} ‖Σ_k a_k x⁽ᵏ⁾ − y‖²,   Δ_c = {a ≥ 0, Σ a = 1, a_k ≤ c},  c = 1/(1 + 0.45)
    p   = Σ_k a_k x⁽ᵏ⁾                      the point of the capped hull nearest to y
    x̂₀ ← x̂₀ + Π (p − x̂₀)                 Π: projector onto span{x⁽ᵏ⁾ − x̄} (tangent directions)
    v  ← (x_σ − x̂₀) / σ

Inside the hull the projection keeps y's tangential coordinate (set by the navigation stage),
so samples stay diverse; the cap keeps any single training sample from holding more than c of
the weight (for two neighbours at the cap, d(p, x⁽¹⁾)/d(p, x⁽²⁾) = (1 − c)/c = 0.45; where
several neighbours share the rest and the ratio among them is still below 0.45, lower caps are
tried, down to 1/K). Only the
tangential part of x̂₀ is replaced: the part normal to the neighbours' span stays the model's
and adds the same ‖n‖² to every squared neighbour distance, so it only moves the ratio towards 1.

Unflagged samples keep their prediction bit for bit. Per-run state (the flags) lives in the
:class:`AttractorRun` that :meth:`AttractorRepulsion.bind` gives the sampling loop for one run.

Cost per step: two exact k-NN queries (:func:`nearest`), a third for flagged samples, and a
K-variable projected-gradient solve (``HULL_ITERATIONS`` accelerated steps, exact
capped-simplex projection) for the samples that slide; no extra model evaluations.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from steersample.steering.hull import class_neighbour_count, nearest, project_to_capped_hull_caps, span_basis
from steersample.sampling.protocol import SteeringOutput

if TYPE_CHECKING:  # pragma: no cover
    from steersample.sampling.protocol import StepState

__all__ = ["AttractorRepulsion", "AttractorRun", "Flags", "REFINEMENT_TOP1", "SLIDE_RATIO"]

REFINEMENT_TOP1 = 0.5
"""Posterior top-1 weight above which a sample counts as being in the refinement stage."""

SLIDE_RATIO = 0.45
"""The ridge slide acts on flagged samples whose estimate has d(NN₁)/d(NN₂) below this, and
caps each hull weight at 1/(1 + SLIDE_RATIO) (ratio 0.45 between two samples): just clear of
the copy threshold 1/3, so the slide moves samples as little as it can."""
def _check_strength(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(
            f"{name} must be a finite number >= 0, got {value!r}; 0 switches the steerer off, "
            f"larger values steer harder (e.g. {name}=1.0)"
        )
    return value


class AttractorRepulsion:
    """Keep samples out of memorised training samples: per sample, in refinement only.

    A sample is *flagged* once its x̂₀ has been falling into an attractor (module docstring) at
    two consecutive steps; a flagged sample stays flagged for the rest of the run (the flags
    live in the per-run object that :meth:`bind` gives the sampling loop; a direct call without
    a run decides from the current step alone).
    Flagged samples are then

    1. refined with the guidance scale ``1 − strength`` instead of the run's
       (``v = v_u + (1 − strength)(v_c − v_u)``: strength 1 is the unconditional model,
       above 1 opposite guidance), where the step has an unconditional pass; and
    2. slid along the ridge (capped-hull projection, ``c = 1/(1 + SLIDE_RATIO)``) wherever
       their estimate is still within d(NN₁)/d(NN₂) < ``SLIDE_RATIO`` (0.45) of one training
       sample (the only tool at steps without an unconditional pass, e.g. guidance scale 1).

    Unflagged samples keep their prediction bit for bit. Reference-aware: the pipeline call
    needs ``reference=ReferenceSet(...)`` in the pipeline's latent layout.

    Args:
        strength: ≥ 0; 0 switches the steerer off; flagged samples are refined at guidance
            scale 1 − strength: 1 is the unconditional model, values in (0, 1) keep part of
            the condition (better class fidelity, more copies left to the slide), values above
            1 are opposite guidance (Jain et al.'s −2 is strength 3). Default 0.5, the best
            setting of ``steersample audit`` on the embedded default (copy rate 0.956 -> 0,
            class accuracy kept at 1.000, where strength 1 gives 0.964).
        trigger: flag a sample when its x̂₀ has d(NN₁)/d(NN₂) below this, in (0, 1]
            (default 0.8: early in the fall, before the copy is fixed; real unseen digits sit
            around 0.9, copies near 0).
        neighbours: K, the nearest reference samples of y = x_σ/(1 − σ) used for the
            posterior test and as hull vertices.
        scarce: an int ≥ 0; samples whose class has fewer reference samples than this skip
            CFG (use guidance scale 1) while σ > ``navigation_sigma`` (default 32; 0 turns
            this off). Needs class labels on the call and the reference set.
        navigation_sigma: in (0, 1); where the navigation stage ends for scarce conditions
            (default 0.5, Jain et al.'s static transition).

    Telemetry (per sample, every step): ``scarce`` (1 where the sample's condition is scarce
    and CFG was skipped at this step), ``active`` (1 where flagged), ``slid`` (1 where the
    ridge slide acted), ``ratio`` (x̂₀'s d(NN₁)/d(NN₂) before steering) and ``top1``
    (posterior top-1 weight over the neighbours), both NaN for samples flagged earlier in the
    run (they are not tested again).

    Sources: classifier-free guidance inside the attraction basin causes the copy (Jain et al.,
    arXiv 2411.16738; here switched off per sample, and only once the sample is in the basin);
    reference repellency (SPELL, arXiv 2410.06025; AMG, CVPR 2024) made manifold-preserving
    with the ridge picture of arXiv 2602.06021; the refinement test is the oracle posterior of
    arXiv 2512.02826.
    """

    name: ClassVar[str] = "attractor"
    needs_reference: ClassVar[bool] = True

    def __init__(self, strength: float = 0.5, trigger: float = 0.8, neighbours: int = 4,
                 scarce: int = 32, navigation_sigma: float = 0.5) -> None:
        self.strength = _check_strength(strength, "strength")
        if isinstance(trigger, bool) or not isinstance(trigger, numbers.Real) or not (
            math.isfinite(float(trigger)) and 0.0 < float(trigger) <= 1.0
        ):
            raise ValueError(
                f"trigger must be a number in (0, 1] (a nearest-neighbour ratio), got {trigger!r}; "
                f"e.g. trigger=0.8"
            )
        self.trigger = float(trigger)
        if isinstance(neighbours, bool) or not isinstance(neighbours, numbers.Integral) or neighbours < 2:
            raise ValueError(f"neighbours must be an int >= 2, got {neighbours!r}; e.g. neighbours=4")
        self.neighbours = int(neighbours)
        if isinstance(scarce, bool) or not isinstance(scarce, numbers.Integral) or scarce < 0:
            raise ValueError(
                f"scarce must be an int >= 0 (a count of reference samples per class), got "
                f"{scarce!r}; e.g. scarce=32, or 0 to never skip CFG in navigation"
            )
        self.scarce = int(scarce)
        if isinstance(navigation_sigma, bool) or not isinstance(navigation_sigma, numbers.Real) or not (
            math.isfinite(float(navigation_sigma)) and 0.0 < float(navigation_sigma) < 1.0
        ):
            raise ValueError(
                f"navigation_sigma must be a noise level in (0, 1), got {navigation_sigma!r}; "
                f"e.g. navigation_sigma=0.5"
            )
        self.navigation_sigma = float(navigation_sigma)

    def __repr__(self) -> str:
        return (f"AttractorRepulsion(strength={self.strength:g}, trigger={self.trigger:g}, "
                f"neighbours={self.neighbours}, scarce={self.scarce}, "
                f"navigation_sigma={self.navigation_sigma:g})")

    def bind(self, pipeline: Any) -> "AttractorRun":
        """The per-run steerer (holds which samples are flagged); the sampling loop calls this."""
        return AttractorRun(self)

    def __call__(self, state: "StepState") -> SteeringOutput:
        output, _ = self.step(state, None)
        return output

    def scarce_samples(self, reference: Any, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``(B,)`` bool: samples whose class holds fewer than ``scarce`` reference samples
        (all False without labels on the call or on the reference set, or with ``scarce=0``)."""
        ref_labels = getattr(reference, "labels", None)
        if self.scarce == 0 or labels is None or ref_labels is None:
            return torch.zeros(batch, dtype=torch.bool)
        labels = labels.detach().cpu().long().reshape(-1)
        counts = torch.bincount(ref_labels.detach().cpu().long(),
                                minlength=int(labels.max()) + 1 if labels.numel() else 1)
        known = (labels >= 0) & (labels < counts.numel())
        out = torch.zeros(batch, dtype=torch.bool)
        out[known] = counts[labels[known]] < self.scarce
        return out

    def step(self, state: "StepState", memory: "Flags | None"
             ) -> tuple[SteeringOutput, "Flags | None"]:
        """One step: ``(output, memory)``. ``memory`` holds the flags of a run (None: decide
        from this step alone, flagging every sample that meets the tests now)."""
        flagged = None if memory is None else memory.flagged
        reference = state.reference
        if reference is None:
            raise ValueError(
                "AttractorRepulsion needs a reference set: pass "
                "reference=steersample.ReferenceSet(latents, labels) to the pipeline call"
            )
        batch = state.latents.shape[0]
        sigma = float(state.sigma)
        zeros = torch.zeros(batch, dtype=torch.float64)
        # scarce conditions: no CFG while σ > navigation_sigma (per-sample delayed guidance)
        delayed = torch.zeros(batch, dtype=torch.bool)
        if self.strength > 0.0 and sigma > self.navigation_sigma:
            delayed = self.scarce_samples(reference, state.labels, batch)
            if bool(delayed.any()):
                pred = state.pred.clone()
                dev_rows = delayed.nonzero().flatten().to(pred.device)
                pred[dev_rows] = state.pred_cond[dev_rows]
                state = dataclasses.replace(state, pred=pred)
        idle = {"scarce": delayed.double(), "active": zeros if flagged is None else flagged.double(),
                "slid": zeros, "ratio": zeros + math.nan, "top1": zeros + math.nan}
        k, search_labels = class_neighbour_count(reference, state.labels, self.neighbours)
        if self.strength == 0.0 or sigma >= 1.0 - 1e-6 or sigma <= 0.0 or k < 2:
            return SteeringOutput(state.pred, idle), memory
        layout = state.layout
        x = layout.unpack(state.latents).detach().to("cpu", torch.float64)
        x0_hat = layout.unpack(state.latents - sigma * state.pred).detach().to("cpu", torch.float64)
        y = x / (1.0 - sigma)
        noise = sigma / (1.0 - sigma)

        def labels_of(rows: torch.Tensor) -> torch.Tensor | None:
            return None if search_labels is None else search_labels[rows]

        # the tests run on the samples not flagged yet (all of them without a run)
        ratio, top1 = zeros + math.nan, zeros + math.nan
        test = torch.arange(batch) if flagged is None else (~flagged).nonzero().flatten()
        # the K nearest reference samples of y for every sample: the posterior test of the
        # samples not flagged yet and the hull vertices of those that slide (one search)
        # and, in the same search, the 2 nearest of x̂₀ for the attractor test
        both = torch.cat([y, x0_hat[test]])
        both_labels = None if search_labels is None else torch.cat([search_labels, search_labels[test]])
        dist_all, idx_all = nearest(reference, both, k, both_labels)
        y_dist, y_idx = dist_all[:batch], idx_all[:batch]
        if test.numel():
            # attractor test: x̂₀ sits next to one sample, d(NN₁)/d(NN₂) small
            ratio[test] = _ratio(dist_all[batch:, :2])
            # refinement test: oracle posterior of (x_σ, σ) over the K nearest samples of y,
            # γ_k ∝ exp(−‖y − x⁽ᵏ⁾‖² / (2 (σ/(1 − σ))²))
            dist = y_dist[test]
            top1[test] = torch.softmax(-dist.square() / (2.0 * noise * noise), dim=1)[:, 0]
        falling = (top1 >= REFINEMENT_TOP1) & (ratio < self.trigger)       # NaN compares False
        if memory is None:
            active = falling
        else:   # in a run: flag after two consecutive steps, then keep the flag
            active = memory.flagged | (falling & memory.falling)
        memory = Flags(flagged=active, falling=falling)
        telemetry = {"scarce": delayed.double(), "active": active.to(torch.float64), "slid": zeros,
                     "ratio": ratio, "top1": top1}
        if not bool(active.any()):
            return SteeringOutput(state.pred, telemetry), memory

        # 1. flagged samples: guidance scale 1 − strength (the unconditional model at 1); not
        # while a scarce sample's navigation runs without CFG (as with a delayed schedule)
        pred = state.pred.clone()
        rows = active.nonzero().flatten()
        switch = rows[~delayed[rows]]
        dev_rows = switch.to(pred.device)
        if state.pred_uncond is not None and switch.numel():
            v_u, v_c = state.pred_uncond[dev_rows], state.pred_cond[dev_rows]
            pred[dev_rows] = v_u + (1.0 - self.strength) * (v_c - v_u)
            x0_hat = layout.unpack(state.latents - sigma * pred).detach().to("cpu", torch.float64)
        # 2. ridge slide where the estimate is still next to one sample
        near = torch.zeros(batch, dtype=torch.bool)
        near[rows] = _ratio(nearest(reference, x0_hat[rows], 2, labels_of(rows))[0]) < SLIDE_RATIO
        telemetry["slid"] = near.to(torch.float64)
        if bool(near.any()):
            rows = near.nonzero().flatten()
            idx = y_idx[rows]
            verts = reference.rows(idx.flatten()).to("cpu", torch.float64)
            verts = verts.reshape(rows.numel(), k, -1)
            hull_point = _capped_hull_point(y[rows].flatten(1), verts)
            # slide: replace only the tangential part of x̂₀ (within the neighbours' affine
            # span); the normal part stays the model's. With n the normal part, every neighbour
            # is at sqrt(d_k² + ‖n‖²), so d(NN₁)/d(NN₂) among them only moves towards 1.
            x0_rows = x0_hat[rows].flatten(1)
            basis = span_basis(verts)                                             # (b, D, r)
            slide = (basis @ (basis.transpose(1, 2) @ (hull_point - x0_rows)[..., None]))[..., 0]
            # v = (x_σ − x̂₀)/σ: moving x̂₀ by δ changes v by −δ/σ
            delta = torch.zeros_like(x0_hat)
            delta[rows] = (-slide / sigma).reshape(x0_hat[rows].shape)
            delta = layout.pack(delta.to(device=pred.device, dtype=pred.dtype))
            dev_rows = rows.to(pred.device)
            pred[dev_rows] = pred[dev_rows] + delta[dev_rows]
        return SteeringOutput(pred, telemetry), memory


@dataclass(frozen=True)
class Flags:
    """A run's memory: ``flagged`` (steered from now on) and ``falling`` (met the tests at the
    previous step), each ``(B,)`` bool."""

    flagged: torch.Tensor
    falling: torch.Tensor


class AttractorRun:
    """One sampling run of an :class:`AttractorRepulsion`: remembers the flagged samples."""

    needs_reference: ClassVar[bool] = True

    def __init__(self, steerer: AttractorRepulsion) -> None:
        self.name = steerer.name
        self.steerer = steerer
        self.memory: Flags | None = None

    def __enter__(self) -> "AttractorRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.memory = None

    def __call__(self, state: "StepState") -> SteeringOutput:
        if self.memory is None or self.memory.flagged.shape[0] != state.latents.shape[0]:
            none = torch.zeros(state.latents.shape[0], dtype=torch.bool)
            self.memory = Flags(flagged=none, falling=none)
        output, self.memory = self.steerer.step(state, self.memory)
        return output


def _capped_hull_point(y: torch.Tensor, verts: torch.Tensor) -> torch.Tensor:
    """Capped-hull point ``(b, D)`` for the slide: the first cap of 1/(1 + SLIDE_RATIO), 0.6,
    0.5, 0.4, 1/K whose point is not nearer than SLIDE_RATIO to one vertex (with a high cap,
    several vertices can share the rest of the weight); 1/K (the centroid) always qualifies.
    All caps are solved in one batched call that shares each point's Gram matrix and step size,
    which costs about what one cap did; the centroid needs no solve."""
    b, k = verts.shape[0], verts.shape[1]
    caps = sorted({max(c, 1.0 / k) for c in (1.0 / (1.0 + SLIDE_RATIO), 0.6, 0.5, 0.4)}, reverse=True)
    caps = [c for c in caps if c > 1.0 / k + 1e-12]          # the 1/K cap is the centroid, no solve
    centroid = verts.mean(1)
    if not caps:
        return centroid
    weights = project_to_capped_hull_caps(y, verts, caps)                        # (n, b, K)
    point = torch.einsum("nbk,bkd->nbd", weights, verts)                          # (n, b, D)
    dist = torch.sort((verts[None] - point[:, :, None, :]).norm(dim=3), dim=2).values
    ok = _ratio(dist[..., :2].reshape(-1, 2)).reshape(len(caps), b) >= SLIDE_RATIO
    point = torch.cat([point, centroid[None]])                                  # 1/K always works
    ok = torch.cat([ok, torch.ones(1, b, dtype=torch.bool)])
    first = ok.to(torch.int8).argmax(0)                                          # first cap that works
    return point[first, torch.arange(b)]


def _ratio(dist: torch.Tensor) -> torch.Tensor:
    """d(NN₁)/d(NN₂) from ``(B, 2)`` distances (0 for an exact duplicate pair)."""
    return torch.where(dist[:, 1] > 0, dist[:, 0] / dist[:, 1].clamp_min(1e-300),
                       torch.zeros_like(dist[:, 0]))
