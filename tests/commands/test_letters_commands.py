"""`steersample audit` and `compare` on the letters testbed (the shipped model, few samples and
steps): its judge, held-out fonts, class names and bands; a bad --model name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steersample import cli
from steersample.default import DEFAULT_MODELS, load_default_info


def test_a_bare_path_names_a_default():
    assert load_default_info(Path("letters")).testbed == "letters"
    assert load_default_info(Path("digits")).testbed == "digits"
    with pytest.raises(ValueError, match="unknown default model 'lettrs'"):
        load_default_info(Path("lettrs"))


@pytest.mark.parametrize("model", ["letters", str(DEFAULT_MODELS["letters"])])
def test_audit_on_letters(model, tmp_path, capsys):
    out = tmp_path / "audit"
    assert cli.main(["audit", "--model", model, "--grid", "quick", "--rare-samples", "2",
                     "--frequent-samples", "2", "--steps", "2", "--timing-repeats", "0",
                     "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "audit.json").read_text())
    s = summary["settings"]
    assert s["testbed"] == "letters" and s["rare_classes"] == [0, 3, 5]
    assert s["bands"]["accuracy"] == 0.85 and s["bands"]["precision"] == 0.7
    assert s["class_names"] == ["A", "B", "E", "G", "K", "M", "R", "S", "W", "X"]
    plain = summary["results"][0]
    assert plain["method"] == "plain" and 0 <= plain["rare"]["accuracy"] <= 1
    assert plain["rare"]["fd"] is not None and plain["rare"]["z_u"] is not None
    targets = [t["target"] for t in summary["targets"]]
    assert "best rare accuracy >= 0.85 in every class" in targets
    assert "best rare precision >= 0.7 in every class" in targets
    md = (out / "audit.md").read_text()
    assert "[0, 3, 5] (A G M)" in md and "held-out letters" in md and "precision >= 0.7" in md
    assert (out / "sheet.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_on_letters(tmp_path, capsys):
    out = tmp_path / "compare"
    assert cli.main(["compare", "--model", "letters", "--classes", "0", "1", "--samples", "2",
                     "--steps", "2", "--sheet-samples", "1", "--out", str(out),
                     "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["testbed"] == "letters" and report["class_names"][:2] == ["A", "B"]
    assert report["rare_classes"] == [0] and report["frequent_classes"] == [1]
    for run in report["results"].values():
        assert run["fd"] is not None and 0 <= run["accuracy"] <= 1
        assert [r["label"] for r in run["per_class"]] == [0, 1]
    md = (out / "report.md").read_text()
    assert "| 0 A | rare |" in md and "held-out letters" in md
    assert (out / "sheet.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command", ["audit", "compare"])
def test_bad_model_name(command, tmp_path, capsys):
    assert cli.main([command, "--model", "lettrs", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown default model 'lettrs'" in err and "letters" in err
    assert not (tmp_path / "o").exists()
