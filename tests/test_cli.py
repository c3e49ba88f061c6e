"""The ``mor`` command's help, config listing and config errors, run as a user types them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def mor(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The installed ``mor`` executable (else ``python -m cli.main``)."""
    exe = Path(sys.executable).with_name("mor")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "cli.main"]
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_mor_help_as_typed() -> None:
    proc = mor("--help")
    assert proc.returncode == 0, proc.stderr
    assert (
        "examples:" in proc.stdout and "mor sweep run sweeps/configs/quickstart.yaml" in proc.stdout
    )


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (("train",), ["examples:", "mor train --print-config", "--verbose"]),
        (("sweep", "resume"), ["examples:", "(default: outputs)", "the sweep's name"]),
        (("sweep", "status"), ["examples:", "the id `mor sweep submit` printed"]),
        (("up",), ["examples:", "(default: 240.0)", "Start a local Ray head"]),
        (("status",), ["examples:", "mor status --json"]),
        (("down",), ["examples:", "Stop the processes `mor up` started"]),
        (("eval",), ["examples:", "(default: 16)", "(default: cpu)"]),
    ],
)
def test_help_has_description_defaults_and_examples(command, shown, capsys) -> None:
    """Every page in-process (the same parser the executable builds; no process per page)."""
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    for text in shown:
        assert text in out, (command, text, out)


def test_every_command_has_help_and_examples() -> None:
    """No option without a help text (so its default shows), no page without examples."""
    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        missing.extend([] if parser.epilog else [f"{name}: examples"])
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    walk(p, f"{name} {sub}")
            elif not action.help:
                missing.append(f"{name}: {action.dest}")

    walk(build_parser(), "mor")
    assert not missing


def test_print_config_lists_fields_with_docstrings(tmp_path: Path) -> None:
    """Values after the overrides, each with its docstring; nothing is started or written."""
    proc = mor("train", "model.sharing=cycle", "model.num_recursions=3", "--print-config",
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = lines.index('model.sharing = "cycle"')
    assert "How unrolled layers map to unique layers" in lines[at + 1]
    assert "[optim]" in lines and "optim.lr = 0.003" in lines
    assert "Peak learning rate of AdamW." in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "named", "suggestion"),
    [
        (("train", "model.shring=cycle"), "model.shring", "did you mean model.sharing?"),
        (
            ("sweep", "run", str(ROOT / "sweeps/configs/quickstart.yaml"), "eval.limt=5"),
            "eval.limt",
            "did you mean eval.limit?",
        ),
    ],
)
def test_unknown_key_suggests_the_nearest(tmp_path: Path, args, named, suggestion) -> None:
    """Exit 2 before anything starts, naming the key and the valid key it is closest to."""
    proc = mor(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"{named}: unknown key" in proc.stderr and suggestion in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_report_of_nothing_creates_nothing(tmp_path: Path) -> None:
    """A read-only command in an empty folder, no stack, no tracking URI: a clear error, and
    no MLflow database (MLflow would create one on connecting), folder or report."""
    cwd, stack = tmp_path / "cwd", tmp_path / "no-stack"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["MOR_STACK_DIR"] = str(stack)
    proc = mor("report", "NOSUCH", cwd=cwd, env=env)
    assert proc.returncode == 2, proc.stderr
    store = cwd / "outputs" / "mlflow.db"
    assert f"no sweep NOSUCH: no tracking store at {store}" in proc.stderr
    assert list(cwd.iterdir()) == [] and not stack.exists()


def test_eval_of_an_mlflow_model_without_a_store_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`mor eval runs:/...` finds no tracking store: a clear error, and no MLflow database."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["eval", "runs:/0123456789abcdef/model", "--no-mlflow"]) == 2
    assert f"no tracking store at {tmp_path / 'outputs' / 'mlflow.db'}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


_TEARDOWN = """
import os, signal, sys, time, weakref
sys.path.insert(0, os.getcwd())

def sigterm_handler(signum, frame):  # what Ray's worker installs (ray._private.worker)
    raise SystemExit(1)

signal.signal(signal.SIGTERM, sigterm_handler)
if sys.argv[1] == "hook":
    from core.quiet import honour_lost_sigterm
    honour_lost_sigterm()

class Item: pass
item = Item()
# The signal is raised inside a weakref callback, as when Tune tears a trial's actor down.
ref = weakref.ref(item, lambda _: signal.raise_signal(signal.SIGTERM))
del item
time.sleep(0.5)
print("still running")
"""


@pytest.mark.parametrize("mode", ["hook", "plain"])
def test_sigterm_in_a_weakref_callback_ends_the_process(mode: str) -> None:
    """Ray's SIGTERM landing in a weakref callback: without the hook Python prints "Exception
    ignored ... SystemExit" and the process lives on; with it, the process exits, silently."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _TEARDOWN, mode], cwd=repo, capture_output=True, text=True
    )
    if mode == "plain":  # the problem is real: the exit is lost and a traceback printed
        assert out.returncode == 0 and "still running" in out.stdout
        assert "Exception ignored" in out.stderr and "SystemExit" in out.stderr
    else:
        assert out.returncode == 1 and "still running" not in out.stdout
        assert out.stderr == ""


_MANY_ACTORS = """
import time, ray
from core.quiet import configure, ray_init_kwargs
configure()  # what `mor sweep run` / `mor train` do before Ray starts
ray.init(address="local", num_cpus=2, **ray_init_kwargs())
@ray.remote(num_cpus=0)
class Idle:
    def pid(self):
        import os
        return os.getpid()
actors = [Idle.remote() for _ in range(12)]
print(len(set(ray.get([a.pid.remote() for a in actors]))), "actors")
time.sleep(8)  # the raylet's warning reaches the driver through Ray's log monitor
ray.shutdown()
"""


def test_many_zero_cpu_actors_do_not_warn() -> None:
    """Two trials on 2 cores are 6+ zero-CPU actors: by default the raylet warns at 8 worker
    processes ("4x the maximum expected startup concurrency (2)"); the console mode raises
    the threshold, so 12 actors on 2 CPUs start without the warning."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_maximum_startup_concurrency"}
    out = subprocess.run(
        [sys.executable, "-c", _MANY_ACTORS],
        cwd=repo, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "12 actors" in out.stdout
    assert "PYTHON worker processes" not in out.stdout + out.stderr
