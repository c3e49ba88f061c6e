"""Help pages of ``mor``: a one-line description, the defaults and a few examples per command.

``add_command`` is how every ``cli/<name>_cmd.py`` adds its parser, so all help pages look
alike: the description as written (line breaks kept), each option's default appended when
it has one, and an ``examples:`` block at the end.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends ``(default: X)`` to options that have a
    default worth saying (not None/False, and not already stated in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, [], argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def examples(lines: Sequence[str]) -> str:
    """The ``examples:`` epilog: one command per line, each run as typed."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    description: str | None = None,
    example_lines: Sequence[str] = (),
) -> argparse.ArgumentParser:
    """A subcommand parser: ``help`` is its line in the parent's list and, without a
    ``description``, the first line of its own page."""
    return subparsers.add_parser(
        name,
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        epilog=examples(example_lines) if example_lines else None,
        formatter_class=HelpFormatter,
    )


def add_verbose(p: argparse.ArgumentParser) -> None:
    """``--verbose``: Ray's and DeepSpeed's own logs back on the console (core.quiet)."""
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and DeepSpeed's own log output (also: MOR_VERBOSE=1)",
    )
