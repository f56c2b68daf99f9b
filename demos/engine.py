"""The studio's models and its one operation: sample plain and steered on the same seeds.

No gradio here. :class:`StudioModel` wraps a loaded pipeline, its reference set (the training
set the copy test and the oracle read) and a cache of phase profiles; :func:`run_comparison`
runs the two arms of a :class:`~steersample.studio.settings.StudioRequest`.

Concurrency: a request never writes to anything shared. Each arm runs on its own shallow
pipeline object (the same transformer/VAE modules, a fresh scheduler built from the model's
config), so the pipeline's per-call attributes and the scheduler's step index stay per request;
the loop keeps all other run state in locals. Phase profiles are computed once per class under
a lock and are read-only afterwards.

Determinism: sample k of a request starts from ``torch.Generator().manual_seed(seed + k)`` on
both arms, so a seed gives the same images whatever the sample count or the other requests.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steersample.studio.settings import RunPlan, StudioRequest, plan_runs

__all__ = ["StudioModel", "ArmResult", "Comparison", "load_model_folder", "load_prompt_model",
           "run_comparison"]


@dataclass(frozen=True)
class StudioModel:
    """A served model.

    Attributes:
        name: the name the UI lists (never a filesystem path).
        pipe: a steered pipeline (``SteeredFlowPipeline`` for ``kind="class"``, a steered SD3 or
            Flux pipeline for ``kind="prompt"``).
        reference: its training set as a ``ReferenceSet`` in the pipeline's latent layout, or
            None (then there are no nearest images, copy badges or phase profile).
        kind: ``"class"`` (class-conditional) or ``"prompt"`` (text-to-image).
        class_names: the label shown for each class id (class models).
        description: one line shown under the model menu.
        default_class: the class selected when the model is picked (default 0).
        digits: samples are 8×8 digits in [-1, 1], so ``steersample.evaluation.judge`` (a classifier
            fitted on real digits) can say which digit each sample reads as.
        heldout: ``(images, labels)`` of real data the model never saw, in the reference's
            latent layout (labels may be None), or None: each sample's distance to the training
            set is then reported relative to held-out data's (``metrics.relative_distance``).
        call: keyword arguments every pipeline call gets (prompt models: ``max_sequence_length``,
            height, width from the folder's ``metadata.json``).
        prompts: the prompts offered in the prompt chooser (prompt models; free text works too).
        prompt_labels: prompt -> label of its rows in the reference/held-out stores, so a known
            prompt is judged against its own held-out images and phase profile.
    """

    name: str
    pipe: Any
    reference: Any = None
    kind: str = "class"
    class_names: tuple[str, ...] = ()
    description: str = ""
    default_class: int | None = None
    digits: bool = False
    heldout: Any = None
    call: dict = field(default_factory=dict)
    prompts: tuple[str, ...] = ()
    prompt_labels: dict = field(default_factory=dict)
    _profiles: dict = field(default_factory=dict, repr=False, compare=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("class", "prompt"):
            raise ValueError(f"kind must be 'class' or 'prompt', got {self.kind!r}")
        if self.kind == "class" and not self.class_names:
            names = tuple(str(c) for c in range(self.pipe.num_classes))
            object.__setattr__(self, "class_names", names)
        if self.kind == "class" and self.default_class is None:
            object.__setattr__(self, "default_class", 0)
        if self.reference is not None:
            _warm_up(self.reference)

    @property
    def labelled(self) -> bool:
        """A prompt model whose store labels name its prompts (class models: False; their
        classes are the labels)."""
        return bool(self.prompt_labels) and getattr(self.reference, "labels", None) is not None

    @property
    def steerers(self) -> list[str]:
        """The steering methods this model offers (``settings.steerer_names``, less those that
        need class labels for a prompt model whose store labels do not name its prompts)."""
        from steersample.studio.settings import steerers_for

        return steerers_for(self.kind, self.labelled)

    def label(self, request: StudioRequest) -> int | None:
        """The reference label a request samples: its class, or its prompt's id when known."""
        if self.kind == "class":
            return request.class_id
        return self.prompt_labels.get(request.prompt)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shift(self) -> float:
        """The ``shift`` of the model's own scheduler config (what "plain" samples with)."""
        return float(self.pipe.scheduler.config.get("shift", 1.0))

    def profile(self, class_id: int | None):
        """The phase profile (``PhaseProfile``) of ``class_id``'s training images, cached.

        None without a reference set. With a labelled reference the profile is the class's own
        (queries and posterior restricted to the class); otherwise the whole set's.
        """
        if self.reference is None:
            return None
        from steersample.oracle.phases import PhaseProfile

        labelled = self.reference.labels is not None and class_id is not None
        key = int(class_id) if labelled else None
        with self._lock:
            if key not in self._profiles:
                if labelled and key not in set(self.reference.classes.tolist()):
                    self._profiles[key] = None
                else:
                    self._profiles[key] = PhaseProfile.estimate(
                        self.reference, torch.Generator().manual_seed(0), label=key)
            return self._profiles[key]

    def boundary_sigma(self, class_id: int | None) -> float | None:
        profile = self.profile(class_id)
        return None if profile is None else float(profile.boundary_sigma)


def _warm_up(reference) -> None:
    """Fill the reference set's lazy caches now rather than inside concurrent requests."""
    reference.squared_norms()
    reference.nearest(reference.latents[:1], k=min(2, len(reference)))
    if reference.labels is not None:
        for label in reference.classes.tolist():
            first = reference.indices(label)[:1].to(reference.latents.device)
            reference.nearest(reference.latents[first], k=1, labels=int(label))


def load_model_folder(path: str | Path, name: str | None = None) -> StudioModel:
    """Load a model folder given at launch (``--model PATH``).

    Accepted: a folder written by ``scripts/train_default.py`` (model + training set +
    metadata), or any diffusers pipeline folder holding a class-conditional flow transformer
    (SteeredFlowPipeline), Stable Diffusion 3 or Flux, loaded offline and converted to the
    steered pipeline (prompt models have no reference set).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {str(folder)!r} is not a folder; pass a diffusers "
                                "pipeline folder or one written by scripts/train_default.py")
    name = name or folder.name
    if (folder / "metadata.json").is_file() and (folder / "reference.safetensors").is_file():
        from steersample.default import load_default, load_default_info

        from steersample.default import held_out_digits

        pipe, reference = load_default(folder)
        info = load_default_info(folder)
        return StudioModel(name, pipe, reference, "class", _class_names(info),
                           f"{folder.name}: class-conditional flow model and its training set",
                           default_class=min(info.rare_classes, default=0), digits=True,
                           heldout=held_out_digits(info))
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--model {str(folder)!r} has no model_index.json; pass a diffusers "
                         "pipeline folder (pipe.save_pretrained(folder)) or a default-model folder")
    return _load_diffusers_folder(folder, name)


def _load_diffusers_folder(folder: Path, name: str) -> StudioModel:
    from diffusers import DiffusionPipeline

    from steersample.pipelines import (SteeredFluxPipeline, SteeredFlowPipeline,
                                       SteeredStableDiffusion3Pipeline)

    index = json.loads((folder / "model_index.json").read_text())
    class_name = index.get("_class_name", "")
    # components saved as [null, null] (e.g. SD3 without T5) must be passed as None
    absent = {key: None for key, value in index.items()
              if not key.startswith("_") and isinstance(value, list) and value[0] is None}
    if class_name in ("SteeredFlowPipeline", "DiTPipeline"):
        from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

        transformer = DiTTransformer2DModel.from_pretrained(folder / "transformer",
                                                            local_files_only=True)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler",
                                                                    local_files_only=True)
        pipe = SteeredFlowPipeline(transformer=transformer.eval(), scheduler=scheduler)
        kind = "class"
    else:
        stock = DiffusionPipeline.from_pretrained(folder, local_files_only=True, **absent)
        steered = {"StableDiffusion3Pipeline": SteeredStableDiffusion3Pipeline,
                   "SteeredStableDiffusion3Pipeline": SteeredStableDiffusion3Pipeline,
                   "FluxPipeline": SteeredFluxPipeline, "SteeredFluxPipeline": SteeredFluxPipeline}
        if type(stock).__name__ not in steered:
            raise ValueError(f"--model {str(folder)!r} is a {type(stock).__name__}; the studio "
                             "serves class-conditional flow pipelines, Stable Diffusion 3 and Flux")
        pipe = steered[type(stock).__name__].from_pipe(stock)
        kind = "prompt"
    pipe.set_progress_bar_config(disable=True)
    return StudioModel(name, pipe, None, kind, description=f"{folder.name}: {class_name}")


def load_prompt_model(model: str | Path, reference: str | Path | None = None,
                      prompts: str | Path | None = None, heldout: str | Path | None = None,
                      name: str | None = None) -> StudioModel:
    """A text-to-image model (SD3 or Flux folder, or ``"prompt"``: the shipped testbed) served
    with its reference store, its prompts and (optionally) held-out data.

    Every input is checked as ``steersample compare`` checks it
    (``steersample.commands._prompt_runs.load_inputs``) before any model call: a store whose
    latent shape differs from the pipeline's latents, a held-out set of another shape or an
    empty/unreadable prompts file raise ``ValueError``/``FileNotFoundError`` naming the fix.
    """
    from argparse import Namespace

    from steersample.commands._prompt_runs import load_inputs

    inputs = load_inputs(Namespace(model=model, reference=reference, prompts=prompts,
                                   heldout=heldout))
    held = inputs.heldout
    labels = {spec.text: spec.label for spec in inputs.prompts if spec.label is not None}
    heldout_pair = None
    if held is not None:
        heldout_pair = (held.latents, held.labels if labels else None)
    folder = inputs.folder
    name = name or ("prompt testbed" if str(model) == "prompt" else folder.name)
    what = "held-out data: distances relative to it" if held is not None else "no held-out set"
    return StudioModel(name, inputs.pipe, inputs.reference, "prompt",
                       description=f"{folder.name}: {type(inputs.pipe).__name__} with its "
                                   f"training set ({len(inputs.reference)} latents; {what}). "
                                   + ("Its store's labels name the prompts, so novelty steering "
                                      "works on them (not on free text)."
                                      if labels and inputs.reference.labels is not None else
                                      "Novelty steering needs class labels, which this store does "
                                      "not give its prompts; attractor steering works."),
                       heldout=heldout_pair,
                       call={**inputs.call, **({"negative_prompt": ""} if inputs.kind == "flux"
                                               else {})},
                       prompts=tuple(spec.text for spec in inputs.prompts), prompt_labels=labels)


def _class_names(info) -> tuple[str, ...]:
    classes = sorted(set(info.rare_classes) | set(info.frequent_classes))
    return tuple(f"{c} · {'rare' if c in info.rare_classes else 'frequent'}"
                 for c in range(max(classes) + 1))


@dataclass(frozen=True)
class ArmResult:
    """One arm of a comparison.

    Attributes:
        name: ``"plain"`` or ``"steered"``.
        images: ``(B, H, W, C)`` float32 in [0, 1].
        latents: ``(B, *shape)`` final latents (pixels in [-1, 1] for pixel-space models).
        seeds: the seed of each sample.
        telemetry: the run's ``steersample.Telemetry``.
        seconds: wall time of the pipeline call.
        guidance: the arm's ``GuidanceSchedule``.
        nearest_images: ``(B, H, W, C)`` nearest training image of each sample, or None.
        judge_labels: the digit ``steersample.evaluation.judge.classify`` reads in each sample, or None
            (models that are not digits models).
        relative_distances: each sample's nearest-training distance over the median held-out
            sample's (of its class when labelled; 1: as far as unseen real data, near 0: a
            copy), or None without held-out data.
    """

    name: str
    images: np.ndarray
    latents: torch.Tensor
    seeds: tuple[int, ...]
    telemetry: Any
    seconds: float
    guidance: Any
    nearest_images: np.ndarray | None
    judge_labels: tuple[int, ...] | None = None
    relative_distances: tuple[float, ...] | None = None

    @property
    def model_evals(self) -> int:
        return self.telemetry.total_model_evals

    @property
    def ratios(self) -> list[float] | None:
        final = self.telemetry.final
        return None if final is None else [float(r) for r in final.nn_ratio]

    @property
    def copies(self) -> list[bool] | None:
        final = self.telemetry.final
        return None if final is None else [bool(c) for c in final.is_copy]

    @property
    def nearest_indices(self) -> list[int] | None:
        final = self.telemetry.final
        return None if final is None else [int(i) for i in final.nearest_index]


@dataclass(frozen=True)
class Comparison:
    """Result of one request: both arms, the plan that produced them, the class's profile."""

    request: StudioRequest
    plan: RunPlan
    plain: ArmResult
    steered: ArmResult
    profile: Any
    model: StudioModel


def _arm_pipeline(model: StudioModel, scheduler_options: dict[str, Any] | None, profile=None):
    """A shallow per-request pipeline: shared modules, own scheduler and call attributes."""
    components = dict(model.pipe.components)
    if scheduler_options is not None:
        from steersample.sampling.scheduler import PhaseAwareFlowMatchScheduler

        config = model.pipe.scheduler.config
        if scheduler_options.get("from_profile"):
            if profile is None:
                raise ValueError("the profile schedule needs the class's phase profile, which "
                                 f"model {model.name!r} does not have (no training set); use the "
                                 "shift schedule")
            components["scheduler"] = PhaseAwareFlowMatchScheduler.from_profile(config, profile)
        else:
            components["scheduler"] = PhaseAwareFlowMatchScheduler.from_config(
                config, **scheduler_options)
    pipe = type(model.pipe)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_arm(name: str, model: StudioModel, request: StudioRequest, guidance: Any,
             steering: tuple, scheduler_options: dict | None, profile=None) -> ArmResult:
    pipe = _arm_pipeline(model, scheduler_options, profile)
    seeds = tuple(request.seed + k for k in range(request.num_samples))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    common = dict(guidance=guidance, steering=list(steering), reference=model.reference,
                  num_inference_steps=request.steps, generator=generators, return_telemetry=True)
    start = time.perf_counter()
    if model.kind == "class":
        out = pipe(class_labels=[request.class_id] * request.num_samples, output_type="latent",
                   **common)
        latents = out.images.float()
        images = pipe.decode(latents, "np")
    else:
        call = dict(model.call)
        if isinstance(call.get("negative_prompt"), str):   # Flux: true CFG, as compare runs it
            call["negative_prompt"] = [call["negative_prompt"]] * request.num_samples
        label = model.label(request)     # a known prompt: its store class, as compare passes it
        if label is not None and steering and getattr(model.reference, "labels", None) is not None:
            call["reference_labels"] = [label] * request.num_samples
        out = pipe(prompt=[request.prompt] * request.num_samples, output_type="latent",
                   **call, **common)
        latents = _unpacked(pipe, model, out.images.float())
        images = _decode(pipe, latents)
    seconds = time.perf_counter() - start
    nearest = None
    final = out.telemetry.final
    if final is not None and model.reference is not None:
        index = final.nearest_index.to(model.reference.latents.device)
        nearest = _decode(pipe, model.reference.latents[index].float())
    judged = None
    if model.digits and tuple(latents.shape[1:]) == (1, 8, 8):
        from steersample.evaluation.judge import classify

        judged = tuple(int(c) for c in classify(latents.clamp(-1.0, 1.0).cpu()))
    return ArmResult(name, np.asarray(images, dtype=np.float32), latents.cpu(), seeds,
                     out.telemetry, seconds, guidance, nearest, judged,
                     _relative_distances(model, request, latents))


def _unpacked(pipe, model: StudioModel, latents: torch.Tensor) -> torch.Tensor:
    """Flux returns packed latents ``(B, L, 4C)``; the store and the VAE want ``(B, C, H, W)``."""
    if latents.dim() != 3:
        return latents
    f = pipe.vae_scale_factor
    height = int(model.call.get("height") or pipe.default_sample_size * f)
    width = int(model.call.get("width") or pipe.default_sample_size * f)
    return pipe._unpack_latents(latents, height, width, f)


def _decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """Latents in the transformer's layout -> ``(B, H, W, C)`` float images in [0, 1]."""
    if hasattr(pipe, "decode"):
        return pipe.decode(latents, "np")
    vae = pipe.vae
    shift = vae.config.get("shift_factor") or 0.0
    with torch.no_grad():
        x = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
        images = vae.decode(x, return_dict=False)[0]
    return pipe.image_processor.postprocess(images.float(), output_type="np")


def _relative_distances(model: StudioModel, request: StudioRequest,
                        latents: torch.Tensor) -> tuple[float, ...] | None:
    """``metrics.relative_distance`` of each sample against the model's held-out data."""
    if model.reference is None or model.heldout is None:
        return None
    from steersample.evaluation.novelty import relative_distance

    images, labels = model.heldout
    x = latents.float().to(model.reference.latents.device)
    label = model.label(request)
    if labels is not None and model.reference.labels is not None and label is not None:
        mine = torch.full((x.shape[0],), label, dtype=torch.long)
        values = relative_distance(x, model.reference, images, labels=mine, heldout_labels=labels)
    else:
        values = relative_distance(x, model.reference, images)
    return tuple(float(v) for v in values.cpu())


def run_comparison(model: StudioModel, request: StudioRequest) -> Comparison:
    """Sample ``request`` plain and steered (same seeds, steps, class) and collect telemetry.

    Raises:
        ValueError: the request needs σ* and the class has none (see ``settings.plan_runs``),
            or the pipeline rejects an argument.
    """
    needs_boundary = request.window_relative or request.schedule in ("phase-aware", "profile")
    profile = model.profile(model.label(request)) if model.reference is not None else None
    boundary = None if profile is None else float(profile.boundary_sigma)
    if needs_boundary and model.reference is None:
        raise ValueError(f"model {model.name!r} has no training set, so it has no phase boundary "
                         "σ*; use an absolute window and the shift schedule")
    plan = plan_runs(request, boundary)
    plain = _run_arm("plain", model, request, plan.plain_guidance, (), None)
    steered = _run_arm("steered", model, request, plan.steered_guidance, plan.steering,
                       plan.steered_scheduler_options, profile)
    return Comparison(request, plan, plain, steered, profile, model)
