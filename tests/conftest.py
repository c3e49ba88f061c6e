"""Shared fixtures: one tiny real sweep (Ray Tune + Train + evals + MLflow) for several modules."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY_BASE = {
    "model": {"preset": "micro", "num_layers": 6, "max_seq_len": 64},
    "data": {"source": "default", "vocab_size": 512, "seq_len": 64, "max_documents": 150},
    "batch": {"micro_batch_size": 4},
    "checkpoint": {"every_steps": 20},
    "eval": {"every_steps": 1000, "batches": 2},
    "log_every_steps": 20,
}
TINY_VARIANTS = [
    {"name": "vanilla", "model.sharing": "none", "model.num_recursions": 1},
    {
        "name": "mor-ec",
        "model.sharing": "middle_cycle",
        "model.num_recursions": 2,
        "model.router": "expert_choice",
    },
]
# `mor train` as a user types it, on the smallest model and data (the tiny sweep's base).
TINY_TRAIN = [
    "model.preset=micro", "model.num_layers=6", "model.max_seq_len=64",
    "data.vocab_size=512", "data.seq_len=64", "data.max_documents=150",
    "batch.micro_batch_size=4", "budget.steps=3", "eval.every_steps=1000", "eval.batches=2",
]  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def no_user_stack(tmp_path_factory: pytest.TempPathFactory):
    """The suite never talks to a `mor up` stack the developer has running (~/.mor/stack):
    with one healthy, commands rightly default to it, and tests that expect a local sqlite
    store or a fresh local Ray would use it. Tests that want a stack start their own."""
    saved = os.environ.get("MOR_STACK_DIR")
    os.environ["MOR_STACK_DIR"] = str(tmp_path_factory.mktemp("no-stack"))
    yield
    if saved is None:
        os.environ.pop("MOR_STACK_DIR", None)
    else:
        os.environ["MOR_STACK_DIR"] = saved


def tiny_spec_dict(tmp: Path, name: str, **extra: object) -> dict:
    d = {
        "name": name,
        "storage_path": str(tmp),
        "base": TINY_BASE,
        "variants": TINY_VARIANTS,
        "budgets": [6e9],
        "eval": {"limit": 10, "tasks": ["mor_heldout_mc"]},
        "tracking": {"experiment": "sweeps-test"},
    }
    d.update(extra)
    return d


CONSOLE_FILE = "console.txt"
"""The tiny sweep's whole console output, beside its ``outputs`` folder."""
DIVERGING = {
    "name": "mor-tc-diverges",
    "model.sharing": "middle_cycle",
    "model.num_recursions": 2,
    "model.router": "token_choice",
    "fault_injection.nan_at_step": 3,
}


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory):
    """A finished sweep: vanilla and MoR expert-choice train and evaluate; a third trial's loss
    turns NaN (a diverging run), which must stop only that trial."""
    import ray

    from core.quiet import configure, ray_init_kwargs
    from mor.overrides import validate
    from sweeps.driver import run_sweep
    from sweeps.spec import SweepSpec

    tmp = tmp_path_factory.mktemp("tiny_sweep")
    # A relative storage path, as users write it: it must resolve against the driver's
    # working directory, not each Tune trial's.
    data = tiny_spec_dict(tmp, "tiny", variants=[*TINY_VARIANTS, DIVERGING])
    data["storage_path"] = "outputs"
    data["budgets"] = [2e9]  # ~15 steps a trial: the pipeline, not the learning, is tested
    data["eval"]["topk"] = True  # the non-causal point too: kept off the front, gap reported
    spec = validate(SweepSpec, data)
    cwd, env = os.getcwd(), dict(os.environ)
    os.chdir(tmp)
    console = io.StringIO()  # what `mor sweep run` would show: ours, Tune's and Ray's lines
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            configure()  # the console mode `mor sweep run` sets before Ray starts
            ray.init(address="local", num_cpus=2, configure_logging=False, **ray_init_kwargs())
            try:
                result = run_sweep(spec)
            finally:
                ray.shutdown()
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        (tmp / CONSOLE_FILE).write_text(console.getvalue())
    return spec, result, tmp / "outputs"


# --------------------------------------------------------------------------- object storage
S3_BUCKET = "mor-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> str:
    """An S3 endpoint with an empty bucket; the AWS_* variables point at it meanwhile."""
    import boto3

    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield f"s3://{S3_BUCKET}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- tracking server
def start_mlflow(port: int, root: Path, artifacts: str | None = None) -> subprocess.Popen:
    """A real MLflow server on 127.0.0.1:``port`` with its store under ``root``; artifacts in
    ``root/art``, or served by the server from ``artifacts`` (e.g. an s3:// URI)."""
    import urllib.request

    where = (
        ["--serve-artifacts", "--artifacts-destination", artifacts]
        if artifacts
        else ["--default-artifact-root", str(root / "art")]
    )
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", *where,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240  # creating the store's tables takes a while on a busy machine
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                stop(proc)
                raise RuntimeError("the MLflow server did not start") from None
            time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    """Kill a server started in its own session, and its workers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)
    proc.wait()
