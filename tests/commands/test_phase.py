"""`steersample phase`: table, sigma*, PNG plot, reference files and errors."""

import re

import torch

import steersample as ss
from steersample import cli


def test_help_lists_phase(capsys):
    try:
        cli.main(["--help"])
    except SystemExit as err:
        assert err.code == 0
    assert "phase" in capsys.readouterr().out


def test_phase_on_bundled_digits(tmp_path, capsys):
    out = tmp_path / "plots" / "phase.png"
    assert cli.main(["phase", "--out", str(out), "--num-queries", "16"]) == 0
    text = capsys.readouterr().out
    assert "N=1797" in text and "boundary sigma*" in text
    value = float(re.search(r"boundary sigma\* \(top-1 = 0\.5\): ([0-9.]+)", text).group(1))
    assert 0.2 < value < 0.8
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_phase_on_reference_file_per_class(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    ref = ss.ReferenceSet(torch.randn(60, 4, generator=g), torch.arange(60) % 3)
    path = tmp_path / "ref.safetensors"
    ref.save(path)
    out = tmp_path / "p.png"
    assert cli.main(["phase", "--reference", str(path), "--out", str(out), "--per-class",
                     "--num-queries", "8", "--rows", "0"]) == 0
    text = capsys.readouterr().out
    assert "N=60" in text and "per class" in text and out.exists()


def test_phase_errors(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert cli.main(["phase", "--reference", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    unlabelled = tmp_path / "u.safetensors"
    ss.ReferenceSet(torch.randn(5, 2)).save(unlabelled)
    assert cli.main(["phase", "--reference", str(unlabelled), "--per-class",
                     "--out", str(tmp_path / "y.png")]) == 2
    assert "labelled" in capsys.readouterr().err
