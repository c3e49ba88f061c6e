"""System metrics of training and eval runs: CPU, memory, disk, network and GPUs where present.

The sampling is MLflow's own (its CPU, disk, network and NVIDIA/AMD GPU monitors, psutil and
nvidia-ml-py underneath) and the keys are MLflow's, ``system/cpu_utilization_percentage``,
``system/system_memory_usage_megabytes``, ``system/gpu_0_utilization_percentage``..., so the
run page's "System metrics" tab shows them. What differs from ``mlflow.start_run(
log_system_metrics=True)``: no fluent active run (a run here is created by the driver and
written to by a Ray worker, and an eval run is created only after its evaluation, so that a
dead tracking server never costs an evaluation), and a last sample when sampling stops, so a
run shorter than one interval still has one point.

The interval is MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (seconds), default 10:
one sample costs a few psutil/NVML reads and, for a live run, one ``log_batch``.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

DEFAULT_INTERVAL_S = 10.0
PREFIX = "system/"

Sink = Callable[[list[Any]], None]
"""Takes one sample as a list of ``mlflow.entities.Metric``."""


def sampling_interval() -> float:
    """MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (seconds), else 10."""
    from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL as ENV

    value = ENV.get()
    return float(value) if value else DEFAULT_INTERVAL_S


def _monitors() -> list[Any]:
    """MLflow's monitors: CPU and memory, disk, network, and the GPUs this node has."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    # Their constructors raise without a GPU (or without nvidia-ml-py): then no GPU metrics.
    for module, name in (("gpu_monitor", "GPUMonitor"), ("rocm_monitor", "ROCMMonitor")):
        try:
            found = importlib.import_module(f"mlflow.system_metrics.metrics.{module}")
            monitors.append(getattr(found, name)())
            break
        except Exception:
            logging.getLogger(__name__).debug("no %s on this node", name, exc_info=True)
    return monitors


class SystemMetricsSampler:
    """Samples every ``interval_s`` on a daemon thread and hands each sample to ``sink``;
    ``stop`` takes a last sample. ``node`` names a node of a multi-node run
    (``system/<node>/...``, MLflow's convention); steps count from ``first_step``.
    A sink that raises costs that sample only (system metrics are never worth a run)."""

    def __init__(
        self,
        sink: Sink,
        interval_s: float | None = None,
        node: str | None = None,
        first_step: int = 0,
    ) -> None:
        self.sink, self.interval = sink, interval_s or sampling_interval()
        self.prefix = PREFIX + (f"{node}/" if node else "")
        self.step = first_step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monitors: list[Any] = []
        self._warned = False

    def start(self) -> SystemMetricsSampler:
        self._monitors = _monitors()
        self._collect()  # primes psutil's CPU counters: a first reading would be 0%
        for m in self._monitors:
            m.clear_metrics()
        self._thread = threading.Thread(target=self._run, name="mor-system-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, then log the last (partial) interval as one more sample."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()

    def __enter__(self) -> SystemMetricsSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _collect(self) -> None:
        for m in self._monitors:
            m.collect_metrics()

    def _sample(self) -> None:
        from mlflow.entities import Metric

        self._collect()
        ts, values = int(time.time() * 1000), {}
        for m in self._monitors:
            values.update(m.aggregate_metrics())
            m.clear_metrics()
        metrics = [Metric(self.prefix + k, float(v), ts, self.step) for k, v in values.items()]
        self.step += 1
        try:
            self.sink(metrics)
        except Exception as exc:
            if not self._warned:
                print(f"[mlflow] system metrics not logged: {exc}")
            self._warned = True


def live_sink(tracking_uri: str, run_id: str) -> Sink:
    """A sink that logs each sample to ``run_id`` at once."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return lambda metrics: client.log_batch(run_id, metrics=metrics)


def next_step(tracking_uri: str, run_id: str, key: str = "cpu_utilization_percentage") -> int:
    """The step after the last system-metrics sample of ``run_id`` (0 for a new run): a
    resumed training run continues its series instead of writing over its first steps."""
    from mlflow import MlflowClient

    try:
        history = MlflowClient(tracking_uri).get_metric_history(run_id, PREFIX + key)
    except Exception:
        return 0
    return max((m.step for m in history), default=-1) + 1


def log_samples(client: Any, run_id: str, samples: list[Any]) -> None:
    """Log samples kept by a buffering sink (an evaluation's, logged once its run exists)."""
    for i in range(0, len(samples), 500):
        client.log_batch(run_id, metrics=samples[i : i + 500])
