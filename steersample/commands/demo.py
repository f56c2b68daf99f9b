"""Launch the steersample studio: plain against steered sampling in the browser (Gradio).

Serves the embedded default model and every --model FOLDER given here (a folder written by
scripts/train_default.py, or a diffusers pipeline folder: class-conditional flow, SD3, Flux).

A text-to-image model (SD3/Flux folder, or ``--model prompt``: the shipped prompt testbed) is
served with its training set when one is known: ``--reference STORE`` (its training latents),
``--prompts FILE`` (the prompt chooser) and ``--heldout STORE`` (distances relative to unseen
data), checked before any model call as ``steersample compare`` checks them; the testbed brings
its own. Then its tiles carry the nearest training image, copy badges and the relative distance,
and attractor steering is offered (novelty steering needs class labels).
The page never accepts filesystem paths; models are chosen only at launch. Binds to
127.0.0.1 unless --host says otherwise. Needs the studio extra: pip install "steersample[studio]".
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

__all__ = ["NAME", "HELP", "add_arguments", "run"]

NAME = "demo"
HELP = "launch the Gradio studio: plain vs steered samples side by side"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, action="append", default=[], metavar="FOLDER",
                        help="add a model folder to the studio (repeatable); the embedded "
                             "default is always served")
    parser.add_argument("--reference", type=Path, default=None, metavar="STORE",
                        help="training latents of the prompt model (a store folder from "
                             "`steersample index build`, or a ReferenceSet .safetensors file)")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="prompts offered for the prompt model, one a line")
    parser.add_argument("--heldout", type=Path, default=None, metavar="STORE",
                        help="held-out latents of the prompt model (distances relative to them)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0 exposes the studio to your network)")
    parser.add_argument("--port", type=int, default=None,
                        help="port to listen on (default: the first free one from 7860)")


def run(args: argparse.Namespace) -> int:
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must lie in 1..65535, got {args.port}")
    for folder in args.model:
        if str(folder) != "prompt" and not folder.is_dir():
            raise FileNotFoundError(f"--model {str(folder)!r} is not a folder; pass a diffusers "
                                    "pipeline folder or one written by scripts/train_default.py")
    if importlib.util.find_spec("gradio") is None:   # the studio's one heavy dependency
        raise ValueError('the studio needs gradio: pip install "steersample[studio]"')
    from steersample.studio.app import build_app, default_models, launch

    prompt_folders, other = _split_prompt_models(args)
    prompt_models = [_prompt_model(folder, args) for folder in prompt_folders]  # checked first
    models = default_models() + prompt_models
    demo = build_app(models=models, model_paths=[str(m) for m in other])
    launch(demo, host=args.host, port=args.port, block=True)
    return 0


def _with_reference(folder: Path, args: argparse.Namespace) -> bool:
    """Whether a --model is served as a prompt model with a training set."""
    from steersample.commands._prompt_runs import _KINDS

    if str(folder) == "prompt" and not folder.is_dir():
        return True
    index = folder / "model_index.json"
    if not index.is_file():
        return False
    import json

    if json.loads(index.read_text()).get("_class_name") not in _KINDS:
        return False
    bundled = (folder / "reference").is_dir() and (folder / "prompts.txt").is_file()
    return bundled or args.reference is not None


def _split_prompt_models(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """(prompt models served with a training set, the other folders)."""
    prompt = [m for m in args.model if _with_reference(m, args)]
    other = [m for m in args.model if m not in prompt]
    given = [f"--{n}" for n in ("reference", "prompts", "heldout") if getattr(args, n) is not None]
    if given and len(prompt) != 1:
        raise ValueError(f"{'/'.join(given)} belong to one text-to-image model: pass exactly one "
                         "--model SD3_OR_FLUX_FOLDER (or --model prompt) with them, got "
                         f"{len(prompt)}")
    return prompt, other


def _prompt_model(folder: Path, args: argparse.Namespace):
    from steersample.studio.engine import load_prompt_model

    return load_prompt_model(folder if folder.is_dir() else str(folder), args.reference,
                             args.prompts, args.heldout)
