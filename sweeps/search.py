"""Searching a sweep's space: random and Optuna (TPE) draws, checked before a trial starts, and
ASHA on cumulative training FLOPs.

Both searchers are Optuna samplers behind Ray Tune's ``OptunaSearch`` (``RandomSampler`` for
``random``, ``TPESampler`` for ``optuna``) over a define-by-run space (``SpaceFn``): first the
trial's point (variant × grid values × budget × seed), then each sampled axis whose ``when``
holds for what was drawn so far, so a router is never drawn for a vanilla model. ``GuardedSearch``
wraps it: each draw's TrainConfig is built and validated before Tune sees it; an invalid one is
recorded (``skipped.jsonl`` in the sweep's state folder, with the reason), told to Optuna as a
failure and replaced by a new draw, so it never starts. It also stops proposing once the next
trial's budget would take the sweep past ``max_total_flops``. Its state (and Optuna's study)
is saved with the Tune experiment, so ``mor sweep resume`` continues the same search.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher

from mor.overrides import ConfigError
from sweeps.plan import TrialPoint, point_flops, trial_config
from sweeps.space import asha_milestones, draw_order, is_active
from sweeps.spec import POINT, SweepSpec
from sweeps.store import SweepStore

SKIPPED_FILE = "skipped.jsonl"
STOPPED_FILE = "stopped.jsonl"
RUNGS_FILE = "asha_rungs.json"  # ASHA's recorded losses per rung (Tune does not save them)
MAX_DRAWS = 200  # invalid draws in a row before the search gives up (space mostly invalid)


class SpaceFn:
    """Optuna define-by-run space of a spec (a plain object, so Optuna's study pickles)."""

    def __init__(self, spec: SweepSpec, points: list[TrialPoint]) -> None:
        self.spec, self.points = spec, {p.label: p for p in points}

    def __call__(self, trial: Any) -> None:
        point = self.points[trial.suggest_categorical(POINT, list(self.points))]
        drawn: dict[str, Any] = {}
        for key in draw_order(self.spec):  # grid axes live in the point
            d = self.spec.space[key]
            if not is_active(self.spec, key, point, drawn):
                continue  # the base config's value stands
            if d.kind == "choice":
                drawn[key] = trial.suggest_categorical(key, d.choice)
            elif d.kind == "randint":
                drawn[key] = trial.suggest_int(key, d.randint[0], d.randint[1] - 1)
            else:
                lo, hi = getattr(d, d.kind)
                drawn[key] = trial.suggest_float(key, lo, hi, log=d.kind == "loguniform")


def make_searcher(
    spec: SweepSpec, points: list[TrialPoint], state_dir: Path, max_concurrent: int
) -> GuardedSearch:
    """The spec's searcher (random or optuna), guarded; seeded, so a rerun draws the same."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = (
        optuna.samplers.TPESampler(seed=0)
        if spec.searcher == "optuna"
        else optuna.samplers.RandomSampler(seed=0)
    )
    inner = OptunaSearch(
        space=SpaceFn(spec, points), metric=spec.metric, mode=spec.mode, sampler=sampler
    )
    return GuardedSearch(inner, spec, points, state_dir, max_concurrent)


class GuardedSearch(Searcher):
    """Validates each draw before a trial starts, records skips and applies the FLOPs cap."""

    def __init__(
        self,
        searcher: Searcher,
        spec: SweepSpec,
        points: list[TrialPoint],
        state_dir: Path,
        max_concurrent: int,
    ) -> None:
        super().__init__(metric=spec.metric, mode=spec.mode)
        self.searcher = searcher  # the name Tune's save/restore follows through wrappers
        self.spec, self.state_dir, self.max_concurrent = spec, Path(state_dir), max_concurrent
        self.points = {p.label: p for p in points}
        self.total = trial_count_of(spec, len(points))
        self.inner_id: dict[str, str] = {}
        self.spent: dict[str, float] = {}  # trial → budget (running) or FLOPs used (done)
        self.done: set[str] = set()
        self.n_skipped = 0
        self.capped = False

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **_: Any):
        return True  # metric, mode and space come from the spec

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.capped:
            return Searcher.FINISHED
        for attempt in range(MAX_DRAWS):
            inner_id = trial_id if attempt == 0 else f"{trial_id}-draw{attempt}"
            raw = self.searcher.suggest(inner_id)
            if not isinstance(raw, dict):
                return raw
            point = self.points[raw.pop(POINT)]
            try:
                trial_config(self.spec, point, raw, name="check")
            except ConfigError as exc:
                self._skip(point, raw, str(exc).replace("invalid config:", "").strip())
                self._reject(inner_id)
                continue
            need = point_flops(self.spec, point) if self.spec.max_total_flops else 0.0
            if self.spec.max_total_flops and self.used() + need > self.spec.max_total_flops:
                self.capped = True
                self.searcher.on_trial_complete(inner_id, None, error=True)
                print(
                    f"[mor] search: max_total_flops {self.spec.max_total_flops:.3g} reached "
                    f"({self.used():.3g} used or planned, the next trial needs {need:.3g}); "
                    "no more trials proposed"
                )
                return Searcher.FINISHED
            self.inner_id[trial_id], self.spent[trial_id] = inner_id, need
            self._live(f"trial {len(self.inner_id)}/{self.total} proposed: {point.label} {raw}")
            return {POINT: point.model_dump(mode="json"), **raw}
        print(f"[mor] search: {MAX_DRAWS} invalid draws in a row; stopping the search")
        return Searcher.FINISHED

    def _reject(self, inner_id: str) -> None:
        """Tell Optuna an invalid draw: infeasible for TPE (see ``_constraints``)."""
        inner = self.searcher
        ot_trial = getattr(inner, "_ot_trials", {}).get(inner_id)
        if ot_trial is None or self.spec.searcher != "optuna":
            inner.on_trial_complete(inner_id, None, error=True)  # random: nothing to learn
            return
        # Constrained TPE ranks an infeasible trial below every feasible one, so TPE learns to
        # avoid the region (a failed trial it would ignore, and draw the same again).
        ot_trial.set_constraint("valid_config", 1.0)
        inner._ot_study.tell(ot_trial, 0.0)  # any value: infeasible ranks below all feasible
        inner._completed_trials.add(inner_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # Optuna only needs the final metric (intermediate training reports lack it)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id not in self.inner_id or trial_id in self.done:
            return
        self.done.add(trial_id)
        used = (result or {}).get("flops")
        if isinstance(used, (int, float)) and math.isfinite(used):
            self.spent[trial_id] = float(used)  # a stopped trial frees the rest of its budget
        self.searcher.on_trial_complete(self.inner_id[trial_id], result, error=error)
        self._live(f"trial {trial_id} {'failed' if error else 'done'}")

    def used(self) -> float:
        return sum(self.spent.values())

    def _live(self, event: str) -> None:
        """One line of the live table: progress, concurrency and the FLOPs spent."""
        cap = self.spec.max_total_flops
        flops = f"{self.used():.3g}" + (f" of max_total_flops {cap:.3g}" if cap else "")
        print(
            f"[mor] search ({self.spec.searcher}): {event} | {len(self.done)} done, "
            f"{len(self.inner_id) - len(self.done)} running (max_concurrent "
            f"{self.max_concurrent}), {self.n_skipped} skipped | FLOPs {flops}"
        )

    def _skip(self, point: TrialPoint, sampled: dict, reason: str) -> None:
        self.n_skipped += 1
        record = {"label": point.label, "sampled": sampled, "reason": reason}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / SKIPPED_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        keep(self.spec.resolved_storage_path, self.spec.name, self.state_dir / SKIPPED_FILE)
        print(f"[mor] search: skipped invalid draw {point.label} {sampled}: {reason}")

    def get_state(self) -> dict:
        keys = ("inner_id", "spent", "done", "n_skipped", "capped")
        return {k: getattr(self, k) for k in keys}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)


def trial_count_of(spec: SweepSpec, n_points: int) -> int:
    """Trials the searcher proposes: points × num_samples (random) or num_samples (optuna)."""
    return n_points * spec.num_samples if spec.searcher == "random" else spec.num_samples


class FlopsASHA(ASHAScheduler):
    """ASHA whose time is cumulative training FLOPs; every stop is recorded with its rung.

    Each trial validates at the first step past every rung (``eval.at_flops``), so the loss a
    rung compares is the one measured at that compute, for every architecture alike; reports
    without a validation loss are ignored by ASHA."""

    def __init__(self, spec: SweepSpec, state_dir: Path, tracking: tuple[str, str]) -> None:
        s = spec.scheduler
        assert s is not None
        super().__init__(
            time_attr="flops",
            metric=s.metric,
            mode=s.mode,
            # Above every budget: a trial that ends a little past its budget (measured routing)
            # must finish and be evaluated, never be stopped as if at a last rung.
            max_t=4 * max(spec.budgets),
            grace_period=s.grace_flops,
            reduction_factor=s.reduction_factor,
            stop_last_trials=False,
        )
        self.sweep, self.state_dir, self.tracking = spec.name, Path(state_dir), tracking
        self.storage = spec.resolved_storage_path
        self.milestones = asha_milestones(spec)
        self._loaded = False  # a resumed sweep reloads the rungs its killed driver recorded

    def _rungs_io(self, save: bool) -> None:
        path = self.state_dir / RUNGS_FILE
        rungs = self._brackets[0]._rungs  # one bracket (Tune's default): [(milestone, {id: v})]
        if save:
            data = [[m, {k: float(v) for k, v in rec.items()}] for m, rec in rungs]
            path.write_text(json.dumps(data))
            keep(self.storage, self.sweep, path)
        elif path.is_file():
            for (_, recorded), (_, saved) in zip(rungs, json.loads(path.read_text())):
                recorded.update(saved)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if not self._loaded:
            self._loaded = True
            self._rungs_io(save=False)
        action = super().on_trial_result(tune_controller, trial, result)
        if self._metric in result:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._rungs_io(save=True)
        if action == self.STOP:
            rung = max((m for m in self.milestones if m <= result["flops"]), default=0.0)
            record = {
                "trial": trial.trial_id,
                "run_name": f"{self.sweep}-{trial.trial_id}",  # TrainConfig.name (TAG_RUN_NAME)
                "rung_flops": rung,
                "flops": result["flops"],
                "step": int(result.get("step", 0)),
                "metric": result.get(self._metric),
                "metric_name": self._metric,
            }
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with open(self.state_dir / STOPPED_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            keep(self.storage, self.sweep, self.state_dir / STOPPED_FILE)
            print(
                f"[mor] ASHA: stopped trial {trial.trial_id} at the {rung:.3g}-FLOPs rung "
                f"({self._metric}={record['metric']:.4g})"
            )
            mark_stopped(*self.tracking, [record])
        return action


def keep(storage_path: str, sweep: str, path: Path) -> None:
    """A bookkeeping file, as it changes, kept beside the sweep's record (object storage): a
    driver resumed on another machine starts from it (sweeps/store.py)."""
    SweepStore.of(storage_path, sweep).keep(path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mark_stopped(uri: str, parent_run_id: str, records: list[dict]) -> list[str]:
    """Tag the training runs of early-stopped trials (KILLED, ``mor.stopped_early`` = the rung's
    FLOPs): partial results, never finished models."""
    from mlflow import MlflowClient

    from core.keys import TAG_RUN_NAME, TAG_STOPPED_EARLY

    client = MlflowClient(uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    marked = []
    for r in records:
        runs = client.search_runs(
            [exp],
            f"tags.mlflow.parentRunId = '{parent_run_id}' "
            f"and tags.`{TAG_RUN_NAME}` = '{r['run_name']}'",
        )
        for run in runs:
            client.set_tag(run.info.run_id, TAG_STOPPED_EARLY, f"{r['rung_flops']:.6g}")
            if r.get("metric") is not None:  # the loss the rung compared (measured there)
                client.log_metric(run.info.run_id, r["metric_name"], r["metric"], step=r["step"])
            client.set_terminated(run.info.run_id, status="KILLED")
            marked.append(run.info.run_id)
    return marked


def release_orphaned_placement_groups() -> int:
    """Remove the placement groups whose creating actor is dead; how many were removed.

    Ray Train V2's controller creates its worker group's placement group and removes it when
    training ends. A controller that dies with its Tune trial (ASHA stopped it) leaves that to
    a detached cleaner actor which finds the cluster through the state API; where several Ray
    instances share a machine it connects to the wrong one and never cleans up, and the
    trial's CPUs stay reserved until the sweep ends (the next trials wait forever). Only
    groups made by an actor (Train controllers) are touched: Tune's own trial groups are the
    driver's. Reads the GCS table through Ray's private state accessor (Ray 2.60)."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        made_by_actor = pg.creator_actor_id.strip(b"\xff") != b""  # nil: the driver made it
        if (
            made_by_actor
            and pg.creator_actor_dead
            and not pg.is_detached
            and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
        ):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


class PlacementGroupJanitor(Callback):
    """Tune callback: releases orphaned placement groups every few seconds of the sweep."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s, self._last = every_s, 0.0

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        try:
            n = release_orphaned_placement_groups()
        except Exception as exc:  # a private Ray API: never let it stop the sweep
            print(f"[mor] could not check for orphaned placement groups: {exc}")
            self.every_s = math.inf
            return
        if n:
            print(f"[mor] released {n} placement group(s) left by stopped trials")
