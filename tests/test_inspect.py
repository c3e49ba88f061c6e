"""The ``mor`` command line and ``mor inspect``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_keys_and_vanilla_360m_params(capsys: pytest.CaptureFixture[str]) -> None:
    rep = _json(capsys, "smollm-360m")
    for key in (
        "preset", "config", "layer_map", "num_unique_layers", "recursion_layers", "parameters",
        "seq_len", "flops_per_token", "kv_cache_bytes_per_token",
    ):  # fmt: skip
        assert key in rep, key
    assert set(rep["parameters"]) >= {"total", "embedding", "non_embedding"}
    assert rep["parameters"]["non_embedding"] == pytest.approx(315e6, rel=0.01)
    assert rep["parameters"]["embedding"] == 49152 * 960
    assert rep["layer_map"] == list(range(32)) and rep["num_unique_layers"] == 32
    f = rep["flops_per_token"]
    assert set(f) >= {"forward", "forward_paper", "training", "inference_by_depth"}
    assert set(f["training"]) == {"exact", "paper"}
    assert f["training"]["exact"] == pytest.approx(3 * f["forward"]["total"])
    assert list(f["inference_by_depth"]) == ["1"]
    assert rep["kv_cache_bytes_per_token"]["shared"] is None
    assert rep["kv_cache_bytes_per_token"]["recursion_wise"] == 32 * 2 * 5 * 64 * 2
    assert rep["seq_len"] == 2048


@pytest.mark.parametrize(("n_r", "expected"), [(2, 167e6), (3, 118e6)])
def test_middle_cycle_params(capsys: pytest.CaptureFixture[str], n_r: int, expected: float) -> None:
    rep = _json(capsys, "smollm-360m", "sharing=middle_cycle", f"num_recursions={n_r}")
    assert rep["parameters"]["non_embedding"] == pytest.approx(expected, rel=0.01)
    assert rep["num_unique_layers"] == 2 + 30 // n_r
    assert sorted(rep["flops_per_token"]["inference_by_depth"]) == [
        str(d) for d in range(1, n_r + 1)
    ]
    kv = rep["kv_cache_bytes_per_token"]
    assert kv["shared"] < kv["recursion_wise"]


def test_seq_len_and_overrides_after_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "tiny", "--seq-len", "64", "--json", "sharing=cycle",
                 "num_recursions=2"]) == 0  # fmt: skip
    rep = json.loads(capsys.readouterr().out)
    assert rep["seq_len"] == 64 and rep["config"]["sharing"] == "cycle"


def test_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("preset: tiny\nsharing: middle_cycle\nnum_recursions: 2\n")
    rep = _json(capsys, "--config", str(path))
    assert rep["config"]["sharing"] == "middle_cycle" and rep["config"]["hidden_size"] == 128


def test_table_mentions_each_depth(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "smollm-360m-mor3"]) == 0
    out = capsys.readouterr().out
    for depth in (1, 2, 3):
        assert f"depth {depth}" in out
    for word in ("non-embedding", "embedding", "total", "recursion_wise", "shared", "paper"):
        assert word in out
    assert main(["inspect", "smollm-360m"]) == 0
    assert "n/a" in capsys.readouterr().out  # no shared KV without recursion


def test_list_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--list"]) == 0
    out = capsys.readouterr().out
    assert "smollm-360m" in out and "tiny-mor" in out


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["smollm-360m", "router=bogus"], "router"),
        (["smollm-360m", "sharing=middle_cycle", "num_recursions=4"], "num_layers"),
        (["smollm-360m", "num_recursions=3"], "num_recursions"),
        (["no-such-preset"], "preset"),
        (["tiny", "--seq-len", "0"], "seq_len"),
        ([], "preset"),
    ],
)
def test_bad_input_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str], field: str) -> None:
    assert main(["inspect", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err
    assert "Traceback" not in err


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["inspect", "tiny", "--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_console_script() -> None:
    exe = shutil.which("mor")
    cmd = [exe] if exe else [sys.executable, "-m", "cli.main"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
           os.environ.get("PYTHONPATH")]))}  # fmt: skip
    proc = subprocess.run(
        [*cmd, "inspect", "tiny", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["preset"] == "tiny" and rep["parameters"]["total"] > 0
