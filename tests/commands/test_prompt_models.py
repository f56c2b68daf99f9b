"""`steersample compare|audit --model SD3_FOLDER --reference STORE --prompts FILE`: a tiny SD3
folder and tiny stores, round trips and the bad-input errors (raised before any model call)."""

from __future__ import annotations

import json

import pytest
import torch

import steersample as ss

from steersample import cli
from steersample.commands import _prompt_runs

PROMPTS = ["a cat", "a dog", "a fox"]
GROUPS = {"rare": ["a fox"], "frequent": ["a cat", "a dog"]}


def _store(path, latents, labels=None):
    from steersample.reference.store import write_store

    write_store(path, latents, labels, metadata={"prompts": PROMPTS, "groups": GROUPS})
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from steersample.testing import tiny_sd3_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("prompt_model")
    pipe = tiny_sd3_pipeline()
    pipe.save_pretrained(root / "model")
    # a call default the runs must pass on (no 256 zero T5 tokens: faster)
    (root / "model" / "metadata.json").write_text(json.dumps({"call": {"max_sequence_length": 0}}))
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    _store(root / "ref", torch.randn(8, 4, 8, 8, generator=g), labels)
    _store(root / "held", torch.randn(15, 4, 8, 8, generator=g), torch.arange(3).repeat(5))
    _store(root / "wrong", torch.randn(4, 4, 4, 4, generator=g))
    (root / "prompts.txt").write_text("# a comment\na cat\na dog\n\na fox\trare\n")
    return root


@pytest.fixture
def no_model_call(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was called before the inputs were validated")

    from steersample.commands import _prompt_audit, _prompt_compare

    for module in (_prompt_runs, _prompt_compare, _prompt_audit):
        monkeypatch.setattr(module, "generate", fail)


def _args(folder, out, *extra):
    return ["--model", str(folder / "model"), "--reference", str(folder / "ref"),
            "--prompts", str(folder / "prompts.txt"), "--heldout", str(folder / "held"),
            "--out", str(out), "--no-progress", *extra]


def test_compare_on_sd3_folder_writes_report(folder, tmp_path, capsys):
    out = tmp_path / "compare"
    assert cli.main(["compare", *_args(folder, out, "--samples", "4", "--steps", "2",
                                       "--sheet-samples", "2")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "sheet.png"]
    assert (out / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "prompt" and report["prompts"] == PROMPTS
    assert report["call"] == {"max_sequence_length": 0}
    assert report["groups"] == {"frequent": ["a cat", "a dog"], "rare": ["a fox"]}
    assert set(report["results"]) == {"plain", "steered"}
    for run in report["results"].values():
        assert 0 <= run["copy_rate"] <= 1 and run["z_u"] is not None
        assert run["distance_ratio"] > 0 and 0 <= run["precision"] <= 1
        assert run["model_evals_per_sample"] == 4 and run["model_evals"] == 4 * 12   # CFG each step
        assert run["seconds"] > 0
        assert [r["prompt"] for r in run["per_prompt"]] == PROMPTS
        for row in run["per_prompt"]:   # per-prompt Z_U: store labels name the prompts
            assert row["samples"] == 4 and row["z_u"] is not None and 0 <= row["copy_rate"] <= 1
        assert set(run["groups"]) == {"rare", "frequent"}
        assert run["groups"]["rare"]["z_u_min"] is not None
    assert "accuracy" not in report["results"]["plain"] and "fd" not in report["results"]["plain"]
    # the store's labels name the prompts: steered is the recommended NoveltySteering()
    assert report["results"]["steered"]["steering"] == [repr(ss.NoveltySteering())]
    md = (out / "report.md").read_text()
    assert "## Per group" in md and "| a fox | rare |" in md
    assert "wrote" in capsys.readouterr().out


def test_compare_without_prompt_labels_uses_kmeans_cells(folder, tmp_path):
    """A store without prompt metadata: per-group Z_U over k-means cells, no per-prompt Z_U."""
    from steersample.reference.store import write_store

    g = torch.Generator().manual_seed(1)
    write_store(tmp_path / "plain_ref", torch.randn(12, 4, 8, 8, generator=g))
    write_store(tmp_path / "plain_held", torch.randn(12, 4, 8, 8, generator=g))
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    out = tmp_path / "out"
    assert cli.main(["compare", "--model", str(folder / "model"), "--reference",
                     str(tmp_path / "plain_ref"), "--heldout", str(tmp_path / "plain_held"),
                     "--prompts", str(tmp_path / "p.txt"), "--samples", "3", "--steps", "2",
                     "--sheet-samples", "1", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "report.json").read_text())["results"]
    run = results["plain"]
    assert list(run["groups"]) == ["all"] and run["groups"]["all"]["z_u"] is not None
    assert run["per_prompt"][0]["z_u"] is None and run["z_u_cells"].startswith("k-means")
    # no prompt classes: NoveltySteering cannot act, the label-free steerer runs
    assert results["steered"]["steering"][0].startswith("AttractorRepulsion(strength=0.5")


def _row(name, z_min, dist, prec, freq_prec=0.5, freq_z=5.0):
    per = [{"group": "rare", "distance_ratio": dist, "precision": prec},
           {"group": "rare", "distance_ratio": dist + 0.1, "precision": prec + 0.1},
           {"group": "frequent", "distance_ratio": 1.5, "precision": freq_prec}]
    return {"method": name, "per_prompt": per,
            "groups": {"rare": {"copy_rate": 0.0, "z_u": z_min + 1, "z_u_min": z_min,
                                "distance_ratio": dist + 0.05, "precision": prec + 0.05},
                       "frequent": {"copy_rate": 0.0, "z_u": freq_z, "z_u_min": freq_z,
                                    "distance_ratio": 1.5, "precision": freq_prec}}}


def test_prompt_audit_picks_by_the_digits_tiers():
    """One rule on every testbed: meets every band (worst prompt) > novel and most precise >
    on the data; worst-prompt figures come from the per-prompt rows; frequent prompts kept."""
    from steersample.commands._prompt_audit import select_best

    plain = _row("plain", -11.8, 0.06, 0.93)
    blend = _row("blend", -11.4, 0.48, 0.95)
    novel = _row("novel", -0.8, 1.0, 0.6)
    novel_sharper = _row("novel-sharper", -2.5, 0.9, 0.7)
    off = _row("off-data", 2.0, 1.3, 0.1)
    assert select_best([plain, blend, novel, novel_sharper, off], "rare")["method"] == "novel-sharper"
    # the worst prompt decides: a group precision of 0.80 (prompts 0.75 and 0.85) is not in the
    # band, so the higher Z_U loses to the row whose every prompt is
    mean_only = _row("mean-only", -1.0, 1.0, 0.75)
    assert mean_only["groups"]["rare"]["precision"] == 0.8
    assert select_best([plain, mean_only, _row("every", -2.5, 0.9, 0.8)], "rare")["method"] == "every"
    # a copier that stays on the data beats nothing novel: highest Z_U among the precise
    assert select_best([plain, blend, _row("near", -3.2, 1.0, 0.9)], "rare")["method"] == "near"
    # every band met (worst prompt precision 0.8) beats the merely novel
    banded = _row("banded", -2.9, 0.85, 0.8)
    assert select_best([plain, novel, banded], "rare")["method"] == "banded"
    # ... unless it costs the frequent prompts their precision
    hurts = _row("hurts", -1.0, 0.9, 0.85, freq_prec=0.3)
    assert select_best([plain, novel, hurts], "rare")["method"] == "novel"


def test_audit_on_sd3_folder(folder, tmp_path):
    out = tmp_path / "audit"
    assert cli.main(["audit", *_args(folder, out, "--grid", "quick", "--rare-samples", "3",
                                     "--frequent-samples", "2", "--steps", "2",
                                     "--timing-repeats", "1", "--batch-size", "8")]) == 0
    summary = json.loads((out / "audit.json").read_text())
    names = [r["method"] for r in summary["results"]]
    assert names[0] == "plain" and "attractor-0.5" in names and summary["best"] in names[1:]
    assert "novelty" in names          # labelled store: the per-class steerer joins the grid
    for r in summary["results"]:
        assert set(r["groups"]) == {"rare", "frequent"} and r["seconds"] > 0
        counts = {row["prompt"]: row["samples"] for row in r["per_prompt"]}
        assert counts == {"a cat": 2, "a dog": 2, "a fox": 3}
    assert (out / "sheet.png").is_file() and "prompt model" in (out / "audit.md").read_text()


@pytest.mark.parametrize("command", ["compare", "audit"])
def test_store_of_another_latent_shape_is_refused(folder, tmp_path, capsys, no_model_call, command):
    args = _args(folder, tmp_path / "o", "--steps", "2")
    args[args.index("--reference") + 1] = str(folder / "wrong")
    assert cli.main([command, *args]) == 2
    err = capsys.readouterr().err
    assert "(4, 4, 4)" in err and "(4, 8, 8)" in err and "index build" in err


def test_heldout_of_another_shape_is_refused(folder, tmp_path, capsys, no_model_call):
    args = _args(folder, tmp_path / "o")
    args[args.index("--heldout") + 1] = str(folder / "wrong")
    assert cli.main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert "held-out" in err and "(4, 4, 4)" in err and "same VAE" in err


@pytest.mark.parametrize("content, expected", [
    (b"", "holds no prompts"),
    (b"# only a comment\n\n", "holds no prompts"),
    (b"\xff\xfe\x00bad", "cannot be read"),
])
def test_bad_prompts_file_is_refused(folder, tmp_path, capsys, no_model_call, content, expected):
    (tmp_path / "bad.txt").write_bytes(content)
    args = _args(folder, tmp_path / "o")
    args[args.index("--prompts") + 1] = str(tmp_path / "bad.txt")
    assert cli.main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "one prompt a line" in err


def test_missing_inputs_are_named(folder, tmp_path, capsys, no_model_call):
    args = _args(folder, tmp_path / "o")
    args[args.index("--prompts") + 1] = str(tmp_path / "nope.txt")
    assert cli.main(["compare", *args]) == 2
    assert "does not exist" in capsys.readouterr().err
    args = _args(folder, tmp_path / "o")
    args[args.index("--reference") + 1] = str(tmp_path / "nostore")
    assert cli.main(["audit", *args]) == 2
    assert "index build" in capsys.readouterr().err
    assert cli.main(["compare", "--reference", str(folder / "ref"), "--prompts",
                     str(folder / "prompts.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "--model PIPELINE_FOLDER" in capsys.readouterr().err
    assert cli.main(["compare", "--model", str(folder / "model"), "--prompts",
                     str(folder / "prompts.txt"), "--classes", "1", "--out", str(tmp_path / "o")]) == 2


def test_compare_on_flux_folder(tmp_path):
    """Flux: packed latents are unpacked to the store's (C, H, W) layout."""
    from steersample.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.save_pretrained(tmp_path / "flux")
    (tmp_path / "flux" / "metadata.json").write_text(json.dumps(
        {"call": {"height": 16, "width": 16, "max_sequence_length": 8}}))
    g = torch.Generator().manual_seed(0)
    _store(tmp_path / "ref", torch.randn(6, 1, 16, 16, generator=g), torch.tensor([0, 0, 1, 1, 2, 2]))
    _store(tmp_path / "held", torch.randn(15, 1, 16, 16, generator=g), torch.arange(3).repeat(5))
    (tmp_path / "p.txt").write_text("a cat\na fox\n")
    out = tmp_path / "out"
    assert cli.main(["compare", "--model", str(tmp_path / "flux"), "--reference", str(tmp_path / "ref"),
                     "--heldout", str(tmp_path / "held"), "--prompts", str(tmp_path / "p.txt"),
                     "--samples", "2", "--steps", "2", "--sheet-samples", "1", "--out", str(out),
                     "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"] == "flux" and report["latent_shape"] == [1, 16, 16]
    assert set(report["results"]["plain"]["groups"]) == {"frequent", "rare"}


def test_prompt_runs_refuse_a_launcher(folder, tmp_path, capsys, monkeypatch, no_model_call):
    monkeypatch.setenv("WORLD_SIZE", "2")
    from steersample.commands import _prompt_runs as runs

    with pytest.raises(ValueError, match="one process"):
        runs._check_single_process()


def test_steered_prompt_calls_carry_each_prompts_store_label(folder, monkeypatch):
    """generate() tells steered calls which store class each prompt is (reference_labels)."""
    from argparse import Namespace

    from steersample.commands import _timed

    inputs = _prompt_runs.load_inputs(Namespace(
        model=str(folder / "model"), reference=str(folder / "ref"),
        prompts=str(folder / "prompts.txt"), heldout=str(folder / "held")))
    assert inputs.labelled and inputs.labels_of([2, 0]) == [2, 0]
    seen = []
    real = _timed.timed_call

    def spy(pipe, bar, **kwargs):
        seen.append(kwargs.get("reference_labels"))
        return real(pipe, bar, **kwargs)

    monkeypatch.setattr(_timed, "timed_call", spy)
    from steersample.sampling.guidance import GuidanceSchedule
    from steersample.steering.attractor import AttractorRepulsion

    prompts, seeds, which = _prompt_runs.seeds_for(inputs, [2, 0], 1, 0)
    labels = inputs.labels_of(which.tolist())
    _prompt_runs.generate(inputs, prompts, seeds, GuidanceSchedule.constant(2.0),
                          (AttractorRepulsion(0.5),), 2, labels=labels)
    _prompt_runs.generate(inputs, prompts, seeds, GuidanceSchedule.constant(2.0), (), 2, labels=labels)
    assert seen == [[2, 0], None]     # plain calls get no reference, so no labels either
