"""User-facing failures (issue 19, items 3 and 15): one clear line, never a raw traceback, never
a credential. Every test runs ``mor`` in-process (``cli.main.main``) and needs no Ray."""

from __future__ import annotations

import http.server
import json
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch

from cli.main import main
from mor.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config, load_pretrained, save_pretrained
from mor.config import build_config

SECRET = "s3cret-pw"
URI = f"http://alice:{SECRET}@mlflow.example.invalid:5000"


@pytest.fixture(autouse=True)
def _log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    logs = tmp_path / "logs"
    monkeypatch.setenv("MOR_LOG_DIR", str(logs))
    monkeypatch.delenv("MOR_DEBUG", raising=False)
    return logs


def _export(tmp_path: Path) -> Path:
    from mor.model import MoRModel

    cfg = build_config("micro", overrides=["num_layers=2", "max_seq_len=32", "vocab_size=64"])
    return save_pretrained(tmp_path / "export", cfg, MoRModel(cfg).state_dict())


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _tamper(export: Path, how: str) -> None:
    cfg_path, weights = export / CONFIG_FILE, export / WEIGHTS_FILE
    if how == "no-model-key":
        cfg_path.write_text(json.dumps({"meta": {}}))
    elif how == "not-json":
        cfg_path.write_text("{not json")
    elif how == "model-not-mapping":
        cfg_path.write_text(json.dumps({"model": [1, 2]}))
    elif how == "garbage-weights":
        weights.write_bytes(b"\x00garbage, not a torch file" * 10)
    elif how == "pickled-weights":
        weights.write_bytes(pickle.dumps(_Payload()))
    elif how == "payload-weights":  # torch.save's own zip format around a code payload
        torch.save({"w": _Payload()}, weights)


TAMPERS = [
    "no-model-key",
    "not-json",
    "model-not-mapping",
    "garbage-weights",
    "pickled-weights",
    "payload-weights",
]


@pytest.mark.parametrize("how", TAMPERS)
def test_tampered_export_is_a_clear_error(tmp_path: Path, how: str) -> None:
    """load_config/load_pretrained: a ValueError naming the file, never KeyError or pickle's."""
    export = _export(tmp_path)
    _tamper(export, how)
    with pytest.raises(ValueError) as info:
        load_pretrained(export)
    name = WEIGHTS_FILE if how.endswith("weights") else CONFIG_FILE
    assert str(export / name) in str(info.value) and "tampered" in str(info.value)


@pytest.mark.parametrize("how", ["no-model-key", "payload-weights"])
def test_mor_eval_tampered_export_exit_2(tmp_path: Path, capsys, how: str) -> None:
    export = _export(tmp_path)
    _tamper(export, how)
    assert main(["eval", str(export), "--no-mlflow", "--tasks", "mor_heldout_mc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and str(export) in err


def test_load_config_reads_a_good_export(tmp_path: Path) -> None:
    cfg, meta = load_config(_export(tmp_path))
    assert cfg.num_layers == 2 and meta == {}


def test_non_utf8_and_directory_configs_are_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model:\n  preset: \xff\xfe micro\n")
    for path in (bad, tmp_path):
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert str(path) in err


def _boom(args) -> int:
    raise RuntimeError(f"could not talk to {URI}/api\nsecond line of detail")


def test_internal_error_one_line_redacted_and_logged(
    monkeypatch: pytest.MonkeyPatch, capsys, _log_dir: Path
) -> None:
    import cli.inspect_cmd

    monkeypatch.setattr(cli.inspect_cmd, "run", _boom)
    assert main(["inspect", "tiny"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: RuntimeError: could not talk to http://***@"), err
    assert "second line" not in err and "Traceback" not in err and SECRET not in err
    assert len(lines) == 2 and "--debug" in lines[1]
    (log,) = list(_log_dir.iterdir())
    assert str(log) in lines[1]
    text = log.read_text()
    assert "Traceback" in text and "_boom" in text and SECRET not in text


def test_debug_flag_and_env_print_the_traceback(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import cli.inspect_cmd

    monkeypatch.setattr(cli.inspect_cmd, "run", _boom)
    assert main(["--debug", "inspect", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "_boom" in err and SECRET not in err
    monkeypatch.setenv("MOR_DEBUG", "1")
    assert main(["inspect", "tiny"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import cli.inspect_cmd

    def interrupted(args) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.inspect_cmd, "run", interrupted)
    assert main(["inspect", "tiny"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_user_errors_of_other_types_exit_2(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import cli.inspect_cmd

    def denied(args) -> int:
        raise PermissionError(13, "Permission denied", f"{URI}/x")

    monkeypatch.setattr(cli.inspect_cmd, "run", denied)
    assert main(["inspect", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and SECRET not in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- item 3
def test_submission_carries_no_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """What `mor sweep submit` hands Ray's Jobs API (readable by anyone holding the token, and
    written to Ray's logs): the tracking URI without user:password, and a warning that the
    cluster must provide MLflow's credentials itself."""
    from sweeps.jobs import build_submission
    from sweeps.spec import SweepSpec
    from tests.conftest import tiny_spec_dict

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no Ray import, no token lookup
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    spec = SweepSpec.model_validate(tiny_spec_dict(tmp_path, "creds", tracking={"uri": URI}))
    sub = build_submission(spec, "http://127.0.0.1:8265")
    assert set(sub) == {"entrypoint", "runtime_env", "metadata"}
    assert SECRET not in json.dumps(sub) and "alice" not in json.dumps(sub)
    shipped = json.loads(sub["runtime_env"]["env_vars"]["MOR_SWEEP_SPEC"])
    assert shipped["tracking"]["uri"] == "http://mlflow.example.invalid:5000"
    err = capsys.readouterr().err
    assert "MLFLOW_TRACKING_USERNAME" in err and SECRET not in err


def test_unreachable_tracking_uri_error_is_redacted() -> None:
    """A tracking URI carrying credentials whose server does not answer."""
    from mor.overrides import ConfigError
    from trainers.tracking import check_reachable

    with pytest.raises(ConfigError) as info:
        check_reachable(URI)
    assert "mlflow.example.invalid" in str(info.value) and SECRET not in str(info.value)


class _HealthOnly(http.server.BaseHTTPRequestHandler):
    """Answers /health, refuses the MLflow API: reachable, then unusable."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 403)
        self.end_headers()
        self.wfile.write(b"OK" if self.path == "/health" else b"forbidden")

    def log_message(self, *args) -> None:
        pass


def test_connect_errors_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real server that answers /health but refuses the API: the health probe reaches it
    (urllib cannot parse user:password@ in a URL) and the error names the URI redacted."""
    from mor.overrides import ConfigError
    from trainers.tracking import connect

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://alice:{SECRET}@127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ConfigError) as info:
            connect(uri, "exp")
    finally:
        server.shutdown()
    msg = str(info.value)
    # It answered /health: the probe must not mistake "alice:pw@127.0.0.1" for a host name.
    assert "does not answer" not in msg, msg
    assert "http://***@127.0.0.1" in msg and SECRET not in msg, msg


def test_train_summary_prints_no_credentials() -> None:
    """The run line `mor train` prints: the URI without user:password."""
    from cli.train_cmd import describe_run

    class Plan:
        total_steps, tokens_per_step, run_id, resumed_run = 3, 64, "abc", False
        tracking_uri = URI

    line = describe_run("r", Plan())
    assert SECRET not in line and "mlflow.example.invalid" in line
