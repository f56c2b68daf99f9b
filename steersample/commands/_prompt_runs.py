"""`compare` and `audit` on a text-to-image folder (SD3 or Flux) with a reference store.

    steersample compare --model PIPELINE_FOLDER --reference STORE --prompts FILE [--heldout STORE]

Inputs, all checked before the first model call:

- ``--model``: a diffusers ``StableDiffusion3Pipeline`` or ``FluxPipeline`` folder (loaded offline
  as its steered subclass). A ``metadata.json`` beside ``model_index.json`` may hold ``"call"``
  keyword arguments every call needs (the prompt testbed: ``max_sequence_length``, height, width).
- ``--reference``: a store folder (``steersample index build``) or a ``ReferenceSet`` safetensors
  file, in the pipeline's latent layout (VAE latents as the transformer sees them, unpacked).
- ``--prompts``: UTF-8 text, one prompt a line, optionally ``prompt<TAB>group`` (``#`` comments).
- ``--heldout``: real data the model never saw, in the same layout (store or file).

The prompt testbed (``steersample/assets/prompt``) holds ``reference/``, ``heldout/`` and
``prompts.txt``: with ``--model`` naming it (or ``prompt``) they are the defaults.

Groups: a line's group, else the group the reference store's metadata gives the prompt
(``{"groups": {"rare": [...], ...}}``), else ``all``. Per-prompt novelty needs held-out rows of
that prompt: store labels index the store metadata's ``"prompts"`` list; without them Z_U is
computed per group over k-means cells of the training latents (Meehan et al.'s partition).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PromptSpec", "PromptInputs", "resolve_model", "read_prompts", "open_store",
           "load_inputs", "generate", "judge_prompts", "uses_prompt_model", "SEED_STRIDE"]

SEED_STRIDE = 10_000  # sample k of prompt i uses seed + i * SEED_STRIDE + k
_KINDS = {"StableDiffusion3Pipeline": "sd3", "SteeredStableDiffusion3Pipeline": "sd3",
          "FluxPipeline": "flux", "SteeredFluxPipeline": "flux"}
PROMPT_TESTBED = Path(__file__).resolve().parents[1] / "assets" / "prompt"


@dataclass(frozen=True)
class PromptSpec:
    text: str
    group: str
    label: int | None   # index into the reference store's "prompts" list, when it has one


@dataclass(frozen=True)
class PromptInputs:
    """Everything a prompt-model run needs, validated."""

    folder: Path
    pipe: object
    kind: str                      # "sd3" | "flux"
    call: dict                     # keyword arguments every call gets (height, width, ...)
    latent_shape: tuple[int, ...]
    reference: object              # ReferenceSet (a ShardedReferenceSet for a store)
    heldout: object | None
    prompts: tuple[PromptSpec, ...]
    groups: dict                   # group -> [prompt index]
    paths: dict                    # what was loaded from where (for the report)

    @property
    def labelled(self) -> bool:
        """Every prompt names a class of the (labelled) reference store."""
        return bool(self.prompts) and all(p.label is not None for p in self.prompts)

    def labels_of(self, which) -> list[int] | None:
        """The store class ids of the prompts ``which`` (prompt indices), or None when unlabelled."""
        return [self.prompts[int(i)].label for i in which] if self.labelled else None


def uses_prompt_model(args) -> bool:
    """True when the arguments ask for a text-to-image run (``--reference``/``--prompts``/
    ``--heldout`` given, or ``--model`` a diffusers pipeline folder or ``prompt``)."""
    if any(getattr(args, name, None) is not None for name in ("reference", "prompts", "heldout")):
        return True
    model = getattr(args, "model", None)
    return model is not None and (str(model) == "prompt" or (Path(model) / "model_index.json").is_file())


def resolve_model(model) -> Path:
    if model is None:
        raise ValueError("--reference/--prompts need --model PIPELINE_FOLDER (an SD3 or Flux folder; "
                         "`--model prompt` is the embedded prompt testbed)")
    folder = PROMPT_TESTBED if str(model) == "prompt" and not Path(model).is_dir() else Path(model)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--model {str(model)!r} is not a diffusers pipeline folder (no model_index.json); "
                         "pass a StableDiffusion3Pipeline or FluxPipeline folder saved with save_pretrained")
    return folder


def read_prompts(path) -> list[tuple[str, str | None]]:
    """``[(prompt, group or None)]`` from a text file; clear errors for missing/unreadable/empty."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist; pass --prompts FILE "
                                "with one prompt a line (optionally 'prompt<TAB>group')")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"prompts file {str(path)!r} cannot be read ({type(err).__name__}: {err}); "
                         "pass a UTF-8 text file with one prompt a line") from err
    out = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, _, group = line.partition("\t")
        out.append((prompt.strip(), group.strip() or None))
    if not out:
        raise ValueError(f"prompts file {str(path)!r} holds no prompts; write one prompt a line "
                         "(blank lines and '#' comments are skipped)")
    return out


def open_store(path, what: str):
    """A store folder or a ReferenceSet safetensors file -> ``(ReferenceSet, metadata dict)``."""
    from steersample.reference.reference_set import ReferenceSet
    from steersample.reference.sharded import ShardedReferenceSet

    path = Path(path)
    try:
        if path.is_dir():
            ref = ShardedReferenceSet.open(path)
            return ref, dict(ref.manifest.metadata or {})
        if path.is_file():
            return ReferenceSet.load(path), {}
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"--{what} {str(path)!r} cannot be opened ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); pass a store folder "
                         "written by `steersample index build` or a ReferenceSet .safetensors file") from err
    raise FileNotFoundError(f"--{what} {str(path)!r} does not exist; pass a store folder written by "
                            "`steersample index build` or a ReferenceSet .safetensors file")


def _kind(folder: Path) -> str:
    name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    if name not in _KINDS:
        raise ValueError(f"{folder / 'model_index.json'} names {name!r}; compare/audit with --reference "
                         "take a StableDiffusion3Pipeline or FluxPipeline folder")
    return _KINDS[name]


def _load_pipeline(folder: Path, kind: str):
    from steersample.pipelines import SteeredFluxPipeline, SteeredStableDiffusion3Pipeline

    extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    index = json.loads((folder / "model_index.json").read_text())
    extra = {k: v for k, v in extra.items() if index.get(k, [None])[0] is None}
    cls = SteeredStableDiffusion3Pipeline if kind == "sd3" else SteeredFluxPipeline
    try:
        pipe = cls.from_pretrained(folder, local_files_only=True, **extra)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"pipeline folder {str(folder)!r} could not be loaded ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); pass a folder written by "
                         "save_pretrained with every component") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latent_shape(pipe, kind: str, call: dict) -> tuple[int, ...]:
    """The per-sample latent shape a call with ``call``'s height/width samples (unpacked)."""
    f = pipe.vae_scale_factor
    height = int(call.get("height") or pipe.default_sample_size * f)
    width = int(call.get("width") or pipe.default_sample_size * f)
    if kind == "sd3":
        return (pipe.transformer.config.in_channels, height // f, width // f)
    return (pipe.transformer.config.in_channels // 4, 2 * (height // (f * 2)), 2 * (width // (f * 2)))


def _check_single_process() -> None:
    """Prompt-model runs sample in one process; under a launcher every process would write."""
    import os

    if any(int(os.environ.get(n, "1") or 1) > 1 for n in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        raise ValueError("compare/audit on a prompt model run in one process; run `steersample "
                         "compare|audit` directly, not under `accelerate launch`")


def load_inputs(args) -> PromptInputs:
    """Validate every input and load the pipeline; no model is called."""
    _check_single_process()
    folder = resolve_model(args.model)
    kind = _kind(folder)
    defaults = folder if (folder / "reference").is_dir() and (folder / "prompts.txt").is_file() else None
    ref_path = args.reference or (defaults / "reference" if defaults else None)
    prompts_path = args.prompts or (defaults / "prompts.txt" if defaults else None)
    held_path = args.heldout or (defaults / "heldout" if defaults and (defaults / "heldout").is_dir() else None)
    if ref_path is None:
        raise ValueError("a prompt model needs --reference STORE (its training latents: "
                         "`steersample index build STORE --images DIR --vae MODEL`)")
    if prompts_path is None:
        raise ValueError("a prompt model needs --prompts FILE (one prompt a line)")
    lines = read_prompts(prompts_path)
    reference, meta = open_store(ref_path, "reference")
    heldout = open_store(held_path, "heldout")[0] if held_path is not None else None
    call = {}
    if (folder / "metadata.json").is_file():
        call = dict(json.loads((folder / "metadata.json").read_text()).get("call", {}))
    pipe = _load_pipeline(folder, kind)
    shape = _latent_shape(pipe, kind, call)
    ref_shape = tuple(reference.latents.shape[1:])
    if ref_shape != shape:
        raise ValueError(f"the reference store {str(ref_path)!r} holds latents of shape {ref_shape}, but "
                         f"this pipeline samples latents of shape {shape}; build the store with this "
                         f"pipeline's VAE at its image size (`steersample index build STORE --images DIR "
                         f"--vae {folder}`)")
    if heldout is not None and tuple(heldout.latents.shape[1:]) != ref_shape:
        raise ValueError(f"the held-out set {str(held_path)!r} holds latents of shape "
                         f"{tuple(heldout.latents.shape[1:])}, the reference {ref_shape}; encode the "
                         "held-out images with the same VAE and image size as the reference")
    known = list(meta.get("prompts") or [])
    store_groups = {p: g for g, members in (meta.get("groups") or {}).items() for p in members}
    specs = []
    for text, group in dict.fromkeys(lines):
        label = known.index(text) if text in known and reference.labels is not None else None
        specs.append(PromptSpec(text, group or store_groups.get(text, "all"), label))
    groups: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(spec.group, []).append(i)
    pipe.to("cpu")
    return PromptInputs(folder, pipe, kind, call, shape, reference, heldout, tuple(specs), groups,
                        {"model": str(folder), "reference": str(ref_path), "prompts": str(prompts_path),
                         "heldout": None if held_path is None else str(held_path)})


# ----------------------------------------------------------------------------- generation
def generate(inputs: PromptInputs, prompts: list[str], seeds: list[int], guidance, steering,
             steps: int, bar=None, labels: list[int] | None = None) -> tuple[torch.Tensor, int, float]:
    """Latents ``(B, *latent_shape)`` (unpacked), model evaluations per sample, seconds.

    ``labels``: each prompt's class id in the store (:meth:`PromptInputs.labels_of`), passed to
    steered calls as ``reference_labels`` so that per-class steerers see the prompt's class.
    Seconds are what the user pays for the sampling call (no telemetry recorded); model
    evaluations are counted by a forward hook on the transformer (rows seen / samples)."""
    from steersample.commands._timed import timed_call
    from steersample.distributed import seeded_generators

    pipe = inputs.pipe
    extra = {"negative_prompt": [""] * len(prompts)} if inputs.kind == "flux" else {}
    out, rows, seconds = timed_call(
        pipe, bar, prompt=prompts, guidance=guidance, steering=list(steering),
        reference=inputs.reference if steering else None,
        reference_labels=labels if steering else None, num_inference_steps=steps,
        generator=seeded_generators(seeds), **inputs.call, **extra)
    x = out.images.float()
    if inputs.kind == "flux":   # packed (B, L, 4C) -> (B, C, H, W)
        _, h, w = inputs.latent_shape
        x = pipe._unpack_latents(x, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                 pipe.vae_scale_factor)
    return x.reshape(len(seeds), *inputs.latent_shape), rows // len(seeds), seconds


def seeds_for(inputs: PromptInputs, indices: list[int], samples: int, seed: int) -> tuple[list[str], list[int], torch.Tensor]:
    """Prompts, seeds and prompt indices of ``samples`` samples of each prompt in ``indices``."""
    prompts = [inputs.prompts[i].text for i in indices for _ in range(samples)]
    seeds = [seed + SEED_STRIDE * i + k for i in indices for k in range(samples)]
    which = torch.tensor(indices).repeat_interleave(samples)
    return prompts, seeds, which


# ----------------------------------------------------------------------------- judging
def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 4)


def judge_prompts(inputs: PromptInputs, samples: torch.Tensor, which: torch.Tensor) -> dict:
    """Copy rate (ratio test vs the reference), data-copying Z_U, distance ratio and precision/
    recall against held-out, per prompt and per group: ``{"per_prompt": [...], "groups": {...},
    "overall": {...}}`` (JSON-ready; None where a figure is undefined)."""
    from steersample.evaluation.metrics import nn_ratio
    from steersample.evaluation.novelty import data_copying, novelty_by_class, precision_recall
    from steersample.evaluation.metrics import COPY_THRESHOLD

    ratio = nn_ratio(samples, inputs.reference).double().cpu()
    copies = ratio < COPY_THRESHOLD
    specs, held = inputs.prompts, inputs.heldout
    present = sorted(set(which.tolist()))
    labelled = (held is not None and held.labels is not None
                and all(specs[i].label is not None for i in present))
    per_prompt = {i: {"prompt": specs[i].text, "group": specs[i].group, "label": specs[i].label,
                      "samples": int((which == i).sum()),
                      "copy_rate": _num(copies[which == i].double().mean()),
                      "median_ratio": _num(ratio[which == i].median()),
                      "z_u": None, "distance_ratio": None, "precision": None, "recall": None}
                  for i in present}
    groups = {g: {"prompts": [specs[i].text for i in members if i in per_prompt],
                  "copy_rate": _num(copies[torch.isin(which, torch.tensor(members))].double().mean())}
              for g, members in inputs.groups.items() if any(i in per_prompt for i in members)}
    overall = {"copy_rate": _num(copies.double().mean())}
    if held is not None:
        if labelled:
            labels = torch.tensor([specs[i].label for i in which.tolist()])
            by_label = {name: [specs[i].label for i in members if i in per_prompt]
                        for name, members in inputs.groups.items()}
            nov = novelty_by_class(samples, labels, inputs.reference, held.latents, held.labels,
                                   groups={k: v for k, v in by_label.items() if v}, k=3)
            for i in present:
                per_prompt[i].update({k: _num(v) for k, v in nov["per_class"][specs[i].label].items()})
            for name, figures in nov["groups"].items():
                groups[name].update({k: _num(v) for k, v in figures.items() if k != "classes"})
            cells = "prompts"
        else:
            for name, members in inputs.groups.items():
                mask = torch.isin(which, torch.tensor(members))
                if mask.sum() < 2:
                    continue
                test = data_copying(samples[mask], inputs.reference, held.latents)
                pr = precision_recall(samples[mask], held.latents, k=3) if len(held) > 3 else None
                groups[name].update({"z_u": _num(test.c_t), "distance_ratio": _num(test.distance_ratio),
                                     "precision": _num(pr.precision) if pr else None,
                                     "recall": _num(pr.recall) if pr else None})
            cells = "k-means cells of the reference"
        test = data_copying(samples, inputs.reference, held.latents)
        pr = precision_recall(samples, held.latents, k=3) if len(held) > 3 else None
        overall.update({"z_u": _num(test.c_t), "distance_ratio": _num(test.distance_ratio),
                        "precision": _num(pr.precision) if pr else None,
                        "recall": _num(pr.recall) if pr else None, "z_u_cells": cells})
    return {"per_prompt": [per_prompt[i] for i in present], "groups": groups, "overall": overall,
            "ratios": ratio, "copies": copies}
