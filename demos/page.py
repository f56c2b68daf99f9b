"""The studio page: its layout and the handlers that keep it honest.

Layout: controls on the left, results on the right (on phones the results come first).
The results are one two-column gallery, each row one seed (plain left, steered right), under
the Generate button, a message line (why the last request was refused, if it was) and a line
naming the settings that made the results (marked stale when a control moves).

Handlers: ``generate`` (the ``/generate`` endpoint; a refusal returns its reason and leaves
every result as it is), and small unqueued ones that keep the page's text in step with the
controls: preset status, stale marker, and controls that cannot act (disabled, with why).
"""

from __future__ import annotations

import atexit
import json
import logging
import random
from functools import partial
from typing import Any, Mapping

import gradio as gr

from steersample.studio.downloads import DownloadFolder, write_downloads
from steersample.studio.engine import StudioModel, run_comparison
from steersample.studio.render import arm_summary, comparison_tiles, phase_html
from steersample.studio.settings import (LIMITS, PRESET_DESCRIPTIONS, PRESETS, RANDOM_SEED,
                                         SCHEDULES, StudioRequest, parse_request,
                                         preset_values, steerer_default_strength,
                                         steerer_names, steerer_summary)
from steersample.studio.status import (active_preset, applied_controls, changed_controls,
                                       describe_change, outer_scale_reasons, preset_changes,
                                       run_caption, strength_state)

__all__ = ["build_page", "HOW_TO_READ"]

log = logging.getLogger("steersample.studio")

HOW_TO_READ = """
**How to read it.** Each row is one seed: plain left, steered right. A tile shows the sample
(framed green when **novel**, red when a **COPY**, orange when **off-class**: the judge reads
another class, so it is no new instance of its own) beside its nearest training image;
*ratio* is d(NN1)/d(NN2) against the training set (near 0: sits on one training image);
*judge reads* is what an independent classifier sees in the sample;
*dist* is its distance to the training set over that of a typical real image the model never
saw (held-out: 1, as far as unseen real data; near 0: a copy). The plot shows how sharply
the empirical oracle's posterior points at a single training image as noise falls: the black
curve for noised training images (it crosses 0.5 at the phase boundary **σ\\***, red), the dots for these
samples. Above σ\\* sampling *navigates*, below it *refines*. The steered side applies the
guidance scale w inside the shaded window and the outer scales outside it.
"""

_REQUEST_FIELDS = tuple(StudioRequest.__dataclass_fields__)

# controls the preset buttons may set, in the order of their outputs
_PRESET_CONTROLS = ("guidance_scale", "window_relative", "window_lo", "window_hi",
                    "below_boundary", "above_boundary", "scale_above", "scale_below",
                    "schedule", "shift", "steering", "strength")


def _slider(name: str, **overrides: Any) -> gr.Slider:
    limit = LIMITS[name]
    options = dict(minimum=limit.minimum, maximum=limit.maximum, value=limit.default,
                   step=limit.step, label=limit.label, info=limit.info or None)
    options.update(overrides)
    return gr.Slider(**options)


def _model_controls(model: StudioModel, steering: str | None = None) -> tuple:
    """Updates for (class, prompt, prompt chooser, description, shift, steering) when ``model``
    is selected (a prompt model starts on its first prompt and offers the steerers it can run:
    ``StudioModel.steerers``)."""
    is_class = model.kind == "class"
    choices = [(name, c) for c, name in enumerate(model.class_names)]
    offered = model.steerers
    keep = steering if steering in offered else ("attractor" if "attractor" in offered
                                                  else offered[0])
    first_prompt = model.prompts[0] if model.prompts else None
    return (gr.update(choices=choices, value=model.default_class, visible=is_class),
            gr.update(visible=not is_class) if is_class or first_prompt is None
            else gr.update(visible=True, value=first_prompt),
            gr.update(choices=list(model.prompts), value=first_prompt,
                      visible=bool(model.prompts)),
            gr.update(value=model.description),
            gr.update(value=model.shift), gr.update(choices=offered, value=keep))


def _preset_context(served: Mapping[str, StudioModel], name: Any) -> dict[str, Any]:
    """What the presets depend on: the model's kind and whether its store labels its prompts."""
    model = served.get(name)
    return {"kind": model.kind, "labelled": model.labelled} if model is not None else {"kind": "class"}


def _window_visibility(relative: bool) -> tuple:
    return gr.update(visible=not relative), gr.update(visible=bool(relative))


def _class_name(model: StudioModel, class_id: Any) -> str | None:
    if model.kind != "class" or class_id is None:
        return None
    try:
        return model.class_names[int(class_id)]
    except (ValueError, IndexError, TypeError):
        return str(class_id)


def _preset_text(values: Mapping[str, Any], clicked: str | None, shift: float,
                 kind: str = "class", labelled: bool = False) -> str:
    """The line under the preset buttons: the active preset and what it does, or what moved."""
    active = active_preset(values, shift, kind, labelled)
    if active is not None:
        return f"Preset **{active}** is active: {PRESET_DESCRIPTIONS[active]}."
    if clicked in PRESETS:
        moved = [describe_change(k, then, now) for k, then, now in
                 preset_changes(clicked, values, shift, kind, labelled)]
        return (f"Custom settings: moved away from **{clicked}** ({'; '.join(moved)}). "
                "Click a preset to return to it.")
    return "Custom settings (no preset matches)."


def _run_text(last: Mapping[str, Any] | None, values: Mapping[str, Any]) -> tuple[str, bool]:
    """The line above the results: what made them, and whether controls moved since."""
    if not last:
        return "No results yet: set the controls and press **Generate** (or Enter in Seed).", False
    applied = last["applied"]
    text = f"Showing: {last['caption']}."
    changed = changed_controls(applied, values)
    if changed:
        moves = "; ".join(describe_change(k, applied[k], values[k]) for k in changed)
        text = (f"⚠ **Stale**: controls changed since these results were made ({moves}). "
                f"Press **Generate** to update.  \n{text}")
    return text, bool(changed)


def build_page(served: Mapping[str, StudioModel]) -> gr.Blocks:
    """The ``gr.Blocks`` page serving ``served`` (name -> model); see the module docstring."""
    first = next(iter(served.values()))
    downloads = DownloadFolder()
    atexit.register(downloads.cleanup)
    best = preset_values("best steering", LIMITS["guidance_scale"].default, first.shift,
                         first.kind, first.labelled)

    def generate(model: str, class_id: int | None, prompt: str | None, seed: float,
                 num_samples: float, steps: float, guidance_scale: float, scale_above: float,
                 scale_below: float, window_relative: bool, window_lo: float, window_hi: float,
                 below_boundary: float, above_boundary: float, schedule: str, shift: float,
                 navigation_fraction: float, steering: str, strength: float):
        """Sample plain and steered on the same seeds; return tiles, summaries, plot, files,
        the message (the reason when refused: then every other output stays as it was) and
        the line naming the results' settings."""
        values = {key: value for key, value in locals().items() if key in _REQUEST_FIELDS}
        try:
            request = parse_request(values, models=served)
            random_seed = values["seed"] == RANDOM_SEED and not isinstance(values["seed"], bool)
            comparison = run_comparison(served[request.model], request)
            preset = active_preset(values, served[request.model].shift,
                                   **_preset_context(served, request.model))
            report, sheet = write_downloads(comparison, downloads.new(), preset, random_seed)
            plot = phase_html(comparison)
        except (ValueError, TypeError, FileNotFoundError) as err:
            return _refused(f"**Not generated**: {err}")
        except Exception as err:  # a bug or a resource problem: log it, show one line
            log.exception("studio request failed")
            return _refused(f"**Generation failed** ({type(err).__name__}: {err})")
        applied = applied_controls(request, comparison.plan.window, random_seed)
        caption = run_caption(applied, _class_name(served[request.model], request.class_id),
                              preset)
        return (comparison_tiles(comparison), arm_summary(comparison.plain, comparison),
                arm_summary(comparison.steered, comparison), plot, report, sheet, "",
                f"Showing: {caption}.",
                {"applied": applied, "caption": caption})

    def _refused(message: str) -> tuple:
        gr.Warning(message.replace("**", ""))  # a toast as well; the message line stays
        keep = gr.skip()
        return (keep,) * 6 + (message + "  \nThe results below are from the last good run.",
                              keep, keep)

    with gr.Blocks(title="steersample studio", delete_cache=(3600, 3600),
                   analytics_enabled=False) as demo:
        gr.Markdown(
            "# steersample studio\n"
            "Same seeds, two samplers: **plain** (constant CFG, the model's schedule) against "
            "**steered** (guidance window in σ, shift, phase-aware or profile schedule, "
            "steering). Each "
            "row of results is one seed, plain left and steered right.", elem_id="studio-header")
        last_run = gr.State(None)
        clicked_preset = gr.State("best steering")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=340, elem_id="controls-column"):
                with gr.Row():
                    model = gr.Dropdown(list(served), value=first.name, label="Model")
                    first_choices = [(n, c) for c, n in enumerate(first.class_names)]
                    class_id = gr.Dropdown(first_choices, value=first.default_class,
                                           label="Class", visible=first.kind == "class",
                                           elem_id="class")
                    prompt = gr.Textbox(label="Prompt", visible=first.kind == "prompt",
                                        max_lines=2, elem_id="prompt",
                                        value=first.prompts[0] if first.prompts else "",
                                        info="free text, or pick a training prompt")
                prompt_choice = gr.Dropdown(list(first.prompts),
                                            value=first.prompts[0] if first.prompts else None,
                                            label="Training prompts (from the prompts file)",
                                            visible=bool(first.prompts), elem_id="prompt-choice")
                model_info = gr.Markdown(first.description)
                with gr.Row(equal_height=True):
                    seed = gr.Number(value=LIMITS["seed"].default, precision=0, label="Seed",
                                     info="−1: a new random seed each run; Enter runs",
                                     minimum=RANDOM_SEED, maximum=LIMITS["seed"].maximum,
                                     min_width=160, elem_id="seed", scale=3)
                    dice = gr.Button("Random seed", size="sm", min_width=80, scale=1,
                                     elem_id="random-seed")
                with gr.Row():
                    num_samples = _slider("num_samples", elem_id="num-samples", min_width=200)
                    steps = _slider("steps", elem_id="steps", min_width=200)
                gr.Markdown("**Presets** (set the steered side)")
                with gr.Row():
                    preset_buttons = {p: gr.Button(p, size="sm", min_width=80,
                                                   elem_id=f"preset-{p.replace(' ', '-')}")
                                      for p in PRESETS}
                preset_info = gr.Markdown(elem_id="preset-info")
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
                        scale_above = _slider("scale_above", value=best["scale_above"],
                                              elem_id="scale-above")
                        scale_below = _slider("scale_below", value=best["scale_below"],
                                              elem_id="scale-below")
                with gr.Accordion("Schedule and steering (steered side)", open=True):
                    schedule = gr.Radio(list(SCHEDULES), value=best["schedule"],
                                        label="Schedule", elem_id="schedule",
                                        info="phase-aware: a chosen share of the steps above σ*; "
                                        "profile: steps dense where the class's posterior "
                                        "mean moves fastest (from_profile)")
                    with gr.Row():
                        shift = _slider("shift", value=first.shift, elem_id="shift")
                        navigation_fraction = _slider("navigation_fraction",
                                                      visible=best["schedule"] == "phase-aware")
                    with gr.Row():
                        steering = gr.Dropdown(first.steerers, value=best["steering"],
                                               label="Steering method", elem_id="steering")
                        strength = _slider("strength",
                                           value=best.get("strength", LIMITS["strength"].default),
                                           elem_id="strength")
                    steering_info = gr.Markdown(steerer_summary(best["steering"]))
            with gr.Column(scale=3, min_width=560, elem_id="results-column"):
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                message = gr.Markdown(elem_id="message")
                run_info = gr.Markdown(elem_id="run-info")
                gr.Markdown("Each row is one seed: **plain** left, **steered** right. Click a "
                            "tile to enlarge it.", elem_id="results-legend")
                gallery = gr.Gallery(label="Results: plain and steered tile of each seed",
                                     show_label=False, elem_id="results-gallery", columns=2, format="png",
                                     object_fit="contain", height="auto", preview=False,
                                     interactive=False, buttons=["download", "fullscreen"])
                with gr.Row(equal_height=True):
                    plain_stats = gr.Markdown(elem_id="stats-plain")
                    steered_stats = gr.Markdown(elem_id="stats-steered")
                phase_plot = gr.HTML(elem_id="phase-plot", js_on_load=None)
                with gr.Row():
                    report_button = gr.DownloadButton("Download JSON report", interactive=False,
                                                      elem_id="download-report")
                    sheet_button = gr.DownloadButton("Download PNG sheet", interactive=False,
                                                     elem_id="download-sheet")
                gr.Markdown("Downloads hold the results on screen (available after the first run).",
                            elem_id="downloads-note")
                gr.Markdown(HOW_TO_READ)

        by_name = dict(model=model, class_id=class_id, prompt=prompt, seed=seed,
                       num_samples=num_samples, steps=steps, guidance_scale=guidance_scale,
                       scale_above=scale_above, scale_below=scale_below,
                       window_relative=window_relative, window_lo=window_lo, window_hi=window_hi,
                       below_boundary=below_boundary, above_boundary=above_boundary,
                       schedule=schedule, shift=shift, navigation_fraction=navigation_fraction,
                       steering=steering, strength=strength)
        controls = [by_name[f] for f in _REQUEST_FIELDS]
        private = dict(api_visibility="private", queue=False, show_progress="hidden")

        # --- the page's own text: run line (stale marker), preset line, active preset button
        def page_state(last, clicked, *raw):
            values = dict(zip(_REQUEST_FIELDS, raw))
            shift_now = served[values["model"]].shift if values["model"] in served else 1.0
            text, stale = _run_text(last, values)
            active = active_preset(values, shift_now, **_preset_context(served, values["model"]))
            buttons = [gr.update(elem_classes=["active-preset"] if p == active else [])
                       for p in PRESETS]
            return (gr.update(value=text, elem_classes=["stale"] if stale else []),
                    _preset_text(values, clicked, shift_now, **_preset_context(served, values["model"])),
                    gr.update(elem_classes=["stale-results"] if stale else []), *buttons)

        state_outputs = [run_info, preset_info, gallery, *preset_buttons.values()]
        refresh = dict(fn=page_state, inputs=[last_run, clicked_preset, *controls],
                       outputs=state_outputs, **private)
        gr.on([c.change for c in controls], **refresh)

        # --- controls that cannot act: disabled, with the reason as their info line
        def outer_scales(model_name, class_value, relative, lo, hi, below, above):
            model_ = served.get(model_name)
            star = None
            if relative and model_ is not None and model_.reference is not None:
                try:
                    star = model_.boundary_sigma(int(class_value) if class_value is not None
                                                 else None)
                except (TypeError, ValueError):
                    star = None
            why_above, why_below = outer_scale_reasons(
                dict(window_relative=relative, window_lo=lo, window_hi=hi,
                     below_boundary=below, above_boundary=above), star)
            return (gr.update(interactive=why_above is None,
                              info=why_above or LIMITS["scale_above"].info),
                    gr.update(interactive=why_below is None,
                              info=why_below or LIMITS["scale_below"].info))

        window_inputs = [model, class_id, window_relative, window_lo, window_hi,
                         below_boundary, above_boundary]
        gr.on([c.change for c in window_inputs], outer_scales, window_inputs,
              [scale_above, scale_below], **private)

        def strength_control(name, current):
            enabled, maximum, note = strength_state(name)
            update = dict(interactive=enabled, maximum=maximum, info=note or None)
            if isinstance(current, (int, float)) and current > maximum:
                update["value"] = maximum
            return gr.update(**update), steerer_summary(name)

        steering.change(strength_control, [steering, strength], [strength, steering_info],
                        **private)
        # a method picked by hand starts at its own default strength (presets set their own);
        # done in the browser, so the slider is right before the user can touch it
        defaults = {n: steerer_default_strength(n) for n in steerer_names()}
        steering.input(None, [steering, strength], strength,
                       js=f"(name, current) => ({json.dumps(defaults)})[name] ?? current")
        demo.load(outer_scales, window_inputs, [scale_above, scale_below], **private)
        demo.load(strength_control, [steering, strength], [strength, steering_info], **private)
        demo.load(**refresh)

        # --- presets
        preset_outputs = [by_name[c] for c in _PRESET_CONTROLS] + [
            absolute_row, relative_row, navigation_fraction, clicked_preset]

        def apply_preset(preset: str, w: float, model_name: str) -> list:
            values = preset_values(preset, w, served[model_name].shift, **_preset_context(served, model_name))
            updates = [gr.update(value=values[c]) if c in values else gr.update()
                       for c in _PRESET_CONTROLS]
            relative = values.get("window_relative")
            rows = (_window_visibility(relative) if relative is not None
                    else (gr.update(), gr.update()))
            nav = (gr.update(visible=values["schedule"] == "phase-aware") if "schedule" in values
                   else gr.update())
            return updates + list(rows) + [nav, preset]

        for preset, button in preset_buttons.items():
            button.click(partial(apply_preset, preset), [guidance_scale, model], preset_outputs,
                         **private).then(**refresh)
        window_relative.change(_window_visibility, window_relative, [absolute_row, relative_row],
                               **private)
        def schedule_controls(name):
            profile = name == "profile"
            return (gr.update(visible=name == "phase-aware"),
                    gr.update(interactive=not profile,
                              info="no effect: the profile grid sets its own spacing" if profile
                              else LIMITS["shift"].info))

        schedule.change(schedule_controls, schedule, [navigation_fraction, shift], **private)
        model.change(lambda m, s: _model_controls(served[m], s), [model, steering],
                     [class_id, prompt, prompt_choice, model_info, shift, steering], **private)
        prompt_choice.input(lambda p: gr.update(value=p) if p else gr.update(), prompt_choice,
                            prompt, **private)
        dice.click(lambda n: random.randrange(0, LIMITS["seed"].maximum - int(n or 1) + 2),
                   num_samples, seed, **private)

        def idle(last):
            ready = gr.update(interactive=last is not None)
            return gr.update(value="Generate", interactive=True), ready, ready

        # --- generate: the button says "Running…" and is disabled until the run ends
        busy = gr.on([run.click, seed.submit],
                     lambda: gr.update(value="Running…", interactive=False), None, run,
                     **private)
        busy.then(generate, controls,
                  [gallery, plain_stats, steered_stats, phase_plot, report_button, sheet_button,
                   message, run_info, last_run],
                  api_name="generate", concurrency_limit=2, show_progress_on=[gallery],
                  preprocess=False  # raw values: parse_request checks them, naming the control
                  ).then(idle, last_run, [run, report_button, sheet_button],
                         **private).then(**refresh)
    return demo
