"""Sampling: the one denoising loop and everything it is handed.

``loop`` (``sample``, ``StepState``), the steerer protocol (``protocol``: ``SteeringOutput``,
``Steerer``, ``NoSteering``), pure σ-grid functions (``schedules``), the diffusers scheduler
(``scheduler``), guidance schedules (``guidance``) and the diffusers guider (``guider``),
per-step telemetry (``telemetry``). Built on ``reference`` and ``oracle``.
"""

from __future__ import annotations

from steersample._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "GuidanceSchedule": "steersample.sampling.guidance",
    "SIGMA_ATOL": "steersample.sampling.guidance",
    "ScheduledClassifierFreeGuidance": "steersample.sampling.guider",
    "ModelFn": "steersample.sampling.loop",
    "SampleResult": "steersample.sampling.loop",
    "sample": "steersample.sampling.loop",
    "Conditioning": "steersample.sampling.protocol",
    "LatentLayout": "steersample.sampling.protocol",
    "StepState": "steersample.sampling.protocol",
    "SteeringOutput": "steersample.sampling.protocol",
    "Steerer": "steersample.sampling.protocol",
    "NoSteering": "steersample.sampling.protocol",
    "PhaseAwareFlowMatchScheduler": "steersample.sampling.scheduler",
    "DEFAULT_NAVIGATION_FRACTION": "steersample.sampling.scheduler",
    "static_shift": "steersample.sampling.schedules",
    "dynamic_shift": "steersample.sampling.schedules",
    "calculate_mu": "steersample.sampling.schedules",
    "image_seq_len": "steersample.sampling.schedules",
    "stock_sigmas": "steersample.sampling.schedules",
    "flux_sigmas": "steersample.sampling.schedules",
    "phase_aware_sigmas": "steersample.sampling.schedules",
    "navigation_steps": "steersample.sampling.schedules",
    "count_above": "steersample.sampling.schedules",
    "uniform_sigmas": "steersample.sampling.schedules",
    "profile_cdf": "steersample.sampling.schedules",
    "profile_density": "steersample.sampling.schedules",
    "profile_sigmas": "steersample.sampling.schedules",
    "DEFAULT_PROFILE_MIXING": "steersample.sampling.schedules",
    "acceleration_cdf": "steersample.sampling.schedules",
    "acceleration_density": "steersample.sampling.schedules",
    "acceleration_mixing": "steersample.sampling.schedules",
    "acceleration_sigmas": "steersample.sampling.schedules",
    "DEFAULT_ACCELERATION_MIXING": "steersample.sampling.schedules",
    "ACCELERATION_POWER": "steersample.sampling.schedules",
    "StepTelemetry": "steersample.sampling.telemetry",
    "SampleTelemetry": "steersample.sampling.telemetry",
    "Telemetry": "steersample.sampling.telemetry",
    "TelemetryRecorder": "steersample.sampling.telemetry",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
