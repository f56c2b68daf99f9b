"""The steersample studio: plain against steered sampling, same seeds, side by side.

    python demos/app.py [--model FOLDER] [--host 127.0.0.1] [--port 7860]
    steersample demo    [--model FOLDER] [--host 127.0.0.1] [--port 7860]

Serves the embedded default (a class-conditional flow model on 8×8 digits, with its training
set) plus any model folder given with ``--model`` at launch; the page itself never accepts a
filesystem path. Every control is a plain value; :mod:`steersample.studio.settings` validates
them, :mod:`steersample.studio.engine` samples, :mod:`steersample.studio.render` draws.

Robustness: requests go through Gradio's queue and share nothing writable (each gets its own
pipeline object, scheduler, telemetry and download folder), so concurrent users never see each
other's results; a seed gives the same images every time; every failure reaches the page as a
``gr.Error`` message (never a stack trace) and the last good results stay on screen, because
a failed request updates no output.

API: the ``/generate`` endpoint takes the controls by name (see ``generate``'s signature) and
returns the two galleries, the two summaries, the phase plot, the JSON report and the sheet.
"""

from __future__ import annotations

import atexit
import json
import logging
from functools import partial
from typing import Any, Sequence

import gradio as gr

from steersample.studio.downloads import DownloadFolder, write_downloads
from steersample.studio.engine import StudioModel, load_model_folder, run_comparison
from steersample.studio.render import arm_summary, arm_tiles, phase_figure
from steersample.studio.settings import (LIMITS, PRESETS, SCHEDULES, StudioRequest,
                                         parse_request, preset_values, steerer_names,
                                         steerer_default_strength, steerer_summary)

__all__ = ["build_app", "main", "default_models", "CSS"]

log = logging.getLogger("steersample.studio")

CSS = """
#gallery-plain .thumbnail-item .caption-label,
#gallery-steered .thumbnail-item .caption-label { display: none; }  /* the tile says it */
#gallery-plain .grid-wrap.fixed-height,
#gallery-steered .grid-wrap.fixed-height { min-height: 240px; }  /* no blank band below */
#studio-header p { margin-top: 0; }
"""

_HOW_TO_READ = """
**How to read it.** Each tile is one seed: the sample (framed green when novel, red when a
**COPY**) beside its nearest training image; *ratio* is d(NN1)/d(NN2) against the training set
(near 0: sits on one training image; near 1: between several). The plot shows how sharply the
empirical oracle's posterior points at a single training image as noise falls: the black
curve for noised training images (it crosses 0.5 at the phase boundary **σ\\***, red), the
dots for these samples along their trajectories. Above σ\\* sampling *navigates* (chooses
which image it heads for), below it *refines*. The steered side applies the guidance scale w
inside the shaded window and the outer scales outside it.
"""

_REQUEST_FIELDS = frozenset(StudioRequest.__dataclass_fields__)

# controls the preset buttons may set, in the order of their outputs
_PRESET_CONTROLS = ("guidance_scale", "window_relative", "window_lo", "window_hi",
                    "below_boundary", "above_boundary", "scale_above", "scale_below",
                    "schedule", "shift", "steering", "strength")


def default_models() -> list[StudioModel]:
    """The embedded default model, with its training set and class names."""
    from steersample.default import load_default, load_default_info
    from steersample.studio.engine import _class_names

    pipe, reference = load_default()
    info = load_default_info()
    return [StudioModel("default · digits", pipe, reference, "class", _class_names(info),
                        "embedded default: 8×8 digits; few training images of the rare "
                        "classes (it copies them), many of the frequent ones",
                        default_class=min(info.rare_classes, default=0), digits=True)]


def _slider(name: str, **overrides: Any) -> gr.Slider:
    limit = LIMITS[name]
    options = dict(minimum=limit.minimum, maximum=limit.maximum, value=limit.default,
                   step=limit.step, label=limit.label, info=limit.info or None)
    options.update(overrides)
    return gr.Slider(**options)


def _model_controls(model: StudioModel) -> tuple:
    """Updates for (class, prompt, description, shift) when ``model`` is selected."""
    is_class = model.kind == "class"
    choices = [(name, c) for c, name in enumerate(model.class_names)]
    return (gr.update(choices=choices, value=model.default_class, visible=is_class),
            gr.update(visible=not is_class),
            gr.update(value=model.description),
            gr.update(value=model.shift))


def _window_visibility(relative: bool) -> tuple:
    return gr.update(visible=not relative), gr.update(visible=bool(relative))


def build_app(pipe: Any = None, reference: Any = None, *, name: str = "default",
              models: Sequence[StudioModel] | None = None,
              model_paths: Sequence[str] = (), class_names: Sequence[str] | None = None,
              description: str = "") -> gr.Blocks:
    """Build the studio (not launched; call ``.queue().launch(...)`` or use :func:`main`).

    Args:
        pipe, reference: a class-conditional steered pipeline and its training set
            (``ReferenceSet``) to serve under ``name``; None loads the embedded default.
        models: ready ``StudioModel`` objects to serve instead (overrides ``pipe``).
        model_paths: model folders to add (``--model``), loaded here, at build time.
        class_names, description: labels for ``pipe``'s classes and a one-line description.

    Returns:
        the ``gr.Blocks`` app; its ``/generate`` endpoint runs one comparison.
    """
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
    first = next(iter(served.values()))
    downloads = DownloadFolder()
    atexit.register(downloads.cleanup)
    best = preset_values("best steering", LIMITS["guidance_scale"].default, first.shift)

    def generate(model: str, class_id: int | None, prompt: str | None, seed: float,
                 num_samples: float, steps: float, guidance_scale: float, scale_above: float,
                 scale_below: float, window_relative: bool, window_lo: float, window_hi: float,
                 below_boundary: float, above_boundary: float, schedule: str, shift: float,
                 navigation_fraction: float, steering: str, strength: float):
        """Sample plain and steered on the same seeds; return galleries, summaries, plot, files."""
        values = {key: value for key, value in locals().items() if key in _REQUEST_FIELDS}
        try:
            request = parse_request(values, models=served)
            comparison = run_comparison(served[request.model], request)
            report, sheet = write_downloads(comparison, downloads.new())
            figure = phase_figure(comparison)
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise gr.Error(str(err), title="Cannot generate", print_exception=False) from None
        except Exception as err:  # a bug or a resource problem: log it, show one line
            log.exception("studio request failed")
            raise gr.Error(f"generation failed ({type(err).__name__}: {err}); the previous "
                           "results are still shown", title="Generation failed",
                           print_exception=False) from None
        return (arm_tiles(comparison.plain), arm_tiles(comparison.steered),
                arm_summary(comparison.plain, comparison),
                arm_summary(comparison.steered, comparison), figure,
                report, sheet)

    with gr.Blocks(title="steersample studio", delete_cache=(3600, 3600),
                   analytics_enabled=False) as demo:
        gr.Markdown(
            "# steersample studio\n"
            "Same seeds, two samplers: **plain** (constant CFG, the model's schedule) against "
            "**steered** (guidance window in σ, shift or phase-aware schedule, steering); sample "
            "k uses seed + k on both sides. Beside each sample: its nearest training image, the "
            "ratio d(NN1)/d(NN2) and a copy badge (ratio < 1/3).", elem_id="studio-header")
        with gr.Row():
            with gr.Column(scale=2, min_width=440):
                with gr.Row():
                    model = gr.Dropdown(list(served), value=first.name, label="Model")
                    first_choices = [(n, c) for c, n in enumerate(first.class_names)]
                    class_id = gr.Dropdown(first_choices, value=first.default_class,
                                           label="Class", visible=first.kind == "class",
                                           elem_id="class")
                    prompt = gr.Textbox(label="Prompt", visible=first.kind == "prompt",
                                        max_lines=2)
                model_info = gr.Markdown(first.description)
                with gr.Row():
                    seed = gr.Number(value=LIMITS["seed"].default, precision=0, label="Seed",
                                     minimum=LIMITS["seed"].minimum,
                                     maximum=LIMITS["seed"].maximum, min_width=120)
                    num_samples = _slider("num_samples", elem_id="num-samples", min_width=120)
                    steps = _slider("steps", elem_id="steps", min_width=120)
                gr.Markdown("**Presets** (set the steered side)")
                with gr.Row():
                    preset_buttons = {p: gr.Button(p, size="sm", min_width=80) for p in PRESETS}
                guidance_scale = _slider("guidance_scale", value=best["guidance_scale"])
                with gr.Accordion("Guidance window (steered side)", open=True):
                    window_relative = gr.Checkbox(best["window_relative"],
                                                  label="relative to the phase boundary σ*",
                                                  elem_id="window-relative")
                    with gr.Row(visible=not best["window_relative"]) as absolute_row:
                        window_lo = _slider("window_lo", value=best["window_lo"],
                                            elem_id="window-lo")
                        window_hi = _slider("window_hi", value=best["window_hi"],
                                            elem_id="window-hi")
                    with gr.Row(visible=best["window_relative"]) as relative_row:
                        below_boundary = _slider("below_boundary")
                        above_boundary = _slider("above_boundary")
                    with gr.Row():
                        scale_above = _slider("scale_above", value=best["scale_above"])
                        scale_below = _slider("scale_below", value=best["scale_below"])
                with gr.Accordion("Schedule and steering (steered side)", open=True):
                    schedule = gr.Radio(list(SCHEDULES), value=best["schedule"],
                                        label="Schedule",
                                        info="phase-aware: a chosen share of the steps above σ*")
                    with gr.Row():
                        shift = _slider("shift", value=first.shift)
                        navigation_fraction = _slider("navigation_fraction",
                                                      visible=best["schedule"] == "phase-aware")
                    with gr.Row():
                        steering = gr.Dropdown(steerer_names(), value=best["steering"],
                                               label="Steering method", elem_id="steering")
                        strength = _slider("strength",
                                           value=best.get("strength", LIMITS["strength"].default),
                                           elem_id="strength")
                    steering_info = gr.Markdown(steerer_summary(best["steering"]))
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3, min_width=480):
                with gr.Row(equal_height=True):
                    with gr.Column():
                        plain_gallery = gr.Gallery(label="Plain", elem_id="gallery-plain",
                                                   columns=2, format="png", object_fit="contain",
                                                   height="auto", preview=False)
                        plain_stats = gr.Markdown(label="Plain summary", elem_id="stats-plain")
                    with gr.Column():
                        steered_gallery = gr.Gallery(label="Steered", elem_id="gallery-steered",
                                                     columns=2, format="png",
                                                     object_fit="contain", height="auto",
                                                     preview=False)
                        steered_stats = gr.Markdown(label="Steered summary",
                                                    elem_id="stats-steered")
                phase_plot = gr.Plot(label="Phase plot: oracle top-1 weight against σ",
                                     format="png", elem_id="phase-plot")
                with gr.Row():
                    report_button = gr.DownloadButton("Download JSON report", elem_id="download-report")
                    sheet_button = gr.DownloadButton("Download PNG sheet", elem_id="download-sheet")
                gr.Markdown(_HOW_TO_READ)

        controls = dict(guidance_scale=guidance_scale, window_relative=window_relative,
                        window_lo=window_lo, window_hi=window_hi, below_boundary=below_boundary,
                        above_boundary=above_boundary, scale_above=scale_above,
                        scale_below=scale_below, schedule=schedule, shift=shift,
                        steering=steering, strength=strength)
        preset_outputs = [controls[c] for c in _PRESET_CONTROLS] + [absolute_row, relative_row,
                                                                     navigation_fraction]

        def apply_preset(preset: str, w: float, model_name: str) -> list:
            values = preset_values(preset, w, served[model_name].shift)
            updates = [gr.update(value=values[c]) if c in values else gr.update()
                       for c in _PRESET_CONTROLS]
            relative = values.get("window_relative")
            rows = (_window_visibility(relative) if relative is not None
                    else (gr.update(), gr.update()))
            nav = (gr.update(visible=values["schedule"] == "phase-aware") if "schedule" in values
                   else gr.update())
            return updates + list(rows) + [nav]

        for preset, button in preset_buttons.items():
            button.click(partial(apply_preset, preset), [guidance_scale, model], preset_outputs,
                         api_visibility="private", queue=False)
        window_relative.change(_window_visibility, window_relative, [absolute_row, relative_row],
                               api_visibility="private", queue=False)
        schedule.change(lambda s: gr.update(visible=s == "phase-aware"), schedule,
                        navigation_fraction, api_visibility="private", queue=False)
        steering.change(steerer_summary, steering, steering_info, api_visibility="private",
                        queue=False)
        # a method picked by hand starts at its own default strength (presets set their own);
        # done in the browser, so the slider is right before the user can touch it
        defaults = {n: steerer_default_strength(n) for n in steerer_names()}
        steering.input(None, [steering, strength], strength,
                       js=f"(name, current) => ({json.dumps(defaults)})[name] ?? current")
        model.change(lambda m: _model_controls(served[m]), model,
                     [class_id, prompt, model_info, shift], api_visibility="private", queue=False)
        run.click(generate,
                  [model, class_id, prompt, seed, num_samples, steps, guidance_scale, scale_above,
                   scale_below, window_relative, window_lo, window_hi, below_boundary,
                   above_boundary, schedule, shift, navigation_fraction, steering, strength],
                  [plain_gallery, steered_gallery, plain_stats, steered_stats, phase_plot,
                   report_button, sheet_button],
                  api_name="generate", concurrency_limit=2,
                  preprocess=False)  # raw values: parse_request checks them, naming the control
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None,
           block: bool = True):
    """Queue and launch ``demo`` on ``host:port`` (port None: Gradio picks a free one)."""
    demo.queue(max_size=64)
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
                       show_error=True, css=CSS, theme=gr.themes.Soft(), footer_links=["api"],
                       quiet=not block)


def main(argv: Sequence[str] | None = None) -> int:
    """``python demos/app.py [options]``: exactly ``steersample demo [options]``."""
    import sys

    from steersample.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
