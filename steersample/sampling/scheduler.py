"""``PhaseAwareFlowMatchScheduler``: diffusers' flow-matching Euler scheduler, plus a phase-aware grid.

With ``phase_boundary`` unset it *is* ``FlowMatchEulerDiscreteScheduler``: every stock option
(static and dynamic shift, ``shift_terminal``, custom ``sigmas``/``timesteps``, Karras/exponential/
beta spacing, stochastic sampling) runs diffusers' own code, so sigmas, timesteps and ``step``
outputs are identical. With ``phase_boundary = σ*`` (a number or a ``PhaseProfile``) the grid
from :func:`steersample.sampling.schedules.phase_aware_sigmas` replaces the stock spacing::

    sched = PhaseAwareFlowMatchScheduler.from_config(pipe.scheduler.config,
                                                     phase_boundary=profile, navigation_fraction=0.6)
    pipe.scheduler = sched            # works in stock StableDiffusion3Pipeline and FluxPipeline

What the phase-aware grid keeps from the stock one: the step count and both endpoints. diffusers
first computes the stock grid for the same call (so ``mu``, ``shift``, ``shift_terminal`` and the
``sigmas`` a pipeline passes decide ``σ_max`` = its first and ``σ_min`` = its last evaluated σ);
the steps in between are then redistributed so that exactly
``round(navigation_fraction · N)`` of the N evaluated σ lie above σ*. In phase mode the
``sigmas`` argument thus fixes only N and the endpoints (FluxPipeline always passes
``linspace(1, 1/N, N)``), and explicit ``timesteps`` are refused.

``from_profile(config, profile)`` is the grid that earned its place in
``benchmarks/quality_per_nfe.py`` (issue #16):
:func:`~steersample.sampling.schedules.acceleration_sigmas`, equal-mass quantiles of the step
density ``ρ ∝ (1 − λ) + λ·√a(σ)``, where ``a(σ) = ‖dx̂₀*/dσ‖/σ`` is how hard the reference
oracle's ODE trajectories bend (``PhaseProfile.acceleration``): the density that minimises
Euler's global error bound, mixed with uniform, ending at 0 with every step spent::

    profile = ss.PhaseProfile.estimate(ref)              # ref: the training set or a latent store
    pipe.scheduler = ss.PhaseAwareFlowMatchScheduler.from_profile(pipe.scheduler.config, profile)

``from_profile(config, profile, density="top1")`` is the earlier grid
(:func:`~steersample.sampling.schedules.profile_sigmas`: the rate of change of the profile's
top-1 curve, λ = 0.2), kept for comparison and for profiles without an acceleration curve.

The profile curve is stored in the config (plain float lists), so ``save_config`` /
``from_pretrained`` round-trip it. The profile grid replaces the stock spacing entirely
(``shift``, ``mu`` and the values of a pipeline's ``sigmas`` are not applied; ``sigmas`` only sets
N): the profile, estimated in the model's own latent space, already places the steps where its
posterior changes (towards noise for large latents, as a shift would).
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config

from steersample.sampling.schedules import (
    DEFAULT_ACCELERATION_MIXING,
    DEFAULT_PROFILE_MIXING,
    acceleration_cdf,
    acceleration_sigmas,
    phase_aware_sigmas,
    profile_cdf,
    profile_sigmas,
)

__all__ = ["PhaseAwareFlowMatchScheduler", "DEFAULT_NAVIGATION_FRACTION"]

DEFAULT_NAVIGATION_FRACTION = 0.5


def _boundary_value(phase_boundary: Any) -> float | None:
    """``phase_boundary`` as a float σ* (reads ``.boundary_sigma`` from a PhaseProfile)."""
    if phase_boundary is None:
        return None
    value = getattr(phase_boundary, "boundary_sigma", phase_boundary)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"phase_boundary must be a noise level in (0, 1) or a PhaseProfile, got {phase_boundary!r}."
        )
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(
            f"phase_boundary must lie strictly between 0 (data) and 1 (noise), got {value!r}; pass "
            "PhaseProfile.boundary_sigma, or None for the stock grid."
        )
    return value


def _profile_lists(
    sigmas: Any, top1: Any, mixing: Any, acceleration: Any = None
) -> tuple[list[float], list[float], float, list[float] | None] | None:
    """The profile options as JSON-ready lists and λ, validated (None when no profile is set)."""
    if sigmas is None and top1 is None:
        if acceleration is not None:
            raise ValueError(
                "profile_acceleration needs profile_sigmas and profile_top1; use from_profile(config, profile)."
            )
        if mixing is not None:
            raise ValueError(
                f"profile_mixing={mixing!r} needs a profile; use from_profile(config, profile, mixing=...)."
            )
        return None
    if sigmas is None or top1 is None:
        raise ValueError("set both profile_sigmas and profile_top1 (or use from_profile(config, profile)).")
    knots_sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    knots_top1 = torch.as_tensor(top1, dtype=torch.float64).flatten()
    if acceleration is None:
        mixing = DEFAULT_PROFILE_MIXING if mixing is None else mixing
        profile_cdf(knots_sigmas, knots_top1, mixing)  # raises, naming the fix, on a bad profile or λ
        return knots_sigmas.tolist(), knots_top1.tolist(), float(mixing), None
    knots_acc = torch.as_tensor(acceleration, dtype=torch.float64).flatten()
    # raises, naming the fix; None stays None: the share then follows the step count
    acceleration_cdf(knots_sigmas, knots_acc, DEFAULT_ACCELERATION_MIXING if mixing is None else mixing)
    if knots_top1.numel() != knots_sigmas.numel():
        raise ValueError("profile_top1 and profile_sigmas must have the same length (one PhaseProfile's curves).")
    return (knots_sigmas.tolist(), knots_top1.tolist(), None if mixing is None else float(mixing),
            knots_acc.tolist())


class PhaseAwareFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler scheduler whose grid can put a chosen share of steps above σ*.

    Args:
        (all ``FlowMatchEulerDiscreteScheduler`` arguments, same defaults and meaning)
        phase_boundary: σ* in (0, 1), or a ``PhaseProfile`` (its ``boundary_sigma`` is stored in
            the config as a float). None (default) = stock behaviour, bit for bit.
        navigation_fraction: share of the evaluated steps placed above σ*, in (0, 1); None means
            0.5 when ``phase_boundary`` is set. Only valid together with ``phase_boundary``.
        profile_sigmas, profile_top1: a phase profile's curve (float lists, any σ order) for the
            profile grid; set both (normally through :meth:`from_profile`) or neither.
        profile_acceleration: the profile's acceleration curve on ``profile_sigmas``; when set the
            grid is :func:`~steersample.sampling.schedules.acceleration_sigmas` (the
            :meth:`from_profile` default), otherwise
            :func:`~steersample.sampling.schedules.profile_sigmas` of the top-1 curve.
        profile_mixing: λ of the profile grid, in [0, 1); None means ``acceleration_mixing(N)``
            = ``DEFAULT_ACCELERATION_MIXING − 1/N`` at ``N`` steps (with an acceleration curve;
            kept as None in the config) or ``DEFAULT_PROFILE_MIXING`` (top-1 curve) when a
            profile is set.

    The Euler update is the stock one, ``x_next = x + (σ_next − σ)·v`` (or the stochastic
    re-noising variant); only the grid changes. See :func:`~steersample.sampling.schedules.phase_aware_sigmas`
    for the grid's formula and how the share is counted.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        phase_boundary: float | None = None,
        navigation_fraction: float | None = None,
        profile_sigmas: list[float] | None = None,
        profile_top1: list[float] | None = None,
        profile_mixing: float | None = None,
        profile_acceleration: list[float] | None = None,
    ):
        # the stock constructor body, without registering its arguments a second time
        FlowMatchEulerDiscreteScheduler.__init__.__wrapped__(
            self,
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
            stochastic_sampling=stochastic_sampling,
        )
        boundary = _boundary_value(phase_boundary)
        if navigation_fraction is not None:
            if boundary is None:
                raise ValueError(
                    f"navigation_fraction={navigation_fraction!r} needs a phase_boundary (the sigma it "
                    "splits the steps at); pass phase_boundary=..., or navigation_fraction=None for the stock grid."
                )
            if isinstance(navigation_fraction, bool) or not isinstance(navigation_fraction, (int, float)):
                raise TypeError(f"navigation_fraction must be a number in (0, 1), got {navigation_fraction!r}.")
            if not (math.isfinite(navigation_fraction) and 0.0 < navigation_fraction < 1.0):
                raise ValueError(
                    f"navigation_fraction must lie strictly between 0 and 1, got {navigation_fraction!r}; "
                    "it is the share of steps above the phase boundary, e.g. 0.5."
                )
            navigation_fraction = float(navigation_fraction)
        profile = _profile_lists(profile_sigmas, profile_top1, profile_mixing, profile_acceleration)
        if profile is not None and boundary is not None:
            raise ValueError(
                "phase_boundary and a profile grid are two different grids; use from_profile(config, profile) "
                "alone, or phase_boundary=... without profile_sigmas/profile_top1."
            )
        if boundary is not None or profile is not None:
            clashes = [
                name
                for name in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
                if getattr(self.config, name)
            ]
            if clashes:
                raise ValueError(
                    f"a phase-aware grid replaces the grid spacing, so it cannot be combined with {clashes}; "
                    "set those to False, or use the stock grid (no phase_boundary or profile)."
                )
        # store plain floats (a PhaseProfile is not JSON) so save/load round-trips
        self.register_to_config(phase_boundary=boundary, navigation_fraction=navigation_fraction)
        if profile is not None:
            self.register_to_config(profile_sigmas=profile[0], profile_top1=profile[1], profile_mixing=profile[2],
                                    profile_acceleration=profile[3])

    @classmethod
    def from_profile(cls, config=None, profile=None, *, density: Literal["acceleration", "top1"] = "acceleration",
                     mixing: float | None = None, **kwargs):
        """The phase-derived grid with the best quality per model evaluation (issue #16).

        ``density="acceleration"`` (default): ``σ_i = F⁻¹(1 − i/N)`` with step density
        ``ρ(σ) = (1 − λ) + λ·√a(σ)/∫√a``, ``a(σ) = ‖dx̂₀*/dσ‖/σ`` the reference oracle's trajectory
        acceleration (``profile.acceleration``), ``λ_N = 0.65 − 1/N`` at ``N`` steps (see
        :func:`~steersample.sampling.schedules.acceleration_sigmas` and
        :func:`~steersample.sampling.schedules.acceleration_mixing`). Euler's global error is
        ``≈ (1/2N)·∫ a/ρ``, smallest for ``ρ ∝ √a``; the uniform share keeps steps where the oracle
        has memorised but a model still refines, and one step's worth more at few steps, which
        are wider than the peak of ``a``. σ_0 = 1, the grid ends at the terminal 0 and the
        last evaluated σ is at least 1/N.

        ``density="top1"``: the earlier grid, ``F(σ) = (1 − λ)·σ + λ·V(σ)/V(1)`` with ``V`` the
        total variation of the profile's mean top-1 weight from σ = 0, λ = 0.2 (see
        :func:`~steersample.sampling.schedules.profile_sigmas`).

        Args:
            config: a scheduler config (``pipe.scheduler.config``); its stock options other than the
                spacing (``num_train_timesteps``, ``stochastic_sampling``, ...) are kept.
            profile: a ``PhaseProfile`` (``PhaseProfile.estimate(ref)``; for SD3/Flux estimate it on a
                reference store of VAE latents), or anything with ``.sigmas`` and ``.top1`` (and
                ``.acceleration`` for the default density).
            density: ``"acceleration"`` or ``"top1"``, the curve the steps follow.
            mixing: λ in [0, 1), the share of the step density that follows the curve at every
                step count; None means :func:`~steersample.sampling.schedules.acceleration_mixing`
                (``DEFAULT_ACCELERATION_MIXING − 1/N``) or
                :data:`~steersample.sampling.schedules.DEFAULT_PROFILE_MIXING`, both fitted once
                on the digits default and not meant to be tuned per model.
            kwargs: other config overrides, as in ``from_config``.
        """
        if profile is None or not (hasattr(profile, "sigmas") and hasattr(profile, "top1")):
            raise TypeError(
                f"from_profile needs a PhaseProfile (with .sigmas and .top1), got {profile!r}; "
                "pass ss.PhaseProfile.estimate(reference)."
            )
        if density not in ("acceleration", "top1"):
            raise ValueError(f"density must be 'acceleration' or 'top1', got {density!r}.")
        sigmas = torch.as_tensor(profile.sigmas, dtype=torch.float64).flatten().tolist()
        top1 = torch.as_tensor(profile.top1, dtype=torch.float64).flatten().tolist()
        acceleration = None
        if density == "acceleration":
            acceleration = getattr(profile, "acceleration", None)
            if acceleration is None:
                raise ValueError(
                    "this profile has no acceleration curve (estimated with acceleration=False, or built "
                    "without one); re-estimate it with ss.PhaseProfile.estimate(reference), or pass "
                    "density='top1' for the top-1 grid."
                )
            acceleration = torch.as_tensor(acceleration, dtype=torch.float64).flatten().tolist()
        for key in ("phase_boundary", "navigation_fraction", "profile_sigmas", "profile_top1", "profile_mixing",
                    "profile_acceleration"):
            if key in kwargs:
                raise TypeError(f"from_profile sets the grid itself; drop {key}=... (use from_config for other grids).")
        return cls.from_config(
            config, profile_sigmas=sigmas, profile_top1=top1, profile_mixing=mixing,
            profile_acceleration=acceleration, **kwargs
        )

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """diffusers' ``from_config``, except that a misspelt option raises instead of being dropped.

        Keyword arguments close to a config name (``phase_boundry``) raise ``TypeError``; other
        extra keyword arguments pass through to diffusers as usual.
        """
        known = sorted(set(inspect.signature(cls.__init__).parameters) - {"self"})
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
                if close:
                    raise TypeError(f"unknown scheduler option {key!r}; did you mean {close[0]!r}?")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def phase_aware(self) -> bool:
        """True when ``phase_boundary`` is set (the phase-aware grid is used)."""
        return self.config.phase_boundary is not None

    @property
    def profile_aware(self) -> bool:
        """True when a profile curve is set (the :meth:`from_profile` grid is used)."""
        return self.config.get("profile_sigmas") is not None

    @property
    def effective_navigation_fraction(self) -> float | None:
        """The share of steps above σ* actually used (0.5 when unset), None in stock mode."""
        if not self.phase_aware:
            return None
        fraction = self.config.navigation_fraction
        return DEFAULT_NAVIGATION_FRACTION if fraction is None else fraction

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ):
        """Stock ``set_timesteps``; in phase mode the stock grid's interior is then redistributed.

        Sets ``self.sigmas`` (``(N + 1,)``, float32, terminal 0 appended) and ``self.timesteps``
        (``(N,)`` = ``1000·σ``), exactly as diffusers does.
        """
        if timesteps is not None and (self.phase_aware or self.profile_aware):
            raise ValueError(
                "explicit timesteps conflict with the phase-aware grid; pass num_inference_steps (or "
                "sigmas) instead, or use the stock grid (no phase_boundary or profile)."
            )
        super().set_timesteps(
            num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps
        )
        if not (self.phase_aware or self.profile_aware):
            return
        stock = self.sigmas  # (N + 1,), last entry the terminal 0
        if self.profile_aware and self.config.get("profile_acceleration") is not None:
            grid = acceleration_sigmas(
                len(stock) - 1,
                self.config.profile_sigmas,
                self.config.profile_acceleration,
                self.config.profile_mixing,
                device=stock.device,
            )
        elif self.profile_aware:
            grid = profile_sigmas(
                len(stock) - 1,
                self.config.profile_sigmas,
                self.config.profile_top1,
                self.config.profile_mixing,
                device=stock.device,
            )
        else:
            grid = phase_aware_sigmas(
                len(stock) - 1,
                self.config.phase_boundary,
                self.effective_navigation_fraction,
                sigma_max=stock[0].item(),
                sigma_min=stock[-2].item(),
                device=stock.device,
            )
        self.timesteps = grid * self.config.num_train_timesteps
        self.sigmas = torch.cat([grid, torch.zeros(1, device=grid.device)])
        self._step_index = None
        self._begin_index = None
