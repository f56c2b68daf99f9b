"""The studio's downloads: a JSON report of one comparison and a labelled PNG sheet.

The sheet is a grid with one row per seed, plain left and steered right, each cell the tile
the page shows (sample, nearest training image, badge, ratio, the judge's reading, distance
relative to held-out data), under a header naming the model, class, seeds, preset and the
settings of both sides. It draws any model's images.

The JSON report holds the controls that applied (``status.applied_controls``: no absolute
window values under a relative window, no strength without a steerer), each arm's guidance
schedule, scheduler options, steering, model evaluations, time, per-sample verdicts (seed,
nearest training index, ratio, copy flag, judge's class, relative distance) and full per-step
telemetry. Only the ``seconds`` fields vary between two runs of the same request.

File names carry the class, the first seed and the preset:
``steersample-class3-seed5-best-steering-report.json`` and ``...-sheet.png``.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from steersample.studio.render import arm_tiles, describe_arm
from steersample.studio.status import applied_controls

__all__ = ["report_dict", "sheet_png", "download_stem", "write_downloads", "DownloadFolder"]


def _arm_dict(arm: Any, scheduler_options: dict | None, steering: tuple) -> dict[str, Any]:
    samples = []
    for k, seed in enumerate(arm.seeds):
        entry: dict[str, Any] = {"seed": seed}
        if arm.ratios is not None:
            entry.update(nearest_index=arm.nearest_indices[k], ratio=arm.ratios[k],
                         is_copy=arm.copies[k])
        if arm.judge_labels is not None:
            entry["judge_class"] = arm.judge_labels[k]
        if arm.relative_distances is not None:
            entry["relative_distance"] = arm.relative_distances[k]
        samples.append(entry)
    return {
        "guidance": arm.guidance.to_dict(),
        "scheduler": scheduler_options or "the model's own scheduler",
        "steering": [repr(s) for s in steering],
        "model_evals": arm.model_evals,
        "copies": None if arm.copies is None else int(sum(arm.copies)),
        "seconds": arm.seconds,
        "samples": samples,
        "telemetry": arm.telemetry.as_dict(),
    }


def report_dict(comparison: Any, preset: str | None = None,
                random_seed: bool = False) -> dict[str, Any]:
    """The JSON report of a ``Comparison`` (plain Python types only); ``request`` lists only
    the controls that applied."""
    import steersample

    plan, model = comparison.plan, comparison.model
    profile = comparison.profile
    return {
        "tool": f"steersample {steersample.__version__} studio",
        "model": model.name,
        "model_kind": model.kind,
        "preset": preset,
        "request": applied_controls(comparison.request, plan.window, random_seed),
        "boundary_sigma": plan.boundary_sigma,
        "guidance_window": list(plan.window),
        "copy_test": "d(NN1)/d(NN2) < 1/3 against the model's training set",
        "relative_distance": None if model.heldout is None else
        "nearest-training distance over the median held-out sample's (of the class); "
        "1: as far as unseen real data, near 0: a copy",
        "phase_profile": None if profile is None else {
            "class": profile.label, "sigmas": profile.sigmas.tolist(),
            "top1": profile.top1.tolist(), "boundary_sigma": profile.boundary_sigma},
        "plain": _arm_dict(comparison.plain, None, ()),
        "steered": _arm_dict(comparison.steered, plan.steered_scheduler_options, plan.steering),
    }


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def sheet_png(comparison: Any, preset: str | None = None) -> bytes:
    """PNG bytes of the labelled sheet: a header, then one row per seed (plain | steered)."""
    model, request = comparison.model, comparison.request
    target = request.class_id
    pairs = list(zip(arm_tiles(comparison.plain, target), arm_tiles(comparison.steered, target)))
    cell_w = max(tile.width for pair in pairs for tile, _ in pair)
    cell_h = max(tile.height for pair in pairs for tile, _ in pair)
    pad, gap = 16, 12
    width = max(2 * cell_w + gap + 2 * pad, 900)
    what = (f"class {model.class_names[target]}" if target is not None
            else f"prompt “{request.prompt}”")
    last = request.seed + request.num_samples - 1
    header = [(f"steersample studio · {model.name} · {what} · seeds {request.seed}–{last} · "
               f"{request.steps} steps · preset {preset or 'custom'}", 26, (20, 20, 20)),
              (f"Plain: {describe_arm(comparison.plain, comparison)}", 20, (60, 60, 60)),
              (f"Steered: {describe_arm(comparison.steered, comparison)}", 20, (60, 60, 60))]
    lines: list[tuple[str, int, tuple]] = []
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for text, size, colour in header:  # wrap each header line to the sheet's width
        words, current = text.split(" "), ""
        for word in words:
            trial = f"{current} {word}".strip()
            if current and probe.textlength(trial, font=_font(size)) > width - 2 * pad:
                lines.append((current, size, colour))
                current = word
            else:
                current = trial
        lines.append((current, size, colour))
    header_h = sum(size + 8 for _, size, _ in lines) + 40
    height = header_h + len(pairs) * (cell_h + gap) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for text, size, colour in lines:
        draw.text((pad, y), text, fill=colour, font=_font(size))
        y += size + 8
    y += 8
    for column, name in enumerate(("plain", "steered")):
        draw.text((pad + column * (cell_w + gap), y), name, fill=(20, 20, 20), font=_font(22))
    y = header_h
    for (plain, _), (steered, _) in pairs:
        sheet.paste(plain, (pad, y))
        sheet.paste(steered, (pad + cell_w + gap, y))
        y += cell_h + gap
    buffer = io.BytesIO()
    sheet.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buffer, "png",
                                                                       optimize=True)
    return buffer.getvalue()


def download_stem(comparison: Any, preset: str | None) -> str:
    """``steersample-class3-seed5-best-steering``: class, first seed and preset, file-name safe."""
    request = comparison.request
    what = (f"class{request.class_id}" if request.class_id is not None
            else re.sub(r"[^a-z0-9]+", "-", (request.prompt or "").lower())[:24].strip("-"))
    name = f"steersample-{what}-seed{request.seed}-{preset or 'custom'}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


class DownloadFolder:
    """A private temporary folder of per-request subfolders; ones older than ``max_age`` go."""

    def __init__(self, max_age: float = 3600.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="steersample-studio-"))
        self.max_age = max_age

    def new(self) -> Path:
        now = time.time()
        for old in self.root.iterdir():
            try:
                if now - old.stat().st_mtime > self.max_age:
                    shutil.rmtree(old, ignore_errors=True)
            except FileNotFoundError:  # pruned by a concurrent request
                pass
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def write_downloads(comparison: Any, folder: Path, preset: str | None = None,
                    random_seed: bool = False) -> tuple[str, str]:
    """Write the report and the sheet into ``folder`` (named by :func:`download_stem`);
    return their paths."""
    stem = download_stem(comparison, preset)
    report = folder / f"{stem}-report.json"
    data = report_dict(comparison, preset, random_seed)
    report.write_text(json.dumps(data, indent=1) + "\n")
    sheet = folder / f"{stem}-sheet.png"
    sheet.write_bytes(sheet_png(comparison, preset))
    return str(report), str(sheet)
