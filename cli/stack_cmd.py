"""``mor up|status|down``: a local Ray head and MLflow server that sweeps and training use.

    mor up [--state-dir DIR] [--ray-port 6379] [--dashboard-port 8265] [--mlflow-port 5000]
           [--nodes N [--cpus-per-node C]]
    mor status [--json]
    mor down

While the stack is up, ``mor sweep submit`` sends jobs to its Ray head; ``mor train`` and
``mor sweep run`` use it as their Ray cluster and track runs on its MLflow server.
``--nodes N`` starts N Ray nodes on this machine (the head and N - 1 more, each with its own
temp dir and the custom resource ``mor_node_<i>``): a multi-node cluster for rehearsing
placement and node failures; ``mor up --nodes N`` again restarts a lost node.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.stack import StackRecord

STACK_NOTE = """While the stack is up, `mor sweep submit` sends jobs to its Ray head,
`mor train` and `mor sweep run` use it as their Ray cluster, and runs are tracked on its
MLflow server (unless --address, $RAY_ADDRESS, tracking.uri or $MLFLOW_TRACKING_URI say otherwise).
State lives in --state-dir, else $MOR_STACK_DIR, else ~/.mor/stack; use $MOR_STACK_DIR for a
non-default place so that every command finds it.
--nodes N starts N Ray nodes on this machine (the head and N - 1 more, each with its own temp
dir and the custom resource mor_node_<i>): a multi-node cluster for rehearsing placement and
node failures; `mor up --nodes N` again restarts a lost node."""


def _state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the stack keeps stack.json, logs, mlflow.db and artifacts "
        "(default: $MOR_STACK_DIR, else ~/.mor/stack)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from cli.help import add_command

    u = add_command(
        subparsers,
        "up",
        help="start the local stack (Ray head + MLflow server), bound to loopback",
        description="Start a local Ray head and MLflow server that sweeps and training use.\n\n"
        + STACK_NOTE,
        example_lines=[
            "mor up",
            "mor up --mlflow-port 5001 --state-dir /data/mor-stack",
            "mor up --nodes 2 --cpus-per-node 1     # rehearse a two-node cluster",
        ],
    )
    _up_arguments(u)
    s = add_command(
        subparsers,
        "status",
        help="health of the local stack (exit 0 if healthy, 1 if not)",
        description="Check each service of the local stack (Ray head, MLflow server): its\n"
        "process and whether it answers. Exit 0 when all are healthy, else 1.",
        example_lines=["mor status", "mor status --json"],
    )
    _state_arg(s)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=run_status)
    d = add_command(
        subparsers,
        "down",
        help="stop the local stack (only the processes it started; data is kept)",
        description="Stop the processes `mor up` started (by their recorded ids, nothing else);\n"
        "the MLflow database, artifacts and logs stay in the state folder.",
        example_lines=["mor down", "mor down --state-dir /data/mor-stack"],
    )
    _state_arg(d)
    d.set_defaults(func=run_down)


def _up_arguments(u: argparse.ArgumentParser) -> None:
    from core.stack import DEFAULT_PORTS

    _state_arg(u)
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    u.add_argument("--ray-port", type=int, help=f"Ray GCS port (default {DEFAULT_PORTS['ray']})")
    u.add_argument(
        "--dashboard-port",
        type=int,
        help=f"Ray dashboard + job server port (default {DEFAULT_PORTS['dashboard']})",
    )
    u.add_argument(
        "--mlflow-port", type=int, help=f"MLflow server port (default {DEFAULT_PORTS['mlflow']})"
    )
    u.add_argument(
        "--nodes",
        type=_positive,
        help="Ray nodes on this machine: the head and N-1 more (default 1; on a running "
        "stack: as recorded, a lost node restarted)",
    )
    u.add_argument(
        "--cpus-per-node",
        type=_positive,
        help="CPUs each Ray node offers (default with --nodes: the cores split between them)",
    )
    u.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for health")
    u.set_defaults(func=run_up)


def _print_addresses(record: StackRecord) -> None:
    print(f"[mor]   Ray dashboard + jobs : {record.ray.dashboard}")
    print(f"[mor]   Ray address          : {record.ray.address}")
    if record.nodes:
        print(f"[mor]   Ray nodes            : {len(record.nodes) + 1} (mor_node_0 .. "
              f"mor_node_{len(record.nodes)}), {record.ray.num_cpus} CPU each")  # fmt: skip
    print(f"[mor]   MLflow               : {record.mlflow.url}")
    print(f"[mor]   state                : {record.state_dir}")


def run_up(args: argparse.Namespace) -> int:
    from core.stack import StackError, up

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"[mor] warning: binding {args.host}: MLflow has no authentication; "
            "only do this on a trusted network"
        )
    try:
        record, started = up(
            args.state_dir,
            host=args.host,
            ray_port=args.ray_port,
            dashboard_port=args.dashboard_port,
            mlflow_port=args.mlflow_port,
            timeout=args.timeout,
            nodes=args.nodes,
            cpus_per_node=args.cpus_per_node,
        )
    except StackError as exc:
        print(f"error: {exc}")
        return 1
    print("[mor] stack up" if started else "[mor] stack already running")
    _print_addresses(record)
    print(f"[mor] next: mor sweep submit SPEC.yaml, then browse {record.mlflow.url}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from core.stack import check, check_nodes, is_healthy, read_record, resolve_dir

    state = resolve_dir(args.state_dir)
    record = read_record(state)
    report = check(record, deep=True) if record else {}
    ok = record is not None and record.status == "up" and is_healthy(report)
    nodes = check_nodes(record, deep=True) if ok and record else {}
    lost = [name for name, n in nodes.items() if not n.healthy]
    report.update(nodes)
    if args.json:
        services = {k: {**asdict(v), "healthy": v.healthy} for k, v in report.items()}
        out: dict[str, Any] = {"healthy": ok, "state_dir": str(state), "services": services}
        if record:
            out["status"] = record.status
        out["nodes_lost"] = lost
        print(json.dumps(out, indent=2))
        return 0 if ok and not lost else 1
    if not record:
        print(f"[mor] no stack recorded in {state} (start one with `mor up`)")
        return 1
    for name, svc in report.items():
        state_word = "healthy" if svc.healthy else (
            "not answering" if svc.pid_alive else "not running"
        )  # fmt: skip
        print(f"[mor] {name:<7} {state_word:<14} pid {svc.pid}  {svc.where}")
    if ok and lost:
        print(f"[mor] stack degraded: {', '.join(lost)} lost (restart with `mor up --nodes "
              f"{len(record.nodes) + 1}`)")  # fmt: skip
        return 1
    print("[mor] stack healthy" if ok else "[mor] stack NOT healthy (try `mor down && mor up`)")
    return 0 if ok else 1


def run_down(args: argparse.Namespace) -> int:
    from core.stack import STACK_FILE, StackError, down, resolve_dir

    state = resolve_dir(args.state_dir)
    if not (state / STACK_FILE).exists():
        print(f"[mor] no stack recorded in {state}: nothing to stop")
        return 0
    try:
        stopped = down(state)
    except StackError as exc:
        print(f"error: {exc}")
        return 1
    print(f"[mor] stack down: stopped {len(stopped)} processes (data kept in {state})")
    return 0
