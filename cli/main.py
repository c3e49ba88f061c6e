"""Entry point of the ``mor`` command (``mor = "cli.main:main"`` in pyproject.toml).

Each subcommand lives in its own module ``cli/<name>_cmd.py`` exposing
``register(subparsers) -> None``; ``register`` adds a parser and sets ``func`` (called with the
parsed namespace, returns the exit code) via ``set_defaults``. To add a command, write the
module and list it in ``COMMAND_MODULES``. Keep heavy imports (torch, ray) inside ``func`` so
``mor --help`` stays fast.

A command that takes free ``key=value`` overrides after its options sets
``set_defaults(extra_dest="<dest>")``: bare words that argparse leaves over (e.g. overrides
written after ``--json``) are appended to that list instead of being rejected; with
``extra_any=True`` options are too (``mor lm-eval``: lm-eval's own arguments).

No exception reaches the user as a raw traceback (``cli.errors.report``): a user error
(``ConfigError``, ``ValueError``, a path that cannot be read, ...) prints ``error: <message>``
and exits 2; any other prints one line plus the log file holding the traceback and exits 1;
Ctrl-C exits 130. ``mor --debug COMMAND`` (or ``MOR_DEBUG=1``) prints the traceback instead.
Credentials in URLs are redacted from all of it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Subcommand modules, in the order ``mor --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "cli.inspect_cmd",
    "cli.data_cmd",
    "cli.train_cmd",
    "cli.eval_cmd",
    "cli.lmeval_cmd",
    "cli.sweep_cmd",
    "cli.stack_cmd",
    "cli.report_cmd",
)

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from cli.help import HelpFormatter, examples

    parser = argparse.ArgumentParser(
        prog="mor",
        description="Mixture-of-Recursions research platform (arXiv 2507.10524).\n\n"
        "Run `mor COMMAND --help` for a command's options, defaults and examples.",
        epilog=examples(
            [
                "mor inspect tiny-mor                          # parameters, FLOPs, KV cache",
                "mor train trainers/configs/tiny-mor.yaml      # one run, logged to MLflow",
                "mor sweep run sweeps/configs/quickstart.yaml  # the quickstart sweep",
            ]
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the full traceback of an error (also: MOR_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mor`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if "--debug" in extra:  # also accepted after the subcommand
            extra.remove("--debug")
            args.debug = True
        if extra:
            dest = getattr(args, "extra_dest", None)
            # A command handing its arguments to another tool takes options too (extra_any).
            bad = [] if getattr(args, "extra_any", False) else [e for e in extra if e[:1] == "-"]
            if dest is None or bad:
                parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
            getattr(args, dest).extend(extra)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(func(args) or 0)
    except BrokenPipeError:  # e.g. `mor inspect ... --json | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (Exception, KeyboardInterrupt) as exc:  # SystemExit passes: a command's own status
        from cli.errors import debug_requested, report

        return report(exc, argv, debug=debug_requested(args.debug))


if __name__ == "__main__":
    raise SystemExit(main())
