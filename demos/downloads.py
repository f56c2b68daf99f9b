"""The studio's downloads: a JSON report of one comparison and the PNG sheet.

The sheet is ``steersample compare``'s (``steersample.commands._compare_report.render_sheet``:
plain | steered, every sample beside its nearest training image, copies framed in red), fed
with this request's samples, so the studio and the command draw the same picture. It draws
one-channel 8×8 images (the digits models); for other models the studio offers no sheet.

The JSON report holds the request, each arm's guidance schedule, scheduler options,
steering, model evaluations, time, per-sample verdicts (seed, nearest training index, ratio,
copy flag) and full per-step telemetry. Only the ``seconds`` fields vary between two runs of
the same request.
"""

from __future__ import annotations

import json
import shutil
import threading
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["report_dict", "sheet_png", "write_downloads", "DownloadFolder"]

# render_sheet draws with pyplot, whose figure registry is global: one sheet at a time
_PYPLOT_LOCK = threading.Lock()


def _arm_dict(arm: Any, scheduler_options: dict | None, steering: tuple) -> dict[str, Any]:
    samples = []
    for k, seed in enumerate(arm.seeds):
        entry: dict[str, Any] = {"seed": seed}
        if arm.ratios is not None:
            entry.update(nearest_index=arm.nearest_indices[k], ratio=arm.ratios[k],
                         is_copy=arm.copies[k])
        if arm.judge_labels is not None:
            entry["judge_class"] = arm.judge_labels[k]
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


def report_dict(comparison: Any) -> dict[str, Any]:
    """The JSON report of a ``Comparison`` (plain Python types only)."""
    import steersample

    plan, model = comparison.plan, comparison.model
    profile = comparison.profile
    return {
        "tool": f"steersample {steersample.__version__} studio",
        "model": model.name,
        "model_kind": model.kind,
        "request": comparison.request.as_dict(),
        "boundary_sigma": plan.boundary_sigma,
        "guidance_window": list(plan.window),
        "copy_test": "d(NN1)/d(NN2) < 1/3 against the model's training set",
        "phase_profile": None if profile is None else {
            "class": profile.label, "sigmas": profile.sigmas.tolist(),
            "top1": profile.top1.tolist(), "boundary_sigma": profile.boundary_sigma},
        "plain": _arm_dict(comparison.plain, None, ()),
        "steered": _arm_dict(comparison.steered, plan.steered_scheduler_options, plan.steering),
    }


def sheet_png(comparison: Any) -> bytes | None:
    """PNG bytes of ``steersample compare``'s sheet for this request, or None if it cannot draw
    this model's images (it draws one-channel 8×8 images with a training set)."""
    from steersample.commands._compare_report import render_sheet

    model, request = comparison.model, comparison.request
    x = comparison.plain.latents
    if model.reference is None or model.kind != "class" or tuple(x.shape[1:]) != (1, 8, 8):
        return None
    runs = {}
    for arm in (comparison.plain, comparison.steered):
        flags = SimpleNamespace(copy=torch.tensor(arm.copies))
        runs[arm.name] = (None, arm.latents.clamp(-1.0, 1.0), flags, arm.model_evals, arm.seconds)
    rare = tuple(c for c, name in enumerate(model.class_names) if "rare" in name)
    with _PYPLOT_LOCK:
        return render_sheet(runs, model.reference, [request.class_id], request.num_samples,
                            request.num_samples, SimpleNamespace(rare_classes=rare))


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


def write_downloads(comparison: Any, folder: Path) -> tuple[str, str | None]:
    """Write ``report.json`` (and ``sheet.png`` when drawable) into ``folder``; return paths."""
    report = folder / "steersample-report.json"
    report.write_text(json.dumps(report_dict(comparison), indent=1) + "\n")
    png = sheet_png(comparison)
    sheet = None
    if png is not None:
        sheet = folder / "steersample-sheet.png"
        sheet.write_bytes(png)
    return str(report), None if sheet is None else str(sheet)
