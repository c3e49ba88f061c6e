"""``mor report EXPERIMENT_OR_SWEEP``: Pareto fronts, iso-FLOP view and results table."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    from cli.help import add_command

    p = add_command(
        subparsers,
        "report",
        help="Pareto plots and the results table of sweeps, from MLflow",
        description="Read sweeps (or MLflow experiments) from MLflow and write their results\n"
        "table, Pareto fronts and iso-FLOP view; attach them to the sweeps' parent runs.",
        example_lines=[
            "mor report quickstart",
            "mor report quickstart --metric nll --out reports/qs-nll",
            "mor report sweep-a sweep-b --tracking-uri http://127.0.0.1:5000 --no-mlflow",
        ],
    )
    p.add_argument(
        "names",
        nargs="+",
        metavar="EXPERIMENT_OR_SWEEP",
        help="sweep names (their MLflow parent runs) or MLflow experiment names",
    )
    p.add_argument("--out", default=None, help="output folder (default: reports/<first name>)")
    p.add_argument(
        "--metric",
        default=None,
        help="what ranks the models: 'average' (accuracy), 'nll' or TASK/METRIC, e.g. "
        "piqa/acc_norm or mor_heldout_bpb/bits_per_byte (default: the sweep's headline)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else the `mor up` stack, "
        "else sqlite:///outputs/mlflow.db)",
    )
    p.add_argument(
        "--no-mlflow",
        action="store_true",
        help="do not attach the report to the sweeps' parent runs",
    )
    p.set_defaults(func=run)


def default_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the `mor up` stack, else outputs/mlflow.db (absolute)."""
    from core.endpoints import resolve_tracking_uri

    return resolve_tracking_uri(None, "outputs")


def run(args: argparse.Namespace) -> int:
    from core.endpoints import require_store

    uri = args.tracking_uri or default_uri()
    require_store(uri, args.names)  # before pandas/MLflow load: a typo answers at once
    from dashboards.report import build_report

    out = args.out or os.path.join("reports", args.names[0])
    rep = build_report(
        uri,
        args.names,
        out,
        metric=args.metric,
        log_to_mlflow=not args.no_mlflow,
    )
    print((rep.out_dir / "results.md").read_text())
    print(f"[mor] {len(rep.table)} trials, {len(rep.front)} Pareto-optimal depth points")
    for f in rep.files:
        print(f"[mor] wrote {f}")
    return 0
