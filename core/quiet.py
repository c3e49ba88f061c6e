"""How much of Ray's and DeepSpeed's own logging reaches the console: the one home of it.

By default a run shows the platform's own lines (progress, summary) and every warning and
error; Ray's informational logs (start-up banner, ``Reporting training result N:
TrainingReport(...)`` dumps, worker-group set-up) and DeepSpeed's info logs stay in Ray's
log files (``/tmp/ray/session_latest/logs``). ``--verbose`` on train/sweep commands, or
``MOR_VERBOSE=1``, brings them back. Errors are never filtered.

Ray Train's print patch (``RAY_TRAIN_ENABLE_PRINT_PATCH``) is turned off in both modes: on
a worker it both prints and logs each ``print`` to the console, so every line appeared twice.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import TracebackType
from typing import Any

VERBOSE_ENV = "MOR_VERBOSE"
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
QUIET_LOGGERS = {
    # "Token authentication is enabled for this Ray cluster" at every local start: the
    # platform turns token auth on itself (core.endpoints.enable_ray_token_auth).
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # "Creating initial MLflow database tables..." when a sqlite store is first used.
    "mlflow.store.db.utils": logging.WARNING,
    "alembic": logging.WARNING,
}
"""Driver-side loggers that are quieter by default (their errors still show)."""
BENIGN_WORKER_LINES = (
    # DeepSpeed on a CPU worker, once per worker: the expected accelerator, and its op build.
    "Setting accelerator to CPU",
    "deepspeed_shm_comm_op built successfully",
    # Ray Train's controller, every run: a C++ notice about its preemption watcher actor.
    "PreemptionWatcher' and ID: .* has constructor arguments in the object store",
    # Ray Train's placement-group cleaner told to stop without waiting (trainers/launcher.py).
    "Monitor thread did not exit within",
)
"""Worker log lines Ray's driver drops by default (``RAY_DEDUP_LOGS_SKIP_REGEX``): specific,
known-benign notices, never a warning class or an error."""


TUNE_TRIAL_ERROR = ("ray.tune.execution.tune_controller", "Trial task failed for trial")
"""Tune's line when a trial fails: kept, without the ~60-line traceback of Ray's wrappers
(the trial's own traceback is printed by its worker, and Tune writes the whole of it to the
trial's ``error.txt``; the sweep's table names that file)."""


class _OneLine(logging.Filter):
    """Keeps a record whose message starts with ``prefix`` but drops its traceback."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith(self.prefix):
            record.exc_info, record.exc_text = None, None
        return True


def node_env() -> dict[str, str]:
    """Variables for a process that starts Ray nodes (a local ``ray.init``, ``mor up``'s
    ``ray start``); a value the user set wins.

    A raylet warns each time its Python workers reach another multiple (from 4x) of its
    ``worker_maximum_startup_concurrency``, which defaults to its CPU count ("8 PYTHON worker
    processes have been started ... 4x the maximum expected startup concurrency (2)").
    Every trial is 3+ zero-CPU actors (Tune's trial, Train's controller, the worker group),
    so two trials on 2 cores trip it with nothing wrong (in both console modes: what the
    cluster keeps must not depend on verbosity). Raised to 3x the CPUs (at least 8), as
    SkyPilot does for the same reason; it also lets that many workers start at once, which
    only matters while a trial's actors start."""
    key = "RAY_worker_maximum_startup_concurrency"
    return {key: os.environ.get(key, str(max(8, 3 * (os.cpu_count() or 1))))}


def verbose() -> bool:
    """True when ``MOR_VERBOSE`` is set to anything but 0/false/no (``--verbose`` sets it)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def configure(flag: bool = False) -> None:
    """Set this process's console mode before Ray starts: ``flag`` (``--verbose``) turns
    verbose on; environment variables carry the mode to Ray's processes, which inherit them
    (and Ray Train forwards ``RAY_TRAIN_ENABLE_PRINT_PATCH`` to its workers itself)."""
    if flag:
        os.environ[VERBOSE_ENV] = "1"
    os.environ.setdefault(PRINT_PATCH_ENV, "0")
    # Ray's driver merges worker lines that differ only in numbers ("[repeated 3x across
    # cluster]"): progress lines are exactly that, so they are never merged. Read at import.
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"^\[mor\] ")
    for key, value in node_env().items():
        os.environ.setdefault(key, value)
    if not verbose():
        # MLflow prints "🏃 View run NAME at: URL" whenever a run on a tracking server ends
        # (every trial, every eval): the sweep's summary names the server once.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(BENIGN_WORKER_LINES))
        # Ray Data's progress bars (the data stage, before training starts).
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        # Bars no caller can turn off: lm-eval's request building (``Task.build_all_requests``
        # passes no ``disable``) and HF datasets' "Generating test split". tqdm reads
        # TQDM_DISABLE when it is imported: Ray's processes started from here inherit it.
        # (lm-eval's bars that pass ``disable=`` follow ``MoRLM(progress=...)`` instead.)
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        tune_logger = logging.getLogger(TUNE_TRIAL_ERROR[0])
        if not any(isinstance(f, _OneLine) for f in tune_logger.filters):
            tune_logger.addFilter(_OneLine(TUNE_TRIAL_ERROR[1]))


MODE_ENV = (
    VERBOSE_ENV,
    PRINT_PATCH_ENV,
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
    "RAY_DATA_DISABLE_PROGRESS_BARS",
    "TQDM_DISABLE",
    "HF_DATASETS_DISABLE_PROGRESS_BARS",
)
"""The variables by which ``configure`` tells Ray's worker processes the console mode."""


def ray_init_kwargs(address: str | None = "local") -> dict[str, Any]:
    """Extra ``ray.init`` arguments: the driver's ``ray`` logger at WARNING (no start-up
    banner) unless verbose. Workers' output still reaches the console (``log_to_driver``).

    Connecting to a running cluster (``mor up``'s, or another), the job's workers are
    children of raylets started elsewhere, without this process's environment: the console
    mode travels to them as the job's ``runtime_env`` variables. (A local Ray started here
    inherits it; an env-only runtime_env there would only cost its pre-started workers.)"""
    kwargs: dict[str, Any] = {} if verbose() else {"logging_level": logging.WARNING}
    if address not in (None, "local"):
        env = {k: os.environ[k] for k in MODE_ENV if k in os.environ}
        kwargs["runtime_env"] = {"env_vars": env}
    return kwargs


def ray_train_log_level() -> str:
    """``ray.train.LoggingConfig(log_level=...)``: Ray Train's own console logs (report dumps,
    worker-group start-up) at WARNING unless verbose."""
    return "INFO" if verbose() else "WARNING"


def tune_verbosity() -> int:
    """``tune.RunConfig(verbose=...)``: 1 = Tune reports progress only through the sweep's
    own reporter (``sweeps.progress.SweepTable``); 2 = Tune's status table and results."""
    return 2 if verbose() else 1


def quiet_worker() -> None:
    """On a training worker, before DeepSpeed starts, unless verbose: the root logger and
    DeepSpeed's at WARNING. Ray Train logs each ``Reporting training result N:
    TrainingReport(...)`` at INFO through a logger named by its file path, which its own
    ``LoggingConfig`` level does not cover; it reaches the console through the root logger."""
    if verbose():
        return
    logging.getLogger().setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return
    ds_logger.setLevel(logging.WARNING)


def honour_lost_sigterm() -> None:
    """In a Ray worker process (a Tune trial, a Train worker): make a SIGTERM that Python
    swallowed end the process after all, without printing it.

    Ray's worker turns SIGTERM into ``SystemExit`` (``ray._private.worker``'s
    ``sigterm_handler``). When Tune tears a finished trial's actor down, the signal can land
    while Python runs a weakref callback (seen: ``WeakSet._remove``, once in 42 trials); an
    exception there is "unraisable", so Python prints "Exception ignored in ... SystemExit: 1"
    and the process goes on instead of exiting. This hook sends the signal again, to be
    handled where it can end the process (one swallowed again is sent again). Any other
    unraisable exception goes to the previous hook, printed as before: nothing else is
    hidden."""
    previous = sys.unraisablehook
    if getattr(previous, "_mor_lost_sigterm", False):
        return

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, SystemExit) and _from_sigterm_handler(
            unraisable.exc_traceback
        ):
            # From another thread, a moment later: sent from here, the handler would run at
            # once, still inside the callback, and be swallowed again.
            threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return
        previous(unraisable)

    hook._mor_lost_sigterm = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _from_sigterm_handler(tb: TracebackType | None) -> bool:
    """True when the exception passed through a function named ``sigterm_handler``."""
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "sigterm_handler":
            return True
        tb = tb.tb_next
    return False
