"""Ray Train's ``TorchTrainer`` with its placement-group cleaner fixed for shared machines.

Ray 2.60's ``PlacementGroupCleanerCallback`` starts a detached ``PlacementGroupCleaner``
actor that asks the State API, every second, whether the run's controller is alive (so it
can remove the run's placement group if the controller dies). Two problems here:

- The State API client inside that actor finds its cluster from ``RAY_ADDRESS``, else by
  looking for running GCS processes on the machine. Ray does not set ``RAY_ADDRESS`` in a
  local cluster's processes, so on a machine where other Ray clusters run (other users,
  CI jobs, the `mor up` stack beside a local run) every check raised ``ConnectionError:
  Found multiple active Ray instances`` and the monitor thread died with a ~30-line
  traceback at the end of every run (and the cleaner did nothing). The cleaner is now
  started with ``RAY_ADDRESS`` set to its own cluster's GCS address.
- Its stop at the end of every run waits for the current liveness query (10 s timeout):
  12 s of a 33 s tiny run, in every training and every sweep trial. By then the controller
  has removed the placement group itself, so the stop request is sent and not awaited; the
  cleaner ends at its next check.

Its controller also polls the workers every 0.5 s instead of Ray's 2 s
(``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, unless set): each checkpoint report waits for a poll,
and so do a run's start and end (~5 s of a 9-step tiny run, measured; nothing next to a real
run's steps). A poll is one small call per worker.

(Private Ray API: pinned with Ray.)
"""

from __future__ import annotations

import os
from typing import Any

POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def torch_trainer_class() -> type:
    """``TorchTrainer`` whose placement-group cleaner knows its cluster and is not waited for,
    polling its workers every 0.5 s (Ray Train passes the variable on to its controller)."""
    os.environ.setdefault(POLL_INTERVAL_ENV, "0.5")
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback as Cleaner,
    )

    class ClusterBoundCleaner(Cleaner):
        def after_controller_start(self, train_run_context: Any) -> None:
            """Ray's, with ``RAY_ADDRESS`` in the cleaner actor's environment."""
            import ray
            from ray._common.constants import HEAD_NODE_RESOURCE_NAME
            from ray.train.v2._internal.execution.controller.placement_group_cleaner import (
                PlacementGroupCleaner,
            )

            context = ray.get_runtime_context()
            self._controller_actor_id = context.get_actor_id()
            try:
                self._cleaner = (
                    ray.remote(num_cpus=0)(PlacementGroupCleaner)
                    .options(
                        lifetime="detached",
                        get_if_exists=False,
                        resources={HEAD_NODE_RESOURCE_NAME: 0.001},
                        scheduling_strategy="DEFAULT",
                        runtime_env={"env_vars": {"RAY_ADDRESS": context.gcs_address}},
                    )
                    .remote(
                        controller_actor_id=self._controller_actor_id,
                        check_interval_s=self._check_interval_s,
                        get_actor_timeout_s=self._get_actor_timeout_s,
                        stop_timeout=self._stop_timeout,
                    )
                )
            except Exception as exc:  # as Ray's: the run goes on without the safety net
                print(f"[mor] placement-group cleaner not started ({exc})")
                self._cleaner = None
                return
            self._cleaner.start_monitoring.remote()

        def _stop_cleaner(self) -> None:
            if self._cleaner is not None:
                self._cleaner.stop.remote()
                self._cleaner = None

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [
                ClusterBoundCleaner() if isinstance(c, Cleaner) else c
                for c in super()._create_default_callbacks()
            ]

    return Trainer


def start_autoscaling_coordinator(timeout_s: float = 120.0) -> None:
    """Start Ray Data's ``AutoscalingCoordinator`` actor and wait until it answers.

    Ray Train 2.60's controller registers every run's resources with that detached actor
    (created on first use) and waits 5 s for the answer. On a loaded machine starting the
    actor takes longer, so runs printed Ray's 20-line "Failed to send resource request"
    traceback, twice each. Started and awaited here first, the request finds it running. A
    failure here changes nothing: Ray's own call then behaves (and warns) as before.
    """
    try:
        import ray
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote(), timeout=timeout_s)
    except Exception:  # private Ray API, a convenience only: never stop a run for it
        return
