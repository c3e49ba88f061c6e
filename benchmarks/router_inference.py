"""Expert-choice inference rules side by side (issue #14): drift and accuracy per option.

    python -m benchmarks.router_inference [--skip-sweep] [--storage outputs] [--out DIR]

Runs ``mor sweep run sweeps/configs/router-inference.yaml`` (the quickstart's three
expert-choice models × ``model.ec_inference`` ∈ {threshold, calibrated, aux_router}, same
training, same FLOPs budget), then reads its MLflow runs and writes
``DIR/router_inference.{json,md}``: per model and option, on held-out text the router never
trained on, the training capacity and eval-mode active fraction per recursion, the agreement
with training's top-k, the mean depth, and the held-out accuracy / bits per byte at the
router's own causal point beside the non-causal top-k point (the causality gap).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from core.keys import KIND_EVAL, TAG_KIND, TAG_LABEL, eval_key, eval_point_key

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "sweeps" / "configs" / "router-inference.yaml"
ACC, BPB = "mor_heldout_mc/acc", "mor_heldout_bpb/bits_per_byte"


def run_sweep(storage: Path) -> None:
    """The sweep itself, typed as a user types it (from the storage folder's parent)."""
    cmd = ["mor", "sweep", "run", str(SPEC), f"storage_path={storage}"]
    subprocess.run(cmd, check=True)


def rows(tracking_uri: str) -> list[dict[str, Any]]:
    """One row per trained model of the sweep's experiment, with its eval's routing metrics."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("router-inference")
    if exp is None:
        raise SystemExit(f"no 'router-inference' experiment at {tracking_uri}: run the sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    evals = {
        r.data.tags.get("mlflow.parentRunId"): r.data.metrics
        for r in runs
        if r.data.tags.get(TAG_KIND) == KIND_EVAL and r.info.status == "FINISHED"
    }
    out = []
    for run in runs:
        rule = run.data.params.get("resolved_model.ec_inference")
        m = evals.get(run.info.run_id)
        if rule is None or m is None:
            continue
        n_r = int(run.data.params["resolved_model.num_recursions"])
        rec = range(1, n_r + 1)
        out.append(
            {
                "model": run.data.tags.get(TAG_LABEL, "").split(",")[0],
                "ec_inference": rule,
                "capacity": [m[eval_key(f"drift/capacity_r{r}")] for r in rec],
                "active": [m[eval_key(f"drift/active_r{r}")] for r in rec],
                "agreement": [m[eval_key(f"drift/agree_r{r}")] for r in rec],
                "max_abs_gap": m[eval_key("drift/max_abs_gap")],
                "mean_depth": m.get(eval_point_key("router", "mean_depth")),
                "acc_router": m.get(eval_point_key("router", ACC)),
                "acc_topk": m.get(eval_point_key("topk", ACC)),
                "bpb_router": m.get(eval_point_key("router", BPB)),
                "bpb_topk": m.get(eval_point_key("topk", BPB)),
                "spearman_depth_loss": m.get(eval_key("routing/spearman_depth_loss")),
                "val_loss": run.data.metrics.get("val/loss"),
            }
        )
    return sorted(out, key=lambda r: (r["model"], r["ec_inference"]))


def markdown(table: list[dict[str, Any]], when: str) -> str:
    def f(v: Any) -> str:
        if isinstance(v, list):
            return " / ".join(f"{x:.3f}" for x in v)
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    cols = [
        ("model", "model"),
        ("ec_inference", "rule"),
        ("capacity", "capacity per recursion"),
        ("active", "eval-mode active"),
        ("max_abs_gap", "max gap"),
        ("agreement", "agreement with top-k"),
        ("mean_depth", "mean depth"),
        ("acc_router", "acc (router)"),
        ("acc_topk", "acc (top-k, non-causal)"),
        ("bpb_router", "bpb (router)"),
        ("bpb_topk", "bpb (top-k)"),
        ("spearman_depth_loss", "Spearman(depth, loss)"),
    ]
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "| " + " | ".join("---" for _ in cols) + " |"
    body = ["| " + " | ".join(f(r[c[0]]) for c in cols) + " |" for r in table]
    return f"# Expert-choice inference rules ({when})\n\n" + "\n".join([head, sep, *body]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-sweep", action="store_true", help="tabulate an existing sweep")
    ap.add_argument("--storage", default="outputs", help="the sweep's storage_path")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    storage = Path(args.storage).resolve()
    if not args.skip_sweep:
        run_sweep(storage)
    table = rows(f"sqlite:///{storage / 'mlflow.db'}")
    when = (
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_inference.json").write_text(json.dumps({"when": when, "rows": table}, indent=2))
    (out / "router_inference.md").write_text(markdown(table, when))
    print(markdown(table, when))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
