"""The top-level ``steersample`` parser: every listed command builds, and its help is clean."""

import re

import pytest

from steersample.cli import COMMANDS, build_parser, main


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_defaults_once_and_never_none(command, capsys):
    text = " ".join(_help(command, capsys).split())   # argparse wraps lines
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    # never a second "(default: ...)" right after one the help text already gives
    assert not re.search(r"\(default: [^)]*\) \(default:", text)


def test_help_still_shows_real_defaults(capsys):
    text = " ".join(_help("phase", capsys).split())
    assert "(default: 256)" in text
    assert "(default: the bundled digits)" in text


def test_every_command_is_listed_in_top_level_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text
    assert build_parser().prog == "steersample"
