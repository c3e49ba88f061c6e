"""Read what trainers and evals logged to MLflow into pandas tables (no second store).

Layout in MLflow: a sweep parent run (tag ``mor.kind=sweep``) → one training run per trial
(params ``resolved_model.*``, metrics ``flops``/``tokens``/``val/loss``) → one eval run per
trained model (tag ``mor.kind=eval``) with ``eval/d<point>/<key>`` metrics per depth point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
from mlflow import MlflowClient

_POINT_KEY = re.compile(r"^eval/d(?P<point>[^/]+)/(?P<key>.+)$")


@dataclass
class SweepRuns:
    trials: pd.DataFrame  # one row per training run
    points: pd.DataFrame  # one row per (training run, depth point)
    parent_run_ids: list[str]  # the sweeps' parent runs (empty for a plain experiment)
    experiment_ids: list[str]


def _experiments(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _all_runs(client: MlflowClient, exp_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def resolve(client: MlflowClient, name: str) -> tuple[list[str], list[str]]:
    """A sweep name (its parent runs) or an experiment name → (experiment ids, parent ids)."""
    exp_ids = _experiments(client)
    sweeps = _all_runs(
        client, exp_ids, f"tags.`mor.kind` = 'sweep' and tags.`mlflow.runName` = '{name}'"
    )
    if sweeps:
        return sorted({r.info.experiment_id for r in sweeps}), [r.info.run_id for r in sweeps]
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ValueError(
            f"{name!r} is neither a sweep nor an MLflow experiment at {client.tracking_uri}"
        )
    return [exp.experiment_id], []


def load_runs(tracking_uri: str, names: list[str]) -> SweepRuns:
    """Trials and their per-depth evaluation points for one or more sweeps or experiments."""
    client = MlflowClient(tracking_uri)
    exp_ids: list[str] = []
    parents: list[str] = []
    for name in names:
        e, p = resolve(client, name)
        exp_ids += [x for x in e if x not in exp_ids]
        parents += p
    train_runs = _all_runs(client, exp_ids, "tags.`mor.sharing` != ''")
    if parents:
        train_runs = [r for r in train_runs if r.data.tags.get("mlflow.parentRunId") in parents]
    eval_runs = _all_runs(client, exp_ids, "tags.`mor.kind` = 'eval'")
    eval_by_parent = {r.data.tags.get("mlflow.parentRunId"): r for r in eval_runs}
    trial_rows, point_rows = [], []
    for run in train_runs:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        row = {
            "run_id": run.info.run_id,
            "name": t.get("mlflow.runName", run.info.run_id),
            "status": run.info.status,
            "sharing": t.get("mor.sharing"),
            "router": t.get("mor.router"),
            "num_recursions": int(t.get("mor.num_recursions", 1)),
            "kv_cache": t.get("mor.kv_cache"),
            "preset": p.get("model.preset"),
            "params_non_embedding": _num(p.get("model.params_non_embedding")),
            "params_total": _num(p.get("model.params_total")),
            "train_flops": m.get("flops"),
            "tokens": m.get("tokens"),
            "val_nll": m.get("val/loss"),
            "train_loss": m.get("train/loss"),
            "sweep": t.get("mlflow.parentRunId"),
            "label": t.get("mor.label"),
        }
        row["model"] = model_label(row)
        trial_rows.append(row)
        ev = eval_by_parent.get(run.info.run_id)
        if ev is None:
            continue
        per_point: dict[str, dict[str, float]] = {}
        for key, value in ev.data.metrics.items():
            match = _POINT_KEY.match(key)
            if match:
                per_point.setdefault(match["point"], {})[match["key"]] = value
        for point, values in per_point.items():
            point_rows.append(
                {
                    "run_id": run.info.run_id,
                    "model": row["model"],
                    "sharing": row["sharing"],
                    "router": row["router"],
                    "num_recursions": row["num_recursions"],
                    "kv_cache": row["kv_cache"],
                    "point": point,
                    "fixed_depth": point != "router",
                    **values,
                }
            )
    return SweepRuns(pd.DataFrame(trial_rows), pd.DataFrame(point_rows), parents, exp_ids)


def model_label(row: dict) -> str:
    """Short human name of a configuration, e.g. 'middle_cycle N_r=2 expert_choice'."""
    if row.get("label"):
        return str(row["label"]).split(",budget=")[0]
    if row.get("sharing") in (None, "none"):
        return "vanilla"
    router = row.get("router") or "none"
    kind = "recursive" if router == "none" else router.replace("_choice", "-choice")
    kv = "" if row.get("kv_cache") in (None, "recursion_wise") else " kv-shared"
    return f"{row['sharing']} N_r={row['num_recursions']} {kind}{kv}"


def _num(v: str | None) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None
