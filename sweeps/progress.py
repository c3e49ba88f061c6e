"""What a sweep shows while it runs: each trial by its variant and budget, in a live table.

Tune's own reporter prints its whole status box every few seconds under a trial name such as
``trial_fn_27869_00003``; this one is the sweep's. On a terminal the table is redrawn in place
(``rich.live``): one screen, whatever the sweep's length. Into a file or a pipe (a Ray Job's
log, CI) it writes one line when a trial starts, finishes or fails and the table once at the
end, so a log stays short. ``--verbose`` / ``MOR_VERBOSE=1`` gives Tune's own output back
(``core.quiet``). Tune's trials and their folders are named here too, from the same label.
"""

from __future__ import annotations

import atexit
import math
import re
import sys
import time
from typing import Any

from ray.tune import ProgressReporter

from sweeps.plan import trial_title, with_sampled
from sweeps.spec import POINT

COLUMNS = ("trial", "status", "step", "train loss", "val loss", "FLOPs so far")
"""The table's columns, then the sweep's metric once a trial reports it (after its eval)."""
_STATUS = {"TERMINATED": "finished", "ERROR": "failed", "RUNNING": "running"}


def trial_label(config: dict[str, Any]) -> str:
    """A trial's label from its Tune config: its grid point's, with the searcher's draws."""
    sampled = {k: v for k, v in config.items() if k != POINT}
    return with_sampled((config.get(POINT) or {}).get("label") or "", sampled)


def trial_name(trial: Any) -> str:
    """Tune's name of a trial (``TuneConfig.trial_name_creator``): 'vanilla @ 2e12'."""
    return trial_title(trial_label(trial.config))


def trial_dirname(trial: Any) -> str:
    """A trial's folder (``TuneConfig.trial_dirname_creator``): its name as a path component,
    then Tune's trial id, which keeps it unique ('vanilla_2e12_1a2b3_00000')."""
    safe = re.sub(r"[^A-Za-z0-9.=-]+", "_", trial_name(trial)).strip("_")
    return f"{safe[:80]}_{trial.trial_id}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def trial_row(trial: Any, metric: str) -> list[str]:
    """One trial's cells: name, status, step, losses, training FLOPs so far / its budget,
    and the sweep's metric when the trial has reported it."""
    last = trial.last_result or {}
    budget = (trial.config.get(POINT) or {}).get("budget")
    flops = last.get("flops")
    spent = "" if flops is None else f"{flops:.3g}"
    if spent and budget:
        spent += f" / {budget:.3g}"
    step = last.get("step")
    return [
        trial_name(trial),
        _STATUS.get(trial.status, trial.status.lower()),
        "" if step is None else str(int(step)),
        _fmt(last.get("train/loss")),
        _fmt(last.get("val/loss")),
        spent,
        _fmt(last.get(metric)),
    ]


def failure(trial: Any) -> str:
    """' | ERROR (traceback: FILE)' of a failed trial: the last line of the error file Tune
    wrote (the innermost exception, e.g. 'FloatingPointError: training diverged ...')."""
    from pathlib import Path

    path = getattr(trial, "error_file", None)
    if not path or not Path(path).is_file():
        return ""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    return f" | {(lines or ['unknown error'])[-1][:300]} (traceback: {path})"


class SweepTable(ProgressReporter):
    """Tune's progress reporter for a sweep (``RunConfig(progress_reporter=...)``)."""

    def __init__(self, metric: str, refresh_s: float = 1.0) -> None:
        self.metric, self.refresh_s = metric, refresh_s
        self._status: dict[str, str] = {}
        self._last = 0.0
        self._live: Any = None

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its run config with the sweep
        return {**self.__dict__, "_live": None}

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self._status, self._last, self._live = {}, 0.0, None

    def headers(self) -> list[str]:
        return [*COLUMNS, self.metric.removeprefix("eval/")]

    def should_report(self, trials: list, done: bool = False) -> bool:
        if done or self._changed(trials):
            return True
        return sys.stdout.isatty() and time.monotonic() - self._last >= self.refresh_s

    def _changed(self, trials: list) -> bool:
        return any(self._status.get(t.trial_id) != t.status for t in trials)

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        self._last = time.monotonic()
        if sys.stdout.isatty():
            self._redraw(trials, done)
        else:
            self._lines(trials, done)
        self._status = {t.trial_id: t.status for t in trials}

    def table(self, trials: list, width: int = 200) -> Any:
        """The trials as a rich table. Where one line per trial does not fit in ``width``
        (an 80-column terminal), a compact layout: headers on two lines, the FLOPs without
        the budget (the trial's name has it), one space between columns; never a cut cell."""
        from rich.table import Table

        headers, rows = self.headers(), [trial_row(trial, self.metric) for trial in trials]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
        compact = sum(widths) + 2 * (len(widths) - 1) > width
        if compact:
            headers = [h.replace(" ", "\n", 1).replace("/", "/\n", 1) for h in headers]
            rows = [[*r[:5], r[5].split(" / ")[0], *r[6:]] for r in rows]
        table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=compact)
        for h in headers:
            justify = "left" if h in ("trial", "status") else "right"
            table.add_column(h, justify=justify)
        for row in rows:
            table.add_row(*row)
        return table

    def _redraw(self, trials: list, done: bool) -> None:
        from rich.live import Live

        if self._live is None:
            self._live = Live(auto_refresh=False, redirect_stdout=True, redirect_stderr=True)
            self._live.start()
            atexit.register(self._stop)  # a sweep cut short still gives the terminal back
        self._live.update(self.table(trials, self._live.console.width), refresh=True)
        if done:
            self._stop()

    def _stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _lines(self, trials: list, done: bool) -> None:
        """Not a terminal: a line per trial that started or ended, the table at the end."""
        for trial in trials:
            if self._status.get(trial.trial_id) == trial.status or trial.status == "PENDING":
                continue
            cells = dict(zip(self.headers(), trial_row(trial, self.metric), strict=True))
            extra = "".join(
                f" | {h} {cells[h]}" for h in ("step", "val loss", self.headers()[-1]) if cells[h]
            )
            if trial.status == "ERROR":
                extra += failure(trial)
            print(f"[mor] trial {cells['trial']}: {cells['status']}{extra}", flush=True)
        if done:
            from rich.console import Console

            Console(width=200, highlight=False, soft_wrap=True).print(self.table(trials))
