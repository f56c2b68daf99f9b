"""`steersample compare`: end to end on a reduced setting, and its bad-input errors."""

from __future__ import annotations

import json
import shutil

import pytest

from steersample import cli
from steersample.default import DEFAULT_MODEL_DIR

SMALL = ["--classes", "0", "1", "--samples", "3", "--steps", "3", "--sheet-samples", "2",
         "--no-progress"]


def _compare(*args: str) -> int:
    return cli.main(["compare", *args])


def test_compare_end_to_end_writes_all_three_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert _compare(*SMALL, "--out", str(out)) == 0
    assert (out / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == [0, 1] and report["samples_per_class"] == 3
    assert set(report["results"]) == {"plain", "steered"}
    for run in report["results"].values():
        assert [r["label"] for r in run["per_class"]] == [0, 1]
        for row in run["per_class"]:   # novelty against each class's held-out digits
            assert row["z_u"] is not None and row["distance_ratio"] > 0
            assert 0 <= row["precision"] <= 1
        assert 0 <= run["copy_rate"] <= 1 and 0 <= run["accuracy"] <= 1
        assert run["model_evals_per_sample"] >= 3 and run["model_evals"] > 0
        assert run["fd"] is not None
    assert report["results"]["plain"]["model_evals_per_sample"] == 6  # CFG at every step
    md = (out / "report.md").read_text()
    assert "| class | kind |" in md and "steered" in md and "| Z_U plain | Z_U steered |" in md
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "sheet.png"]


def test_guidance_one_needs_no_unconditional_pass(tmp_path):
    """Evaluations are counted on the transformer: at scale 1 there is one pass per step."""
    out = tmp_path / "run"
    assert _compare(*SMALL, "--guidance", "1", "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["results"]["plain"]["model_evals_per_sample"] == 3
    assert report["results"]["plain"]["model_evals"] == 3 * 6


def test_same_seeds_give_the_same_report(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _compare(*SMALL, "--out", str(a)) == 0
    assert _compare(*SMALL, "--out", str(b)) == 0
    ra, rb = (json.loads((p / "report.json").read_text())["results"] for p in (a, b))
    for name in ("plain", "steered"):
        assert ra[name]["per_class"] == rb[name]["per_class"]


def test_help_is_readable(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--classes", "--samples", "--steps", "--guidance", "--out"):
        assert option in text


@pytest.mark.parametrize("args, message", [
    (["--classes", "12"], "outside 0-9"),
    (["--classes", "x"], "not an integer"),
])
def test_bad_class_is_a_usage_error(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _compare(*args, "--out", str(tmp_path))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--samples", "-3"], "--samples must be a positive integer"),
    (["--samples", "1"], "at least 2"),
    (["--guidance", "nan"], "finite"),
])
def test_bad_numbers_are_explained(args, message, capsys, tmp_path):
    assert _compare(*SMALL, *args, "--out", str(tmp_path / "o")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_and_corrupt_model_folders_are_explained(tmp_path, capsys):
    assert _compare(*SMALL, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(DEFAULT_MODEL_DIR, bad)
    (bad / "transformer" / "config.json").write_text("{ not json")
    assert _compare(*SMALL, "--model", str(bad), "--out", str(tmp_path / "o")) == 2
    assert "could not be loaded" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()   # a bad --model leaves no empty --out folder behind


def test_unwritable_output_folder_is_explained(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert _compare(*SMALL, "--out", str(blocker / "sub")) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_a_failure_mid_run_keeps_earlier_outputs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _compare(*SMALL, "--out", str(out)) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import steersample.evaluation.judge

    def broken(*args, **kwargs):
        raise ValueError("judge exploded")

    monkeypatch.setattr(steersample.evaluation.judge.Judge, "judge", broken)   # the testbed's judge
    assert _compare(*SMALL, "--seed", "5", "--out", str(out)) == 2
    assert "judge exploded" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
