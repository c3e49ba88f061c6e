"""``mor lm-eval ARGS``: lm-eval's own command line with the ``mor`` backend registered.

lm-eval finds models in its registry, filled by the modules it imports; it has no plugin
discovery, so a plain ``lm_eval --model mor`` does not know the backend (``evals/lm_backend.py``
registers it on import). This command imports the backend, adds the platform's embedded tasks
(``mor_heldout_bpb``, ``mor_heldout_mc``) to ``--include_path`` and hands every argument, as
typed, to lm-eval's ``cli_evaluate``: options, output and exit status are lm-eval's.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """Run lm-eval's own command line (`lm-eval run ...`, `lm-eval ls tasks`, ...) with
the `mor` backend registered and the platform's embedded tasks on --include_path. Every
argument after `lm-eval` goes to lm-eval unchanged (see `python -m lm_eval run --help` for its
options); `--model_args` of `mor` take pretrained=EXPORT, depth=1..N_r (omit for the router's
own choice), batch_size, device, dtype."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from cli.help import add_command

    p = add_command(
        subparsers,
        "lm-eval",
        help="lm-eval's own command line, with the mor backend and the embedded tasks",
        description=DESCRIPTION,
        example_lines=[
            "mor lm-eval --model mor --model_args pretrained=outputs/runs/NAME/export "
            "--tasks mor_heldout_mc --limit 100",
            "mor lm-eval run --model mor --model_args pretrained=EXPORT,depth=2 --tasks "
            "mor_heldout_bpb --output_path results/",
            "mor lm-eval ls tasks",
        ],
    )
    # Everything after the command is lm-eval's, options included (cli.main passes them on).
    p.set_defaults(func=run, lm_eval_args=[], extra_dest="lm_eval_args", extra_any=True)


def run(args: argparse.Namespace) -> int:
    from lm_eval.__main__ import cli_evaluate

    import evals.lm_backend  # noqa: F401  (registers the `mor` model with lm-eval)
    from core.storage import local_cache_root
    from evals.default_tasks import prepare_default_tasks

    argv = list(args.lm_eval_args)
    if not argv or argv[0] not in ("ls", "validate"):  # `run`, typed or implied
        if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
            tasks = prepare_default_tasks(local_cache_root() / "eval_tasks" / "default_tasks")
            argv += ["--include_path", str(tasks)]
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:  # lm-eval's own status (argparse errors, --help)
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved
    return 0
