"""``mor eval MODEL``: lm-eval at every test-time depth → compute-vs-accuracy curve in MLflow."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evals.runner import EvalReport

DESCRIPTION = """Evaluate an exported model with lm-eval at every test-time depth (1..N_r and the
router's own choice) and log the compute-vs-accuracy curve to MLflow, as a child of the
training run. Results are also written to files and printed as a table."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from cli.help import add_command, add_verbose

    p = add_command(
        subparsers,
        "eval",
        help="evaluate an exported model at every test-time depth (lm-eval), log to MLflow",
        description=DESCRIPTION,
        example_lines=[
            "mor eval outputs/runs/tiny-mor/export",
            "mor eval runs:/RUN_ID/model --depths 1,2,router --limit 100",
            "mor eval models:/NAME/VERSION --tasks piqa,arc_easy --device cuda --json",
        ],
    )
    p.add_argument(
        "model",
        help="an exported model folder (written by `mor train`), its s3:// URI, or the MLflow "
        "model a training run logged: runs:/RUN_ID/model or models:/NAME/VERSION (downloaded "
        "into the local cache from --tracking-uri's MLflow)",
    )
    p.add_argument(
        "--tasks",
        default="mor_heldout_bpb,mor_heldout_mc",
        help="comma-separated lm-eval task names (default: the embedded held-out tasks); "
        "the paper's: lambada_openai,hellaswag,piqa,winogrande,arc_easy,arc_challenge",
    )
    p.add_argument(
        "--data-dir",
        help="folder with the eval sets in their release formats "
        "(offline); without it, lm-eval's built-in tasks download their data",
    )
    p.add_argument(
        "--depths",
        help="comma-separated points, e.g. 1,2,router (default: every depth and router); add "
        "'topk' for expert-choice's training-time top-k over the sequence: the paper's "
        "evaluation, non-causal, shown beside the router to measure the causality gap",
    )
    p.add_argument(
        "--topk",
        action="store_true",
        help="expert-choice: also evaluate the non-causal top-k point (the paper's evaluation)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--out", help="artifact folder (default: next to the export, eval/)")
    p.add_argument(
        "--tracking-uri",
        help="MLflow URI (default: the one the export recorded, else $MLFLOW_TRACKING_URI, "
        "else the `mor up` stack's, else sqlite under the export's storage folder)",
    )
    p.add_argument("--run-id", help="parent MLflow run (default: the training run)")
    p.add_argument(
        "--no-mlflow",
        action="store_true",
        help="write files and print only, for a model whose MLflow is out of reach",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate, write and print the results, then log them: a logging failure exits 1 with
    the results already on disk and on screen."""
    from core.quiet import configure

    configure(args.verbose)  # before lm-eval imports tqdm: its bars read the mode then
    from core.endpoints import strip_credentials
    from evals.lm_backend import export_path
    from evals.pipeline import EvalLoggingError, eval_tracking_uri, evaluate_export, log_eval

    model_dir = export_path(args.model, args.tracking_uri)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    depths = [d.strip() for d in args.depths.split(",")] if args.depths else None
    report, out = evaluate_export(
        model_dir,
        tasks,
        data_dir=args.data_dir,
        depths=depths,
        topk=args.topk,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        out_dir=args.out,
    )
    if not args.json:
        print_table(report)
        print_routing(report)
        print(f"[mor] artifacts: {out}", flush=True)
    run_id, error = None, None
    if not args.no_mlflow:
        uri = eval_tracking_uri(report, args.tracking_uri)
        if not args.json:
            print(f"[mor] logging to MLflow at {strip_credentials(uri)}", flush=True)
        try:
            run_id = log_eval(report, out, uri, parent_run_id=args.run_id)
        except EvalLoggingError as exc:
            error = exc
    if args.json:
        payload = {"report": report.to_dict(), "mlflow_run_id": run_id, "artifacts": str(out)}
        print(json.dumps(payload, indent=2, default=str))
    elif run_id:
        print(f"[mor] MLflow eval run: {run_id}")
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def print_table(report: EvalReport) -> None:
    """One line per depth point: mean depth, GFLOP/token, NLL, average accuracy, each task."""
    header = f"{'point':>7} {'mean depth':>10} {'GFLOP/token':>12} {'NLL':>7} {'avg acc':>8}"
    cols = []
    for task in report.tasks:
        metrics = report.points[0].metrics.get(task, {})
        name = next(
            (m for m in ("acc_norm", "acc", "bits_per_byte", "perplexity") if m in metrics), None
        )
        if name:
            cols.append((task, name))
            header += f"  {task}/{name}"
    print(header)
    for p in report.points:
        line = (
            f"{p.label:>7} {p.mean_depth:>10.3f} {p.flops_per_token / 1e9:>12.5f} "
            f"{p.nll if p.nll is not None else float('nan'):>7.4f} "
            f"{p.average if p.average is not None else float('nan'):>8.4f}"
        )
        for task, name in cols:
            v = p.metrics.get(task, {}).get(name)
            se = p.metrics.get(task, {}).get(f"{name}_stderr")
            cell = "n/a" if v is None else f"{v:.4f}" + (f"±{se:.3f}" if se else "")
            line += f"  {cell:>{len(task) + len(name) + 1}}"
        print(line)


def print_routing(report: EvalReport) -> None:
    """Routing on held-out text: drift from the training capacities, depth vs difficulty."""
    routing = report.routing
    if not routing:
        return
    print(f"[mor] routing on {routing['tokens']} held-out tokens:")
    drift = routing.get("drift")
    if drift:
        for r, (cap, act, agree) in enumerate(
            zip(drift["capacity"], drift["active"], drift["agreement"], strict=True)
        ):
            print(
                f"  recursion {r + 1}: trained capacity {cap:.3f}, eval-mode active {act:.3f}, "
                f"agreement with top-k {agree:.3f}"
            )
    rho = routing.get("spearman_depth_loss")
    buckets = ", ".join(f"{b['bucket']} {b['mean_depth']:.2f}" for b in routing["by_frequency"])
    print(f"  mean depth by token frequency: {buckets}")
    if rho is not None:
        print(f"  Spearman(depth, loss at full depth) = {rho:.3f}")
