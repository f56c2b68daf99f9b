"""``steersample analyze`` end to end on a tiny model folder (seconds, no network)."""

from __future__ import annotations

import json

import pytest
import torch

from steersample.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A folder shaped like scripts/train_default.py output: tiny DiT, 3 rare + 7 frequent classes."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from steersample.data import load_digits
    from steersample.reference.reference_set import ReferenceSet
    from steersample.testing import tiny_dit_transformer

    folder = tmp_path_factory.mktemp("tiny_default")
    images, labels = load_digits()
    rare = (0, 4, 7)
    train = []
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        train.append(idx[: 3 if c in rare else 6])
    train = torch.sort(torch.cat(train)).values
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[train] = False
    held = mask.nonzero().flatten()
    tiny_dit_transformer().save_pretrained(folder / "transformer", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    ReferenceSet(images[train], labels[train]).save(folder / "reference.safetensors")
    meta = {"rare_classes": list(rare), "frequent_classes": [c for c in range(10) if c not in rare],
            "null_class": 10, "split": {"train_indices": train.tolist(), "held_out_indices": held.tolist()},
            "training_config": {}, "git_commit": "test", "command": "test fixture"}
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_analyze_writes_plots_table_and_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["analyze", "--model", str(tiny_model_dir), "--out", str(out), "--sigmas", "0.5", "0.1",
               "--small-sigma", "0.1", "--points", "2", "--subset-sizes", "2", "4", "--subset-sigmas",
               "0.3", "--trajectories", "1", "--steps", "4", "--neighbours", "4", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "small-sigma local dimension (sigma = 0.1" in printed and "model rare" in printed
    for name in ("local_dimension.png", "dimension_vs_n.png", "ridge_trace.png", "geometry.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    table = (out / "analyze.md").read_text()
    assert "| sigma | oracle rare | oracle frequent | model rare | model frequent |" in table
    assert "## Reach, align, slide" in table and "ridge_trace.png" in table
    result = json.loads((out / "analyze.json").read_text())
    assert result["sigmas"] == [0.5, 0.1] and result["subset_sizes"] == [2, 4]
    for source in ("oracle", "model"):
        for group in ("rare", "frequent"):
            values = result["dimension_vs_sigma"][source][group]["0.1"]
            assert len(values) == 2 and all(0 <= v <= 64 for v in values)
    assert [tr["label"] for tr in result["traces"]] == [0, 1]
    trace = result["traces"][0]
    assert len(trace["sigmas"]) == 3 and len(trace["distance"]) == 1 and len(trace["distance"][0]) == 3


def test_analyze_at_training_points(tiny_model_dir, tmp_path, capsys):
    rc = main(["analyze", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--at", "train",
               "--sigmas", "0.2", "--small-sigma", "0.2", "--points", "1", "--subset-sizes", "2",
               "--subset-sigmas", "0.2", "--trajectories", "1", "--steps", "3", "--trace-classes", "4",
               "--neighbours", "3", "--no-progress"])
    assert rc == 0 and "1 train points per group" in capsys.readouterr().out
    result = json.loads((tmp_path / "analyze.json").read_text())
    assert result["points_at"] == "train" and [tr["label"] for tr in result["traces"]] == [4]


def test_analyze_help_and_bad_arguments(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out
    assert main(["analyze", "--model", str(tiny_model_dir), "--points", "0", "--out", str(tmp_path)]) == 2
    assert "--points must be >= 1" in capsys.readouterr().err
    assert main(["analyze", "--model", str(tiny_model_dir), "--sigmas", "1.0", "--out", str(tmp_path)]) == 2
    assert "(0, 1)" in capsys.readouterr().err
    assert main(["analyze", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze", "--model", str(tiny_model_dir), "--trace-classes", "12",
                 "--out", str(tmp_path)]) == 2
    assert "not in the training set" in capsys.readouterr().err
