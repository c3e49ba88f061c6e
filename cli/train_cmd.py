"""``mor train [CONFIG.yaml] [key=value ...]``: train one configuration on Ray Train workers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DESCRIPTION = """Train one MoR configuration on Ray Train workers (DeepSpeed), logged to MLflow.

The config is the defaults, then CONFIG.yaml, then each key=value override (dotted paths
such as model.sharing=cycle); `mor train --print-config` lists every field. Rerunning a
run's name resumes it from its last checkpoint."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from cli.help import add_command, add_verbose

    p = add_command(
        subparsers,
        "train",
        help="train one MoR configuration (Ray Train + DeepSpeed), logged to MLflow",
        description=DESCRIPTION,
        example_lines=[
            "mor train trainers/configs/tiny-mor.yaml budget.steps=50",
            "mor train model.sharing=cycle model.num_recursions=3 optim.lr=1e-3 name=my-run",
            "mor train --print-config    # every config field, its default and meaning",
        ],
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG.yaml|key=value",
        help="an optional YAML config, then dotted overrides such as optim.lr=1e-3",
    )
    p.add_argument(
        "--address",
        help="Ray cluster address (default: $RAY_ADDRESS, else the `mor up` stack, else local Ray)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the config sections and fields (docstrings and defaults), then exit; "
        "with CONFIG.yaml/overrides, show their values instead of the defaults",
    )
    add_verbose(p)
    p.set_defaults(func=run, extra_dest="items")


def describe_run(name: str, plan: Any) -> str:
    """The line printed before training; the tracking URI without ``user:password@``."""
    from core.endpoints import strip_credentials

    return (
        f"[mor] run {name!r}: {plan.total_steps} steps x {plan.tokens_per_step} tokens, "
        f"MLflow run {plan.run_id} at {strip_credentials(plan.tracking_uri)}"
        + (" (resumed)" if plan.resumed_run else "")
    )


def print_config(cfg: Any) -> None:
    """Every section and field of ``cfg`` with its value and docstring; ``model`` lists the
    resolved MoRConfig fields (vocab_size becomes the tokenizer's at run time)."""
    from mor.overrides import describe_fields

    print("# mor train: config fields (set with CONFIG.yaml or key=value overrides)")
    for line in describe_fields(cfg, expand={"model": cfg.mor_config()}):
        print(line)


def run(args: argparse.Namespace) -> int:
    from core.endpoints import redact, strip_credentials
    from trainers.config import load_train_config

    path = None
    overrides = list(args.items)
    if overrides and "=" not in overrides[0]:
        path = overrides.pop(0)
    if args.address:
        overrides.append(f"address={args.address}")
    cfg = load_train_config(path, overrides)  # validated before Ray starts
    if args.print_config:
        print_config(cfg)
        return 0
    from core.quiet import configure

    configure(args.verbose)  # before Ray starts: its processes inherit the mode

    # Ray address, Ray auth and MLflow URI: core.endpoints.resolve_endpoints, called by
    # plan_run (MLflow) and run_training (Ray), so that the `mor up` stack is the default.
    from trainers.launcher import TrainingError, plan_run, run_training

    plan = plan_run(cfg)
    print(describe_run(cfg.name, plan))
    try:
        result = run_training(cfg, plan=plan)
    except TrainingError as exc:  # recorded in MLflow (FAILED, mor.failure); not a bug of ours
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 1
    summary = {
        "run_id": result.run_id,
        "tracking_uri": strip_credentials(result.tracking_uri),
        "export_dir": str(result.export_dir),
        "steps": result.total_steps,
        "final": {
            k: result.metrics[k]
            for k in ("train/loss", "val/loss", "tokens", "flops")
            if k in result.metrics
        },
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"[mor] done: MLflow run {result.run_id}")
        print(f"[mor] export: {result.export_dir}")
        for k, v in summary["final"].items():
            print(f"[mor]   {k} = {v:.6g}")
    return 0
