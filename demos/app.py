"""The steersample studio: plain against steered sampling, same seeds, side by side.

    python demos/app.py [--model FOLDER] [--host 127.0.0.1] [--port 7860]
    steersample demo    [--model FOLDER] [--host 127.0.0.1] [--port 7860]

Serves the embedded default (a class-conditional flow model on 8×8 digits, with its training
set) plus any model folder given with ``--model`` at launch; the page itself never accepts a
filesystem path. Every control is a plain value; :mod:`steersample.studio.settings` validates
them, :mod:`steersample.studio.engine` samples, :mod:`steersample.studio.render` draws and
:mod:`steersample.studio.page` wires the page.

Nothing is lost: a refused or failed request changes no result on screen; its reason stays in
the message line above the results (and in a toast). While a run is going the Generate button
reads "Running…" and is disabled; the line above the results names the settings that made
them and marks them stale as soon as a control moves. Requests go through Gradio's queue and
share nothing writable (each gets its own pipeline object, scheduler, telemetry and download
folder), so concurrent users never see each other's results; a seed gives the same images
every time.

API: the ``/generate`` endpoint takes the controls by name (see ``page.generate``'s signature;
``seed=-1`` draws a random seed) and returns the results gallery (plain and steered tile of
each seed in turn), the two summaries, the phase plot (HTML), the JSON report, the PNG sheet,
the message (empty on success, the reason on refusal; then the other outputs are unchanged)
and the line naming the settings of the results.
"""

from __future__ import annotations

from typing import Any, Sequence

import gradio as gr

from steersample.studio.engine import StudioModel, load_model_folder

__all__ = ["build_app", "launch", "main", "default_models", "CSS", "JS"]

CSS = """
#results-gallery .thumbnail-item .caption-label { display: none; }  /* the tile says it */
#results-gallery .grid-wrap { max-height: none !important; height: auto !important;
                              overflow: visible !important; }  /* one page, no inner scroll */
#results-gallery .preview .media-button { height: auto; flex: 1 1 0; min-height: 0; }
#results-gallery .preview .caption { white-space: normal; overflow: visible; flex: none;
                                     text-overflow: clip; max-width: 100%;
                                     margin-bottom: calc(var(--size-14) + 4px); }
                                     /* the enlarged tile's caption whole, above the strip */
.stale-results { opacity: 0.5; transition: opacity 0.2s; }
#message:has(p) { border-left: 4px solid #d62728; padding: 6px 10px;
                       background: rgba(214, 39, 40, 0.08); border-radius: 4px; }
#run-info.stale { border-left: 4px solid #ff7f0e; padding-left: 10px; }
button.active-preset { outline: 3px solid var(--color-accent); outline-offset: 1px; }
#studio-header p { margin-top: 0; }
#steps, #num-samples { min-width: 200px; }
@media (max-width: 900px) { #results-column { order: -1; } }  /* phones: results first */
"""

# names every slider's reset button after its slider (Gradio labels them all alike)
JS = """
() => {
  const name = () => document.querySelectorAll('button.reset-button').forEach((b) => {
    const label = b.closest('.block')?.querySelector('label')?.textContent?.trim();
    if (label && b.dataset.named !== label) {
      b.dataset.named = label;
      b.setAttribute('aria-label', `Reset ${label} to its starting value`);
      b.title = `Reset ${label}`;
    }
  });
  name();
  new MutationObserver(name).observe(document.body, {childList: true, subtree: true});
}
"""


def default_models() -> list[StudioModel]:
    """The embedded default model, with its training set, held-out digits and class names."""
    from steersample.default import held_out_digits, load_default, load_default_info
    from steersample.studio.engine import _class_names

    pipe, reference = load_default()
    info = load_default_info()
    return [StudioModel("default · digits", pipe, reference, "class", _class_names(info),
                        "embedded default: 8×8 digits; few training images of the rare "
                        "classes (it copies them), many of the frequent ones",
                        default_class=min(info.rare_classes, default=0), digits=True,
                        heldout=held_out_digits(info))]


def build_app(pipe: Any = None, reference: Any = None, *, name: str = "default",
              models: Sequence[StudioModel] | None = None,
              model_paths: Sequence[str] = (), class_names: Sequence[str] | None = None,
              description: str = "") -> gr.Blocks:
    """Build the studio (not launched; use :func:`launch` or :func:`main`).

    Args:
        pipe, reference: a class-conditional steered pipeline and its training set
            (``ReferenceSet``) to serve under ``name``; None loads the embedded default.
        models: ready ``StudioModel`` objects to serve instead (overrides ``pipe``).
        model_paths: model folders to add (``--model``), loaded here, at build time.
        class_names, description: labels for ``pipe``'s classes and a one-line description.

    Returns:
        the ``gr.Blocks`` app; its ``/generate`` endpoint runs one comparison.
    """
    from steersample.studio.page import build_page

    if models is None:
        if pipe is None:
            models = default_models()
        else:
            models = [StudioModel(name, pipe, reference, "class", tuple(class_names or ()),
                                  description)]
    served = {m.name: m for m in models}
    for path in model_paths:
        model = load_model_folder(path)
        served[model.name] = model
    if not served:
        raise ValueError("build_app needs at least one model")
    return build_page(served)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None,
           block: bool = True):
    """Queue and launch ``demo`` on ``host:port`` (port None: Gradio picks a free one)."""
    demo.queue(max_size=64)
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
                       show_error=True, css=CSS, js=JS, theme=gr.themes.Soft(),
                       footer_links=["api"], quiet=not block)


def main(argv: Sequence[str] | None = None) -> int:
    """``python demos/app.py [options]``: exactly ``steersample demo [options]``."""
    import sys

    from steersample.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
