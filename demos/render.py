"""Pictures and text the studio shows: sample tiles, the phase plot, the per-arm summary.

No gradio here; everything returns PIL images, matplotlib figures or Markdown strings.

A tile shows one sample beside its nearest training image, both enlarged with nearest-
neighbour interpolation (an 8×8 digit becomes 112×112 crisp pixels), and a caption with the
seed, the ratio d(NN1)/d(NN2) and a badge: red **COPY** when the ratio is below 1/3, green
**novel** otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["COPY_COLOUR", "NOVEL_COLOUR", "enlarge", "sample_tile", "arm_tiles", "phase_figure",
           "arm_summary"]

COPY_COLOUR = (214, 39, 40)
NOVEL_COLOUR = (44, 160, 44)
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


def sample_tile(sample: np.ndarray, nearest: np.ndarray | None, seed: int,
                ratio: float | None, is_copy: bool | None,
                nearest_index: int | None = None, scale: int = 2) -> Image.Image:
    """One gallery item: the sample (and its nearest training image) with a captioned badge.

    Drawn at ``scale`` times the layout size (2: sharp text when the browser shrinks the tile
    into a gallery cell, and on high-density screens).
    """
    u = scale
    pad, gap, label_h, caption = 6 * u, 8 * u, 19 * u, 30 * u
    left = enlarge(sample, _DISPLAY * u)
    right = enlarge(nearest, _DISPLAY * u) if nearest is not None else None
    w = left.width + (gap + right.width if right is not None else 0) + 2 * pad
    h = label_h + left.height + caption + 2 * pad
    tile = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(tile)
    small = _font(14 * u)
    colour = _FRAME if is_copy is None else (COPY_COLOUR if is_copy else NOVEL_COLOUR)
    top = pad + label_h
    tile.paste(left, (pad, top))
    draw.rectangle((pad - 3 * u, top - 3 * u, pad + left.width + 3 * u - 1,
                    top + left.height + 3 * u - 1), outline=colour, width=3 * u)
    draw.text((pad, pad - 2 * u), f"seed {seed}", fill=_TEXT, font=small)
    if right is not None:
        x = pad + left.width + gap
        tile.paste(right, (x, top))
        draw.rectangle((x - u, top - u, x + right.width + u - 1, top + right.height + u - 1),
                       outline=_FRAME, width=u)
        label = "nearest" if nearest_index is None else f"nearest #{nearest_index}"
        draw.text((x, pad - 2 * u), label, fill=(110, 110, 110), font=small)
    y = top + left.height + 8 * u
    if ratio is not None:
        text = "COPY" if is_copy else "novel"
        font = _font(15 * u)
        box = draw.textbbox((0, 0), text, font=font)
        bw, bh = box[2] - box[0] + 14 * u, 22 * u
        x0 = pad - 3 * u
        draw.rounded_rectangle((x0, y, x0 + bw, y + bh), radius=6 * u, fill=colour)
        draw.text((x0 + 7 * u, y + (bh - (box[3] - box[1])) / 2 - box[1]), text, fill="white",
                  font=font)
        draw.text((x0 + bw + 8 * u, y + 3 * u), f"ratio {ratio:.2f}", fill=_TEXT,
                  font=_font(14 * u))
    return tile


def arm_tiles(arm: Any) -> list[tuple[Image.Image, str]]:
    """Gallery value for one ``ArmResult``: ``[(tile, caption), ...]`` in seed order.

    The caption repeats the tile's verdict for screen readers and the full-size preview.
    """
    ratios, copies, nearest_idx = arm.ratios, arm.copies, arm.nearest_indices
    items = []
    for k, seed in enumerate(arm.seeds):
        nearest = arm.nearest_images[k] if arm.nearest_images is not None else None
        ratio = ratios[k] if ratios is not None else None
        copy = copies[k] if copies is not None else None
        index = nearest_idx[k] if nearest_idx is not None else None
        tile = sample_tile(arm.images[k], nearest, seed, ratio, copy, index)
        if ratio is None:
            caption = f"seed {seed}"
        else:
            verdict = "COPY" if copy else "novel"
            caption = f"seed {seed}: {verdict}, ratio {ratio:.2f}, nearest training image #{index}"
        items.append((tile, caption))
    return items


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


def _describe(arm: Any, comparison: Any) -> str:
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
    if request.schedule == "phase-aware":
        parts.append(f"phase-aware grid ({request.navigation_fraction:.0%} of steps above σ*)")
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
    verdict = ("copies: n/a (no training set)" if copies is None else
               f"copies: **{sum(copies)}/{len(copies)}** (ratio < 1/3)")
    steps = comparison.request.steps
    judged = ""
    if arm.judge_labels is not None:
        target = comparison.request.class_id
        hits = sum(label == target for label in arm.judge_labels)
        judged = f" · judge reads **{hits}/{len(arm.judge_labels)}** as a {target}"
    return (f"**{arm.name.capitalize()}**: {_describe(arm, comparison)}  \n"
            f"model evaluations: **{arm.model_evals}** in {steps} steps · "
            f"time: **{arm.seconds:.2f} s** · {verdict}{judged}")
