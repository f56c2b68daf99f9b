"""The embedded default model: a tiny class-conditional flow-matching DiT on 8x8 digits.

``load_default()`` returns ``(SteeredFlowPipeline, ReferenceSet)`` from package data, offline:

    pipe, ref = ss.load_default()
    out = pipe(class_labels=[0, 3], num_inference_steps=30, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    out.images                       # (2, 1, 8, 8) pixels in [-1, 1]; "np"/"pt"/"pil" give [0, 1]

The model (``assets/default/``) was trained by ``scripts/train_default.py`` on an imbalanced
split of scikit-learn's digits: a few images of each *rare* class (it copies them) and many of
each *frequent* class (it generalises). ``ref`` is its training set (latents = training images
``(N, 1, 8, 8)`` in [-1, 1], labels); ``load_default_info()`` has the split, the rare and
frequent classes, the training config and the commit it was trained from, and
``held_out_digits()`` the real digits it never saw (the quality reference).

Named defaults: ``"digits"`` (the one above, ``None`` means it) and ``"letters"``
(``assets/letters/``, 16x16 letters from matplotlib's fonts, trained by
``scripts/train_letters.py`` on a split keyed on fonts): ``load_default("letters")``,
``load_default_info("letters")``, ``held_out("letters")``. ``"prompt"`` (``assets/prompt/``,
``scripts/train_prompt.py``) is a text-to-image testbed: ``load_default("prompt")`` gives a
``SteeredStableDiffusion3Pipeline`` (call it with ``max_sequence_length=0``) and the store of
its training latents, ``held_out("prompt")`` the held-out digit latents and prompt ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_DIR", "DEFAULT_MODELS", "DefaultInfo", "held_out", "held_out_digits",
           "load_default", "load_default_info"]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default"
DEFAULT_MODELS: dict[str, Path] = {
    "digits": DEFAULT_MODEL_DIR,
    "letters": DEFAULT_MODEL_DIR.parent / "letters",
    "prompt": DEFAULT_MODEL_DIR.parent / "prompt",
}
"""The embedded defaults by name; a name can stand wherever a model folder is accepted."""
_REQUIRED = ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
             "scheduler/scheduler_config.json", "reference.safetensors", "metadata.json")
_RETRAIN = "retrain it with `python scripts/train_default.py --out FOLDER` or pass a folder it wrote"
_PROMPT_REQUIRED = ("model_index.json", "transformer/config.json", "vae/config.json",
                    "reference/manifest.json", "metadata.json")


@dataclass(frozen=True)
class DefaultInfo:
    """What ``metadata.json`` of a default-model folder records."""

    path: Path
    rare_classes: tuple[int, ...]
    frequent_classes: tuple[int, ...]
    null_class: int
    train_indices: tuple[int, ...]  # into load_digits() (letters: metadata's "indices_into")
    held_out_indices: tuple[int, ...]
    training_config: dict
    git_commit: str
    command: str
    testbed: str = "digits"  # which judge reads it: "digits" or "letters" (metadata's "letters")
    class_names: tuple[str, ...] = ()  # label i is class_names[i] (digits: "0".."9")


def _resolve(path: str | os.PathLike | None, name: str | None = None) -> Path:
    """None -> the digits default; a name of ``DEFAULT_MODELS`` -> its folder; else a folder."""
    if name is not None:
        if path is not None:
            raise ValueError(f"pass a model folder or a name, not both (got {path!r}, {name!r})")
        if name not in DEFAULT_MODELS:
            raise ValueError(f"unknown default model {name!r}; known names: "
                             f"{', '.join(sorted(DEFAULT_MODELS))}")
        return DEFAULT_MODELS[name]
    if path is None:
        return DEFAULT_MODEL_DIR
    if isinstance(path, os.PathLike) and len(Path(path).parts) == 1 and not Path(path).is_dir():
        path = os.fspath(path)   # a bare word from the command line (argparse's Path): a name
    if isinstance(path, str) and path in DEFAULT_MODELS:
        return DEFAULT_MODELS[path]
    if isinstance(path, str) and "/" not in path and os.sep not in path and not Path(path).is_dir():
        raise ValueError(f"unknown default model {path!r}; known names: "
                         f"{', '.join(sorted(DEFAULT_MODELS))} (or pass a model folder)")
    return Path(path)


def _folder(path: str | os.PathLike | None, name: str | None = None) -> Path:
    folder = _resolve(path, name)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model folder {str(folder)!r} does not exist; pass the folder that "
            f"scripts/train_default.py wrote (it holds transformer/, scheduler/, "
            f"reference.safetensors and metadata.json), or omit it for the embedded default"
        )
    required = _PROMPT_REQUIRED if (folder / "model_index.json").is_file() else _REQUIRED
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"model folder {str(folder)!r} is incomplete: missing {', '.join(missing)}; {_RETRAIN}"
        )
    return folder


def load_default_info(path: str | os.PathLike | None = None, *,
                      name: str | None = None) -> DefaultInfo:
    """Read the metadata of a default model: a name (``"digits"``, ``"letters"``; positional or
    ``name=``), a folder, or None (the embedded digits model)."""
    folder = _folder(path, name)
    try:
        meta = json.loads((folder / "metadata.json").read_text())
        return DefaultInfo(
            path=folder,
            rare_classes=tuple(int(c) for c in meta["rare_classes"]),
            frequent_classes=tuple(int(c) for c in meta["frequent_classes"]),
            null_class=int(meta["null_class"]),
            train_indices=tuple(int(i) for i in meta["split"]["train_indices"]),
            held_out_indices=tuple(int(i) for i in meta["split"]["held_out_indices"]),
            training_config=dict(meta["training_config"]),
            git_commit=str(meta.get("git_commit", "unknown")),
            command=str(meta.get("command", "")),
            testbed=_testbed(meta),
            class_names=_class_names(meta),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"model folder {str(folder)!r} has an unreadable metadata.json "
            f"({type(err).__name__}: {err}); {_RETRAIN}"
        ) from err


def _testbed(meta: dict) -> str:
    """metadata's "testbed", else "letters" when it lists letters, else "digits"."""
    if "testbed" in meta:
        return str(meta["testbed"])
    return "letters" if "letters" in meta else "digits"


def _class_names(meta: dict) -> tuple[str, ...]:
    """Names of the class ids: metadata's "class_names" or "letters", else the ids themselves."""
    names = meta.get("class_names", meta.get("letters"))
    if names is not None:
        return tuple(str(n) for n in names)
    ids = [int(c) for c in (*meta["rare_classes"], *meta["frequent_classes"])]
    return tuple(str(i) for i in range(max(ids) + 1)) if ids else ()


def held_out_digits(info: DefaultInfo | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The real digits the model never saw: images ``(M, 1, 8, 8)`` in [-1, 1], labels ``(M,)``."""
    from steersample.data import load_digits

    info = load_default_info() if info is None else info
    images, labels = load_digits()
    idx = torch.tensor(info.held_out_indices, dtype=torch.long)
    return images[idx], labels[idx]


def held_out(path: str | os.PathLike | None = None, *,
             name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out real images of a default model: ``(images (M, 1, H, W) in [-1, 1], labels)``.

    ``path`` as for ``load_default``: ``"digits"`` (or None) gives ``held_out_digits()``,
    ``"letters"`` the letters in fonts each letter was not trained on (``heldout.safetensors``).
    """
    folder = _folder(path, name)
    if (folder / "heldout" / "manifest.json").is_file():   # the prompt testbed: latents
        from steersample.reference.sharded import ShardedReferenceSet

        store = ShardedReferenceSet.open(folder / "heldout")
        return store.latents.clone(), store.labels.clone()
    if (folder / "heldout.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "heldout.safetensors"))
        return tensors["images"], tensors["labels"]
    return held_out_digits(load_default_info(folder))


def load_default(path: str | os.PathLike | None = None, device: str | torch.device = "cpu", *,
                 name: str | None = None):
    """Load the default model: ``(SteeredFlowPipeline, ReferenceSet)``, with no network access
    (``"prompt"``: ``(SteeredStableDiffusion3Pipeline, ShardedReferenceSet)``, see the module).

    Args:
        path: a name of ``DEFAULT_MODELS`` (``"digits"``, ``"letters"``), a folder written by
            ``scripts/train_default.py`` or ``scripts/train_letters.py``, or None (digits).
        device: where the transformer and the reference latents go.
        name: the same as a name in ``path`` (give one of the two); unknown names raise
            ``ValueError`` listing the known ones.
    """
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from steersample.pipelines import SteeredFlowPipeline
    from steersample.reference.reference_set import ReferenceSet

    folder = _folder(path, name)
    if (folder / "model_index.json").is_file():
        return _load_prompt_model(folder, device)
    try:
        transformer = DiTTransformer2DModel.from_pretrained(
            folder / "transformer", local_files_only=True, use_safetensors=True)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            folder / "scheduler", local_files_only=True)
        reference = ReferenceSet.load(folder / "reference.safetensors", device=device)
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(
            f"model folder {str(folder)!r} could not be loaded ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); {_RETRAIN}"
        ) from err
    transformer.eval()
    pipe = SteeredFlowPipeline(transformer=transformer, scheduler=scheduler).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, reference


def _load_prompt_model(folder: Path, device: str | torch.device = "cpu"):
    """The prompt testbed (``scripts/train_prompt.py``): ``(SteeredStableDiffusion3Pipeline,
    ShardedReferenceSet)`` of its training latents ``(N, 4, 8, 8)``, labels = prompt ids
    (``ref.manifest.metadata["prompts"]``). The model was trained without T5 tokens: call it
    with ``max_sequence_length=0`` (metadata.json's ``"call"``)."""
    from steersample.pipelines import SteeredStableDiffusion3Pipeline
    from steersample.reference.sharded import ShardedReferenceSet

    try:
        pipe = SteeredStableDiffusion3Pipeline.from_pretrained(
            folder, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
        reference = ShardedReferenceSet.open(folder / "reference")
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(
            f"prompt model folder {str(folder)!r} could not be loaded ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); retrain it with "
            f"`python scripts/train_prompt.py --out FOLDER`"
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), reference
