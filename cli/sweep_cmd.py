"""``mor sweep run|resume|submit|status|logs|stop``: Ray Tune sweeps, locally or on a cluster."""

from __future__ import annotations

import argparse
import json
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    from cli.help import HelpFormatter, examples

    p = subparsers.add_parser(
        "sweep",
        help="run, resume or submit a Ray Tune sweep",
        description="Ray Tune sweeps of MoR configurations, locally or on a Ray cluster.\n\n"
        "A sweep spec (YAML) lists variants x budgets or a search space; every trial is a\n"
        "`mor train` run, evaluated at every depth and tracked under one MLflow parent run.",
        epilog=examples(
            [
                "mor sweep run sweeps/configs/quickstart.yaml",
                "mor sweep resume quickstart",
                "mor sweep submit sweeps/configs/quickstart.yaml --wait",
            ]
        ),
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="sweep_command", metavar="ACTION", required=True)
    _register_run_and_resume(sub)
    _register_jobs(sub)


def _register_run_and_resume(sub: argparse._SubParsersAction) -> None:
    from cli.help import add_command, add_verbose

    r = add_command(
        sub,
        "run",
        help="run a sweep spec to the end (local Ray, or --address)",
        example_lines=[
            "mor sweep run sweeps/configs/quickstart.yaml",
            "mor sweep run sweeps/configs/quickstart.yaml budgets=[1e12] eval.limit=50",
        ],
    )
    r.add_argument(
        "items",
        nargs="*",
        metavar="SPEC.yaml|key=value",
        help="the sweep spec, then dotted overrides of its fields (e.g. base.optim.lr=1e-3)",
    )
    r.add_argument(
        "--address",
        help="an existing Ray cluster (default: $RAY_ADDRESS, else the `mor up` stack, "
        "else a local Ray started on demand)",
    )
    r.add_argument("--spec-from-env", action="store_true", help=argparse.SUPPRESS)
    add_verbose(r)
    r.set_defaults(func=run, extra_dest="items")

    rs = add_command(
        sub,
        "resume",
        help="continue an interrupted sweep without redoing finished trials",
        example_lines=[
            "mor sweep resume quickstart",
            "mor sweep resume my-sweep --storage-path /data/sweeps",
            "mor sweep resume my-sweep --storage-path s3://my-bucket/mor",
        ],
    )
    rs.add_argument("name", help="the sweep's name (its spec's `name:`)")
    rs.add_argument(
        "--storage-path",
        default="outputs",
        help="the sweep's storage_path (a folder or an s3:// URI), where it saved state",
    )
    rs.add_argument("--address", help="Ray cluster address (default: as for `mor sweep run`)")
    add_verbose(rs)
    rs.set_defaults(func=resume)


def _register_jobs(sub: argparse._SubParsersAction) -> None:
    """submit, then status/logs/stop of a submitted job."""
    from cli.help import add_command

    s = add_command(
        sub,
        "submit",
        help="submit a sweep to a Ray cluster as a Ray Job (prints the job id)",
        example_lines=[
            "mor sweep submit sweeps/configs/quickstart.yaml            # to the `mor up` stack",
            "mor sweep submit sweeps/configs/search.yaml --address http://HEAD:8265 --wait",
        ],
    )
    s.add_argument("items", nargs="*", metavar="SPEC.yaml|key=value", help="as for `sweep run`")
    s.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard/job address, e.g. http://HEAD:8265 "
        "(default: $RAY_API_SERVER_ADDRESS or the `mor up` stack)",
    )
    s.add_argument("--wait", action="store_true", help="follow the job until it ends")
    s.set_defaults(func=submit, extra_dest="items")

    for name, fn, text in (
        ("status", job_status, "status of a submitted sweep job (one JSON line)"),
        ("logs", job_logs, "console output of a submitted sweep job so far"),
        ("stop", job_stop, "stop a submitted sweep job (its finished trials stay in MLflow)"),
    ):
        q = add_command(
            sub,
            name,
            help=text,
            example_lines=[
                f"mor sweep {name} raysubmit_XXXXXXXX",
                f"mor sweep {name} raysubmit_XXXXXXXX --address http://HEAD:8265",
            ],
        )
        q.add_argument("job_id", help="the id `mor sweep submit` printed (raysubmit_...)")
        q.add_argument(
            "--address",
            default=None,
            help="the Ray job server (default: $RAY_API_SERVER_ADDRESS or the `mor up` stack)",
        )
        q.set_defaults(func=fn)


def _spec(items: list[str]):
    """The spec file and its overrides, field by field; ``plan_sweep`` checks its trials."""
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
    outcome = getattr(res, "outcome", {}) or {}
    for stop in outcome.get("stopped_early", []):
        print(f"[mor]   stopped early by ASHA at the {stop['rung_flops']:.3g}-FLOPs rung: "
              f"trial {stop['trial']} (val loss {stop['metric']:.4g})")  # fmt: skip
    if outcome.get("skipped"):
        print(f"[mor]   {len(outcome['skipped'])} invalid draw(s) skipped, never started "
              f"(reasons: {res.summary_csv.parent / 'skipped.jsonl'})")  # fmt: skip
    if outcome.get("best"):
        from sweeps.plan import trial_title

        b = outcome["best"]
        print(f"[mor] best: {trial_title(b['label'])}: {b['metric']} = {b['value']:.4g}")
    if outcome:
        print(f"[mor] training FLOPs spent: {outcome['train_flops_spent']:.3g}")
    print(f"[mor] summary table: {res.summary_csv}")
    artifacts = list(getattr(res, "artifacts", []))
    page = next((a for a in artifacts if a.suffix == ".html"), None)
    if page is not None:
        print(f"[mor] report: {page}")
        pngs = ", ".join(a.name for a in artifacts if a.suffix == ".png")
        print(f"[mor] figures (PNG and SVG) beside it: {pngs}")
    from core.endpoints import strip_credentials

    uri = strip_credentials(res.tracking_uri)
    if uri.startswith("sqlite:///"):
        print(f"[mor] browse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    else:
        print(f"[mor] browse: {uri}")
    print(f"[mor] MLflow parent run: {res.parent_run_id}")


def run(args: argparse.Namespace) -> int:
    from core.quiet import configure
    from sweeps.plan import plan_sweep

    configure(args.verbose)  # before Ray starts: its processes inherit the mode

    if args.spec_from_env:
        from sweeps.jobs import spec_from_env

        spec = spec_from_env()
    else:
        spec = _spec(args.items)
    plan = plan_sweep(spec)  # every trial validated, once, before Ray starts
    from sweeps.driver import run_sweep  # torch, Ray, MLflow: after the spec is known good

    res = run_sweep(plan, address=args.address)  # None: core.endpoints decides
    _print_result(res)
    return 1 if res.errors else 0


def resume(args: argparse.Namespace) -> int:
    from core.quiet import configure
    from sweeps.driver import load_saved_spec, run_sweep

    configure(args.verbose)
    from sweeps.plan import plan_sweep

    plan = plan_sweep(load_saved_spec(args.name, args.storage_path))
    res = run_sweep(plan, resume=True, address=args.address)
    _print_result(res)
    return 1 if res.errors else 0


def _job_server(args: argparse.Namespace) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else the `mor up` stack's job server; the
    Ray token auth of this process is on for it (the stack's head requires it)."""
    from core.endpoints import resolve_endpoints

    address = resolve_endpoints(job_server=args.address, target="jobs").job_server
    if not address:
        raise ValueError("--address: give the Ray job server, e.g. http://127.0.0.1:8265")
    return address


def submit(args: argparse.Namespace) -> int:
    from sweeps import jobs
    from sweeps.plan import plan_sweep

    plan = plan_sweep(_spec(args.items))  # every trial validated before the cluster is asked
    address = _job_server(args)
    # Tracked where core.endpoints says for this job server: the stack's MLflow when it is
    # the stack's head, else an absolute sqlite store (the job runs in another directory).
    job_id = jobs.submit(plan, address)
    print(job_id)
    if args.wait:
        while (state := jobs.status(job_id, address)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            time.sleep(2)
        print(f"[mor] job {job_id}: {state}")
        return 0 if state == "SUCCEEDED" else 1
    return 0


def job_status(args: argparse.Namespace) -> int:
    from sweeps import jobs

    status = jobs.status(args.job_id, _job_server(args))
    print(json.dumps({"job_id": args.job_id, "status": status}))
    return 0


def job_logs(args: argparse.Namespace) -> int:
    from sweeps import jobs

    print(jobs.logs(args.job_id, _job_server(args)), end="")
    return 0


def job_stop(args: argparse.Namespace) -> int:
    from sweeps import jobs

    print(json.dumps({"job_id": args.job_id, "stopped": jobs.stop(args.job_id, _job_server(args))}))
    return 0
