"""Pictures and text the studio shows: sample tiles, the phase plot, the per-arm summary.

No gradio here; everything returns PIL images, matplotlib figures or Markdown strings.

A tile shows one sample beside its nearest training image, both enlarged with nearest-
neighbour interpolation (an 8×8 digit becomes 112×112 crisp pixels), and a caption with the
seed, the ratio d(NN1)/d(NN2) and a badge: red **COPY** when the ratio is below 1/3, orange
**off-class** when the judge reads another class, green **novel** otherwise; then what the
judge reads and the distance to the training set relative to held-out data, where known.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["COPY_COLOUR", "NOVEL_COLOUR", "OFF_CLASS_COLOUR", "enlarge", "verdict", "sample_tile",
           "arm_tiles", "comparison_tiles", "phase_figure", "phase_html", "phase_alt_text", "describe_arm",
           "arm_summary"]

COPY_COLOUR = (214, 39, 40)
NOVEL_COLOUR = (44, 160, 44)
OFF_CLASS_COLOUR = (196, 98, 0)
_FRAME = (205, 205, 205)
_TEXT = (40, 40, 40)
_DISPLAY = 88  # target side of a displayed image, pixels (8x8 digits: 11x)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def enlarge(image: np.ndarray, side: int = _DISPLAY) -> Image.Image:
    """``(H, W, C)`` float in [0, 1] -> PIL image about ``side`` pixels wide.

    Small images grow by an integer factor with nearest-neighbour interpolation (pixels stay
    square and sharp); large ones shrink with Lanczos.
    """
    array = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    pil = Image.fromarray((array * 255.0 + 0.5).astype(np.uint8))
    h, w = array.shape[:2]
    if max(h, w) <= side:
        factor = max(1, side // max(h, w))
        return pil.resize((w * factor, h * factor), Image.Resampling.NEAREST).convert("RGB")
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return pil.resize(size, Image.Resampling.LANCZOS).convert("RGB")


def verdict(is_copy: bool | None, judged: int | None, target: int | None) -> str | None:
    """The tile's badge: ``"COPY"`` (ratio < 1/3), ``"off-class"`` (the judge reads another
    class, so the sample is not a novel instance of its class), ``"novel"``; None untested."""
    if is_copy is None:
        return None
    if is_copy:
        return "COPY"
    if judged is not None and target is not None and judged != target:
        return "off-class"
    return "novel"


_BADGE_COLOUR = {"COPY": COPY_COLOUR, "novel": NOVEL_COLOUR, "off-class": OFF_CLASS_COLOUR}


def sample_tile(sample: np.ndarray, nearest: np.ndarray | None, seed: int,
                ratio: float | None, is_copy: bool | None,
                nearest_index: int | None = None, scale: int = 2, *, side: str = "",
                judged: int | None = None, target: int | None = None,
                relative: float | None = None) -> Image.Image:
    """One gallery item: the sample (and its nearest training image) with a captioned badge.

    Under the images: the badge (:func:`verdict`) and the ratio; then what the judge reads
    (``judged``, against the requested class ``target``) and the distance to the training set
    relative to held-out data (``relative``), when known. Drawn at ``scale`` times the layout
    size (2: sharp text when the browser shrinks the tile, and on high-density screens).
    """
    u = scale
    pad, gap, label_h, line = 6 * u, 8 * u, 19 * u, 19 * u
    left = enlarge(sample, _DISPLAY * u)
    right = enlarge(nearest, _DISPLAY * u) if nearest is not None else None
    badge = verdict(is_copy, judged, target)
    lines = [text for text in (_judge_text(judged, target), _distance_text(relative)) if text]
    w = left.width + (gap + right.width if right is not None else 0) + 2 * pad
    h = label_h + left.height + (30 * u if ratio is not None else 8 * u) + line * len(lines) + 2 * pad
    tile = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(tile)
    small = _font(14 * u)
    colour = _FRAME if badge is None else _BADGE_COLOUR[badge]
    top = pad + label_h
    tile.paste(left, (pad, top))
    draw.rectangle((pad - 3 * u, top - 3 * u, pad + left.width + 3 * u - 1,
                    top + left.height + 3 * u - 1), outline=colour, width=3 * u)
    draw.text((pad, pad - 2 * u), f"{side} · seed {seed}" if side else f"seed {seed}",
              fill=_TEXT, font=small)
    if right is not None:
        x = pad + left.width + gap
        tile.paste(right, (x, top))
        draw.rectangle((x - u, top - u, x + right.width + u - 1, top + right.height + u - 1),
                       outline=_FRAME, width=u)
        label = "nearest" if nearest_index is None else f"nearest #{nearest_index}"
        title_end = pad + draw.textlength(f"{side} · seed {seed}" if side else f"seed {seed}",
                                          font=small) + 6 * u
        if x + draw.textlength(label, font=small) > w - pad // 2 or x < title_end:
            label = label.replace("nearest ", "")  # "#612": the side and seed come first
        x_label = max(x, w - pad // 2 - draw.textlength(label, font=small))
        draw.text((x_label, pad - 2 * u), label, fill=(110, 110, 110), font=small)
    y = top + left.height + 8 * u
    if ratio is not None and badge is not None:
        font = _font(15 * u)
        box = draw.textbbox((0, 0), badge, font=font)
        bw, bh = box[2] - box[0] + 14 * u, 22 * u
        x0 = pad - 3 * u
        draw.rounded_rectangle((x0, y, x0 + bw, y + bh), radius=6 * u, fill=colour)
        draw.text((x0 + 7 * u, y + (bh - (box[3] - box[1])) / 2 - box[1]), badge, fill="white",
                  font=font)
        draw.text((x0 + bw + 8 * u, y + 3 * u), f"ratio {ratio:.2f}", fill=_TEXT,
                  font=_font(14 * u))
        y += 30 * u
    for text in lines:
        fill = OFF_CLASS_COLOUR if text.startswith("judge") and ", not " in text else _TEXT
        draw.text((pad - 3 * u, y), text, fill=fill, font=small)
        y += line
    return tile


def _judge_text(judged: int | None, target: int | None) -> str | None:
    if judged is None:
        return None
    if target is None or judged == target:
        return f"judge reads a {judged}"
    return f"judge reads a {judged}, not {target}"


def _distance_text(relative: float | None) -> str | None:
    if relative is None:
        return None
    if not math.isfinite(relative):
        return "distance: no held-out data"
    return f"dist {relative:.2f} (held-out: 1)"


def _caption(arm: Any, k: int, target: int | None) -> str:
    """Everything the tile says, as text: screen readers and the enlarged view read it."""
    seed = arm.seeds[k]
    parts = []
    if arm.ratios is not None:
        badge = verdict(arm.copies[k], _at(arm.judge_labels, k), target)
        parts.append(f"{badge}, ratio {arm.ratios[k]:.2f}")
    judged = _judge_text(_at(arm.judge_labels, k), target)
    if judged:
        parts.append(judged)
    relative = _at(arm.relative_distances, k)
    if relative is not None and math.isfinite(relative):
        parts.append(f"distance to the training set {relative:.2f} times a held-out sample's")
    if arm.nearest_indices is not None:
        parts.append(f"nearest training image #{arm.nearest_indices[k]}")
    return f"{arm.name} · seed {seed}" + (": " + ", ".join(parts) if parts else "")


def _at(values: Any, k: int) -> Any:
    return None if values is None else values[k]


def arm_tiles(arm: Any, target: int | None = None) -> list[tuple[Image.Image, str]]:
    """``[(tile, caption), ...]`` of one ``ArmResult`` in seed order (``target``: the class)."""
    items = []
    for k, seed in enumerate(arm.seeds):
        tile = sample_tile(arm.images[k], _at(arm.nearest_images, k), seed, _at(arm.ratios, k),
                           _at(arm.copies, k), _at(arm.nearest_indices, k), side=arm.name,
                           judged=_at(arm.judge_labels, k), target=target,
                           relative=_at(arm.relative_distances, k))
        items.append((tile, _caption(arm, k, target)))
    return items


def comparison_tiles(comparison: Any) -> list[tuple[Image.Image, str]]:
    """Gallery value of a ``Comparison``: plain and steered tile of each seed, in turn.

    In a two-column gallery each row is one seed, plain left, steered right."""
    target = comparison.request.class_id
    plain = arm_tiles(comparison.plain, target)
    steered = arm_tiles(comparison.steered, target)
    return [item for pair in zip(plain, steered) for item in pair]


def _mean_top1(arm: Any) -> tuple[np.ndarray, np.ndarray] | None:
    top1 = arm.telemetry.oracle_top1
    if top1 is None:
        return None
    return arm.telemetry.sigmas.numpy(), top1.double().mean(dim=1).numpy()


def phase_figure(comparison: Any):
    """Matplotlib figure: oracle top-1 weight against σ, σ*, the guidance window shaded.

    Curves: the class's phase profile (mean top-1 posterior weight on forward-noised training
    images, which defines σ*) and, per arm, the mean top-1 weight along the generated
    trajectories at each step's σ (from telemetry). σ runs from 1 (noise, left) to 0 (data).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.7), dpi=100)
    ax = fig.add_axes((0.08, 0.33, 0.9, 0.63))
    g = comparison.steered.guidance
    lo, hi = comparison.plan.window
    ax.axvspan(lo, hi, color="#1f77b4", alpha=0.13, lw=0,
               label=f"guidance window ({lo:.2f}, {hi:.2f}], w = {g.scale:g}")
    if g.scale_above != 1.0 and hi < 1.0:
        ax.axvspan(hi, 1.0, color="#ff7f0e", alpha=0.15, lw=0, hatch="//",
                   label=f"w = {g.scale_above:g} above the window")
    if g.scale_below != 1.0 and lo > 0.0:
        ax.axvspan(0.0, lo, color="#9467bd", alpha=0.12, lw=0,
                   label=f"w = {g.scale_below:g} below the window")
    profile = comparison.profile
    if profile is not None:
        ax.plot(profile.sigmas.numpy(), profile.top1.numpy(), color="black", lw=2,
                label="training images, noised (profile)")
        sigma_star = float(profile.boundary_sigma)
        if math.isfinite(sigma_star):
            ax.axvline(sigma_star, color="#d62728", ls="--", lw=1.5,
                       label=f"σ* = {sigma_star:.3f} (top-1 = 0.5)")
    for arm, colour, marker in ((comparison.plain, "#7f7f7f", "o"),
                                (comparison.steered, "#1f77b4", "s")):
        curve = _mean_top1(arm)
        if curve is not None:
            ax.plot(curve[0], curve[1], color=colour, marker=marker, ms=3.5, lw=1.2,
                    label=f"{arm.name} samples (mean over seeds)")
    ax.set_xlim(1.0, 0.0)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("σ   (1 = noise  →  0 = data)")
    ax.set_ylabel("oracle top-1 weight")
    ax.grid(alpha=0.3)
    if profile is None and comparison.plain.telemetry.oracle_top1 is None:
        ax.text(0.5, 0.5, "no training set: no oracle curve", ha="center", va="center",
                transform=ax.transAxes, color="#7f7f7f")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8.5,
              frameon=False)
    return fig


def phase_alt_text(comparison: Any) -> str:
    """What the phase plot shows, in words (its ``alt`` text)."""
    lo, hi = comparison.plan.window
    g = comparison.steered.guidance
    parts = ["Phase plot: oracle top-1 weight against σ, from 1 (noise) to 0 (data)",
             f"guidance window ({lo:.2f}, {hi:.2f}] shaded, w = {g.scale:g}"]
    profile = comparison.profile
    if profile is not None and math.isfinite(float(profile.boundary_sigma)):
        parts.append(f"the training images' curve crosses 0.5 at σ* = "
                     f"{float(profile.boundary_sigma):.3f}")
    for arm in (comparison.plain, comparison.steered):
        curve = _mean_top1(arm)
        if curve is not None:
            parts.append(f"{arm.name} samples end at top-1 weight {float(curve[1][-1]):.2f}")
    return "; ".join(parts) + "."


def phase_html(comparison: Any) -> str:
    """The phase plot as an HTML figure: a heading above the image (never over it), the PNG
    inline, and :func:`phase_alt_text` as its alt text."""
    import base64
    import html
    import io

    buffer = io.BytesIO()
    phase_figure(comparison).savefig(buffer, format="png", dpi=100)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    alt = html.escape(phase_alt_text(comparison), quote=True)
    return ('<figure class="phase-figure" style="margin:0">'
            '<figcaption style="font-weight:600;margin-bottom:4px">Phase plot: oracle top-1 '
            'weight against σ</figcaption>'
            f'<img src="data:image/png;base64,{data}" alt="{alt}" '
            'style="width:100%;height:auto;display:block"></figure>')


def describe_arm(arm: Any, comparison: Any) -> str:
    """One line: what arm ``arm`` ran (scales and window, schedule with its shift, steerer)."""
    request, plan = comparison.request, comparison.plan
    if arm.name == "plain":
        shift = comparison.model.shift
        return f"constant CFG w = {request.guidance_scale:g} · model's schedule (shift {shift:g}) · no steering"
    g = arm.guidance
    lo, hi = plan.window
    parts = [f"CFG {g.scale:g} on σ ∈ ({lo:.2f}, {hi:.2f}]"]
    if g.scale_above != 1.0 and hi < 1.0:
        parts.append(f"{g.scale_above:g} above")
    if g.scale_below != 1.0 and lo > 0.0:
        parts.append(f"{g.scale_below:g} below")
    if request.schedule == "profile":
        parts.append("profile grid (steps dense where the class's posterior mean moves fastest)")
    elif request.schedule == "phase-aware":
        star = plan.boundary_sigma
        at = f" = {star:.3f}" if star is not None else ""
        parts.append(f"phase-aware grid ({request.navigation_fraction:.0%} of steps above "
                     f"σ*{at}), shift {request.shift:g}")
    else:
        parts.append(f"shift {request.shift:g}")
    if plan.steering:
        parts.append(f"steering {request.steering} ({request.strength:g})")
    else:
        parts.append("no steerer")
    return " · ".join(parts)


def arm_summary(arm: Any, comparison: Any) -> str:
    """Markdown: what the arm ran, its model evaluations, time and copy count."""
    copies = arm.copies
    copy_text = ("copies: n/a (no training set)" if copies is None else
                 f"copies: **{sum(copies)}/{len(copies)}** (ratio < 1/3)")
    steps = comparison.request.steps
    judged = ""
    if arm.judge_labels is not None:
        target = comparison.request.class_id
        hits = sum(label == target for label in arm.judge_labels)
        judged = f" · judge reads **{hits}/{len(arm.judge_labels)}** as a {target}"
    distance = ""
    finite = [d for d in (arm.relative_distances or ()) if math.isfinite(d)]
    if finite:
        distance = (f" · median distance **{float(np.median(finite)):.2f}** (held-out data: 1)")
    return (f"**{arm.name.capitalize()}**: {describe_arm(arm, comparison)}  \n"
            f"model evaluations: **{arm.model_evals}** in {steps} steps · "
            f"time: **{arm.seconds:.2f} s** · {copy_text}{judged}{distance}")
