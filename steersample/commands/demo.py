"""Launch the steersample studio: plain against steered sampling in the browser (Gradio).

Serves the embedded default model and every --model FOLDER given here (a folder written by
scripts/train_default.py, or a diffusers pipeline folder: class-conditional flow, SD3, Flux).
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
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0 exposes the studio to your network)")
    parser.add_argument("--port", type=int, default=None,
                        help="port to listen on (default: the first free one from 7860)")


def run(args: argparse.Namespace) -> int:
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must lie in 1..65535, got {args.port}")
    for folder in args.model:
        if not folder.is_dir():
            raise FileNotFoundError(f"--model {str(folder)!r} is not a folder; pass a diffusers "
                                    "pipeline folder or one written by scripts/train_default.py")
    if importlib.util.find_spec("gradio") is None:   # the studio's one heavy dependency
        raise ValueError('the studio needs gradio: pip install "steersample[studio]"')
    from steersample.studio.app import build_app, launch

    demo = build_app(model_paths=[str(m) for m in args.model])
    launch(demo, host=args.host, port=args.port, block=True)
    return 0
