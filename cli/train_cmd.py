"""``mor train [CONFIG.yaml] [key=value ...]``: train one configuration on Ray Train workers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train one MoR configuration (Ray Train + DeepSpeed), logged to MLflow",
        description=__doc__,
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
    p.set_defaults(func=run, extra_dest="items")


def describe_run(name: str, plan: Any) -> str:
    """The line printed before training; the tracking URI without ``user:password@``."""
    from core.endpoints import strip_credentials

    return (
        f"[mor] run {name!r}: {plan.total_steps} steps x {plan.tokens_per_step} tokens, "
        f"MLflow run {plan.run_id} at {strip_credentials(plan.tracking_uri)}"
        + (" (resumed)" if plan.resumed_run else "")
    )


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
