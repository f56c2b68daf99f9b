"""The ``steersample`` command line: one sub-command per module in ``steersample.commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Only commands listed in ``COMMANDS`` appear in ``--help``, so the help never advertises
something that does not work.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "build_parser", "main"]

# module names under steersample.commands, in the order --help shows them
COMMANDS: tuple[str, ...] = (
    "compare",
    "phase",
    "analyze",
    "demo",
    "index",
    "audit",
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help only where it says something: not for
    flags (default False), not for None (the help text says what happens), and not where the
    help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or "default" in help_text):
            return help_text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steersample",
        description="Memorisation-aware sampling for flow-matching diffusion models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMANDS:
        module = importlib.import_module(f"steersample.commands.{module_name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__,
                           formatter_class=_HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as err:
        print(f"steersample {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
