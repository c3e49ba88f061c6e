"""Extra Ray nodes of the local stack (``mor up --nodes N``): a multi-node cluster on one machine.

Each extra node is a second (third, ...) raylet joined to the stack's head with ``ray start
--address``, for rehearsing what a real cluster does (placement across nodes, a node lost
mid-run and its return) before paying for one. What Ray 2.60 needs for it, found by trying:

- Its own ``--dashboard-agent-listen-port``: Ray's fixed default, 52365, may be taken (here
  by another user's cluster; Ray's own ``cluster_utils`` frees it for extra nodes too). Every
  other port (raylet, object manager, agents' gRPC, workers) Ray picks free.
- Its own ``--temp-dir`` (Ray's ``cluster_utils`` shares the head's; a separate one keeps the
  node's sessions, sockets and logs apart and `mor down` deletes it). Short: Unix socket
  paths under it must stay under 108 bytes.
- Node ``i`` carries the custom resource ``mor_node_<i>`` (the head ``mor_node_0``), so that
  work can be pinned to a node; all nodes have the address 127.0.0.1. A driver started on
  this machine attaches to the head (Ray prefers the head among nodes with its address).
- Loopback only, like the head: every node runs in Ray's single-machine mode
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; with it on, Ray rewrites 127.0.0.1 to the host's
  address, where the head's GCS does not listen). In that mode ``ray start --address`` refuses
  to run ("Multi-node Ray clusters are not supported on Windows and OSX"): a guard in the CLI
  only, which ``python -m core.nodes start ...`` (below) lifts for that one check; the node's
  processes then run in single-machine mode like the head's.
- Failure detection is Ray's GCS health check of each raylet (defaults: a check every 3 s, 5
  misses): set ``RAY_health_check_period_ms`` / ``RAY_health_check_failure_threshold`` in the
  environment of ``mor up`` (the head's GCS reads them) to notice a lost node sooner.

Only the standard library, pydantic, psutil (through ``core.procs``) and, for the deep check,
Ray's State API.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from core.procs import (
    console_script,
    free_port,
    owned,
    run_in_new_session,
    same_process,
    session_pids,
    stop,
    tail,
)

NODE_RESOURCE = "mor_node_{}"
"""Custom resource of node i (the head is node 0): ``{"mor_node_1": 1}``."""


class NodeStartError(RuntimeError):
    """``ray start`` of an extra node failed; the message holds its log's tail."""


class RayNode(BaseModel):
    """One extra Ray node of the stack, as recorded in ``stack.json``."""

    index: int
    """1, 2, ...: node 0 is the head."""
    num_cpus: int | None = None
    """CPUs it offers (None: Ray's detection, all of the machine's)."""
    temp_dir: str
    """Its Ray temp dir (sessions, sockets, logs)."""
    agent_port: int
    """Its dashboard agent's HTTP port."""
    log: str
    """Output of its ``ray start``."""
    session: int | None = None
    """Session id of its ``ray start`` (its pid): the node's processes live in it."""
    pids: dict[str, tuple[int, float]] = {}
    """(pid, create_time) of its raylet."""

    @property
    def resource(self) -> str:
        return NODE_RESOURCE.format(self.index)

    @property
    def raylet_pid(self) -> int | None:
        return self.pids["raylet"][0] if "raylet" in self.pids else None

    def alive(self) -> bool:
        """Its raylet runs (the recorded process, not a reused pid)."""
        return same_process(*self.pids.get("raylet", (None, None))) is not None


def new_node(stack_id: str, index: int, num_cpus: int | None, state_dir: Path) -> RayNode:
    # /tmp/mor-<id>/node<i>: Ray's socket paths (<temp>/session_<date>_<pid>/sockets/...)
    # must fit in 107 bytes; a state dir under a pytest tmp path would not.
    temp = Path(tempfile.gettempdir()) / f"mor-{stack_id[:8]}" / f"node{index}"
    return RayNode(
        index=index,
        num_cpus=num_cpus,
        temp_dir=str(temp),
        agent_port=free_port(),
        log=str(state_dir / f"ray-node{index}.log"),
    )


def start_node(
    node: RayNode, gcs_address: str, host: str, loopback: bool, env: dict[str, str]
) -> None:
    """``ray start --address`` for one extra node, in a new session; records its raylet."""
    start = [console_script("ray"), "start"]
    if loopback:  # Ray's CLI refuses a second node in single-machine mode: see the docstring
        start = [sys.executable, "-m", "core.nodes", "start"]
    cmd = [
        *start, f"--address={gcs_address}", f"--node-ip-address={host}",
        f"--temp-dir={node.temp_dir}", f"--dashboard-agent-listen-port={node.agent_port}",
        f"--resources={json.dumps({node.resource: 1})}", "--disable-usage-stats",
        *([f"--num-cpus={node.num_cpus}"] if node.num_cpus is not None else []),
    ]  # fmt: skip
    Path(node.temp_dir).mkdir(parents=True, exist_ok=True)
    session, rc = run_in_new_session(cmd, node.log, env)
    node.session = session
    node.pids = session_pids(session, ("raylet",))
    if rc != 0 or not node.alive():
        raise NodeStartError(
            f"`ray start` of node {node.index} failed (exit {rc}); its log {node.log}:\n"
            f"{tail(node.log)}"
        )


def node_processes(node: RayNode) -> list[Any]:
    """What is left of one extra node: its session, its raylet, their descendants."""
    return owned(node.session, None, None, node.pids.values())


def ensure_nodes(
    nodes: list[RayNode],
    target: int,
    make: Callable[[int], RayNode],
    start: Callable[[RayNode], None],
    save: Callable[[list[RayNode]], None],
) -> list[RayNode]:
    """Extra nodes 1..target-1 running: a lost one (its raylet gone) cleared and started
    again, a missing one made and started, one beyond ``target`` stopped. ``save`` records
    the list before each start (so that `mor down` finds a half-started node) and after.
    Returns the nodes started."""
    by_index: dict[int, RayNode] = {}
    for node in nodes:
        if node.index >= target:
            print(f"[mor] stopping node {node.index}")
            stop(lambda n=node: node_processes(n))
        else:
            by_index[node.index] = node
    started = []
    for i in range(1, target):
        node = by_index.get(i)
        if node is not None and node.alive():
            continue
        if node is not None:  # lost: its agents and workers may outlive the raylet
            print(f"[mor] node {i} is not running: restarting it")
            stop(lambda n=node: node_processes(n))
        else:
            node = make(i)
        by_index[i] = node
        save(sorted(by_index.values(), key=lambda n: n.index))
        try:
            start(node)
        finally:
            save(sorted(by_index.values(), key=lambda n: n.index))
        started.append(node)
    save(sorted(by_index.values(), key=lambda n: n.index))
    return started


def wait_registered(dashboard: str, nodes: list[RayNode], timeout: float) -> None:
    """Until each of ``nodes`` is ALIVE in the head's node table; NodeStartError if one
    exits or ``timeout`` passes."""
    deadline = time.time() + timeout
    while nodes:
        try:
            states = registered(dashboard)
        except Exception:  # the dashboard is still starting
            states = {}
        waiting = [n for n in nodes if states.get(n.resource) != "ALIVE"]
        if not waiting:
            return
        dead = [n for n in waiting if not n.alive()]
        if dead or time.time() > deadline:
            n = (dead or waiting)[0]
            why = "exited" if dead else f"not registered with the head after {timeout}s"
            raise NodeStartError(f"node {n.index} {why}; its log {n.log}:\n{tail(n.log)}")
        time.sleep(1.0)


def registered(dashboard: str) -> dict[str, str]:
    """State (ALIVE, DEAD) of each node the head knows, by its ``mor_node_<i>`` resource:
    Ray's State API over the dashboard (token auth on when the stack uses it)."""
    from ray.util.state import list_nodes

    from core.endpoints import enable_ray_token_auth  # Ray auth has one home

    enable_ray_token_auth()
    out: dict[str, str] = {}
    for n in list_nodes(address=dashboard, detail=True, raise_on_missing_output=False):
        for key in n.resources_total or {}:
            if key.startswith("mor_node_") and (key not in out or n.state == "ALIVE"):
                out[key] = n.state  # a restarted node: its new raylet ALIVE, the old DEAD
    return out


def _start_cli() -> int:
    """``ray start`` with the single-machine-mode guard on ``--address`` lifted (and only it):
    Ray's scripts module reads ``ENABLE_RAY_CLUSTER`` through its ``ray_constants`` name."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants
    import ray.scripts.scripts as scripts

    class _ClusterAllowed:
        ENABLE_RAY_CLUSTER = True

        def __getattr__(self, name: str) -> Any:
            return getattr(ray_constants, name)

    scripts.ray_constants = _ClusterAllowed()  # type: ignore[assignment]
    sys.argv[0] = "ray"
    return scripts.main()


if __name__ == "__main__":
    sys.exit(_start_cli())
