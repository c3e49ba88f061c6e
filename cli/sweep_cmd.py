"""``mor sweep run|resume|submit|status|logs|stop``: Ray Tune sweeps, locally or on a cluster."""

from __future__ import annotations

import argparse
import json
import os
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep", help="run, resume or submit a Ray Tune sweep", description=__doc__
    )
    sub = p.add_subparsers(dest="sweep_command", metavar="ACTION", required=True)

    r = sub.add_parser("run", help="run a sweep spec to the end (local Ray, or --address)")
    r.add_argument("items", nargs="*", metavar="SPEC.yaml|key=value")
    r.add_argument(
        "--address",
        help="an existing Ray cluster (default: $RAY_ADDRESS, else the `mor up` stack, "
        "else a local Ray started on demand)",
    )
    r.add_argument("--spec-from-env", action="store_true", help=argparse.SUPPRESS)
    r.set_defaults(func=run, extra_dest="items")

    rs = sub.add_parser("resume", help="continue an interrupted sweep without redoing trials")
    rs.add_argument("name")
    rs.add_argument("--storage-path", default="outputs", help="the sweep's storage_path")
    rs.add_argument("--address")
    rs.set_defaults(func=resume)

    s = sub.add_parser("submit", help="submit a sweep to a Ray cluster as a Ray Job")
    s.add_argument("items", nargs="*", metavar="SPEC.yaml|key=value")
    s.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard/job address, e.g. http://HEAD:8265 "
        "(default: $RAY_API_SERVER_ADDRESS or the `mor up` stack)",
    )
    s.add_argument("--wait", action="store_true", help="follow the job until it ends")
    s.set_defaults(func=submit, extra_dest="items")

    for name, fn, text in (
        ("status", job_status, "status of a submitted sweep job"),
        ("logs", job_logs, "logs of a submitted sweep job"),
        ("stop", job_stop, "stop a submitted sweep job"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument("job_id")
        q.add_argument("--address", default=None)
        q.set_defaults(func=fn)


def _spec(items: list[str]):
    from sweeps.spec import load_spec

    if not items or "=" in items[0]:
        raise ValueError(
            "SPEC.yaml: give the sweep spec file first, e.g. sweeps/configs/quickstart.yaml"
        )
    return load_spec(items[0], items[1:])


def _print_result(res) -> None:
    print(f"[mor] sweep {res.name!r} finished: {len(res.rows)} trials, {len(res.errors)} failed")
    for err in res.errors:
        print(f"[mor]   failed: {err}")
    if res.errors:
        print(f"[mor] rerun the failed trials with: mor sweep resume {res.name}")
    print(f"[mor] summary table: {res.summary_csv}")
    for extra in getattr(res, "artifacts", []):
        print(f"[mor] plot: {extra}")
    uri = res.tracking_uri
    if uri.startswith("sqlite:///"):
        print(f"[mor] browse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    else:
        print(f"[mor] browse: {uri}")
    print(f"[mor] MLflow parent run: {res.parent_run_id}")


def run(args: argparse.Namespace) -> int:
    from sweeps.driver import run_sweep

    if args.spec_from_env:
        from sweeps.jobs import spec_from_env

        spec = spec_from_env()
    else:
        spec = _spec(args.items)  # validated before Ray starts
    res = run_sweep(spec, address=args.address or _stack_ray())
    _print_result(res)
    return 1 if res.errors else 0


def resume(args: argparse.Namespace) -> int:
    from sweeps.driver import load_saved_spec, run_sweep

    spec = load_saved_spec(args.name, args.storage_path)
    res = run_sweep(spec, resume=True, address=args.address or _stack_ray())
    _print_result(res)
    return 1 if res.errors else 0


def _stack_ray() -> str | None:
    from core.endpoints import default_ray_address

    return default_ray_address()  # the `mor up` stack's head while it is up


def _address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        try:
            from cli.stack import stack_addresses

            address = stack_addresses().get("ray_dashboard")
        except Exception:
            address = None
    if not address:
        raise ValueError("--address: give the Ray job server, e.g. http://127.0.0.1:8265")
    try:  # send the Ray auth token if one is configured (the stack's head requires it)
        from cli.stack import enable_ray_token_auth

        enable_ray_token_auth()
    except Exception:
        pass
    return address


def _stack_tracking(spec, address: str):
    """A spec submitted to the `mor up` stack's head, with no tracking URI of its own (nor
    $MLFLOW_TRACKING_URI), is tracked on the stack's MLflow server."""
    if spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return spec
    from cli.stack import stack_addresses

    stack = stack_addresses()
    if not stack or stack["ray_dashboard"].rstrip("/") != address.rstrip("/"):
        return spec
    return spec.model_copy(
        update={"tracking": spec.tracking.model_copy(update={"uri": stack["mlflow"]})}
    )


def submit(args: argparse.Namespace) -> int:
    from sweeps import jobs

    spec = _spec(args.items)
    address = _address(args)
    job_id = jobs.submit(_stack_tracking(spec, address), address)
    print(job_id)
    if args.wait:
        while (state := jobs.status(job_id, address)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            time.sleep(2)
        print(f"[mor] job {job_id}: {state}")
        return 0 if state == "SUCCEEDED" else 1
    return 0


def job_status(args: argparse.Namespace) -> int:
    from sweeps import jobs

    print(json.dumps({"job_id": args.job_id, "status": jobs.status(args.job_id, _address(args))}))
    return 0


def job_logs(args: argparse.Namespace) -> int:
    from sweeps import jobs

    print(jobs.logs(args.job_id, _address(args)), end="")
    return 0


def job_stop(args: argparse.Namespace) -> int:
    from sweeps import jobs

    print(json.dumps({"job_id": args.job_id, "stopped": jobs.stop(args.job_id, _address(args))}))
    return 0
